"""Project hooks: run parameters for the registry, clear errors for missing checkpoints,
MLflow tags, params and artifacts, nested runs per namespace."""

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


class RunParamsHook:
    """Check the run's parameters (``--env`` and ``--params`` merged; see
    :mod:`anomaly_ae.param_schema`) and record them before Kedro builds the pipelines,
    whose namespaces depend on them (:mod:`anomaly_ae.run_params`)."""

    @hook_impl
    def after_context_created(self, context) -> None:
        from kedro.framework.project import pipelines

        from anomaly_ae import run_params
        from anomaly_ae.param_schema import validate_parameters

        validate_parameters(context.params)  # before any node: a bad value names its key
        if run_params.remember(context.params):
            pipelines.configure("anomaly_ae.pipeline_registry")  # rebuild with these parameters


class PinRunVersionsHook:
    """A run reads back exactly the versions it saved itself.

    Kedro loads the *latest* version of a versioned dataset. When two runs share a project,
    "latest" may be the other run's checkpoint: run A would calibrate and evaluate run B's
    model. Before the run starts, every versioned dataset the pipeline *writes* gets its load
    version pinned to this run's save version, so later nodes of the run load what its own
    earlier nodes saved. Datasets the run only reads keep Kedro's rule (latest, or
    ``--load-versions``).
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from kedro.io.core import Version

        for name in sorted(pipeline.all_outputs()):
            dataset = catalog.get(name)
            version = getattr(dataset, "_version", None)
            if isinstance(version, Version) and version.save and version.load is None:
                dataset._version = Version(version.save, version.save)


#: Inputs a pipeline may need from an earlier run, and the command that makes them.
REQUIRED_ARTIFACTS = {
    "model_checkpoint": ("trained model", "kedro run --pipeline=training"),
    "dataset_info": ("prepared data", "kedro run --pipeline=data_ingestion"),
    "train_images": ("preprocessed images", "kedro run --pipeline=data_processing"),
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
                if "." in namespace:  # <category>.<variant>: a loss-study variant
                    how = f"kedro run --pipeline=loss_study --namespaces={namespace}"
                elif namespace:
                    how += f" --params data.category={namespace}"
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
    """One nested MLflow run per Kedro namespace: the category (``bottle``) under the run
    kedro-mlflow opens for ``kedro run``, and in the loss study each variant
    (``bottle.hybrid``) under its category's run.

    Before each namespaced node this hook makes that namespace's run the active one, so the
    MLflow catalog datasets and the parameters of the namespace land in it. Each run is
    tagged with ``category`` (and ``variant``) and ``git_commit``. Nodes without a namespace
    keep logging into the top run.
    """

    def __init__(self) -> None:
        self._children: dict[str, str] = {}
        self._root: str | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._children = {}
        self._root = None

    def _run_for(self, namespace: str) -> str:
        """The run id of ``namespace``, created (with its parents) on first use."""
        import mlflow

        if namespace in self._children:
            return self._children[namespace]
        parent_namespace = namespace.rpartition(".")[0]
        parent = self._run_for(parent_namespace) if parent_namespace else self._root
        category, _, variant = namespace.partition(".")
        tags = {
            "mlflow.parentRunId": parent,
            "category": category,
            **({"variant": variant} if variant else {}),
        }
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        experiment = mlflow.get_run(parent).info.experiment_id
        child = mlflow.MlflowClient().create_run(experiment, run_name=namespace, tags=tags)
        self._children[namespace] = child.info.run_id
        log.info("MLflow run '%s' (%s) under %s", namespace, child.info.run_id, parent)
        return child.info.run_id

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async: bool) -> None:
        namespace = node.namespace or ""
        if not namespace or not _mlflow_active():
            return
        import mlflow

        if self._root is None:
            self._root = mlflow.active_run().info.run_id
        run_id = self._run_for(namespace)
        if mlflow.active_run().info.run_id != run_id:
            mlflow.start_run(run_id=run_id, nested=True)
        variant = namespace.rpartition(".")[2] if "." in namespace else None
        params = {k[len("params:") :]: v for k, v in inputs.items() if k.startswith("params:")}
        for key, value in _flatten(params).items():  # "hybrid.loss.mse_weight" -> "loss.mse_weight"
            name = key.removeprefix(f"{variant}.") if variant else key
            mlflow.log_param(name, str(value)[:6000])

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
    ``metadata: {mlflow_artifact_path: <folder>}``, and a saved dict's items as run
    parameters when it has ``metadata: {mlflow_params_prefix: <prefix>}``.

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
        metadata = getattr(dataset, "metadata", None) or {}
        import mlflow

        prefix = metadata.get("mlflow_params_prefix")
        if prefix and isinstance(data, dict):
            flat = {f"{prefix}.{k}": str(v)[:6000] for k, v in _flatten(data).items()}
            mlflow.log_params(flat)
        artifact_path = metadata.get("mlflow_artifact_path")
        if not artifact_path:
            return

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
