"""Categories in parallel on one machine: ``kedro run --runner=ParallelRunner``.

Kedro's ParallelRunner runs independent nodes in worker processes, so the categories of a
run (each its own namespace, ``categories=bottle+carpet`` or ``all``) train and evaluate at
the same time. What this module makes work (see :class:`ParallelRunHook`):

* **spawn**: torch in a forked child can deadlock (OpenMP / MKL thread pools copied mid
  use), so :mod:`anomaly_ae.settings` sets ``KEDRO_MP_CONTEXT=spawn`` (what Kedro's
  ParallelRunner reads); a run started with ``fork`` is refused with the reason.
* **project hooks in the workers**: Kedro 1.x re-creates the hook manager in every task,
  but configures the project in a spawned worker only when the *process-wide* start method
  is spawn and ``PACKAGE_NAME`` is set there (it never is in a spawned process), and when
  it does, its logging set-up recurses forever on the worker's second task. Without the
  project's settings a worker has
  none of this project's hooks (no nested MLflow runs, no artifacts) while kedro-mlflow's
  hook, registered by entry point, logs into stray runs. A :class:`WorkerBootstrap` put in
  the catalog travels with every task and configures the project in the worker once.
* **in-memory outputs across processes**: ``MemoryDataset`` outputs of the catalog
  (``copy_mode: assign`` for large arrays) live in one process; a worker's copy would
  never reach the next node's worker. For a parallel run they are replaced by Kedro's
  ``SharedMemoryDataset`` (held by the runner's manager process, pickled in and out).
* **MLflow**: the parent run and one nested run per namespace are created in the main
  process before any worker starts; each worker makes its node's namespace run the active
  one (:class:`anomaly_ae.hooks.NamespaceRunsHook`), so per-epoch metrics logged live from
  the training node, the metrics datasets, parameters, tags and artifacts all land in the
  category's run, whatever process runs the node. Only the main process closes runs.
* **torch threads**: each worker gets ``parallel.torch_threads`` intra-op threads;
  ``auto`` = usable cores // workers (at least 1), so workers x threads <= cores.
* **SQLite tracking store**: several processes write one ``mlflow.db``. MLflow already
  waits up to 20 s for a lock (``PRAGMA busy_timeout`` per session); the project's own
  tracking calls are retried on ``database is locked`` (:func:`retry_locked`), and the
  database is switched to WAL journaling before the workers start (readers no longer
  block writers).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kedro.framework.hooks import hook_impl

from anomaly_ae.hook_errors import refuses

log = logging.getLogger(__name__)

#: What Kedro's ParallelRunner reads to pick the multiprocessing start method.
MP_CONTEXT_ENV = "KEDRO_MP_CONTEXT"
SAFE_CONTEXTS = ("spawn", "forkserver")
#: Set in the main process for the workers of a parallel run (inherited at spawn).
RUNS_ENV = "ANOMALY_AE_MLFLOW_RUNS"  # JSON {namespace: run_id, "": parent run id}
THREADS_ENV = "ANOMALY_AE_TORCH_THREADS"
PARENT_ENV = "ANOMALY_AE_PARALLEL_PARENT"  # pid of the main process
#: Thread pools read by torch / numpy at import in a freshly spawned worker.
THREAD_POOL_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

T = TypeVar("T")


# ----------------------------------------------------------------- where are we
def is_parallel_run(catalog: Any = None, run_params: dict[str, Any] | None = None) -> bool:
    """Whether this run uses Kedro's ParallelRunner (whose session builds a
    ``SharedMemoryDataCatalog``; ``run_params['runner']`` names the runner too)."""
    from kedro.io import SharedMemoryDataCatalog

    if catalog is not None and isinstance(catalog, SharedMemoryDataCatalog):
        return True
    return "ParallelRunner" in str((run_params or {}).get("runner") or "")


def in_worker() -> bool:
    """True in a worker process of a parallel run started by this project."""
    return os.environ.get(PARENT_ENV, "") == str(os.getppid()) and RUNS_ENV in os.environ


def worker_runs() -> dict[str, str]:
    """In a worker: the MLflow run id of each namespace ("" = the parent run)."""
    return json.loads(os.environ.get(RUNS_ENV) or "{}")


# ----------------------------------------------------------------- torch threads
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def kedro_workers(pipeline, max_workers: int | None = None) -> int:
    """The number of processes Kedro's ParallelRunner starts for ``pipeline``
    (``ParallelRunner._get_required_workers_count``; ``max_workers`` defaults to the CPU count)."""
    required = len(pipeline.nodes) - len(pipeline.grouped_nodes) + 1
    return max(1, min(required, max_workers or os.cpu_count() or 1))


def torch_threads(setting: Any, workers: int, cores: int) -> int:
    """Intra-op torch threads per worker: ``auto`` (or null) = ``cores // workers``, at least
    1, so ``workers * threads <= cores`` (unless there are more workers than cores: 1 each);
    an integer is used as given (a warning says when it over-subscribes the cores)."""
    if setting is None or setting == "auto":
        return max(1, cores // max(1, workers))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"parallel.torch_threads must be 'auto' or an integer >= 1, got {setting!r}")
    if setting * workers > cores:
        log.warning(
            "parallel.torch_threads=%d with %d workers asks for %d threads on %d cores: they will "
            "compete (use 'auto').",
            setting,
            workers,
            setting * workers,
            cores,
        )
    return setting


def _runner_max_workers() -> int | None:
    """``max_workers`` of the ParallelRunner running this session (``--runner-params
    max_workers=N``), found in the caller frames of ``before_pipeline_run``; None if unknown."""
    import inspect

    from kedro.runner import ParallelRunner

    frame = inspect.currentframe()
    try:
        while frame is not None:
            runner = frame.f_locals.get("runner")
            if isinstance(runner, ParallelRunner):
                return getattr(runner, "_max_workers", None)
            frame = frame.f_back
    finally:
        del frame
    return None


# ----------------------------------------------------------------- SQLite tracking store
def is_locked_error(exc: BaseException) -> bool:
    text = f"{exc} {exc.__cause__ or ''} {exc.__context__ or ''}".lower()
    return "database is locked" in text or "database table is locked" in text


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried with a jittered back-off (0.2 s, 0.4 s ... up to ~25 s
    in all) while the SQLite tracking store answers ``database is locked``. A locked write is
    rolled back by MLflow, so retrying it does not log twice."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_locked_error(exc):
                raise
            delay = 0.1 * 2**attempt * (0.5 + random.random())
            log.debug("MLflow store locked (%s): retry %d in %.1f s", fn.__name__, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def tracked(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of :func:`retry_locked`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return retry_locked(fn, *args, **kwargs)

    return wrapper


def use_wal(tracking_uri: str) -> bool:
    """Switch a ``sqlite:///`` tracking database to WAL journaling (persistent; readers no
    longer block the writer). False when the URI is not a local SQLite file."""
    import sqlite3

    if not tracking_uri.startswith("sqlite:///"):
        return False
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not os.path.isfile(path):
        return False
    connection = sqlite3.connect(path, timeout=30)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        connection.close()
    return str(mode).lower() == "wal"


# ----------------------------------------------------------------- the summary node
class Summarise:
    """A picklable stand-in for ``summary.nodes.summarise_node(categories)`` (a closure,
    which ParallelRunner cannot send to a worker)."""

    __name__ = "summarise_categories"

    def __init__(self, categories: Sequence[str]) -> None:
        self.categories = tuple(categories)
        self.__annotations__: dict[str, Any] = {}  # Kedro's type-hint check: none to check

    def __call__(self, *inputs: Any):
        from anomaly_ae.pipelines.summary.nodes import summarise_node

        return summarise_node(self.categories)(*inputs)

    def __repr__(self) -> str:
        return f"Summarise({list(self.categories)})"


def picklable_summary(pipeline, categories: Sequence[str]):
    """``pipeline`` with its ``summarise_categories`` node made picklable when it is not."""
    from multiprocessing.reduction import ForkingPickler

    from kedro.pipeline import Pipeline

    nodes = []
    changed = False
    for node in pipeline.nodes:
        if node.name == "summarise_categories":
            try:
                ForkingPickler.dumps(node.func)
            except Exception:  # noqa: BLE001 - AttributeError / PicklingError: a closure
                node = node._copy(func=Summarise(categories))
                changed = True
        nodes.append(node)
    return Pipeline(nodes) if changed else pipeline


# ----------------------------------------------------------------- the hook
def export_runs(runs: dict[str, str] | None) -> None:
    """Hand the MLflow run of each namespace to the workers (None: forget them)."""
    if runs is None:
        os.environ.pop(RUNS_ENV, None)
    else:
        os.environ[RUNS_ENV] = json.dumps(runs)


class WorkerBootstrap:
    """Kept in the catalog of a parallel run, so it travels with every task Kedro sends to a
    worker. Unpickling it in a spawned worker configures the Kedro project there (settings,
    hence this project's hooks), which Kedro 1.x does not do itself: its
    ``Task._run_node_synchronization`` reads ``PACKAGE_NAME`` in the worker, where it is
    still unset."""

    def __init__(self, package_name: str) -> None:
        self.package_name = package_name

    def __reduce__(self):
        return (_bootstrap_worker, (self.package_name,))

    def load(self) -> None:  # pragma: no cover - never an input of a node
        return None

    def save(self, data: Any) -> None:  # pragma: no cover
        raise RuntimeError("WorkerBootstrap holds no data")

    def exists(self) -> bool:  # pragma: no cover
        return True

    def release(self) -> None:  # pragma: no cover
        return None

    def __repr__(self) -> str:
        return f"WorkerBootstrap({self.package_name!r})"


_CONFIGURED: str | None = None
#: Plugins whose hooks need the session's ``after_context_created`` / ``before_pipeline_run``,
#: which run in the main process only: off in the workers. kedro-mlflow's would log each
#: node's parameters unflattened into the category run (the main process logs them to the
#: parent run, as a sequential run does); kedro-viz's dataset statistics fail there.
WORKER_DISABLED_PLUGINS = ("kedro_mlflow", "kedro-mlflow", "kedro-viz", "kedro_viz")


def _bootstrap_worker(package_name: str) -> WorkerBootstrap:
    """Configure the project in this worker, once: its settings (hence hooks), pipelines and
    logger, as ``kedro.framework.project.configure_project`` does, but leaving
    ``PACKAGE_NAME`` unset so that Kedro's own worker bootstrap stays off (it sets
    ``LOGGING.data`` to ``LOGGING`` itself; the next task's bootstrap then recurses forever)."""
    global _CONFIGURED
    import multiprocessing

    from kedro.framework import project

    if multiprocessing.parent_process() is not None and _CONFIGURED != package_name:
        project.settings.configure(f"{package_name}.settings")
        disabled = tuple(project.settings.get("DISABLE_HOOKS_FOR_PLUGINS", ()))
        project.settings.set("DISABLE_HOOKS_FOR_PLUGINS", (*disabled, *WORKER_DISABLED_PLUGINS))
        project.pipelines.configure(f"{package_name}.pipeline_registry")
        project.LOGGING.set_project_logging(package_name)
        _CONFIGURED = package_name
    return WorkerBootstrap(package_name)


#: The catalog entry holding the :class:`WorkerBootstrap` of a parallel run.
BOOTSTRAP_DATASET = "anomaly_ae_parallel_bootstrap"


class ParallelRunHook:
    """Everything ``kedro run --runner=ParallelRunner`` needs (see the module docstring).

    Main process, ``before_pipeline_run``: refuse ``fork``; choose the torch threads per
    worker; share in-memory outputs across processes; WAL for the SQLite store; make the
    workers configure the project. ``before_node_run`` in a worker (first of all hooks, so
    kedro-mlflow's parameter logging already finds the run): torch threads and the node's
    namespace run. ``after_pipeline_run`` / ``on_pipeline_error``: restore the main process.
    """

    def __init__(self) -> None:
        self._previous: dict[str, str | None] | None = None

    @hook_impl
    @refuses
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not is_parallel_run(catalog, run_params):
            return
        import multiprocessing

        from kedro.framework.project import PACKAGE_NAME

        from anomaly_ae import run_params as current_params

        context = os.environ.get(MP_CONTEXT_ENV) or multiprocessing.get_start_method()
        if context not in SAFE_CONTEXTS:
            raise RuntimeError(
                f"ParallelRunner with {MP_CONTEXT_ENV}={context!r}: torch in a forked worker can deadlock. "
                f"Use spawn (the project's default: unset {MP_CONTEXT_ENV} or set it to 'spawn')."
            )
        if not PACKAGE_NAME:
            raise RuntimeError(
                "ParallelRunner needs a configured Kedro project (KedroSession of the package)."
            )
        setting = (current_params.current().get("parallel") or {}).get("torch_threads", "auto")
        workers = kedro_workers(pipeline, _runner_max_workers())
        threads = torch_threads(setting, workers, usable_cores())
        env = {PARENT_ENV: str(os.getpid()), THREADS_ENV: str(threads)}
        env.update({name: str(threads) for name in THREAD_POOL_ENVS})
        self._previous = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        # The workers configure the project when they unpickle their first task. (Kedro's own
        # worker bootstrap runs only when the *process-wide* start method is spawn, and then
        # breaks its logging configuration on a worker's second task: left off here.)
        catalog[BOOTSTRAP_DATASET] = WorkerBootstrap(PACKAGE_NAME)
        shared = share_memory_outputs(pipeline, catalog)
        wal = _wal_for_active_store()
        log_parameters_to_parent(pipeline, catalog)
        log.info(
            "ParallelRunner: %d workers x %d torch thread(s) on %d cores (parallel.torch_threads=%s), "
            "start method %s, %d in-memory outputs shared across processes%s.",
            workers,
            threads,
            usable_cores(),
            setting,
            context,
            len(shared),
            ", MLflow SQLite store in WAL mode" if wal else "",
        )

    @hook_impl(tryfirst=True)
    def before_node_run(self, node, catalog, inputs, is_async: bool) -> None:
        if not in_worker():
            return
        set_worker_threads()
        runs = worker_runs()
        run_id = runs.get(node.namespace or "", runs.get(""))
        if run_id:
            activate_run(run_id)

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        self._restore()

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is None:
            return
        restore_environment(self._previous)
        self._previous = None


def log_parameters_to_parent(pipeline, catalog) -> None:
    """The parameters every node reads, flattened (``training.epochs``), into the active
    (parent) run: what kedro-mlflow's hook logs node by node in a sequential run, where its
    hook is off in the workers (:data:`WORKER_DISABLED_PLUGINS`)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    params: dict[str, Any] = {}
    for name in sorted(n for n in pipeline.inputs() if n.startswith("params:")):
        params.update(_flatten({name.removeprefix("params:"): catalog.load(name)}))
    retry_locked(mlflow.log_params, {k: str(v)[:6000] for k, v in params.items()})


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # an empty one logs nothing, as in kedro-mlflow
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def activate_run(run_id: str) -> None:
    """In a worker: make ``run_id`` the active MLflow run. The run it replaces is popped with
    status RUNNING (it may still be in use by another worker; the main process closes it)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return
    while mlflow.active_run() is not None:
        retry_locked(mlflow.end_run, "RUNNING")
    retry_locked(mlflow.start_run, run_id=run_id)


def _wal_for_active_store() -> bool:
    try:
        import mlflow

        return use_wal(mlflow.get_tracking_uri())
    except Exception as exc:  # noqa: BLE001 - WAL is an optimisation
        log.warning("Could not switch the MLflow SQLite store to WAL: %s", exc)
        return False


def restore_environment(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def share_memory_outputs(pipeline, catalog) -> list[str]:
    """Replace each plain ``MemoryDataset`` a node writes with a ``SharedMemoryDataset``
    (the runner gives it its manager), so the next node sees it in another process."""
    from kedro.io import MemoryDataset
    from kedro.io.shared_memory_dataset import SharedMemoryDataset

    shared = []
    quiet = logging.getLogger("kedro.io.data_catalog")  # "Replacing dataset ...": intended
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name in sorted(pipeline.all_outputs()):
            dataset = catalog.get(name, fallback_to_runtime_pattern=True)
            if type(dataset) is MemoryDataset:
                catalog[name] = SharedMemoryDataset()
                shared.append(name)
    finally:
        quiet.setLevel(level)
    return shared


def set_worker_threads() -> None:
    """In a worker: torch's intra-op threads as the main process chose."""
    value = os.environ.get(THREADS_ENV)
    if not value:
        return
    import torch

    if torch.get_num_threads() != int(value):
        torch.set_num_threads(int(value))
    global _THREADS_LOGGED
    if not _THREADS_LOGGED:
        log.info("Worker %d: %d torch thread(s).", os.getpid(), torch.get_num_threads())
        _THREADS_LOGGED = True


_THREADS_LOGGED = False
