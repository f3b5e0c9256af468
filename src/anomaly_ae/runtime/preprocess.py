"""Image files to model input, exactly as :class:`anomaly_ae.Inspector` does it (numpy and
Pillow only): the same file checks and :func:`anomaly_ae.data.transforms.to_model_array`,
the one preprocessing implementation of the project (it imports no torch)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_ae.data.transforms import IMAGE_SUFFIXES, Framing, to_model_array

__all__ = ["IMAGE_SUFFIXES", "ImageSource", "find_files", "prepare"]


ImageSource = str | os.PathLike | Image.Image | np.ndarray | Callable[[], Image.Image]


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    if callable(source):
        return source()
    path = Path(source)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(
            f"not an image file (suffix {path.suffix or 'none'}; expected {', '.join(IMAGE_SUFFIXES)})"
        )
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    return Image.open(path)  # the header only


def prepare(
    source: ImageSource,
    size: int | tuple[int, int],
    resample: str,
    max_pixels: int,
    min_side: int,
    channels: int = 1,
    framing: Framing | None = None,
) -> tuple[tuple[int, int] | None, np.ndarray | None, str | None]:
    """``((width, height), array (size, size) or (height, width) float32 in [0, 1], None)``
    (``(3, height, width)`` for an RGB model, ``channels=3``)
    (``size`` a side or ``(height, width)``; ``framing`` as in training), or the error as
    ``(size or None, None, "Type: message")``: a bad file never raises. The size limits are
    checked from the header, before any pixel is decoded."""
    dims = None
    try:
        image = _open(source)
        dims = image.size
        if image.width * image.height > max_pixels:
            raise ValueError(
                f"image too large ({image.width}x{image.height} > {max_pixels} pixels); "
                f"refused as a possible decompression bomb (raise max_image_pixels to allow)"
            )
        if min(image.size) < min_side:
            raise ValueError(
                f"image too small ({image.width}x{image.height}; the shorter side must be at least "
                f"{min_side} px)"
            )
        image.load()
        array = to_model_array(image, size=size, resample=resample, channels=channels, framing=framing)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        return dims, None, f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return dims, array, None


def find_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, and every non-hidden file below each given folder (sorted). Non-images
    are kept: they get an error row."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        else:
            files.append(path)
    return files
