"""The loss study on the synthetic sample, checked through a real MLflow tracking server; its
report and figure (fast, from hand-made metrics)."""

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


@pytest.mark.slow
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
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(kedro_project.path)]
    subprocess.run([*git, "init", "-q"], check=True)  # every run, the variants' too, carries git_commit
    subprocess.run([*git, "add", "conf", "pyproject.toml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project"], check=True)
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
    report = kedro_project.latest("data/08_reporting/bottle/loss_study_report.html").read_text()
    detection = report.split("<h2>Detection metrics</h2>")[1].split("<h2>")[0]
    assert detection.count("<tr>") == 1 + len(VARIANTS)  # heading + one row per variant

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
        assert len(run.data.tags["git_commit"].removesuffix("-dirty")) == 40
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


PAPER_TABLE2 = {
    "mse": {"mse_weight": 1.0, "ssim_weight": 0.0, "normal": [0.8662, 0.0130], "defective": [0.8383, 0.0160]},
    "ssim": {
        "mse_weight": 0.0,
        "ssim_weight": 1.0,
        "normal": [0.8461, 0.0153],
        "defective": [0.7938, 0.0270],
    },
    "hybrid": {
        "mse_weight": 0.5,
        "ssim_weight": 0.5,
        "normal": [0.9055, 0.0161],
        "defective": [0.8553, 0.0251],
    },
}


def _variant_metrics(mse_weight: float, ssim_weight: float, level: float) -> dict:
    return {
        "loss_weights": {"mse_weight": mse_weight, "ssim_weight": ssim_weight},
        "checkpoint_epoch": 20,
        "ssim_normal_mean": level,
        "ssim_normal_std": 0.01,
        "ssim_defect_mean": level - 0.03,
        "ssim_defect_std": 0.02,
        "image_auroc": 0.99,  # bars up to the top of the axes: where a legend inside would sit
        "image_auroc_ci_low": 0.9612,
        "image_auroc_ci_high": 0.9987,
        "pixel_auroc": 0.97,
        "aupro": 0.95,
        "image_f1_max": 0.9,
        "threshold": 0.5,
        "data_source": "synthetic",
    }


@pytest.fixture
def comparison():
    from anomaly_ae.evaluation.comparison import compare_variants

    metrics = {
        name: _variant_metrics(float(w[0]), float(w[1]), level)
        for (name, w), level in zip(VARIANTS.items(), (0.9, 0.88, 0.95), strict=True)
    }
    metrics["mse_heavy"] = _variant_metrics(0.8, 0.2, 0.92)  # not in the paper: its columns are empty
    del metrics["mse_heavy"]["image_auroc_ci_low"]  # metrics written before intervals existed
    return compare_variants(metrics, PAPER_TABLE2)


def test_the_loss_study_report_fills_its_detection_table_and_keeps_table2_narrow(comparison):
    from PIL import Image

    from anomaly_ae.pipelines.loss_study.nodes import loss_study_report

    report = loss_study_report(
        comparison,
        Image.new("RGB", (8, 8)),
        {"category": "bottle", "source": "synthetic"},
        list(comparison["variant"]),
    )
    table2, detection = (
        report.split(f"<h2>{title}</h2>")[1].split("<h2>")[0]
        for title in ("Table II — SSIM(original, reconstruction)", "Detection metrics")
    )
    assert detection.count("<tr>") == 1 + len(comparison)
    for variant in comparison["variant"]:
        assert f"<td>{variant}</td>" in detection
    assert '<td class="num">0.9900</td>' in detection  # image AUROC
    assert '<td class="num">0.961–0.999</td>' in detection  # and its interval, unbroken
    assert "0.5·MSE + 0.5·(1 − SSIM)" in detection
    assert table2.count("<th>") <= 7  # mean ± std in one cell: it fit on the page
    assert "0.9000 ± 0.0100" in table2 and "0.9055 ± 0.0161" in table2
    assert 'class="table-wrap"' in table2 and "SYNTHETIC DATA" in report


def test_the_comparison_figure_keeps_its_legends_off_the_bars(comparison):
    import matplotlib.pyplot as plt

    from anomaly_ae.reporting.figures import variant_comparison_figure

    fig = variant_comparison_figure(comparison)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    try:
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is not None
            box = legend.get_window_extent(renderer)
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()  # below the axes
            for bar in ax.patches:
                assert not box.overlaps(bar.get_window_extent(renderer)), ax.get_title()
            for label in ax.get_xticklabels():
                assert not box.overlaps(label.get_window_extent(renderer)), (ax.get_title(), label.get_text())
    finally:
        plt.close(fig)
