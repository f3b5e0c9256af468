"""Custom Kedro datasets: a safe, atomic, versioned checkpoint file and a NumPy ``.npz`` cache."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from kedro.io.core import AbstractDataset, AbstractVersionedDataset, DatasetError, Version
from PIL import Image

from anomaly_ae.data.transforms import ImageTooLargeError, check_image_size
from anomaly_ae.model.checkpoint import atomic_folder, atomic_write, load_checkpoint, save_checkpoint_atomic


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

    def load_member(self, key: str) -> np.ndarray | None:
        """One array of the file (read alone: ``.npz`` members are separate), None if absent."""
        with np.load(self._get_load_path(), allow_pickle=False) as data:
            return data[key] if key in data.files else None

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


_PILLOW_LIMIT = threading.Lock()


@contextmanager
def _own_size_check(active: bool):
    """Lift Pillow's global decompression-bomb limit while opening a header whose size this
    module checks itself (so ``data.max_image_pixels`` can also be raised above Pillow's)."""
    if not active:
        yield
        return
    with _PILLOW_LIMIT:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


class ImageFileDataset(AbstractDataset[Image.Image, Image.Image]):
    """One local image file, opened lazily: ``load()`` reads only the header, refuses an
    image with more than ``max_pixels`` pixels (:class:`ImageTooLargeError`, naming the file
    and ``limit_setting``) and returns the not yet decoded image. The partitions of an image
    folder (:func:`anomaly_ae.data.partitions.image_partitions`) are these datasets, so no
    pixel of an oversized image is ever decoded (kedro-datasets' ``pillow.ImageDataset``
    decodes the whole image on load).
    """

    def __init__(
        self,
        filepath: str,
        max_pixels: int | None = None,
        limit_setting: str = "data.max_image_pixels",
        metadata: dict | None = None,
    ):
        self._filepath = Path(filepath)
        self._max_pixels = max_pixels
        self._limit_setting = limit_setting
        self.metadata = metadata

    def load(self) -> Image.Image:
        try:
            with _own_size_check(self._max_pixels is not None):
                image = Image.open(self._filepath)  # reads the header only
        except Image.DecompressionBombError as exc:  # Pillow's own limit (no max_pixels given)
            raise ImageTooLargeError(
                f"{self._filepath}: {exc} Nothing was decoded; set {self._limit_setting} to allow it."
            ) from None
        try:
            check_image_size(image, str(self._filepath), self._max_pixels, self._limit_setting)
        except ImageTooLargeError:
            image.close()
            raise
        return image

    def save(self, data: Image.Image) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._filepath, lambda handle: data.save(handle, format=data.format or "PNG"))

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "max_pixels": self._max_pixels}


class FolderDataset(AbstractVersionedDataset[dict, dict]):
    """Base of the datasets that are a folder written as a whole (versioned or not):
    subclasses implement ``load`` (from :meth:`_folder`) and ``save`` (with
    :func:`~anomaly_ae.model.checkpoint.atomic_folder`)."""

    def __init__(self, path: str, version: Version | None = None, metadata: dict | None = None):
        super().__init__(filepath=PurePosixPath(path), version=version, exists_function=self._dir_exists)
        self.metadata = metadata

    @staticmethod
    def _dir_exists(path: str) -> bool:
        return Path(path).is_dir()

    def _folder(self, hint: str = "run the pipeline that writes it") -> Path:
        """The folder to load, or a :class:`DatasetError` saying what to run."""
        try:
            folder = Path(self._get_load_path())
        except DatasetError as exc:
            raise DatasetError(f"{self._filepath}: no saved version ({exc}); {hint}.") from exc
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist; {hint}.")
        return folder

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).is_dir()
        except DatasetError:
            return False

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._filepath), "version": self._version}


class ImageFolderDataset(FolderDataset):
    """A folder of PNG images written as a whole: ``save({"a/b": image_or_loader, ...})``
    writes ``a/b.png`` etc. into a temporary sibling folder renamed into place, so a reader
    never sees a half-written folder and, with ``versioned: true``, each run writes its own
    folder (kedro-datasets' PartitionedDataset can be neither). ``load()`` returns lazy
    loaders keyed like the saved dict.

    Example::

        "{namespace}.test_heatmaps":
          type: anomaly_ae.datasets.ImageFolderDataset
          path: data/08_reporting/{namespace}/heatmaps
          versioned: true
    """

    SUFFIX = ".png"

    def load(self) -> dict:
        folder = self._folder()
        files = sorted(folder.rglob(f"*{self.SUFFIX}"))
        return {
            file.relative_to(folder).as_posix().removesuffix(self.SUFFIX): (lambda f=file: Image.open(f))
            for file in files
        }

    def save(self, data: dict) -> None:
        target = Path(self._get_save_path())

        def build(staging: Path) -> None:
            for key, image in data.items():
                image = image() if callable(image) else image
                file = (staging / f"{key}{self.SUFFIX}").resolve()
                if staging.resolve() not in file.parents:
                    raise DatasetError(f"{target}: partition name {key!r} escapes the folder.")
                file.parent.mkdir(parents=True, exist_ok=True)
                image.save(file, format="PNG")

        atomic_folder(target, build)
