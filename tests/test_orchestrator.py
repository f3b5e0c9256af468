"""Scale-out on Dagster through kedro-dagster (issue 15): one Dagster job per category, each
with its MLflow run, run by Dagster's own CLI over two synthetic categories (quick settings).

Needs the ``dagster`` extra (``pip install -e ".[test,dagster]"``, or
``scripts/orchestrator_test.sh``, which makes a separate venv and runs this file); skipped
without it. Marked ``orchestrator`` (and ``slow``): ``pytest -m orchestrator``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_project

MISSING = [m for m in ("dagster", "kedro_dagster", "dagster_mlflow") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.orchestrator,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"{', '.join(MISSING)} not installed: pip install -e '.[test,dagster]' "
        "(or run scripts/orchestrator_test.sh)",
    ),
]

CATEGORIES = ("bottle", "carpet")
ENV = "quick"
TIMEOUT = 1800


def _dagster(project: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """``dagster <args>`` from this interpreter's environment, in ``project``; its output goes
    to a log file (a pipe would stall a job that logs more than the pipe holds)."""
    dagster = Path(sys.executable).with_name("dagster")
    log = project.parent / f"dagster_{args[1]}_{args[-1]}.log"  # e.g. dagster_execute_quick__bottle__main.log
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(dagster), *args], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    process.log = log
    return process


def _finish(process: subprocess.Popen, what: str) -> str:
    process.wait(timeout=TIMEOUT)
    out = process.log.read_text(errors="replace")
    assert process.returncode == 0, f"{what} failed ({process.returncode}):\n{out[-8000:]}"
    return out


def test_one_dagster_job_per_category_with_its_outputs_and_mlflow_run(tmp_path):
    import mlflow

    project = make_project(tmp_path / "project")
    (tmp_path / "dagster_home").mkdir()
    env = {
        **os.environ,
        "KEDRO_ENV": ENV,
        "ANOMALY_AE_PARAMS": f"categories={'+'.join(CATEGORIES)},training.progress=false",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),  # run records of this test only
        "KEDRO_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",  # two jobs at once on a small machine: one torch thread each
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
    }
    module = ["-m", "anomaly_ae.definitions"]

    # The code location loads (this also creates the MLflow database and experiment once,
    # before two runs would race to create them) and has one job per category.
    listing = _finish(_dagster(project.path, env, "job", "list", *module), "dagster job list")
    jobs = [f"{ENV}__{c}__main" for c in CATEGORIES]
    for job in [*jobs, f"{ENV}__summary"]:
        assert f"Job: {job}" in listing

    # A failing job closes its MLflow run FAILED: the summary before any category has run.
    early = _dagster(project.path, env, "job", "execute", *module, "-j", f"{ENV}__summary")
    assert early.wait(timeout=TIMEOUT) != 0, "the summary job ran without the categories' outputs"

    # Both category jobs at the same time, each a Dagster run in its own process.
    running = {job: _dagster(project.path, env, "job", "execute", *module, "-j", job) for job in jobs}
    for job, process in running.items():
        assert "RUN_SUCCESS" in _finish(process, f"dagster job execute -j {job}")
    _finish(_dagster(project.path, env, "job", "execute", *module, "-j", f"{ENV}__summary"), "summary job")

    for category in CATEGORIES:
        assert project.latest(f"data/06_models/{category}/model_checkpoint.pt").is_file()
        assert project.latest(f"data/08_reporting/{category}/evaluation_metrics.json").is_file()
        assert project.latest(f"data/08_reporting/{category}/report.html").is_file()
    summary = pd.read_csv(project.latest("data/08_reporting/summary/summary_table.csv"))
    assert list(summary["category"]) == [*CATEGORIES, "mean"]

    client = mlflow.MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_id = {r.info.run_id: r for r in runs}
    dagster_runs = set()
    for category in CATEGORIES:
        (run,) = [r for r in runs if r.data.tags.get("category") == category]
        assert run.info.status == "FINISHED"
        assert "image_auroc" in run.data.metrics and "train_loss" in run.data.metrics
        assert {"checkpoints", "report"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        # nested in the MLflow run of its Dagster run (dagster-mlflow + kedro-mlflow)
        parent = by_id[run.data.tags["mlflow.parentRunId"]]
        assert parent.info.run_name == f"{ENV}__{category}__main" and parent.info.status == "FINISHED"
        dagster_runs.add(parent.data.tags["dagster_run_id"])
    assert len(dagster_runs) == len(CATEGORIES)  # one Dagster run (task) per category
    summaries = sorted(
        (r for r in runs if r.info.run_name == f"{ENV}__summary"), key=lambda r: r.info.start_time
    )
    assert [r.info.status for r in summaries] == ["FAILED", "FINISHED"]
    assert [a.path for a in client.list_artifacts(summaries[1].info.run_id)] == ["summary"]
