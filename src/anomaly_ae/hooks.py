"""Project hooks: run parameters for the registry, clear errors for missing checkpoints,
MLflow tags, params and artifacts, nested runs per namespace."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from anomaly_ae import parallel
from anomaly_ae.hook_errors import refuses
from anomaly_ae.parallel import retry_locked

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

        global RUN_SAVE_VERSION
        RUN_SAVE_VERSION = None  # this run's, never an earlier in-process run's
        pinned = []
        for name in sorted(pipeline.all_outputs()):
            dataset = catalog.get(name)
            version = getattr(dataset, "_version", None)
            if isinstance(version, Version) and version.save and version.load is None:
                pinned.append(dataset)
        if not pinned:
            return
        # Kedro's save version is a millisecond timestamp: two runs started in the same
        # millisecond would share it. Claim it atomically (mkdir); take the next free one if taken.
        own = claim_save_version(pinned[0]._version.save)
        for dataset in pinned:
            dataset._version = Version(own, own)
        RUN_SAVE_VERSION = own
        # tagged now when kedro-mlflow's run is already open (a ParallelRunner's main process
        # sees no node hooks); otherwise InterruptedRunsHook tags it at the first node
        if not parallel.in_worker() and _mlflow_active():
            from anomaly_ae import prune

            tag_top_run({prune.SAVE_VERSION_TAG: own})


#: The version folder the current run writes (set by :class:`PinRunVersionsHook` before any
#: node runs; tagged on its MLflow run by :class:`InterruptedRunsHook` as
#: ``anomaly_ae.save_version``, which ``anomaly_ae.prune`` protects while the run is RUNNING).
RUN_SAVE_VERSION: str | None = None


def claim_save_version(version: str, root: Path | None = None) -> str:
    """``version`` or the next free millisecond after it, claimed for this run by creating
    ``data/.run_versions/<version>`` (``os.mkdir`` is atomic: one run gets each version)."""
    import os
    from datetime import datetime, timedelta

    from anomaly_ae.run_params import project_root

    folder = (root or project_root(Path.cwd())) / "data" / ".run_versions"
    folder.mkdir(parents=True, exist_ok=True)
    fmt = "%Y-%m-%dT%H.%M.%S.%f"
    while True:
        try:
            os.mkdir(folder / version)
            return version
        except FileExistsError:
            stamp = datetime.strptime(version.removesuffix("Z"), fmt) + timedelta(milliseconds=1)
            version = stamp.strftime(fmt)[:-3] + "Z"


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
    @refuses
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        needed = [n for n in pipeline.inputs() if n.rsplit(".", 1)[-1] in REQUIRED_ARTIFACTS]
        order = list(REQUIRED_ARTIFACTS)
        for name in sorted(needed, key=lambda n: (order.index(n.rsplit(".", 1)[-1]), n)):
            base = name.rsplit(".", 1)[-1]
            try:
                exists = catalog.exists(name)
            except Exception:  # noqa: BLE001 - a missing version also means "not there"
                exists = False
            requested = (run_params.get("load_versions") or {}).get(name)
            if not exists and requested:
                raise RuntimeError(missing_version_message(name, requested, catalog.get(name)))
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


def missing_version_message(name: str, version: str, dataset) -> str:
    """Why ``--load-versions name:version`` found nothing, the versions there are, and - when
    retention deleted it - the MLflow run that holds a copy and the command that restores it."""
    from anomaly_ae import prune
    from anomaly_ae import run_params as current_params

    folder = Path(str(dataset._filepath))
    there = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    text = (
        f"--load-versions asks for version {version} of '{name}', which is not in {folder} "
        f"(versions there: {', '.join(there) or 'none'}). Retention keeps the newest "
        "retention.keep_last versions of each dataset and deletes older ones."
    )
    artifact_path = (getattr(dataset, "metadata", None) or {}).get("mlflow_artifact_path")
    if not artifact_path:
        return text
    artifact = f"{artifact_path}/{folder.name}"
    try:
        tracking_uri = prune._tracking_uri(current_params.project_root(Path.cwd()))
        runs = prune.logged_copies(tracking_uri, version, artifact, run_name=name.rpartition(".")[0])
    except Exception as exc:  # noqa: BLE001 - the message must not fail on tracking trouble
        log.warning("Could not look for a logged copy in MLflow: %s", exc)
        runs = []
    if runs:
        run_id, uri = runs[0]
        text += (
            f" MLflow run {run_id} logged it; restore it with: mlflow artifacts download "
            f"--artifact-uri {uri} --dst-path {folder / version}"
        )
    return text


#: Cached inputs: written by data_ingestion / data_processing, read by later stages.
CACHED_INPUTS = (
    "dataset_info",
    "raw_manifest",
    "image_manifest",
    "train_images",
    "validation_images",
    "test_images",
)


class CachedInputsHook:
    """Before a run that *reads* cached inputs it did not make (``--pipeline=evaluate``,
    ``training``, ``data_processing`` ...), check they were made from this run's ``data.*``
    and ``preprocessing.*`` and from the image folder as it is now; refuse otherwise, naming
    the difference and the command that rebuilds them (:mod:`anomaly_ae.data.fingerprint`)."""

    @hook_impl
    @refuses
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from anomaly_ae import run_params as current_params
        from anomaly_ae.data import fingerprint

        read = [n for n in sorted(pipeline.inputs()) if n.rsplit(".", 1)[-1] in CACHED_INPUTS]
        if not read:
            return
        params = current_params.current()
        infos: dict[str, dict] = {}
        for name in read:
            namespace, _, base = name.rpartition(".")
            info_name = f"{namespace}.dataset_info" if namespace else "dataset_info"
            if info_name not in infos:
                if not catalog.exists(info_name):
                    return  # MissingCheckpointHook has said what to run
                infos[info_name] = catalog.load(info_name)
                category = namespace.split(".")[0] if namespace else params["data"]["category"]
                fingerprint.check_dataset_info(
                    infos[info_name], {**params["data"], "category": category}, info_name
                )
            loader = getattr(catalog.get(name), "load_member", None)
            if loader is not None:
                fingerprint.check_stamp(
                    _as_str(loader(fingerprint.STAMP_KEY)), infos[info_name], params["preprocessing"], name
                )


def _as_str(value) -> str | None:
    return None if value is None else str(value)


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
                retry_locked(mlflow.set_tag, "git_commit", commit)
            self._commit_logged = True
        for name, value in outputs.items():
            if name.endswith(RUN_TAGS_SUFFIX) and isinstance(value, dict):
                retry_locked(mlflow.set_tags, {k: str(v) for k, v in value.items()})


#: Tags that say which process owns a run, so a later run can tell it was killed.
OWNER_PID, OWNER_HOST = "anomaly_ae.pid", "anomaly_ae.host"


def owner_tags() -> dict[str, str]:
    import os
    import socket

    return {OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname()}


def _process_gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def mark_interrupted_runs(client) -> list[str]:
    """Set every MLflow run still RUNNING whose owning process on this host is gone (killed,
    powered off) to FAILED with the tag ``anomaly_ae.interrupted=true``; returns their ids."""
    import socket

    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    marked = []
    for run in client.search_runs(
        experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000
    ):
        tags = run.data.tags
        if tags.get(OWNER_HOST) != host or not tags.get(OWNER_PID, "").isdigit():
            continue
        if _process_gone(int(tags[OWNER_PID])):
            client.set_tag(run.info.run_id, "anomaly_ae.interrupted", "true")
            client.set_terminated(run.info.run_id, "FAILED")
            marked.append(run.info.run_id)
    return marked


class InterruptedRunsHook:
    """A run killed with ``kill -9`` (or a power cut) cannot close its MLflow run, which would
    stay RUNNING forever. Each run is tagged with its process id and host; the next run in the
    project marks the runs whose process is gone as FAILED (tag ``anomaly_ae.interrupted``)."""

    def __init__(self) -> None:
        self._tagged = False
        self._version_tagged = False

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        # hooks run last-registered first: PinRunVersionsHook has not claimed this run's
        # version yet, so only the owner is tagged here and the version at the first node
        self._tagged = self._version_tagged = False
        try:
            import mlflow

            marked = mark_interrupted_runs(mlflow.MlflowClient())
        except Exception as exc:  # noqa: BLE001 - tracking trouble must not stop the run
            log.warning("Could not check MLflow for interrupted runs: %s", exc)
            return
        for run_id in marked:
            log.warning("MLflow run %s was interrupted (its process is gone): marked FAILED.", run_id)
        self._tag_top_run(with_version=False)  # RUN_SAVE_VERSION may still be an earlier run's

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async: bool) -> None:
        self._tag_top_run(with_version=True)

    def _tag_top_run(self, with_version: bool) -> None:
        """Tag the top run of the active chain (kedro-mlflow's run for ``kedro run``) with its
        owner, and ``with_version`` (once nodes run, the versions are claimed) with this run's
        save version. Not from a ParallelRunner worker: the main process owns the run (and
        PinRunVersionsHook tags the version there)."""
        if self._version_tagged or parallel.in_worker() or not _mlflow_active():
            return
        from anomaly_ae import prune

        tags = {} if self._tagged else owner_tags()
        version = RUN_SAVE_VERSION if with_version else None
        if version:  # the version folder this run writes (anomaly_ae.prune keeps it)
            tags[prune.SAVE_VERSION_TAG] = version
        if tags:
            tag_top_run(tags)
        self._tagged = True
        # a run that writes no versioned dataset has no version to tag: stop looking
        self._version_tagged = with_version


def tag_top_run(tags: dict[str, str]) -> None:
    """Set ``tags`` on the top run of the active MLflow chain (kedro-mlflow's run for
    ``kedro run``), retrying while the database is locked."""
    import mlflow

    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    while run.data.tags.get("mlflow.parentRunId"):
        run = client.get_run(run.data.tags["mlflow.parentRunId"])
    for key, value in tags.items():
        retry_locked(client.set_tag, run.info.run_id, key, value)


class RetentionHook:
    """After a successful run, delete old versions as ``retention`` says
    (:mod:`anomaly_ae.prune`; ``anomaly-ae-prune`` does the same by hand), except the
    versions this run loaded by name (``--load-versions``)."""

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from anomaly_ae import prune
        from anomaly_ae import run_params as current_params

        retention = current_params.current().get("retention") or {}
        if not retention.get("prune_after_run"):
            return
        # a version the run was asked for (--load-versions, e.g. one restored from MLflow) is
        # in use: it stays, however old
        loaded = {str(v) for v in (run_params.get("load_versions") or {}).values() if v}
        done = prune.run(current_params.project_root(Path.cwd()), protected=loaded)
        if done.paths:
            log.info(
                "Retention: deleted %d old versions and %d finished training states (%.1f MB); keeping "
                "the newest %s of each dataset.",
                len(done.versions),
                len(done.states),
                done.freed / 1e6,
                retention.get("keep_last"),
            )


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

    With ``--runner=ParallelRunner`` the nodes run in worker processes: every namespace's run
    is created here, in the main process, before the workers start, and handed to them
    (:mod:`anomaly_ae.parallel`); a worker's :class:`anomaly_ae.parallel.ParallelRunHook`
    makes the node's namespace run the active one, and only the main process closes runs.
    """

    def __init__(self) -> None:
        self._children: dict[str, str] = {}
        self._root: str | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._children = {}
        self._root = None
        if parallel.is_parallel_run(catalog, run_params) and _mlflow_active():
            import mlflow

            self._root = mlflow.active_run().info.run_id
            for namespace in sorted({n.namespace for n in pipeline.nodes if n.namespace}):
                self._run_for(namespace)
            parallel.export_runs({"": self._root, **self._children})

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
            **owner_tags(),
            "category": category,
            **({"variant": variant} if variant else {}),
        }
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        experiment = retry_locked(mlflow.get_run, parent).info.experiment_id
        child = retry_locked(mlflow.MlflowClient().create_run, experiment, run_name=namespace, tags=tags)
        self._children[namespace] = child.info.run_id
        log.info("MLflow run '%s' (%s) under %s", namespace, child.info.run_id, parent)
        return child.info.run_id

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async: bool) -> None:
        namespace = node.namespace or ""
        if not _mlflow_active():
            return
        import mlflow

        if parallel.in_worker():  # ParallelRunHook has made the namespace's run the active one
            if not namespace:
                return
        elif not namespace:  # e.g. the summary: back to the top run
            while self._root is not None and mlflow.active_run().info.run_id != self._root:
                mlflow.end_run()
            return
        else:
            if self._root is None:
                self._root = mlflow.active_run().info.run_id
            run_id = self._run_for(namespace)
            if mlflow.active_run().info.run_id != run_id:
                mlflow.start_run(run_id=run_id, nested=True)
        variant = namespace.rpartition(".")[2] if "." in namespace else None
        params = {k[len("params:") :]: v for k, v in inputs.items() if k.startswith("params:")}
        for key, value in _flatten(params).items():  # "hybrid.loss.mse_weight" -> "loss.mse_weight"
            name = key.removeprefix(f"{variant}.") if variant else key
            retry_locked(mlflow.log_param, name, str(value)[:6000])

    def _close(self, status: str) -> None:
        parallel.export_runs(None)
        if not self._children:
            return
        import mlflow

        client = mlflow.MlflowClient()
        for run_id in self._children.values():
            retry_locked(client.set_terminated, run_id, status)
        self._children = {}
        while mlflow.active_run() is not None:  # what is left: the category runs pushed per node, the top run
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
    def before_node_run(self, node, catalog, inputs, is_async: bool) -> None:
        if self._catalog is None or parallel.in_worker():  # a worker gets the catalog per task
            self._catalog = catalog

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self._catalog is None:
            return
        dataset = self._catalog.get(dataset_name)
        if dataset_name.endswith("report") and getattr(dataset, "_filepath", None) is not None:
            log.info("Report written: %s", saved_path(dataset))  # versioned: one folder per run
        if not _mlflow_active():
            return
        metadata = getattr(dataset, "metadata", None) or {}
        import mlflow

        prefix = metadata.get("mlflow_params_prefix")
        if prefix and isinstance(data, dict):
            flat = {f"{prefix}.{k}": str(v)[:6000] for k, v in _flatten(data).items()}
            retry_locked(mlflow.log_params, flat)
        artifact_path = metadata.get("mlflow_artifact_path")
        if not artifact_path:
            return

        path = saved_path(dataset)
        if metadata.get("mlflow_weights_only") and isinstance(data, dict) and path.is_file():
            _log_weights_only(data, path.name, artifact_path)
            return
        if path.is_dir():
            retry_locked(mlflow.log_artifacts, str(path), artifact_path=f"{artifact_path}/{path.name}")
        elif path.is_file():
            retry_locked(mlflow.log_artifact, str(path), artifact_path=artifact_path)
        else:
            log.warning("Not logged to MLflow: %s was not found after saving %s", path, dataset_name)


def _log_weights_only(checkpoint: dict, name: str, artifact_path: str) -> None:
    """Log the checkpoint to the active run without the training state (optimizer moments,
    best-epoch copy): the run stores the weights once. The versioned file in data/06_models
    keeps everything, so training can still resume from it."""
    import tempfile

    import mlflow
    import torch

    from anomaly_ae.model.checkpoint import weights_only

    with tempfile.TemporaryDirectory(prefix="anomaly_ae_weights_") as folder:
        slim = Path(folder) / name
        torch.save(weights_only(checkpoint), slim)
        retry_locked(mlflow.log_artifact, str(slim), artifact_path=artifact_path)


def saved_path(dataset) -> Path:
    """The local path a (possibly versioned) file dataset wrote on its last save."""
    if getattr(dataset, "_version", None) is not None:
        return Path(dataset._get_versioned_path(dataset.resolve_save_version()))
    for attribute in ("_filepath", "_path"):
        if getattr(dataset, attribute, None) is not None:
            return Path(str(getattr(dataset, attribute)))
    raise ValueError(f"Cannot tell where {dataset} saved its data")
