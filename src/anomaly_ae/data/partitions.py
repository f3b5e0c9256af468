"""Reading an MVTec-layout folder through kedro-datasets.

The folder is only known at run time (the real data, a download, or the synthetic
fallback), so the ``PartitionedDataset`` of ``pillow.ImageDataset`` is built here from the
resolved path instead of being a fixed catalog entry.
"""

from __future__ import annotations

from collections.abc import Callable

from kedro_datasets.partitions import PartitionedDataset
from PIL import Image


def image_partitions(path: str, suffix: str = ".png") -> dict[str, Callable[[], Image.Image]]:
    """Lazy loaders of every ``*suffix`` image below ``path``, keyed by relative path
    without the suffix (e.g. ``test/broken_large/000``)."""
    dataset = PartitionedDataset(
        path=str(path), dataset={"type": "pillow.ImageDataset"}, filename_suffix=suffix
    )
    return dataset.load()
