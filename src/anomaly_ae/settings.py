"""Kedro project settings."""

import os
from pathlib import Path

from kedro.config import OmegaConfigLoader

from anomaly_ae.hooks import (
    CachedInputsHook,
    InterruptedRunsHook,
    MissingCheckpointHook,
    MlflowArtifactsHook,
    NamespaceRunsHook,
    PinRunVersionsHook,
    RetentionHook,
    RunParamsHook,
    RunTagsHook,
)
from anomaly_ae.logging_filters import install as install_warning_filters
from anomaly_ae.mlflow_ui import MlflowExperimentKindHook
from anomaly_ae.parallel import ParallelRunHook

# `kedro run --runner=ParallelRunner`: worker processes are started with spawn (torch in a
# forked child can deadlock); Kedro's ParallelRunner reads KEDRO_MP_CONTEXT. See
# anomaly_ae.parallel (a run with fork is refused).
os.environ.setdefault("KEDRO_MP_CONTEXT", "spawn")

# Third-party warnings a user can do nothing about (each one named and explained there).
install_warning_filters()

# kedro-mlflow registers its own MlflowHook through its entry point.
HOOKS = (
    RunParamsHook(),
    PinRunVersionsHook(),
    MissingCheckpointHook(),
    CachedInputsHook(),
    InterruptedRunsHook(),
    NamespaceRunsHook(),
    RunTagsHook(),
    MlflowArtifactsHook(),
    RetentionHook(),
    ParallelRunHook(),
    MlflowExperimentKindHook(),
)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft"},
    # ${project_root:} in configuration: the project folder, also from notebooks/ (so MLflow's
    # sqlite:///${project_root:}/mlflow.db is one database wherever a session starts)
    "custom_resolvers": {"project_root": lambda: _project_root()},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
}


def _project_root() -> str:
    from anomaly_ae.run_params import project_root

    return str(project_root(Path.cwd()).resolve())
