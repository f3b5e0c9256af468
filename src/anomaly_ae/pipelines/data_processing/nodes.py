"""Nodes of the ``data_processing`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from anomaly_ae.data import preprocess
from anomaly_ae.data.fingerprint import STAMP_KEY, inputs_stamp
from anomaly_ae.data.partitions import image_partitions
from anomaly_ae.data.transforms import COLOURFUL

log = logging.getLogger(__name__)


def split_images(raw_manifest: pd.DataFrame, preprocessing: dict[str, Any]) -> pd.DataFrame:
    """Seeded train/validation split of the normal training images."""
    return preprocess.split_train_validation(
        raw_manifest, preprocessing["validation_fraction"], preprocessing["split_seed"]
    )


def build_model_inputs(
    dataset_info: dict[str, Any],
    image_manifest: pd.DataFrame,
    preprocessing: dict[str, Any],
    data: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Grayscale (or RGB: ``preprocessing.color``), resize and scale every image once; the arrays
    are cached in the catalog."""
    folder, suffix = dataset_info["path"], data["image_suffix"]
    size = preprocess.model_shape(image_manifest, preprocessing["image_size"], preprocessing["keep_aspect"])
    log.info(
        "Model images: %dx%d (height x width; preprocessing.image_size=%s, keep_aspect=%s)",
        *size,
        preprocessing["image_size"],
        preprocessing["keep_aspect"],
    )
    resample = preprocessing["resample"]
    loaders = image_partitions(folder, suffix, max_pixels=data["max_image_pixels"])
    train_rows = image_manifest[image_manifest["split"] == preprocess.TRAIN]
    channels, colour = preprocess.image_channels(
        loaders, train_rows["image_file"].tolist(), folder, preprocessing["color"]
    )
    log.info(
        "Model images: %s (preprocessing.color=%s%s)",
        "RGB, 3 channels" if channels == 3 else "grayscale, 1 channel",
        preprocessing["color"],
        "" if colour is None else f"; training images' median colourfulness {colour:.3f}, RGB at {COLOURFUL}",
    )
    framing, seen = preprocess.choose_framing(
        loaders, image_manifest, folder, size, preprocessing["fit"], resample
    )
    rule = ", ".join(f"{k} {v}" for k, v in seen.items() if k not in ("fit", "chosen"))
    log.info(
        "Model images: %s (preprocessing.fit=%s%s)",
        framing.describe(),
        preprocessing["fit"],
        rule and f"; {rule}",
    )
    stamp = np.array(inputs_stamp(dataset_info, preprocessing))
    outputs = []
    for split in (preprocess.TRAIN, preprocess.VALIDATION, preprocess.TEST):
        rows = image_manifest[image_manifest["split"] == split].sort_values("array_index")
        arrays = {
            "images": preprocess.stack_images(
                loaders, rows["image_file"].tolist(), folder, size, resample, channels, framing
            ),
            "labels": rows["label"].to_numpy(dtype=np.int64),
            STAMP_KEY: stamp,  # what these arrays were made from (data/fingerprint.py)
            preprocess.FRAMING_KEY: preprocess.framing_array(framing),  # how (checkpoint, bundle)
        }
        if split == preprocess.TEST:
            # Ground truth known: good images, and defective ones that have a mask (a defect
            # type may come without masks: pixel metrics skip those images).
            arrays["has_mask"] = ((rows["label"] == 0) | rows["mask_file"].notna()).to_numpy()
            if framing.fit == "pad":
                arrays[preprocess.VALID_KEY] = preprocess.frame_valid(rows, size, framing)
            arrays["masks"] = preprocess.stack_masks(
                loaders, rows["mask_file"].tolist(), folder, size, framing
            )
        log.info("%s: %d images of %dx%d (height x width)", split, len(rows), *size)
        outputs.append(arrays)
    return tuple(outputs)
