"""Reading an MVTec-layout folder through kedro-datasets.

The folder is only known at run time (the real data, a download, or the synthetic
fallback), so the ``PartitionedDataset`` of ``pillow.ImageDataset`` is built here from the
resolved path instead of being a fixed catalog entry.
"""

from __future__ import annotations

from collections.abc import Callable

from kedro_datasets.partitions import PartitionedDataset
from PIL import Image


def image_partitions(
    path: str,
    suffix: str = ".png",
    max_pixels: int | None = None,
    limit_setting: str = "data.max_image_pixels",
) -> dict[str, Callable[[], Image.Image]]:
    """Lazy loaders of every ``*suffix`` image below ``path``, keyed by relative path
    without the suffix (e.g. ``test/broken_large/000``).

    Each loader opens its file header only (:class:`anomaly_ae.datasets.ImageFileDataset`)
    and refuses an image of more than ``max_pixels`` pixels before decoding anything."""
    dataset = PartitionedDataset(
        path=str(path),
        dataset={
            "type": "anomaly_ae.datasets.ImageFileDataset",
            "max_pixels": max_pixels,
            "limit_setting": limit_setting,
        },
        filename_suffix=suffix,
    )
    return dataset.load()
