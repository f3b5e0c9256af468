"""The Kedro project end to end on the synthetic sample (the quick environment)."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_registry_lists_every_pipeline(kedro_project):
    out = kedro_project.run("registry", "list").stdout
    for name in (
        "__default__",
        "data_ingestion",
        "data_processing",
        "training",
        "evaluation",
        "reporting",
        "evaluate",
    ):
        assert f"- {name}\n" in out, out


def test_evaluate_without_a_checkpoint_says_train_first(kedro_project):
    result = kedro_project.run("run", "--pipeline=evaluate", check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "No trained model found" in text and "kedro run --pipeline=training" in text, text[-3000:]


def test_quick_run_produces_every_output(kedro_project):
    kedro_project.run("run", "--env", "quick")
    info = json.loads((kedro_project.path / "data/02_intermediate/dataset_info.json").read_text())
    assert info["source"] == "synthetic"

    history = pd.read_csv(kedro_project.latest("data/07_model_output/training_history.csv"))
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]

    table = pd.read_csv(kedro_project.latest("data/07_model_output/ssim_table.csv"))
    assert set(table.columns) >= {"file", "defect_type", "label", "ssim", "mse", "score", "is_anomalous"}
    assert len(table) == 8 + 2 * 6  # synthetic defaults: 8 good, 6 per defect type

    metrics = json.loads(kedro_project.latest("data/08_reporting/evaluation_metrics.json").read_text())
    for name in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold"):
        assert 0.0 <= metrics[name] <= 1.0 or name == "threshold", (name, metrics[name])
    assert metrics["data_source"] == "synthetic"

    table2 = pd.read_csv(kedro_project.latest("data/08_reporting/table2.csv"))
    assert "paper protocol" in set(table2["subset"])
    for figure in ("figure1.png", "image_roc.png", "pixel_roc.png", "ssim_histogram.png", "loss_curve.png"):
        assert kedro_project.latest(f"data/08_reporting/{figure}").stat().st_size > 1000
    assert len(list((kedro_project.path / "data/08_reporting/heatmaps").rglob("*.png"))) == len(table)
    report = (kedro_project.path / "data/08_reporting/report.html").read_text()
    assert "SYNTHETIC DATA" in report and "Table II" in report and "Figure 1" in report
    assert kedro_project.latest("data/06_models/model_checkpoint.pt").stat().st_size > 1_000_000

    # MLflow: one run with params, per-epoch loss history, tags and the metrics.
    with sqlite3.connect(kedro_project.path / "mlflow.db") as db:
        (run_uuid,) = db.execute("select run_uuid from runs where status='FINISHED'").fetchone()
        params = dict(db.execute("select key, value from params where run_uuid=?", (run_uuid,)))
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_uuid,)))
        steps = db.execute(
            "select step, value from metrics where run_uuid=? and key='train_loss' order by step", (run_uuid,)
        ).fetchall()
        logged = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?", (run_uuid,))}
    assert params["training.learning_rate"] == "0.002" and params["training.epochs"] == "3"
    assert [s for s, _ in steps] == [1, 2, 3]
    assert [v for _, v in steps] == pytest.approx(history["train_loss"].tolist())
    assert tags["data_source"] == "synthetic" and tags["device"] == "cpu" and tags["category"] == "bottle"
    assert {
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "ssim_normal_mean",
        "ssim_normal_std",
        "ssim_defect_mean",
        "ssim_defect_std",
        "threshold",
        "val_loss",
    } <= logged

    # the notebook loads the latest results through the Kedro catalog, top to bottom
    import shutil

    import nbformat
    from nbclient import NotebookClient

    notebooks = kedro_project.path / "notebooks"
    notebooks.mkdir()
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
    assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))

    # evaluate again from the saved checkpoint, without retraining
    kedro_project.run("run", "--env", "quick", "--pipeline=evaluate")
    assert len(list((kedro_project.path / "data/08_reporting/evaluation_metrics.json").iterdir())) == 2
