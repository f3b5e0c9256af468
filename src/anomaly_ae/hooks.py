"""Project hooks: clear errors for missing checkpoints, MLflow tags, nested runs per namespace."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)

RUN_TAGS_SUFFIX = "run_tags"


def _mlflow_active() -> bool:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return mlflow.active_run() is not None


#: Inputs a pipeline may need from an earlier run, and the command that makes them.
REQUIRED_ARTIFACTS = {
    "model_checkpoint": ("trained model", "kedro run --pipeline=training"),
    "decision_threshold": ("calibrated decision threshold", "kedro run --pipeline=evaluate"),
    "normal_reference": ("normal reference (fitted anomaly-map statistics)", "kedro run --pipeline=evaluate"),
}


class MissingCheckpointHook:
    """Fail before anything runs when a pipeline needs a checkpoint (or a calibrated
    threshold) that does not exist, saying which command makes it."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        needed = [n for n in pipeline.inputs() if n.rsplit(".", 1)[-1] in REQUIRED_ARTIFACTS]
        order = list(REQUIRED_ARTIFACTS)
        for name in sorted(needed, key=lambda n: (order.index(n.rsplit(".", 1)[-1]), n)):
            base = name.rsplit(".", 1)[-1]
            try:
                exists = catalog.exists(name)
            except Exception:  # noqa: BLE001 - a missing version also means "not there"
                exists = False
            if not exists:
                what, how = REQUIRED_ARTIFACTS[base]
                namespace = name[: -len(base)].rstrip(".")
                if namespace:
                    how = f"kedro run --pipeline=loss_study --namespaces={namespace}"
                raise RuntimeError(
                    f"No {what} found for '{name}'. Make one first: `{how}` "
                    f"(or pick an existing version with --load-versions={name}:<version>)."
                )


class RunTagsHook:
    """Copy ``*run_tags`` node outputs (device, data_source, category, ...) and the git
    commit to the active MLflow run."""

    def __init__(self) -> None:
        self._commit_logged = False

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._commit_logged = False

    @hook_impl
    def after_node_run(self, node, catalog, inputs, outputs: dict[str, Any], is_async: bool) -> None:
        if not _mlflow_active():
            return
        import mlflow

        if not self._commit_logged:
            commit = git_commit()
            if commit:
                mlflow.set_tag("git_commit", commit)
            self._commit_logged = True
        for name, value in outputs.items():
            if name.endswith(RUN_TAGS_SUFFIX) and isinstance(value, dict):
                mlflow.set_tags({k: str(v) for k, v in value.items()})


def git_commit(path: str | Path = ".") -> str | None:
    """The current git commit (with ``-dirty`` if the tree has changes), or None."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


class NamespaceRunsHook:
    """One nested MLflow run per top-level Kedro namespace (e.g. the loss-study variants).

    kedro-mlflow opens a single run per ``kedro run``. Before each namespaced node this hook
    makes that namespace's child run the active one, so MLflow catalog datasets and
    parameters of the namespace land in the child, named after the namespace. Nodes without
    a namespace keep logging into the parent run.
    """

    def __init__(self) -> None:
        self._children: dict[str, str] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._children = {}

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async: bool) -> None:
        namespace = (node.namespace or "").split(".")[0]
        if not namespace or not _mlflow_active():
            return
        import mlflow

        if namespace not in self._children:
            parent = mlflow.active_run()
            child = mlflow.start_run(run_name=namespace, nested=True, tags={"variant": namespace})
            self._children[namespace] = child.info.run_id
            log.info("MLflow child run '%s' (%s) under %s", namespace, child.info.run_id, parent.info.run_id)
        elif mlflow.active_run().info.run_id != self._children[namespace]:
            mlflow.start_run(run_id=self._children[namespace], nested=True)
        params = {k[len("params:") :]: v for k, v in inputs.items() if k.startswith("params:")}
        for key, value in _flatten(params).items():
            mlflow.log_param(key.removeprefix(f"{namespace}."), str(value)[:6000])

    def _close(self, status: str) -> None:
        if not self._children:
            return
        import mlflow

        client = mlflow.MlflowClient()
        for run_id in self._children.values():
            client.set_terminated(run_id, status)
        self._children = {}
        while mlflow.active_run() is not None:  # drop the duplicates kedro-mlflow pushed per node
            mlflow.end_run(status)

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        self._close("FINISHED")

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._close("FAILED")


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class MlflowArtifactsHook:
    """Log a saved dataset's file to the active MLflow run when its catalog entry has
    ``metadata: {mlflow_artifact_path: <folder>}``.

    Unlike wrapping it in kedro-mlflow's MlflowArtifactDataset, this keeps Kedro versioning
    intact (a wrapped versioned dataset gets a save version of its own, which Kedro 1.x
    rejects) and follows the active run, so namespaced outputs land in their child run.
    """

    def __init__(self) -> None:
        self._catalog = None

    @hook_impl
    def after_catalog_created(self, catalog, **kwargs) -> None:
        self._catalog = catalog

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self._catalog is None or not _mlflow_active():
            return
        dataset = self._catalog.get(dataset_name)
        artifact_path = (getattr(dataset, "metadata", None) or {}).get("mlflow_artifact_path")
        if not artifact_path:
            return
        import mlflow

        path = saved_path(dataset)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{path.name}")
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        else:
            log.warning("Not logged to MLflow: %s was not found after saving %s", path, dataset_name)


def saved_path(dataset) -> Path:
    """The local path a (possibly versioned) file dataset wrote on its last save."""
    if getattr(dataset, "_version", None) is not None:
        return Path(dataset._get_versioned_path(dataset.resolve_save_version()))
    for attribute in ("_filepath", "_path"):
        if getattr(dataset, attribute, None) is not None:
            return Path(str(getattr(dataset, attribute)))
    raise ValueError(f"Cannot tell where {dataset} saved its data")
