"""Running the categories on Dagster through kedro-dagster (``pip install -e ".[dagster]"``).

``kedro dagster init --env base`` scaffolded ``conf/base/dagster.yml`` and
``src/anomaly_ae/definitions.py`` (the Dagster code location, also named in ``dg.toml``).
``dagster.yml`` declares a *job factory*, ``{category}__main``: kedro-dagster makes one Dagster
job per category namespace of the ``__default__`` pipeline (ingestion, preprocessing,
training, calibration, evaluation, report), plus a ``summary`` job. A job's name carries the
Kedro environment: ``quick__bottle__main``.

What this module adds to the generated code location:

* The Kedro environment and runtime parameters come from the process environment, like
  ``kedro run --env quick --params categories=bottle+carpet``::

      KEDRO_ENV=quick ANOMALY_AE_PARAMS=categories=bottle+carpet \\
          dagster job execute -m anomaly_ae.definitions -j quick__bottle__main

  The categories shape the pipelines (:mod:`anomaly_ae.run_params`), so they must be known
  when the code location loads: from ``ANOMALY_AE_PARAMS`` or the environment's
  ``categories`` parameter.
* Each job runs in one process (the in-process executor): the Kedro hooks and the MLflow
  runs (kedro-mlflow's run, the project's nested run per category from
  :class:`anomaly_ae.hooks.NamespaceRunsHook`) span all the job's steps, exactly as in
  ``kedro run``. Scale-out is across jobs: Dagster launches each job run (one category) in a
  process of its own, and runs several at once.
* :func:`kedro_memory_io_manager` replaces the generated ``fs_io_manager`` for Kedro's
  in-memory datasets: values stay in the job's process (torch modules and arrays are not
  pickled to disk), and a pipeline input that is a Kedro ``MemoryDataset`` with its data in
  the catalog (``{namespace}.category_name``) is read from the Kedro catalog, which
  ``fs_io_manager`` cannot do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from kedro_dagster import KedroProjectTranslator

#: Environment variables read when the code location loads.
ENV_VAR, PARAMS_VAR = "KEDRO_ENV", "ANOMALY_AE_PARAMS"
DEFAULT_ENV = "local"


def kedro_env() -> str:
    """The Kedro environment of the code location (``KEDRO_ENV``, else ``local``)."""
    return os.environ.get(ENV_VAR) or DEFAULT_ENV


def parse_params(text: str | None) -> dict[str, Any]:
    """``key=value,other.key=value`` (the syntax of ``kedro run --params``) as a nested dict."""
    from omegaconf import OmegaConf

    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    for item in items:
        if "=" not in item or not item.partition("=")[0].strip():
            raise ValueError(f"{PARAMS_VAR}: {item!r} is not key=value (e.g. categories=bottle+carpet)")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items)) if items else {}


def runtime_params() -> dict[str, Any]:
    return parse_params(os.environ.get(PARAMS_VAR))


class ProjectTranslator(KedroProjectTranslator):
    """kedro-dagster's translator, with runtime parameters (``--params``) for the session."""

    def __init__(
        self,
        env: str,
        project_path: Path | None = None,
        conf_source: str | None = None,
        runtime_params: dict[str, Any] | None = None,
    ) -> None:
        self._runtime_params = runtime_params or {}
        super().__init__(env=env, project_path=project_path, conf_source=conf_source)

    def initialize_kedro(self, conf_source: str | None = None) -> None:
        # kedro_dagster.translator.KedroProjectTranslator.initialize_kedro, plus runtime_params
        from kedro.framework.project import find_pipelines
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        self._project_metadata = bootstrap_project(self._project_path)
        self._session = KedroSession.create(
            project_path=self._project_path,
            env=self._env,
            conf_source=conf_source,
            runtime_params=self._runtime_params,
        )
        self._session_id = self._session.session_id
        self._context = self._session.load_context()  # RunParamsHook: the categories, from here
        self._catalog = self._context.catalog
        self._pipelines = find_pipelines()


class KedroMemoryIOManager(dg.IOManager):
    """Kedro's in-memory datasets inside one job run (in-process executor): outputs are kept
    in memory; an input no step of the run made (a job input) is loaded from the Kedro catalog."""

    def __init__(self, catalog) -> None:
        self._catalog = catalog
        self._values: dict[tuple, Any] = {}

    @staticmethod
    def _key(context: dg.OutputContext) -> tuple | None:
        try:
            return (context.run_id, context.step_key, context.name)
        except dg.DagsterInvariantViolationError:  # no step made it: a job input
            return None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        self._values[self._key(context)] = obj

    def load_input(self, context: dg.InputContext) -> Any:
        key = self._key(context.upstream_output) if context.upstream_output is not None else None
        if key is not None and key in self._values:
            return self._values[key]
        if context.has_asset_key:  # asset key [env, *dataset name parts]
            name = ".".join(context.asset_key.path[1:])
            return self._catalog.load(name)
        raise KeyError(f"No in-memory value for input '{context.name}' of step '{context.step_key}'")


def kedro_memory_io_manager(catalog) -> dg.IOManagerDefinition:
    """A fresh :class:`KedroMemoryIOManager` per job run, over ``catalog``."""

    @dg.io_manager
    def _manager(_init_context) -> KedroMemoryIOManager:
        return KedroMemoryIOManager(catalog)

    return _manager


def _end_active_mlflow_runs(status: str = "FAILED") -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run(status)


def kedro_pipeline_error_hook(translator: KedroProjectTranslator) -> dg.HookDefinition:
    """A Dagster failure hook that does what ``kedro run`` does when a node fails: call
    Kedro's ``on_pipeline_error`` hooks in the job's own process (the project's
    :class:`anomaly_ae.hooks.NamespaceRunsHook` marks the category run FAILED), then end the
    MLflow runs still open as FAILED. Without it the Dagster run's MLflow run (opened by
    dagster-mlflow, which kedro-mlflow then leaves open) would be closed as FINISHED when the
    process exits. kedro-dagster's own ``on_pipeline_error_sensor`` runs in the Dagster
    daemon, where none of these runs is open."""

    @dg.failure_hook(name="kedro_on_pipeline_error", required_resource_keys={"kedro_run"})
    def _on_failure(context: dg.HookContext) -> None:
        import atexit

        resource = context.resources.kedro_run
        error = context.op_exception or RuntimeError(f"Dagster step {context.step_key} failed")
        try:
            translator._context._hook_manager.hook.on_pipeline_error(
                error=error,
                run_params=resource.run_params,
                pipeline=resource.pipeline,
                catalog=translator._catalog,
            )
        finally:
            _end_active_mlflow_runs("FAILED")
            # dagster-mlflow re-activates its run when it sets up resources again after the
            # hook, and MLflow's own exit handler would then close it FINISHED: close it first
            # (exit handlers run last-registered first).
            atexit.unregister(_end_active_mlflow_runs)
            atexit.register(_end_active_mlflow_runs, "FAILED")

    return _on_failure
