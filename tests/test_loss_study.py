"""The loss study on the synthetic sample, checked through a real MLflow tracking server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
VARIANTS = {"mse": ("1.0", "0.0"), "ssim": ("0.0", "1.0"), "hybrid": ("0.5", "0.5")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(kedro_project):
    """``mlflow server`` on 127.0.0.1 over the project's sqlite store; stopped afterwards."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            "sqlite:///mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=kedro_project.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start on {url} (exit code {proc.poll()})")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_loss_study_gives_one_child_run_per_variant(kedro_project, request):
    # a two-setting calibration grid: the study's structure and tracking are under test here
    # (tests/test_pipelines.py runs the full grid)
    small_grid = {
        "blend": ["ssim"],
        "win_size": [11],
        "smoothing_sigma": [0, 4],
        "normal_reference": ["none"],
        "score_reduction": ["max"],
    }
    kedro_project.session_run(
        pipeline="loss_study", env="quick", params={"calibration": {"grid": small_grid}}
    )
    comparison = pd.read_csv(kedro_project.latest("data/08_reporting/bottle/loss_study_comparison.csv"))
    assert list(comparison["variant"]) == list(VARIANTS)
    assert comparison.loc[comparison["variant"] == "hybrid", "paper_ssim_normal"].item() == pytest.approx(
        0.9055
    )
    for variant in VARIANTS:
        assert kedro_project.latest(f"data/06_models/bottle.{variant}/model_checkpoint.pt").is_file()

    url = request.getfixturevalue("mlflow_server")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("anomaly_ae")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"loss_study", "bottle", *(f"bottle.{v}" for v in VARIANTS)}
    top, category = runs["loss_study"], runs["bottle"]
    assert "mlflow.parentRunId" not in top.data.tags
    assert category.data.tags["mlflow.parentRunId"] == top.info.run_id
    for name, (mse_weight, ssim_weight) in VARIANTS.items():
        run = runs[f"bottle.{name}"]
        assert run.data.tags["mlflow.parentRunId"] == category.info.run_id
        assert run.data.tags["variant"] == name and run.data.tags["category"] == "bottle"
        assert run.info.status == "FINISHED"
        assert (run.data.params["loss.mse_weight"], run.data.params["loss.ssim_weight"]) == (
            mse_weight,
            ssim_weight,
        )
        metrics = json.loads(
            kedro_project.latest(f"data/08_reporting/bottle.{name}/evaluation_metrics.json").read_text()
        )
        for metric in (
            "image_auroc",
            "pixel_auroc",
            "aupro",
            "ssim_normal_mean",
            "ssim_defect_mean",
            "threshold",
        ):
            assert run.data.metrics[metric] == pytest.approx(metrics[metric]), (name, metric)
        row = comparison.set_index("variant").loc[name]
        assert row["image_auroc"] == pytest.approx(metrics["image_auroc"])
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, 21))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoints", "figures", "tables", "evaluation", "calibration"} <= artifacts
    assert "loss_study" in {a.path for a in client.list_artifacts(category.info.run_id)}
