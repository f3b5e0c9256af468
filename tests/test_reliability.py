"""Issue 13: nothing lost, nothing mixed, nothing escapes.

Crash-safe training state (resume after kill -9, never overwrite a further-along state,
one writer per state), concurrent runs that do not mix models, image sizes checked from the
header, cached inputs tied to the data they came from, interrupted MLflow runs marked FAILED,
retention.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_project
from PIL import Image

from anomaly_ae.model.checkpoint import checkpoint_fingerprint, load_checkpoint
from anomaly_ae.training import state as training_state

SIZE = 64
NS = "bottle"


# ------------------------------------------------------------------ training state (node level)


def _arrays(seed: int = 0, n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images": rng.random((n, 1, SIZE, SIZE), dtype=np.float32), "labels": np.zeros(n, np.int64)}


def _train(tmp_path: Path, epochs: int = 2, **overrides):
    from anomaly_ae.pipelines.training.nodes import train_model

    train = overrides.pop("train", None) or _arrays(0)
    training = {
        "epochs": epochs,
        "batch_size": 3,
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "compile": False,
        "progress": False,
        "early_stopping_patience": 0,
        "state_dir": str(tmp_path / "states"),
        "resume": "auto",
        **overrides,
    }
    return train_model(
        train,
        _arrays(1, 3),
        {"image_size": SIZE},
        training,
        {"mse_weight": 0.5, "ssim_weight": 0.5},
        {"source": "synthetic", "category": "thing"},
    )


def _state_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "states").rglob("*.pt"))


@pytest.mark.usefixtures("one_torch_thread")
def test_state_key_separates_settings_and_data_but_not_speed_levers():
    from anomaly_ae.training.trainer import TrainingConfig

    model = {"image_size": SIZE}
    data = training_state.data_digest(_arrays(0)["images"])
    key = training_state.state_key(model, TrainingConfig(seed=1), data)
    assert key == training_state.state_key(
        model, TrainingConfig(seed=1, epochs=9, compile=False, num_threads=2), data
    )
    assert key != training_state.state_key(model, TrainingConfig(seed=2), data)
    assert key != training_state.state_key(model, TrainingConfig(seed=1, learning_rate=0.001), data)
    assert key != training_state.state_key(
        model, TrainingConfig(seed=1), training_state.data_digest(_arrays(5)["images"])
    )


@pytest.mark.usefixtures("one_torch_thread")
def test_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, caplog):
    straight = _train(tmp_path / "a", epochs=4)[1]
    # "killed" after epoch 2: the state of epoch 2 is on disk
    _train(tmp_path / "b", epochs=2)
    (state,) = _state_files(tmp_path / "b")
    assert int(load_checkpoint(state)["epoch"]) == 2
    with caplog.at_level("INFO"):
        resumed = _train(tmp_path / "b", epochs=4)[1]
    assert "Resuming interrupted training" in caplog.text and "epoch 3 of 4 next" in caplog.text
    assert list(resumed["epoch"]) == [1, 2, 3, 4]
    np.testing.assert_array_equal(resumed["train_loss"].to_numpy(), straight["train_loss"].to_numpy())
    assert int(load_checkpoint(state)["epoch"]) == 4


@pytest.mark.usefixtures("one_torch_thread")
def test_a_further_along_state_is_never_overwritten(tmp_path):
    _train(tmp_path, epochs=3)
    (state,) = _state_files(tmp_path)
    before = state.read_bytes()
    with pytest.raises(training_state.TrainingStateError, match="resume=never would overwrite it"):
        _train(tmp_path, epochs=3, resume="never")
    with pytest.raises(training_state.TrainingStateError, match="beyond training.epochs=2"):
        _train(tmp_path, epochs=2)
    assert state.read_bytes() == before


@pytest.mark.usefixtures("one_torch_thread")
def test_other_settings_get_their_own_state_and_one_state_has_one_writer(tmp_path):
    from filelock import FileLock

    _train(tmp_path, epochs=1)
    _train(tmp_path, epochs=1, seed=1)
    states = _state_files(tmp_path)
    assert len(states) == 2  # different seeds never share a state file
    held = FileLock(str(states[0]) + ".lock")  # a run is training this one right now
    held.acquire()
    try:
        with pytest.raises(training_state.TrainingStateError, match="Another run is training"):
            _train(tmp_path, epochs=2, seed=int(load_checkpoint(states[0])["training"]["seed"]))
    finally:
        held.release()
    assert int(load_checkpoint(states[0])["epoch"]) == 1  # untouched


def test_an_unreadable_state_is_reported_not_replaced(tmp_path):
    path = tmp_path / "s.pt"
    path.write_bytes(b"")
    with pytest.raises(training_state.TrainingStateError, match="cannot be read"):
        training_state.resume_state(path, "auto", 3)
    assert path.read_bytes() == b""


# ------------------------------------------------------------------ image size from the header


def _huge_png(path: Path, side: int) -> Path:
    Image.new("1", (side, side)).save(path)  # a few KB on disk, side*side pixels decoded
    return path


def test_image_size_is_checked_from_the_header_before_decoding(tmp_path):
    import resource

    from anomaly_ae.data.partitions import image_partitions
    from anomaly_ae.data.transforms import ImageTooLargeError, decode_image

    _huge_png(tmp_path / "bomb.png", 20000)
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    loaders = image_partitions(str(tmp_path), ".png", max_pixels=40_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        ImageTooLargeError, match=r"bomb.png is 20000x20000 .* data.max_image_pixels=40,000,000"
    ):
        decode_image(loaders["bomb"], "bomb.png")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"peak memory grew {grown_mb:.0f} MB: the image was decoded"


@pytest.mark.slow
def test_a_too_large_training_image_stops_ingestion_naming_file_and_setting(tmp_path):
    from anomaly_ae.data.synthetic import generate_synthetic_category

    project = make_project(tmp_path / "project")
    root = tmp_path / "mvtec"
    generate_synthetic_category(root / "thing", n_train=6, n_test_good=2, n_test_per_defect=1, size=64)
    result = project.run(
        "run",
        "--pipeline=data_ingestion",
        "--params",
        f"data.root={root},data.category=thing,data.source=mvtec,data.max_image_pixels=1000",
        check=False,
    )
    assert result.returncode != 0
    assert "data.max_image_pixels=1,000" in result.stderr + result.stdout
    assert "000.png is 64x64" in result.stderr + result.stdout
    assert not (project.path / "data/02_intermediate/thing/dataset_info.json").exists()


@pytest.mark.slow
def test_predict_reports_an_oversized_file_without_decoding_it(tmp_path, quick):
    folder = tmp_path / "incoming"
    folder.mkdir()
    _huge_png(folder / "bomb.png", 20000)
    Image.new("L", (64, 64), 128).save(folder / "ok.png")
    quick.session_run(pipeline="predict", env="quick", params={"predict": {"input_dir": str(folder)}})
    table = _latest_csv(quick, f"data/07_model_output/{NS}/predictions.csv")
    rows = {r["file"]: r for r in table.to_dict("records")}
    assert "bomb.png is 20000x20000" in rows["bomb.png"]["error"]
    assert "predict.max_image_pixels" in rows["bomb.png"]["error"]
    assert rows["ok.png"]["error"] != rows["ok.png"]["error"]  # NaN: judged


def _latest_csv(project, relative: str):
    import pandas as pd

    return pd.read_csv(project.latest(relative))


# ------------------------------------------------------------------ cached inputs tied to their data


@pytest.mark.slow
def test_evaluate_refuses_caches_of_other_data(quick, tmp_path):
    from anomaly_ae.data.fingerprint import StaleInputsError

    with pytest.raises(StaleInputsError, match=r"data.root: cached .*, this run '"):
        quick.session_run(
            pipeline="evaluate", env="quick", params={"data": {"root": str(tmp_path / "elsewhere")}}
        )
    with pytest.raises(StaleInputsError, match="preprocessing"):
        quick.session_run(pipeline="training", env="quick", params={"preprocessing": {"split_seed": 7}})


@pytest.mark.slow
def test_processing_refuses_images_changed_since_ingestion(tmp_path):
    from anomaly_ae.data.fingerprint import StaleInputsError
    from anomaly_ae.data.synthetic import generate_synthetic_category

    project = make_project(tmp_path / "project")
    root = tmp_path / "mvtec"
    generate_synthetic_category(root / "thing", n_train=6, n_test_good=2, n_test_per_defect=1, size=64)
    params = {"data": {"root": str(root), "category": "thing", "source": "mvtec"}}
    project.session_run(pipeline="data_ingestion", params=params)
    # a training image is replaced by a corrupt file, then ingestion is rerun and fails ...
    (root / "thing/train/good/000.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="000.png"):
        project.session_run(pipeline="data_ingestion", params=params)
    # ... and processing does not quietly run on the manifest of the earlier ingestion
    with pytest.raises(StaleInputsError, match="changed since"):
        project.session_run(pipeline="data_processing", params=params)


def test_the_state_is_saved_at_most_every_checkpoint_seconds(tmp_path, monkeypatch):
    """A cheaper schedule: with checkpoint_seconds the 145 MB state is written only once that
    much time has passed since the last write, and always after the last epoch."""
    from anomaly_ae.training import trainer

    saved: list[int] = []
    real_save = trainer.save_checkpoint_atomic
    monkeypatch.setattr(
        trainer,
        "save_checkpoint_atomic",
        lambda state, path: (saved.append(state["epoch"]), real_save(state, path)),
    )
    _train(tmp_path / "every", epochs=4, checkpoint_seconds=0)
    assert saved == [1, 2, 3, 4]
    saved.clear()
    _train(tmp_path / "hourly", epochs=4, checkpoint_seconds=3600)
    assert saved == [4]  # only the last epoch: no hour had passed
    saved.clear()
    clock = iter(range(0, 10_000, 25))  # each monotonic() call 25 "seconds" later
    monkeypatch.setattr(trainer.time, "monotonic", lambda: next(clock))
    _train(tmp_path / "timed", epochs=6, checkpoint_seconds=60)
    assert 4 not in saved or 3 not in saved  # never two epochs in a row when 60 s had not passed
    assert saved[-1] == 6 and len(saved) < 6


# ------------------------------------------------------------------ MLflow runs of killed processes


def test_a_run_whose_process_is_gone_is_marked_failed(tmp_path):
    import mlflow

    from anomaly_ae.hooks import OWNER_HOST, OWNER_PID, mark_interrupted_runs, owner_tags

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "mlruns"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = client.create_run(experiment, tags={**owner_tags(), OWNER_PID: str(dead.pid)})
    alive = client.create_run(experiment, tags=owner_tags())  # this process: still running
    foreign = client.create_run(experiment, tags={OWNER_PID: str(dead.pid), OWNER_HOST: "another-host"})
    assert mark_interrupted_runs(client) == [killed.info.run_id]
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert client.get_run(killed.info.run_id).data.tags["anomaly_ae.interrupted"] == "true"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(foreign.info.run_id).info.status == "RUNNING"


# ------------------------------------------------------------------ kill -9 and rerun (the command line)


def _kedro(project, *args) -> subprocess.Popen:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kedro", *args],
        cwd=project.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_epoch(folder: Path, epoch: int, process: subprocess.Popen, timeout: float = 600) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        for path in folder.rglob("*.pt"):
            try:
                if int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) >= epoch:
                    return path
            except Exception:  # noqa: BLE001 - being replaced right now
                pass
        time.sleep(0.5)
    raise AssertionError(f"no state of epoch {epoch} under {folder} after {timeout}s")


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_from_the_last_epoch(tmp_path):
    import mlflow

    project = make_project(tmp_path / "project")
    args = (
        "run",
        "--env",
        "quick",
        "--pipeline=training",
        "--params",
        "training.epochs=30,training.progress=false,training.checkpoint_seconds=0",
    )
    project.run("run", "--env", "quick", f"--to-nodes={NS}.build_model_inputs")
    first = _kedro(project, *args)
    state = _wait_for_epoch(project.path / "data/06_models/training_state", 3, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = int(load_checkpoint(state)["epoch"])
    assert 3 <= killed_at < 30

    second = project.run(*args)
    log = second.stdout + second.stderr
    assert "Resuming interrupted training" in log and f"epoch {killed_at + 1} of 30 next" in log
    history = _latest_csv(project, f"data/07_model_output/{NS}/training_history.csv")
    assert list(history["epoch"]) == list(range(1, 31))
    assert not state.exists()  # a finished training state is deleted by retention (prune_after_run)

    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    top = sorted(
        (r.info.start_time, r.info.status, r.data.tags.get("anomaly_ae.interrupted"))
        for r in runs
        if "mlflow.parentRunId" not in r.data.tags
    )
    # data preparation, the killed run (marked FAILED by the rerun), the rerun
    assert [(status, flag) for _, status, flag in top] == [
        ("FINISHED", None),
        ("FAILED", "true"),
        ("FINISHED", None),
    ]
    assert "RUNNING" not in {r.info.status for r in runs}


# ------------------------------------------------------------------ two runs at once


@pytest.mark.slow
def test_two_concurrent_runs_with_different_seeds_do_not_mix_models(tmp_path):
    project = make_project(tmp_path / "project")
    project.run("run", "--env", "quick", f"--to-nodes={NS}.build_model_inputs")
    runs = [
        _kedro(project, "run", "--env", "quick", "--params", f"training.seed={seed},training.progress=false")
        for seed in (1, 2)
    ]
    outputs = [r.communicate(timeout=1200)[0] for r in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-4000:]
        assert "did not match load version" not in output
    checkpoints = sorted((project.path / f"data/06_models/{NS}/model_checkpoint.pt").iterdir())
    assert len(checkpoints) == 2
    seen = set()
    for version in checkpoints:
        checkpoint = load_checkpoint(version / "model_checkpoint.pt")
        own = checkpoint_fingerprint(checkpoint)
        seen.add(checkpoint["training"]["seed"])
        out = project.path / f"data/07_model_output/{NS}"
        threshold = json.loads(
            (out / "decision_threshold.json" / version.name / "decision_threshold.json").read_text()
        )
        chosen = json.loads((out / "calibrated_map.json" / version.name / "calibrated_map.json").read_text())
        reference = np.load(out / "normal_reference.npz" / version.name / "normal_reference.npz")
        assert threshold["checkpoint_fingerprint"] == chosen["checkpoint_fingerprint"] == own
        assert str(reference["checkpoint_fingerprint"]) == own
        assert (project.path / f"data/08_reporting/{NS}/report.html" / version.name / "report.html").is_file()
    assert seen == {1, 2}


def test_two_runs_in_the_same_millisecond_get_different_save_versions(tmp_path):
    from anomaly_ae.hooks import claim_save_version

    version = "2026-12-01T01.03.26.521Z"
    assert claim_save_version(version, tmp_path) == version
    assert claim_save_version(version, tmp_path) == "2026-12-01T01.03.26.522Z"  # taken: the next one
    assert claim_save_version("2026-12-01T01.03.26.999Z", tmp_path) == "2026-12-01T01.03.26.999Z"
    assert claim_save_version("2026-12-01T01.03.26.999Z", tmp_path) == "2026-12-01T01.03.27.000Z"


# ------------------------------------------------------------------ retention


def _version_tree(root: Path, name: str, versions: list[str]) -> None:
    for version in versions:
        folder = root / "data/06_models/bottle" / name / version
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x" * 1000)


def test_prune_keeps_the_newest_and_running_versions_and_unfinished_states(tmp_path):
    from filelock import FileLock

    from anomaly_ae import prune
    from anomaly_ae.model import AutoencoderConfig, build_model
    from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

    versions = [f"2026-01-0{d}T00.00.00.000Z" for d in range(1, 6)]
    _version_tree(tmp_path, "model_checkpoint.pt", versions)
    states = tmp_path / "states" / "bottle"
    states.mkdir(parents=True)
    model = build_model(AutoencoderConfig(image_size=SIZE))
    for name, epoch in (("done.pt", 4), ("interrupted.pt", 2), ("busy.pt", 4)):
        torch.save(
            build_checkpoint(model, None, epoch=epoch, history=[], config=TrainingConfig(epochs=4)),
            states / name,
        )
    lock = FileLock(str(states / "busy.pt") + ".lock")
    lock.acquire()
    try:
        plan = prune.plan(tmp_path / "data", keep=2, state_dir=tmp_path / "states", protected={versions[0]})
    finally:
        lock.release()
    deleted = {p.name for p in plan.versions}
    assert deleted == set(versions[1:3])  # newest two kept, the running run's version kept
    assert [p.name for p in plan.states] == ["done.pt"]
    assert plan.size() > 0
    prune.prune(plan)
    left = sorted(p.name for p in (tmp_path / "data/06_models/bottle/model_checkpoint.pt").iterdir())
    assert left == [versions[0], *versions[3:]]
    assert sorted(p.name for p in states.glob("*.pt")) == ["busy.pt", "interrupted.pt"]
    with pytest.raises(ValueError, match="keep_last"):
        prune.plan(tmp_path / "data", keep=0)


def test_a_deleted_version_is_found_in_its_own_categorys_mlflow_run(tmp_path):
    """Several categories in one run: each nested run logged its own checkpoint under the same
    artifact path; the copy offered for carpet's version is carpet's, not bottle's."""
    import mlflow

    from anomaly_ae import prune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    version = "2026-12-02T01.02.03.456Z"
    top = client.create_run(experiment, tags={prune.SAVE_VERSION_TAG: version}).info.run_id
    other = client.create_run(experiment, tags={prune.SAVE_VERSION_TAG: "2026-12-01T00.00.00.000Z"})
    runs = {}
    nesting = (("bottle", top), ("carpet", top), ("carpet.mse", None), ("carpet", other.info.run_id))
    for name, parent in nesting:
        parent = parent or runs["carpet"]
        run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
        runs.setdefault(name, run)
        weights = tmp_path / name / "model_checkpoint.pt"
        weights.parent.mkdir(exist_ok=True)
        weights.write_bytes(name.encode())
        client.log_artifact(run, str(weights), "checkpoints")
    artifact = "checkpoints/model_checkpoint.pt"
    (carpet,) = prune.logged_copies(uri, version, artifact, run_name="carpet")
    assert carpet[0] == runs["carpet"] and carpet[1].endswith(f"{runs['carpet']}/artifacts/{artifact}")
    (variant,) = prune.logged_copies(uri, version, artifact, run_name="carpet.mse")  # nested two deep
    assert variant[0] == runs["carpet.mse"]
    assert prune.logged_copies(uri, version, artifact, run_name="screw") == []
    assert prune.logged_copies(uri, "2026-01-01T00.00.00.000Z", artifact, run_name="carpet") == []
    assert prune.logged_copies(None, version, artifact, run_name="carpet") == []


@pytest.mark.slow
def test_prune_command_dry_run_lists_and_keeps(quick):
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_ae.prune", "--keep", "1", "--dry-run"],
        cwd=quick.path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "would delete" in result.stdout and "old versions" in result.stdout
    listed = [
        line.split(" ", 2)[2] for line in result.stdout.splitlines() if line.startswith("would delete data/")
    ]
    assert listed and all((quick.path / p).exists() for p in listed)  # a dry run deletes nothing
