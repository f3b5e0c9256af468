"""Dagster definitions.

Scaffolded by ``kedro dagster init --env base`` (kedro-dagster 0.8.1) and edited: the Kedro
environment and ``--params`` come from ``KEDRO_ENV`` / ``ANOMALY_AE_PARAMS``; every job runs
in one process so the Kedro and MLflow hooks span its steps; Kedro's in-memory datasets stay
in memory. See :mod:`anomaly_ae.orchestration` and ``conf/base/dagster.yml``.
"""

import dagster as dg

from anomaly_ae.orchestration import (
    ProjectTranslator,
    kedro_env,
    kedro_memory_io_manager,
    kedro_pipeline_error_hook,
    runtime_params,
)

translator = ProjectTranslator(env=kedro_env(), runtime_params=runtime_params())
dagster_code_location = translator.to_dagster()

resources = dagster_code_location.named_resources
# The "io_manager" key handles how Kedro MemoryDatasets are handled by Dagster
resources |= {
    "io_manager": kedro_memory_io_manager(translator._catalog),
}

# One process per job run: the Kedro hooks (kedro-mlflow's run, the nested run per category)
# live in that process. Dagster runs several jobs (categories) at once.
default_executor = dg.in_process_executor

on_failure = kedro_pipeline_error_hook(translator)

# Define default loggers for Dagster jobs
default_loggers = {
    "console": dg.colored_console_logger,
}

defs = dg.Definitions(
    assets=list(dagster_code_location.named_assets.values()),
    resources=resources,
    # a failed step closes the job's MLflow runs as FAILED, as `kedro run` does
    jobs=[job.with_hooks({on_failure}) for job in dagster_code_location.named_jobs.values()],
    schedules=list(dagster_code_location.named_schedules.values()),
    sensors=list(dagster_code_location.named_sensors.values()),
    loggers=default_loggers,
    executor=default_executor,
)
