"""A Kedro dataset for an inspection bundle: a folder of files written as a whole."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version

from anomaly_ae.export.folder import write_files


class BundleFolderDataset(AbstractVersionedDataset[dict, dict]):
    """``save({"model.onnx": bytes, "bundle.json": bytes})`` writes the files into a
    temporary sibling folder renamed into place (as
    :class:`anomaly_ae.datasets.ImageFolderDataset`), so a reader never sees a half-written
    bundle and, with ``versioned: true``, each run writes its own folder. ``load()`` returns
    the same dict of file contents.

    Example::

        "{namespace}.inspection_bundle":
          type: anomaly_ae.export.bundle_dataset.BundleFolderDataset
          path: data/06_models/{namespace}/inspection_bundle
          versioned: true
    """

    def __init__(self, path: str, version: Version | None = None, metadata: dict | None = None):
        super().__init__(filepath=PurePosixPath(path), version=version, exists_function=self._dir_exists)
        self.metadata = metadata

    @staticmethod
    def _dir_exists(path: str) -> bool:
        return Path(path).is_dir()

    def load(self) -> dict[str, bytes]:
        try:
            folder = Path(self._get_load_path())
        except DatasetError as exc:
            raise DatasetError(
                f"{self._filepath}: no saved version ({exc}); run `kedro run --pipeline=export`."
            ) from exc
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist; run `kedro run --pipeline=export`.")
        return {file.name: file.read_bytes() for file in sorted(folder.iterdir()) if file.is_file()}

    def save(self, data: dict[str, bytes]) -> None:
        write_files(self._get_save_path(), data)

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._filepath), "version": self._version}
