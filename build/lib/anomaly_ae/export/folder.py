"""Writing a bundle folder atomically (standard library only: the Kedro dataset uses it too)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["write_bundle", "write_files"]


def write_bundle(path: str | os.PathLike, build: Callable[[Path], object]) -> Path:
    """Call ``build(staging_folder)`` in a temporary folder beside ``path``, then rename it
    into place (an existing folder at ``path`` is replaced as a whole): a reader never sees
    a half-written bundle, and a failed export leaves nothing behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        staging.chmod(0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_files(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Write ``{file name: content}`` as the folder ``path``, atomically (:func:`write_bundle`)."""

    def build(staging: Path) -> None:
        for name, content in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"bundle file name {name!r} must be a plain file name")
            (staging / name).write_bytes(content)

    return write_bundle(path, build)
