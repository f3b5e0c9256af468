"""Reading an MVTec-layout folder through kedro-datasets.

The folder is only known at run time (the real data, a download, or the synthetic
fallback), so the ``PartitionedDataset`` of ``pillow.ImageDataset`` is built here from the
resolved path instead of being a fixed catalog entry.

Images are keyed by their relative path without the suffix (``test/crack/000``), so an
image and its mask may have different formats (``000.jpg`` with ``000_mask.png``) and one
folder may mix PNG, JPEG, BMP and TIFF files (``data.image_suffix: any``).
"""

from __future__ import annotations

from pathlib import PurePosixPath

from kedro_datasets.partitions import PartitionedDataset

from anomaly_ae.data.transforms import IMAGE_SUFFIXES

#: ``data.image_suffix`` value that accepts every suffix in :data:`IMAGE_SUFFIXES`.
ANY_SUFFIX = "any"


class DuplicateImageError(ValueError):
    """Two files differ only in their suffix (``000.png`` and ``000.jpg``)."""


def file_key(name: str) -> str:
    """``test/crack/000.png`` -> ``test/crack/000`` (the last suffix only)."""
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else str(path)


def accepts(name: str, suffix: str) -> bool:
    """Whether ``name`` is an image file that ``data.image_suffix=suffix`` reads."""
    ext = PurePosixPath(name).suffix.lower()
    if suffix == ANY_SUFFIX:
        return ext in IMAGE_SUFFIXES
    return ext == suffix.lower()


class ImageFiles(dict):
    """Lazy loaders keyed by relative path without the suffix; :meth:`file` gives the
    relative file name (with its suffix) of a key."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, str] = {}

    def file(self, key: str) -> str:
        return self.files[key]


#: ``suffix`` value for every file, keyed by its full relative name (predict: a file that is
#: not an image gets its own error row instead of being skipped).
EVERY_FILE = ""


def check_suffix(suffix: str) -> str:
    if suffix not in (ANY_SUFFIX, EVERY_FILE) and suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(
            f"data.image_suffix={suffix!r} is not an image suffix this project reads; use "
            f"{ANY_SUFFIX!r} (every one of {', '.join(IMAGE_SUFFIXES)}) or one of them."
        )
    return suffix


def image_partitions(
    path: str,
    suffix: str = ANY_SUFFIX,
    max_pixels: int | None = None,
    limit_setting: str = "data.max_image_pixels",
) -> ImageFiles:
    """Lazy loaders of every image below ``path`` whose suffix ``suffix`` accepts
    (:func:`accepts`; case-insensitive), keyed by relative path without the suffix (e.g.
    ``test/broken_large/000``). Other files (``README.txt``, ``.DS_Store``) are ignored.
    ``suffix=""`` (:data:`EVERY_FILE`): every file, keyed by its relative name as it is.

    Each loader opens its file header only (:class:`anomaly_ae.datasets.ImageFileDataset`)
    and refuses an image of more than ``max_pixels`` pixels before decoding anything.

    Raises:
        DuplicateImageError: two images differ only in their suffix; the message names both.
    """
    check_suffix(suffix)
    dataset = PartitionedDataset(
        path=str(path),
        dataset={
            "type": "anomaly_ae.datasets.ImageFileDataset",
            "max_pixels": max_pixels,
            "limit_setting": limit_setting,
        },
    )
    found = ImageFiles()
    for name, load in sorted(dataset.load().items()):
        if suffix == EVERY_FILE:
            found[name] = load
            found.files[name] = name
            continue
        if not accepts(name, suffix):
            continue
        key = file_key(name)
        if key in found:
            raise DuplicateImageError(
                f"{path}/{found.files[key]} and {path}/{name} are the same image name with two "
                f"suffixes; keep one of them (remove or rename the other)."
            )
        found[key] = load
        found.files[key] = name
    return found
