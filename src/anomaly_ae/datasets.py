"""Custom Kedro datasets: a safe, atomic, versioned checkpoint file and a NumPy ``.npz`` cache."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version

from anomaly_ae.model.checkpoint import atomic_write, load_checkpoint, save_checkpoint_atomic


class TorchCheckpointDataset(AbstractVersionedDataset[dict, dict]):
    """A checkpoint dict (weights + model config + training state) saved with ``torch.save``.

    Saves go to a temporary file that is renamed into place, so a crash never leaves a
    half-written checkpoint; loads use ``torch.load(weights_only=True)``.

    Example::

        model_checkpoint:
          type: anomaly_ae.datasets.TorchCheckpointDataset
          filepath: data/06_models/model_checkpoint.pt
          versioned: true
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=self._file_exists)
        self.metadata = metadata

    @staticmethod
    def _file_exists(path: str) -> bool:
        return Path(path).is_file()

    def load(self) -> dict:
        return load_checkpoint(self._get_load_path())

    def save(self, data: dict) -> None:
        save_checkpoint_atomic(data, self._get_save_path())

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        return Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class NpzDataset(AbstractVersionedDataset[dict, dict]):
    """A dict of NumPy arrays in one uncompressed ``.npz`` file (no pickled objects).

    Used as the preprocessing cache in ``05_model_input`` (training and evaluation read
    these arrays instead of decoding the PNGs again) and, with ``versioned: true``, for the
    normal-reference maps of the evaluate pipeline. Saves are atomic.
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict | None = None):
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=self._file_exists)
        self.metadata = metadata

    @staticmethod
    def _file_exists(path: str) -> bool:
        return Path(path).is_file()

    def load(self) -> dict[str, np.ndarray]:
        try:
            path = Path(self._get_load_path())
        except DatasetError as exc:
            raise DatasetError(
                f"{self._filepath}: no saved version ({exc}); run the pipeline that writes it."
            ) from exc
        if not path.is_file():
            raise DatasetError(f"{path} does not exist; run `kedro run --pipeline=data_processing` first.")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def save(self, data: dict[str, np.ndarray]) -> None:
        arrays = {key: np.asarray(value) for key, value in data.items()}
        objects = sorted(key for key, value in arrays.items() if value.dtype == object)
        path = Path(self._get_save_path())
        if objects:
            raise DatasetError(
                f"{path}: arrays {objects} hold Python objects; only numeric arrays are cached."
            )
        atomic_write(path, lambda handle: np.savez(handle, **arrays))

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        return Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
