"""Writing a bundle folder atomically (:func:`anomaly_ae.model.checkpoint.atomic_folder`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from anomaly_ae.model.checkpoint import atomic_folder as write_bundle

__all__ = ["write_bundle", "write_files"]


def write_files(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Write ``{file name: content}`` as the folder ``path``, atomically (:func:`write_bundle`)."""

    def build(staging: Path) -> None:
        for name, content in files.items():
            if Path(name).name != name or name.startswith("."):
                raise ValueError(f"bundle file name {name!r} must be a plain file name")
            (staging / name).write_bytes(content)

    return write_bundle(path, build)
