"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from anomaly_ae.hooks import (
    MissingCheckpointHook,
    MlflowArtifactsHook,
    NamespaceRunsHook,
    RunParamsHook,
    RunTagsHook,
)

# kedro-mlflow registers its own MlflowHook through its entry point.
HOOKS = (RunParamsHook(), MissingCheckpointHook(), NamespaceRunsHook(), RunTagsHook(), MlflowArtifactsHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft"},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
}
