"""Shared fixtures: an isolated copy of the Kedro project and the real data location."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_ROOT = REPO_ROOT.parent / "shared" / "mvtec_ad"
REAL_BOTTLE = REAL_DATA_ROOT / "bottle"
REAL_BSDATA_ROOT = REPO_ROOT.parent / "shared" / "bsdata"

requires_real_data = pytest.mark.skipif(
    not REAL_BOTTLE.is_dir(),
    reason=f"real MVTec AD bottle data not found at {REAL_BOTTLE} (../shared beside the repo)",
)


class KedroProject:
    """A throwaway copy of the project (conf, pyproject, empty data/) with its own
    ``mlflow.db``, so tests never touch the user's data or runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *args: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        result = subprocess.run(
            [sys.executable, "-m", "kedro", *args],
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kedro {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
            )
        return result

    def session_run(
        self,
        pipeline: str | None = None,
        env: str | None = None,
        params: dict | None = None,
        load_versions: dict | None = None,
        namespaces: list[str] | None = None,
        extra_pipelines: list[str] | None = None,
    ) -> dict:
        """``kedro run`` in this process (a KedroSession), from the project folder."""
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        with _cwd(self.path):
            bootstrap_project(self.path)
            with KedroSession.create(project_path=self.path, env=env, runtime_params=params or {}) as session:
                return session.run(
                    pipeline_names=[pipeline, *(extra_pipelines or [])] if pipeline else None,
                    load_versions=load_versions,
                    namespaces=namespaces,
                )

    def latest(self, relative: str) -> Path:
        """The newest version of a versioned dataset file (``data/.../name.ext``)."""
        folder = self.path / relative
        versions = sorted(p for p in folder.iterdir() if p.is_dir())
        assert versions, f"no versions under {folder}"
        return versions[-1] / folder.name


@contextlib.contextmanager
def _cwd(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def make_project(root: Path) -> KedroProject:
    root.mkdir()
    shutil.copytree(REPO_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy2(REPO_ROOT / name, root / name)
    (root / "src").mkdir()  # the package itself is imported from the (editable) install
    for layer in (
        "01_raw",
        "02_intermediate",
        "05_model_input",
        "06_models",
        "07_model_output",
        "08_reporting",
    ):
        (root / "data" / layer).mkdir(parents=True)
    return KedroProject(root)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` inside, restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on 2 shared cores: one intra-op thread is several times faster than
    two threads spinning at barriers while other processes hold the cores."""
    with torch_threads(1):
        yield


@pytest.fixture
def kedro_project(tmp_path: Path) -> KedroProject:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def quick(tmp_path_factory) -> KedroProject:
    """One ``kedro run --env quick`` (in process) shared by every test that needs a trained,
    calibrated and evaluated project: the synthetic sample, 128 px, 20 epochs. The project is a git
    repository, so runs carry a ``git_commit`` tag."""
    project = make_project(tmp_path_factory.mktemp("quick") / "project")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(project.path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "conf", "pyproject.toml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project"], check=True)
    project.session_run(env="quick")
    return project
