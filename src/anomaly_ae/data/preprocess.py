"""Turn decoded images into model arrays and split the training images."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_ae.data.partitions import file_key
from anomaly_ae.data.transforms import (
    FIT_MODES,
    Framing,
    colourfulness,
    decode_image,
    image_shape,
    mask_to_array,
    model_channels,
    to_grayscale_float,
    to_model_uint8,
)

TRAIN, VALIDATION, TEST = "train", "validation", "test"
#: Key of the cached model-input arrays that holds their :class:`Framing` (as JSON).
FRAMING_KEY = "framing"


#: Key of the test arrays that marks, for a padded frame, the pixels that are the image
#: (``(N, H, W)`` uint8 1) and not its mirrored margin (0): pixel metrics count only those.
VALID_KEY = "valid"


def frame_valid(rows: pd.DataFrame, size: tuple[int, int], framing: Framing) -> np.ndarray:
    """``(N, H, W)`` uint8: 1 where each image (``rows``' ``width`` and ``height``) lies in
    its frame."""
    out = np.zeros((len(rows), *size), dtype=np.uint8)
    for i, (width, height) in enumerate(zip(rows["width"], rows["height"], strict=True)):
        h, w, top, left = framing.placement(int(width), int(height), size)
        out[i, top : top + h, left : left + w] = 1
    return out


def framing_array(framing: Framing) -> np.ndarray:
    return np.array(json.dumps(framing.to_dict()))


def framing_of(arrays) -> Framing:
    """The :class:`Framing` the cached arrays were made with (caches made before framing
    have none: ``stretch``)."""
    if FRAMING_KEY not in arrays:
        return Framing()
    return Framing.from_dict(json.loads(str(np.asarray(arrays[FRAMING_KEY]))))


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


#: ``fit: auto`` looks at the framing only when the normal training images' sizes vary: the
#: 90th percentile of their widths (or heights) at least this times the 10th.
SIZES_VARY = 1.2
#: At most this many normal training images (evenly spaced) are decoded for the ``auto`` rule.
FRAMING_SAMPLE = 120


def _detail(plane: np.ndarray) -> float:
    """Mean gradient magnitude over the intensity spread, after a Gaussian of 1 px: how
    finely the content varies per pixel (contrast-free; a finer texture, or the same texture
    seen smaller, scores higher)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(plane.astype(np.float64), 1.0)
    gy, gx = np.gradient(smooth)
    return float(np.hypot(gx, gy).mean() / (smooth.std() + 1e-6))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def choose_framing(
    loaders: dict[str, Callable[[], Image.Image]],
    manifest: pd.DataFrame,
    folder: str,
    size: tuple[int, int],
    fit: str,
    resample: str = "area",
) -> tuple[Framing, dict]:
    """``preprocessing.fit`` made concrete from the NORMAL training (and validation) images
    only: ``(Framing, what the rule saw)``.

    ``pad``'s one scale is the largest that fits every normal training image in the frame:
    ``min(height / max image height, width / max image width)``. ``auto`` keeps the paper's
    ``stretch`` when the images are (about) one size. When sizes vary it asks which framing
    makes the images alike in scale: each image's fineness of detail (:func:`_detail`) is
    measured at its own pixel size and stretched to the frame, and the Spearman correlation
    of each with the image's area says how much that framing's scale depends on the size.
    Several resolutions of one field of view are alike once stretched (``stretch``); crops
    of one surface at one pixel size are alike as they are (``pad``, which keeps that pixel
    size for all).
    """
    if fit not in FIT_MODES:
        raise ValueError(f"preprocessing.fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    if fit == "stretch":
        return Framing(), {"fit": fit, "chosen": "stretch"}
    train = manifest[manifest["split"].isin([TRAIN, VALIDATION])]
    if train.empty or not {"width", "height"} <= set(train.columns):
        raise ValueError(
            f"preprocessing.fit={fit} needs the training images' width and height in the raw "
            "manifest; rerun `kedro run --pipelines=data_ingestion`."
        )
    widths, heights = train["width"].to_numpy(float), train["height"].to_numpy(float)
    scale = min(size[0] / heights.max(), size[1] / widths.max())
    spread = max(
        np.percentile(widths, 90) / np.percentile(widths, 10),
        np.percentile(heights, 90) / np.percentile(heights, 10),
    )
    seen: dict = {"fit": fit, "size_spread": round(float(spread), 4)}
    if fit == "auto" and spread < SIZES_VARY:
        return Framing(), {**seen, "chosen": "stretch"}
    if fit == "pad":
        return Framing("pad", scale), {**seen, "chosen": "pad"}
    rows = train.iloc[np.unique(np.linspace(0, len(train) - 1, min(len(train), FRAMING_SAMPLE)).astype(int))]
    native, stretched = [], []
    for name in rows["image_file"]:
        image = decode_image(loaders[file_key(name)], f"{folder}/{name}")
        native.append(_detail(to_grayscale_float(image)))
        stretched.append(_detail(to_model_uint8(image, size, resample).astype(np.float32) / 255))
    area = (rows["width"] * rows["height"]).to_numpy(float)
    rho_native, rho_stretched = _spearman(area, np.array(native)), _spearman(area, np.array(stretched))
    chosen = "pad" if abs(rho_native) < abs(rho_stretched) else "stretch"
    seen.update(
        chosen=chosen,
        n_images=len(rows),
        rho_detail_native=round(rho_native, 4),
        rho_detail_stretched=round(rho_stretched, 4),
    )
    return (Framing("pad", scale) if chosen == "pad" else Framing()), seen


#: The fewest validation images a split holds out when ``validation_fraction`` > 0: the
#: calibration compares synthetic defects on them with them (it needs 2).
MIN_VALIDATION = 2


def split_train_validation(manifest: pd.DataFrame, validation_fraction: float, seed: int) -> pd.DataFrame:
    """Mark a seeded random ``validation_fraction`` of the training images as ``validation``.

    Validation images are normal images held out from training: they drive early stopping
    and the calibration of the decision threshold, so the test set is never used for either.
    A fraction above 0 holds out at least :data:`MIN_VALIDATION` images (the calibration's
    least), so a new product with a dozen images still runs the whole chain.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"preprocessing.validation_fraction must be in [0, 1), got {validation_fraction}")
    manifest = manifest.sort_values(["split", "defect_type", "image_key"]).reset_index(drop=True).copy()
    train_idx = np.flatnonzero(manifest["split"].to_numpy() == TRAIN)
    n_val = int(round(validation_fraction * len(train_idx)))
    if validation_fraction > 0:
        n_val = max(n_val, MIN_VALIDATION)
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
    framing: Framing | None = None,
) -> np.ndarray:
    """Decode and convert images to one ``(N, channels, height, width)`` uint8 array (0..255;
    see :func:`~anomaly_ae.data.transforms.to_model_uint8`): a quarter of float32's memory,
    and batches become float32 in [0, 1] only as they are used."""
    out = np.empty((len(files), channels, *image_shape(size)), dtype=np.uint8)
    for i, name in enumerate(files):
        image = decode_image(loaders[file_key(name)], f"{folder}/{name}")
        out[i] = to_model_uint8(image, size, resample, channels, framing).reshape(out.shape[1:])
    return out


def stack_masks(
    loaders: dict[str, Callable[[], Image.Image]],
    files: Sequence[str | None],
    folder: str,
    size: int | tuple[int, int],
    framing: Framing | None = None,
) -> np.ndarray:
    """Decode masks to ``(N, height, width)`` uint8 {0, 1}; images without a mask get zeros."""
    out = np.zeros((len(files), *image_shape(size)), dtype=np.uint8)
    for i, name in enumerate(files):
        if isinstance(name, str) and name:
            mask = decode_image(loaders[file_key(name)], f"{folder}/{name}")
            out[i] = mask_to_array(mask, size, framing)
    return out
