"""Retention: delete old versions of versioned outputs and finished training states.

Every ``kedro run`` writes a new version of each versioned dataset (checkpoints, cached
inputs, tables, figures, reports) under ``data/<layer>/<category>/<name>/<version>/``. This
keeps, for every dataset, the newest ``keep`` versions and deletes the older ones, except a
version that a *running* MLflow run wrote (a concurrent run still reads it). Training states
(``training.state_dir``) of finished trainings are deleted too; a state of an interrupted
training is kept (rerunning the command resumes it) unless ``states=True``; a state whose lock
is held (a run is training it) is never touched.

Run it as ``anomaly-ae-prune [--keep N] [--dry-run] [--states]`` in the project, or let every
successful ``kedro run`` do it (``retention.prune_after_run`` in
``conf/base/parameters_retention.yml``).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Kedro's version folder names, e.g. 2026-11-30T23.03.05.123Z
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")


@dataclass
class PrunePlan:
    versions: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    freed: int = 0  # bytes, measured before deleting

    @property
    def paths(self) -> list[Path]:
        return [*self.versions, *self.states]

    def size(self) -> int:
        return sum(_size(p) for p in self.paths)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def versioned_datasets(data_dir: Path) -> dict[Path, list[str]]:
    """Every versioned dataset folder below ``data_dir`` -> its versions, oldest first."""
    found: dict[Path, list[str]] = {}
    for folder in data_dir.rglob("*"):
        if folder.is_dir() and VERSION.match(folder.name):
            found.setdefault(folder.parent, []).append(folder.name)
    return {dataset: sorted(versions) for dataset, versions in found.items()}


#: MLflow tag of a ``kedro run``'s top run: the version folder it writes
#: (``anomaly_ae.hooks.PinRunVersionsHook``).
SAVE_VERSION_TAG = "anomaly_ae.save_version"


def running_save_versions(tracking_uri: str | None) -> set[str]:
    """Save versions of MLflow runs that are RUNNING (tag :data:`SAVE_VERSION_TAG`)."""
    if not tracking_uri:
        return set()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return set()
    runs = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=5000)
    return {r.data.tags[SAVE_VERSION_TAG] for r in runs if SAVE_VERSION_TAG in r.data.tags}


def logged_copies(
    tracking_uri: str | None, version: str, artifact: str, run_name: str
) -> list[tuple[str, str]]:
    """``(run id, artifact URI)`` of each MLflow run named ``run_name`` (a category's nested
    run is named after its namespace) under the run tagged with save ``version`` that logged
    ``artifact`` (e.g. ``checkpoints/model_checkpoint.pt``): where a version retention
    deleted can be restored from."""
    if not tracking_uri:
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    level = client.search_runs(experiments, filter_string=f"tags.`{SAVE_VERSION_TAG}` = '{version}'")
    runs = []
    while level:  # the tagged run and every run nested under it
        runs += level
        level = [
            child
            for run in level
            for child in client.search_runs(
                experiments, filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
            )
        ]
    folder = artifact.rpartition("/")[0] or None
    return [
        (run.info.run_id, f"{run.info.artifact_uri}/{artifact}")
        for run in runs
        if run.info.run_name == run_name
        and any(item.path == artifact for item in client.list_artifacts(run.info.run_id, folder))
    ]


def plan(
    data_dir: Path,
    keep: int,
    state_dir: Path | None = None,
    protected: set[str] = frozenset(),
    states: bool = False,
) -> PrunePlan:
    """What :func:`prune` would delete (nothing is touched)."""
    from anomaly_ae.training.state import is_complete

    if keep < 1:
        raise ValueError(
            f"retention.keep_last / --keep must be >= 1 (got {keep}): the newest version always stays"
        )
    result = PrunePlan()
    for dataset, versions in sorted(versioned_datasets(data_dir).items()):
        for version in versions[:-keep]:
            if version not in protected:
                result.versions.append(dataset / version)
    if state_dir is not None and state_dir.is_dir():
        from filelock import FileLock, Timeout

        from anomaly_ae.model.checkpoint import CheckpointError, load_checkpoint

        for path in sorted(state_dir.rglob("*.pt")):
            lock = FileLock(str(path) + ".lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # being trained right now
            try:
                if states:
                    result.states.append(path)
                    continue
                try:
                    state = load_checkpoint(path)
                except CheckpointError:
                    continue  # unreadable: left for a person to look at
                if is_complete(state, int(state.get("training", {}).get("epochs", 0))):
                    result.states.append(path)
            finally:
                lock.release()
    return result


def prune(to_delete: PrunePlan) -> None:
    for path in to_delete.paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
            Path(str(path) + ".lock").unlink(missing_ok=True)


def run(
    project: Path,
    keep: int | None = None,
    dry_run: bool = False,
    states: bool = False,
    protected: set[str] = frozenset(),
) -> PrunePlan:
    """Prune the project at ``project`` with its configured retention (``keep`` overrides).
    Versions in ``protected`` (e.g. those the finishing run loaded with ``--load-versions``)
    are kept, as are those of RUNNING MLflow runs."""
    import os

    from anomaly_ae import run_params

    previous = Path.cwd()
    os.chdir(project)
    try:
        params = run_params.current()
        keep = int(keep if keep is not None else params["retention"]["keep_last"])
        state_dir = params["training"].get("state_dir")
        tracking_uri = _tracking_uri(project)
        to_delete = plan(
            project / "data",
            keep,
            project / state_dir if state_dir else None,
            protected=set(protected) | running_save_versions(tracking_uri),
            states=states,
        )
    finally:
        os.chdir(previous)
    to_delete.freed = to_delete.size()
    if not dry_run:
        prune(to_delete)
    return to_delete


def _tracking_uri(project: Path) -> str | None:
    database = project / "mlflow.db"
    return f"sqlite:///{database.resolve()}" if database.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomaly-ae-prune",
        description="Delete old versions of versioned outputs (keeping the newest N of each) and "
        "the training states of finished trainings.",
    )
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder (default: .)")
    parser.add_argument(
        "--keep", type=int, default=None, help="versions kept per dataset (default: retention.keep_last)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    parser.add_argument(
        "--states",
        action="store_true",
        help="also delete states of interrupted trainings (they cannot be resumed then)",
    )
    args = parser.parse_args(argv)
    from anomaly_ae.run_params import project_root

    project = project_root(args.project.resolve())
    if not (project / "pyproject.toml").is_file():
        parser.error(
            f"{args.project} is not inside an anomaly-ae project (no pyproject.toml with [tool.kedro])"
        )
    try:
        done = run(project, keep=args.keep, dry_run=args.dry_run, states=args.states)
    except ValueError as exc:
        parser.error(str(exc))
    verb = "would delete" if args.dry_run else "deleted"
    for path in done.paths:
        print(f"{verb} {path.relative_to(project)}")
    print(
        f"{verb} {len(done.versions)} old versions and {len(done.states)} training states "
        f"({done.freed / 1e6:.1f} MB)"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
