"""The Kedro project end to end on the synthetic sample (the quick environment), in process.

One ``kedro run --env quick`` (a KedroSession) trains, calibrates and evaluates once for the
whole module; the tests then check its outputs, rerun single pipelines on it, and one test
drives the real ``kedro`` command line.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, make_project
from sklearn.metrics import roc_auc_score

from anomaly_ae.model import AutoencoderConfig
from anomaly_ae.model.checkpoint import checkpoint_fingerprint, load_checkpoint
from anomaly_ae.scoring import MapSettings

pytestmark = pytest.mark.slow

NS = "bottle"  # the quick environment's category: every dataset lives in this namespace
EXPECTED_PIPELINES = {
    "__default__",
    "data_ingestion",
    "data_processing",
    "training",
    "calibrate",
    "evaluate",
    "loss_study",
    "predict",
    "summary",
    "export",
}


def _json(path) -> dict:
    return json.loads(path.read_text())


def test_registry_has_one_pipeline_per_job(quick):
    from conftest import _cwd
    from kedro.framework.project import pipelines as project_pipelines

    from anomaly_ae import run_params

    with _cwd(quick.path):
        run_params.remember({"data": {"category": NS}, "loss_study": {"variants": ["mse", "ssim", "hybrid"]}})
        project_pipelines.configure("anomaly_ae.pipeline_registry")  # all of them, as `kedro registry list`
        pipelines = dict(project_pipelines)
    assert set(pipelines) == EXPECTED_PIPELINES
    default = pipelines["__default__"]
    assert {node.namespace for node in default.nodes} == {NS, None}  # None: the summary
    names = [node.name for node in default.nodes]  # topological order
    assert (
        names.index(f"{NS}.train_model") < names.index(f"{NS}.select_map") < names.index(f"{NS}.resolve_map")
    )
    assert f"{NS}.calibrated_map" in pipelines["calibrate"].all_outputs()
    assert f"{NS}.test_images" not in pipelines["calibrate"].all_inputs()  # never reads the test set


def test_quick_run_trains_and_evaluates_with_the_calibrated_map(quick):
    history = pd.read_csv(quick.latest(f"data/07_model_output/{NS}/training_history.csv"))
    assert list(history["epoch"]) == list(range(1, 21))
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]

    checkpoint = load_checkpoint(quick.latest(f"data/06_models/{NS}/model_checkpoint.pt"))
    chosen = _json(quick.latest(f"data/07_model_output/{NS}/calibrated_map.json"))
    threshold = _json(quick.latest(f"data/07_model_output/{NS}/decision_threshold.json"))
    metrics = _json(quick.latest(f"data/08_reporting/{NS}/evaluation_metrics.json"))
    assert chosen["checkpoint_fingerprint"] == checkpoint_fingerprint(checkpoint)
    assert threshold["checkpoint_fingerprint"] == checkpoint_fingerprint(checkpoint)
    assert metrics["map_source"] == "calibrated"
    assert metrics["anomaly_map"] == chosen["map_settings"] == threshold["score"]
    assert chosen["map_settings"] != MapSettings().to_dict()  # the rule moved off the paper's map

    table = pd.read_csv(quick.latest(f"data/07_model_output/{NS}/ssim_table.csv"))
    assert len(table) == 8 + 2 * 6  # synthetic defaults: 8 good, 6 per defect type
    # the reported metrics are those of the scores in the table
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(table["label"], table["score"]), abs=1e-9)
    assert metrics["threshold"] == threshold["value"]
    assert list(table["is_anomalous"]) == list(table["score"] > threshold["value"])
    assert metrics["data_source"] == "synthetic"

    table2 = pd.read_csv(quick.latest(f"data/08_reporting/{NS}/table2.csv"))
    assert "paper protocol" in set(table2["subset"])
    for figure in (
        "figure1",
        "image_roc",
        "pixel_roc",
        "ssim_histogram",
        "score_histogram",
        "loss_curve",
        "hardest_cases",
        "place_map",
    ):
        assert quick.latest(f"data/08_reporting/{NS}/{figure}.png").stat().st_size > 1000
    assert len(list(quick.latest(f"data/08_reporting/{NS}/heatmaps").rglob("*.png"))) == len(table)
    report = quick.latest(f"data/08_reporting/{NS}/report.html").read_text()
    assert "SYNTHETIC DATA" in report and "Table II" in report and "Figure 1" in report
    assert "Hardest cases" in report and "Where the good images vary most" in report
    assert "which settings and why" in report and chosen["setting"] in report
    # the network the numbers come from, as the checkpoint holds it (tiles included)
    model_line = AutoencoderConfig.from_dict(checkpoint["model_config"]).describe()
    assert model_line == "paper_table1, 128 px" and f"model <b>{model_line}</b>" in report

    # per test defect type, in the CSV, the JSON and the report
    per_type = pd.read_csv(quick.latest(f"data/08_reporting/{NS}/defect_type_table.csv"))
    assert sorted(per_type["defect_type"]) == sorted(set(table["defect_type"]) - {"good"})
    for row in per_type.itertuples():
        own = table[(table["defect_type"] == row.defect_type) | (table["label"] == 0)]
        assert row.image_auroc == pytest.approx(roc_auc_score(own["label"], own["score"]), abs=1e-9)
    assert [r["defect_type"] for r in metrics["per_defect_type"]] == list(per_type["defect_type"])
    assert "Per defect type" in report

    # the grid scored on the real test set beside the synthetic scores, with Spearman's rho
    calibration = pd.read_csv(quick.latest(f"data/07_model_output/{NS}/calibration_table.csv"))
    agreement = pd.read_csv(quick.latest(f"data/08_reporting/{NS}/grid_agreement.csv"))
    assert len(agreement) == len(calibration)
    assert (
        agreement["real_image_auroc"].between(0, 1).all()
        and agreement["real_pixel_auroc"].between(0, 1).all()
    )
    in_use = agreement.set_index("setting").loc[chosen["detection_setting"]]  # the image score's map
    assert in_use["real_image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-4)
    assert "Spearman" in report

    # where the image score comes from: the grid and the metrics compute the same at-defect
    # AUROC for the map in use; the synthetic sample's labels are about its defects only
    assert in_use["real_image_auroc_at_defect"] == pytest.approx(metrics["image_auroc_at_defect"], abs=1e-4)
    assert metrics["image_auroc_off_defect"] < 0.75
    assert {"image_auroc_at_defect", "image_auroc_off_defect"} <= set(per_type.columns)
    assert "Where does the image score come from?" in report and "the label leaks" not in report


def test_the_calibration_benchmark_times_what_the_pipeline_runs(quick, monkeypatch):
    """``python -m anomaly_ae.benchmark --calibration``: the calibrate pipeline's nodes on the
    cached arrays, with the project's parameters, make the quick run's own choice."""
    from anomaly_ae import benchmark

    chosen = _json(quick.latest(f"data/07_model_output/{NS}/calibrated_map.json"))
    monkeypatch.chdir(quick.path)
    result = benchmark.main(
        [
            "--calibration",
            f"data/05_model_input/{NS}",
            "--checkpoint",
            str(quick.latest(f"data/06_models/{NS}/model_checkpoint.pt")),
            "--json",
        ]
    )
    assert result["settings"] == chosen["n_settings"] == 1512
    assert result["chosen"] == chosen["setting"]
    assert result["calibration_seconds"] > 0


def test_calibration_table_and_rule(quick):
    table = pd.read_csv(quick.latest(f"data/07_model_output/{NS}/calibration_table.csv"))
    chosen = _json(quick.latest(f"data/07_model_output/{NS}/calibrated_map.json"))
    assert len(table) == 1512 == chosen["n_settings"]  # conf/base: shift_tolerance, memory_pool [0]
    assert table["is_paper"].sum() == 1 and table["is_selected"].sum() == 1
    assert list(table["rank"]) == list(range(1, 1513))
    assert table["selection_score"].is_monotonic_decreasing
    selected = table[table["is_selected"]].iloc[0]
    best = table["selection_score"].max()
    tied = table[table["selection_score"] >= best - chosen["tie_tolerance"]]
    assert selected["levers_changed"] == tied["levers_changed"].min()
    assert json.loads(selected["map_settings"]) == {**chosen["map_settings"], "localisation": None}
    assert chosen["detection_setting"] == selected["setting"]
    # the heat map: the best synthetic pixel AUROC, ties as the rule's; none when it is the same map
    assert chosen["separate_localisation"] and table["is_localisation"].sum() == 1
    located = table[table["is_localisation"]].iloc[0]
    assert located["syn_pixel_auroc"] >= table["syn_pixel_auroc"].max() - chosen["tie_tolerance"]
    assert chosen["localisation_syn_pixel_auroc"] == pytest.approx(located["syn_pixel_auroc"])
    heat = MapSettings.from_dict(json.loads(located["map_settings"]))
    assert chosen["localisation_setting"] == heat.describe_map()
    assert chosen["map_settings"]["localisation"] is not None  # always spelt out: the same MLflow keys
    if MapSettings.from_dict(chosen["map_settings"]).localisation is None:
        assert heat.map_part() == MapSettings.from_dict(chosen["map_settings"]).map_part()
    else:
        assert MapSettings.from_dict(chosen["map_settings"]).localisation == heat.map_part()
    assert selected["selection_score"] == pytest.approx(
        (selected["syn_image_auroc"] + selected["syn_pixel_auroc"]) / 2
    )
    assert {"syn_image_auroc_blob", "syn_image_auroc_scratch", "syn_image_auroc_patch"} <= set(table.columns)


def test_mlflow_runs_hold_params_metrics_and_the_calibration(quick):
    with sqlite3.connect(quick.path / "mlflow.db") as db:
        (top,) = db.execute("select run_uuid from runs where name='__default__'").fetchone()
        top_tags = dict(db.execute("select key, value from tags where run_uuid=?", (top,)))
        children = db.execute(
            "select r.name, r.run_uuid, r.status from runs r join tags t on r.run_uuid = t.run_uuid "
            "where t.key = 'mlflow.parentRunId' and t.value = ?",
            (top,),
        ).fetchall()
        assert [(name, status) for name, _, status in children] == [(NS, "FINISHED")]
        child = children[0][1]
        params = dict(db.execute("select key, value from params where run_uuid=?", (child,)))
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (child,)))
        steps = db.execute(
            "select step, timestamp from metrics where run_uuid=? and key='train_loss' order by step",
            (child,),
        ).fetchall()
        logged = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?", (child,))}
    assert params["training.learning_rate"] == "0.002" and params["training.epochs"] == "20"
    chosen = _json(quick.latest(f"data/07_model_output/{NS}/calibrated_map.json"))
    assert params["calibration.chosen.setting"] == chosen["setting"]
    assert [s for s, _ in steps] == list(range(1, 21))
    stamps = [t for _, t in steps]
    assert stamps == sorted(set(stamps)), stamps  # logged live, as each epoch ended
    assert tags["data_source"] == "synthetic" and tags["category"] == NS and tags["git_commit"]
    # the version folder the run wrote (retention never deletes it while the run is RUNNING)
    written = quick.latest(f"data/06_models/{NS}/model_checkpoint.pt").parent.name
    assert top_tags["anomaly_ae.save_version"] == written
    assert {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold", "val_loss"} <= logged
    assert {"best_epoch", "best_val_loss", "epoch_seconds"} <= logged
    # the held-out synthetic kinds, per kind, to compare runs by kind
    assert {"stress_image_auroc.all", "stress_image_auroc.spot", "stress_pixel_auroc.thin_line"} <= logged
    artifacts = {
        p.relative_to(quick.path / "mlruns").parts[-2] for p in (quick.path / "mlruns").rglob("*.csv")
    }
    assert "calibration" in artifacts
    # the weights once: the logged checkpoint has no training state, the versioned file has it
    logged_checkpoints = list((quick.path / "mlruns" / "1" / child).rglob("checkpoints/model_checkpoint.pt"))
    versioned = sorted(
        (quick.path / f"data/06_models/{NS}/model_checkpoint.pt").glob("*/model_checkpoint.pt")
    )[0]
    assert len(logged_checkpoints) == 1
    slim, full = load_checkpoint(logged_checkpoints[0]), load_checkpoint(versioned)
    assert "optimizer_state" not in slim and full["optimizer_state"]
    assert checkpoint_fingerprint(slim) == checkpoint_fingerprint(full)
    assert logged_checkpoints[0].stat().st_size < 0.5 * versioned.stat().st_size


def test_evaluate_with_the_papers_map(quick):
    # conf/paper's one setting on the quick project (whose cached inputs are 128 px)
    quick.session_run(pipeline="evaluate", env="quick", params={"evaluation": {"map": "configured"}})
    metrics = _json(quick.latest(f"data/08_reporting/{NS}/evaluation_metrics.json"))
    assert metrics["map_source"] == "configured"
    assert metrics["anomaly_map"] == MapSettings().to_dict()  # the paper's map, as in conf/base
    report = quick.latest(f"data/08_reporting/{NS}/report.html").read_text()
    assert "Calibration would have chosen" in report
    assert len(list((quick.path / f"data/08_reporting/{NS}/evaluation_metrics.json").iterdir())) >= 2


def test_a_run_evaluates_the_model_it_trained_not_a_newer_one(quick):
    """Another run (simulated: a newer checkpoint version appears on disk) must not be what
    this run calibrates and evaluates: its outputs are pinned to its own save version."""
    import torch

    from anomaly_ae.model import AutoencoderConfig, build_model
    from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

    folder = quick.path / f"data/06_models/{NS}/model_checkpoint.pt"
    intruder = folder / "9999-12-31T23.59.59.999Z"
    intruder.mkdir()
    torch.manual_seed(123)
    other = build_checkpoint(
        build_model(AutoencoderConfig()), None, epoch=1, history=[], config=TrainingConfig(compile=False)
    )
    torch.save(other, intruder / "model_checkpoint.pt")
    try:
        quick.session_run(pipeline="training", env="quick", extra_pipelines=["evaluate"])
        ours = sorted(p for p in folder.iterdir() if p != intruder)[-1]
        own = checkpoint_fingerprint(load_checkpoint(ours / "model_checkpoint.pt"))
        version = ours.name
        out = quick.path / f"data/07_model_output/{NS}"
        chosen = _json(out / "calibrated_map.json" / version / "calibrated_map.json")
        threshold = _json(out / "decision_threshold.json" / version / "decision_threshold.json")
        reference = np.load(out / "normal_reference.npz" / version / "normal_reference.npz")
        assert chosen["checkpoint_fingerprint"] == threshold["checkpoint_fingerprint"] == own
        assert str(reference["checkpoint_fingerprint"]) == own
        assert own != checkpoint_fingerprint(other)
    finally:
        shutil.rmtree(intruder)


def test_predict_through_the_catalog_with_load_versions(quick, tmp_path):
    source = quick.path / "data/01_raw/synthetic/bottle/test"
    folder = tmp_path / "incoming"
    shutil.copytree(source / "good", folder / "good")
    shutil.copytree(source / "missing_rim", folder / "missing_rim")
    (folder / "notes.txt").write_text("junk")
    version = quick.latest(f"data/06_models/{NS}/model_checkpoint.pt").parent.name
    quick.session_run(
        pipeline="predict",
        env="quick",
        params={"predict": {"input_dir": str(folder)}},
        load_versions={f"{NS}.model_checkpoint": version},
    )
    predictions = pd.read_csv(quick.latest(f"data/07_model_output/{NS}/predictions.csv"))
    assert len(predictions) == 8 + 6 + 1
    assert "cannot identify image" in predictions.set_index("file").loc["notes.txt", "error"]
    scored = predictions[predictions["error"].isna()]
    good = scored[scored["file"].str.startswith("good/")]["score"]
    defective = scored[scored["file"].str.startswith("missing_rim/")]["score"]
    assert defective.mean() > good.mean()


def test_a_deleted_version_is_named_with_the_mlflow_run_that_restores_it(quick, tmp_path):
    """Retention deletes old versions; --load-versions of one says so, lists what is there, and
    gives the MLflow run holding the logged copy and the command that restores it (run here)."""
    from anomaly_ae.model.checkpoint import checkpoint_fingerprint, load_checkpoint

    folder = quick.latest(f"data/06_models/{NS}/model_checkpoint.pt").parent
    version, kept = folder.name, tmp_path / "kept"
    shutil.move(folder, kept)
    try:
        with pytest.raises(RuntimeError, match=rf"version {version} of '{NS}.model_checkpoint'") as error:
            quick.session_run(
                pipeline="predict",
                env="quick",
                params={"predict": {"input_dir": str(tmp_path)}},
                load_versions={f"{NS}.model_checkpoint": version},
            )
        message = str(error.value)
        assert "retention.keep_last" in message and "mlflow artifacts download" in message
        command = message.split("restore it with: ", 1)[1].split()
        assert command[0] == "mlflow"  # run as python -m mlflow: the venv's, whatever PATH says
        subprocess.run([sys.executable, "-m", *command], cwd=quick.path, check=True, timeout=300)
        restored = load_checkpoint(folder / "model_checkpoint.pt")
        original = load_checkpoint(kept / "model_checkpoint.pt")
        assert checkpoint_fingerprint(restored) == checkpoint_fingerprint(original)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(kept, folder)


def test_retention_keeps_a_version_the_run_loaded_however_old(quick, tmp_path):
    """A version restored from MLflow and scored with --load-versions is older than the newest
    retention.keep_last: the run that loads it must not delete it at its end (it did)."""
    from PIL import Image

    project = make_project(tmp_path / "project")
    for layer in ("06_models", "07_model_output"):
        shutil.copytree(quick.path / "data" / layer / NS, project.path / "data" / layer / NS)
    checkpoints = project.path / "data/06_models" / NS / "model_checkpoint.pt"
    newest = sorted(checkpoints.iterdir())[-1]
    restored, unused = "2000-01-02T00.00.00.000Z", "2000-01-01T00.00.00.000Z"
    for version in (restored, unused):
        shutil.copytree(newest, checkpoints / version)
    images = tmp_path / "incoming"
    images.mkdir()
    Image.new("L", (128, 128), 100).save(images / "a.png")
    project.session_run(
        pipeline="predict",
        env="quick",
        params={
            "predict": {"input_dir": str(images)},
            "retention": {"keep_last": 1, "prune_after_run": True},
        },
        load_versions={f"{NS}.model_checkpoint": restored},
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == [restored, newest.name]  # the unused one went


def test_a_missing_model_is_reported_with_the_command_that_makes_it(tmp_path):
    project = make_project(tmp_path / "empty")
    for pipeline in ("evaluate", "predict", "calibrate"):
        with pytest.raises(
            RuntimeError, match=r"No trained model found for 'bottle.model_checkpoint'.*training"
        ):
            project.session_run(
                pipeline=pipeline, env="quick", params={"predict": {"input_dir": str(tmp_path)}}
            )
    # the refused runs are closed as FAILED, not left RUNNING and active in this process (a
    # later session here, in another project, would log into them: Kedro calls no
    # on_pipeline_error for a before_pipeline_run hook's error)
    import mlflow

    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}


def test_a_failed_node_closes_each_mlflow_run_once_as_failed(tmp_path):
    """A node fails after the category's nested run is active: kedro-mlflow closes the runs it
    finds active and logs one line per run. With ``tracking.run.nested: True`` it pushed the
    top run again before every node (and this project's hook the category's run after it), so
    a failed run listed the same two runs five times; conf/base/mlflow.yml sets it False."""
    import logging

    import mlflow
    from PIL import Image

    good = tmp_path / "data" / "cat" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(6):
        Image.new("L", (64, 64), 40 * i).save(good / f"{i:03d}.png")
    (good / "006.png").write_bytes(b"not a png")
    project = make_project(tmp_path / "project")

    class Collect(logging.Handler):  # on kedro-mlflow's logger: Kedro's logging setup replaces the root's
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.records: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record.getMessage())

    logger = logging.getLogger("kedro_mlflow.framework.hooks.mlflow_hook")
    handler = Collect()
    logger.addHandler(handler)
    try:
        with pytest.raises(Exception, match=r"006\.png"):
            project.session_run(
                params={"data": {"root": str(tmp_path / "data"), "category": "cat", "source": "mvtec"}}
            )
    finally:
        logger.removeHandler(handler)
    closed = [m for m in handler.records if "was closed because of an error" in m]
    assert len(closed) == 2 and len(set(closed)) == 2, closed  # the top run and the category's, once each
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name for r in runs) == ["__default__", "cat"]
    assert {r.info.status for r in runs} == {"FAILED"}


def test_notebook_loads_the_results_through_the_catalog(quick):
    import nbformat
    from nbclient import NotebookClient

    notebooks = quick.path / "notebooks"
    notebooks.mkdir(exist_ok=True)
    shutil.copy(REPO_ROOT / "notebooks" / "results.ipynb", notebooks)
    notebook = nbformat.read(notebooks / "results.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebooks)}}
    ).execute()
    outputs = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in notebook.cells
        for o in c.get("outputs", [])
    )
    assert "SYNTHETIC DATA" in outputs and "paper protocol" in outputs and "image_auroc" in outputs
    assert "chosen:" in outputs and "selection_score" in outputs
    assert not [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def test_command_line_calibrates_without_ever_loading_the_test_set(quick):
    """The one subprocess test: the real ``kedro`` command line runs ``calibrate`` while the
    cached test set is poisoned (loading it would fail), and makes the same choice."""
    test_file = quick.latest(f"data/05_model_input/{NS}/test_images.npz")
    saved = test_file.with_suffix(".saved")
    shutil.copy2(test_file, saved)
    before = _json(quick.latest(f"data/07_model_output/{NS}/calibrated_map.json"))
    folder = quick.path / f"data/07_model_output/{NS}/calibrated_map.json"
    n_before = len(list(folder.iterdir()))
    try:
        test_file.write_bytes(b"poisoned: not an npz")
        result = quick.run("run", "--env", "quick", "--pipeline=calibrate")
    finally:
        shutil.move(saved, test_file)
    assert "Calibrated map:" in result.stdout + result.stderr
    assert len(list(folder.iterdir())) == n_before + 1
    after = _json(quick.latest(f"data/07_model_output/{NS}/calibrated_map.json"))
    assert after == before  # same model, same seed: the same choice, made without the test set


def test_a_bad_parameter_stops_the_run_before_any_node(tmp_path):
    from anomaly_ae.param_schema import ParameterError

    project = make_project(tmp_path / "bad")
    with pytest.raises(ParameterError, match=r"training.epochs=1.5: Input should be a valid integer"):
        project.session_run(env="quick", params={"training": {"epochs": 1.5}})
    assert not list((project.path / "data").rglob("*.*"))  # nothing was written
