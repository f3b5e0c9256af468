"""Categories in parallel on one machine (issue 15, item 4): ``kedro run
--runner=ParallelRunner`` with spawned workers, torch threads per worker, one nested MLflow
run per category whatever process runs its nodes, and a SQLite tracking store that loses
nothing when several processes write at once."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from pathlib import Path

import pytest
from conftest import make_project

from anomaly_ae import parallel

# ---------------------------------------------------------------- torch threads


@pytest.mark.parametrize(
    "setting, workers, cores, expected",
    [("auto", 2, 2, 1), (None, 2, 8, 4), ("auto", 3, 8, 2), ("auto", 16, 4, 1), (3, 2, 8, 3)],
)
def test_torch_threads_per_worker_keep_workers_times_threads_within_the_cores(
    setting, workers, cores, expected
):
    threads = parallel.torch_threads(setting, workers, cores)
    assert threads == expected
    if setting in ("auto", None) and workers <= cores:
        assert workers * threads <= cores


@pytest.mark.parametrize("bad", [0, -1, "four", 1.5, True])
def test_a_bad_torch_threads_setting_is_refused(bad):
    with pytest.raises(ValueError, match="parallel.torch_threads"):
        parallel.torch_threads(bad, 2, 2)


def test_kedro_worker_count_follows_the_parallel_runner():
    from kedro.pipeline import Pipeline, node
    from kedro.runner import ParallelRunner

    def f(x):
        return x

    pipe = Pipeline([node(f, f"in{i}", f"out{i}", name=f"n{i}") for i in range(5)])
    runner = ParallelRunner(max_workers=3)
    try:
        assert parallel.kedro_workers(pipe, 3) == runner._get_required_workers_count(pipe) == 3
    finally:
        runner._manager.shutdown()
    assert parallel.kedro_workers(pipe, 64) == 5


# ---------------------------------------------------------------- refusing what cannot work


def test_a_parallel_run_with_fork_is_refused_with_the_reason(monkeypatch):
    from kedro.io import SharedMemoryDataCatalog
    from kedro.pipeline import Pipeline

    monkeypatch.setenv("KEDRO_MP_CONTEXT", "fork")
    with pytest.raises(RuntimeError, match="fork.*deadlock"):
        parallel.ParallelRunHook().before_pipeline_run(
            {"runner": "ParallelRunner"}, Pipeline([]), SharedMemoryDataCatalog()
        )


def test_settings_choose_spawn_unless_the_user_chose():
    import anomaly_ae.settings  # noqa: F401 - sets KEDRO_MP_CONTEXT by default

    assert os.environ["KEDRO_MP_CONTEXT"] in parallel.SAFE_CONTEXTS


def test_in_memory_outputs_are_shared_across_processes_in_a_parallel_run():
    from kedro.io import MemoryDataset, SharedMemoryDataCatalog
    from kedro.io.shared_memory_dataset import SharedMemoryDataset
    from kedro.pipeline import Pipeline, node

    def f(x):
        return x

    catalog = SharedMemoryDataCatalog(
        {"a.test_scores": MemoryDataset(copy_mode="assign"), "a.x": MemoryDataset(1)}
    )
    pipe = Pipeline([node(f, "a.x", "a.test_scores", name="n")])
    assert parallel.share_memory_outputs(pipe, catalog) == ["a.test_scores"]
    assert isinstance(catalog.get("a.test_scores"), SharedMemoryDataset)
    assert type(catalog.get("a.x")) is MemoryDataset  # an input only: pickled with its data


def test_the_summary_node_pickles_for_the_workers(monkeypatch):
    from multiprocessing.reduction import ForkingPickler

    from anomaly_ae import run_params
    from anomaly_ae.pipelines.summary import pipeline as summary

    monkeypatch.setattr(
        run_params, "_CURRENT", {"data": {"category": "bottle"}, "categories": ["bottle", "carpet"]}
    )
    (node,) = parallel.picklable_summary(summary.create_pipeline(), ["bottle", "carpet"]).nodes
    copy = pickle.loads(ForkingPickler.dumps(node))
    assert copy.name == "summarise_categories" and copy.func.categories == ("bottle", "carpet")


# ---------------------------------------------------------------- SQLite under concurrent writers


def test_retry_locked_retries_a_locked_store_and_nothing_else(monkeypatch):
    monkeypatch.setattr(parallel.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert parallel.retry_locked(flaky) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise RuntimeError("no such table")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        parallel.retry_locked(broken)
    assert len(calls) == 1


WRITERS, STEPS = 4, 60


def _hammer(uri: str, own_run: str, shared_run: str, index: int, start, errors) -> None:
    """One writer: per-step metrics to its own run and to a run all writers share, params,
    tags, a batch, as the project's hooks and the training node do."""
    import mlflow

    from anomaly_ae.parallel import retry_locked

    client = mlflow.MlflowClient(uri)
    start.wait()
    try:
        for step in range(STEPS):
            retry_locked(client.log_metric, own_run, "train_loss", 1.0 / (step + 1), step=step)
            retry_locked(client.log_metric, shared_run, f"writer{index}", float(step), step=step)
            if step % 10 == 0:
                retry_locked(client.log_param, own_run, f"p{step}", str(step))
                retry_locked(client.set_tag, shared_run, f"w{index}.s{step}", "x")
        retry_locked(mlflow.MlflowClient(uri).set_terminated, own_run, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        errors.put(f"writer {index}: {exc!r}")


def test_several_processes_logging_at_once_into_one_sqlite_store_lose_no_metric(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("hammer", artifact_location=str(tmp_path / "artifacts"))
    shared = client.create_run(experiment).info.run_id
    runs = [
        client.create_run(experiment, tags={"mlflow.parentRunId": shared}).info.run_id for _ in range(WRITERS)
    ]
    assert parallel.use_wal(uri)  # as the parallel hook does before starting workers

    context = multiprocessing.get_context("spawn")
    start, errors = context.Event(), context.Queue()
    workers = [
        context.Process(target=_hammer, args=(uri, runs[i], shared, i, start, errors)) for i in range(WRITERS)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    start.set()  # all at once
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []

    for index, run_id in enumerate(runs):
        history = client.get_metric_history(run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(STEPS))
        assert len(client.get_run(run_id).data.params) == STEPS // 10
        assert client.get_run(run_id).info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(shared, f"writer{index}")) == list(
            range(STEPS)
        )
    tags = client.get_run(shared).data.tags
    assert sum(key.startswith("w") and ".s" in key for key in tags) == WRITERS * (STEPS // 10)


# ---------------------------------------------------------------- the two-category run, in parallel

EPOCHS = 3
RUN_PARAMS = f"categories=bottle+carpet,training.epochs={EPOCHS},training.progress=false"


def _runs(project_path: Path) -> dict:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    out = {"all": runs, "children": {}}
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" not in tags:
            out.setdefault("top", []).append(run)
        else:
            out["children"].setdefault(tags.get("category"), []).append(run)
    out["history"] = {
        run.info.run_id: {k: len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
        for run in runs
    }
    out["artifacts"] = {
        run.info.run_id: sorted(a.path for a in client.list_artifacts(run.info.run_id)) for run in runs
    }
    return out


@pytest.mark.slow
def test_two_categories_in_parallel_log_what_a_sequential_run_logs(tmp_path):
    parallel_project = make_project(tmp_path / "parallel")
    started = time.perf_counter()
    result = parallel_project.run(
        "run", "--runner=ParallelRunner", "--env", "quick", "--params", RUN_PARAMS, timeout=1500
    )
    parallel_seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert "database is locked" not in output.lower()
    assert "ParallelRunner: 2 workers x 1 torch thread" in output or os.cpu_count() != 2
    assert "Completed 39 out of 39 tasks" in output or "Pipeline execution completed" in output

    sequential_project = make_project(tmp_path / "sequential")
    started = time.perf_counter()
    sequential_project.run("run", "--env", "quick", "--params", RUN_PARAMS, timeout=1500)
    sequential_seconds = time.perf_counter() - started
    print(
        f"two categories, {EPOCHS} epochs: parallel {parallel_seconds:.0f} s, "
        f"sequential {sequential_seconds:.0f} s"
    )

    for category in ("bottle", "carpet"):
        for relative in (
            f"data/08_reporting/{category}/evaluation_metrics.json",
            f"data/06_models/{category}/model_checkpoint.pt",
            f"data/08_reporting/{category}/report.html",
        ):
            assert parallel_project.latest(relative).is_file()
    assert parallel_project.latest("data/08_reporting/summary/summary_table.csv").is_file()

    par, seq = _runs(parallel_project.path), _runs(sequential_project.path)
    assert len(par["top"]) == 1 and len(par["all"]) == 3  # no stray run from a worker
    (top,) = par["top"]
    assert not [r.info.run_name for r in par["all"] if r.info.status != "FINISHED"]  # none left RUNNING
    for project, runs in ((parallel_project, par), (sequential_project, seq)):
        # the version folder the run wrote: retention never deletes it while the run is RUNNING
        written = project.latest("data/06_models/bottle/model_checkpoint.pt").parent.name
        assert runs["top"][0].data.tags.get("anomaly_ae.save_version") == written
    assert par["artifacts"][top.info.run_id] == ["summary"]
    for category in ("bottle", "carpet"):
        (run,) = par["children"][category]  # exactly one nested run per category
        (reference,) = seq["children"][category]
        assert run.data.tags["mlflow.parentRunId"] == top.info.run_id
        assert run.info.run_name == category
        # every metric, with its whole per-epoch history, in the category's own run
        assert par["history"][run.info.run_id] == seq["history"][reference.info.run_id]
        assert par["history"][run.info.run_id]["train_loss"] == EPOCHS
        assert set(run.data.params) >= set(reference.data.params)
        assert par["artifacts"][run.info.run_id] == seq["artifacts"][reference.info.run_id]
        for tag in ("category", "device", "data_source"):
            assert run.data.tags[tag] == reference.data.tags[tag]
