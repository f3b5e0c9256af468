"""Turn decoded images into model arrays and split the training images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_ae.data.partitions import file_key
from anomaly_ae.data.transforms import (
    colourfulness,
    decode_image,
    image_shape,
    mask_to_array,
    model_channels,
    to_model_uint8,
)

TRAIN, VALIDATION, TEST = "train", "validation", "test"


def model_shape(manifest: pd.DataFrame, image_size, keep_aspect: bool) -> tuple[int, int]:
    """``(height, width)`` every image is resized to.

    ``image_size`` given as ``[height, width]`` is used as it is. A single side ``S`` gives
    ``S x S`` (the paper: every image stretched to a square) unless ``keep_aspect``: then the
    normal TRAINING images' median width and median height (from their headers: no test
    image is read) give the ratio ``r = longer / shorter``, rounded to a whole number
    ``k = max(1, round(r))``,
    and the shape is ``S x k*S`` for wide images (``k*S x S`` for tall ones). Square-ish
    products (``r < 1.5``) stay ``S x S``; a 512x208 ball screw (r 2.46) becomes 256x512,
    which a model with ``tile_size: auto`` reads as 1x2 tiles of the paper's network.
    """
    try:
        shape = image_shape(image_size)
    except ValueError as exc:
        raise ValueError(f"preprocessing.image_size: {exc}") from None
    if not isinstance(image_size, int | np.integer) or isinstance(image_size, bool):
        return shape
    side = shape[0]
    if not keep_aspect:
        return side, side
    train = manifest[manifest["split"].isin([TRAIN, VALIDATION])]
    if train.empty or not {"width", "height"} <= set(train.columns):
        raise ValueError(
            "preprocessing.keep_aspect needs the training images' width and height in the raw "
            "manifest; rerun `kedro run --pipelines=data_ingestion`."
        )
    width = float(train["width"].median())
    height = float(train["height"].median())
    ratio = max(width, height) / min(width, height)
    k = max(1, int(np.floor(ratio + 0.5)))
    return (side, k * side) if width >= height else (k * side, side)


def split_train_validation(manifest: pd.DataFrame, validation_fraction: float, seed: int) -> pd.DataFrame:
    """Mark a seeded random ``validation_fraction`` of the training images as ``validation``.

    Validation images are normal images held out from training: they drive early stopping
    and the calibration of the decision threshold, so the test set is never used for either.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"preprocessing.validation_fraction must be in [0, 1), got {validation_fraction}")
    manifest = manifest.sort_values(["split", "defect_type", "image_key"]).reset_index(drop=True).copy()
    train_idx = np.flatnonzero(manifest["split"].to_numpy() == TRAIN)
    n_val = int(round(validation_fraction * len(train_idx)))
    if len(train_idx) - n_val < 2:
        raise ValueError(
            f"Only {len(train_idx)} training images: too few to hold out {n_val} for validation."
        )
    chosen = np.random.default_rng(seed).choice(train_idx, size=n_val, replace=False)
    manifest.loc[chosen, "split"] = VALIDATION
    manifest["array_index"] = manifest.groupby("split").cumcount()
    return manifest


def image_channels(
    loaders: dict[str, Callable[[], Image.Image]], files: Sequence[str], folder: str, color: str
) -> tuple[int, float | None]:
    """``(channels, median colourfulness or None)``: the model's input channels for
    ``preprocessing.color`` (:func:`~anomaly_ae.data.transforms.model_channels`); ``auto``
    decodes ``files`` (the normal training images) to measure their colourfulness."""
    if color != "auto":
        return model_channels(color), None
    values = [colourfulness(decode_image(loaders[file_key(name)], f"{folder}/{name}")) for name in files]
    return model_channels(color, values), float(np.median(values))


def stack_images(
    loaders: dict[str, Callable[[], Image.Image]],
    files: Sequence[str],
    folder: str,
    size: int | tuple[int, int],
    resample: str,
    channels: int = 1,
) -> np.ndarray:
    """Decode and convert images to one ``(N, channels, height, width)`` uint8 array (0..255;
    see :func:`~anomaly_ae.data.transforms.to_model_uint8`): a quarter of float32's memory,
    and batches become float32 in [0, 1] only as they are used."""
    out = np.empty((len(files), channels, *image_shape(size)), dtype=np.uint8)
    for i, name in enumerate(files):
        image = decode_image(loaders[file_key(name)], f"{folder}/{name}")
        out[i] = to_model_uint8(image, size=size, resample=resample, channels=channels).reshape(out.shape[1:])
    return out


def stack_masks(
    loaders: dict[str, Callable[[], Image.Image]],
    files: Sequence[str | None],
    folder: str,
    size: int | tuple[int, int],
) -> np.ndarray:
    """Decode masks to ``(N, height, width)`` uint8 {0, 1}; images without a mask get zeros."""
    out = np.zeros((len(files), *image_shape(size)), dtype=np.uint8)
    for i, name in enumerate(files):
        if isinstance(name, str) and name:
            mask = decode_image(loaders[file_key(name)], f"{folder}/{name}")
            out[i] = mask_to_array(mask, size=size)
    return out
