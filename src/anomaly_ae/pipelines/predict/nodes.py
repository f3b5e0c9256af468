"""Nodes of the ``predict`` pipeline: thin adapters over :class:`anomaly_ae.Inspector`."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import DatasetError
from PIL import Image

from anomaly_ae.data.partitions import image_partitions
from anomaly_ae.evaluation.false_alarms import FalseAlarmOutlook
from anomaly_ae.inspect import Inspector
from anomaly_ae.reporting.figures import heatmap_overlay_image, overlay_vmax

log = logging.getLogger(__name__)


def _png_loader(image: Image.Image) -> Callable[[], Image.Image]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()  # compressed: thousands of overlays stay small in memory
    return lambda: Image.open(io.BytesIO(data))


def predict_folder(
    model_checkpoint: dict, decision_threshold: dict, normal_reference: dict, predict: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Callable[[], Image.Image]]]:
    """Score every file below ``predict.input_dir``; one row per file, errors included."""
    folder = predict.get("input_dir")
    if not folder or not Path(folder).is_dir():
        raise FileNotFoundError(
            f"predict.input_dir={folder!r} is not a folder. Run "
            f"`kedro run --pipeline=predict --params predict.input_dir=<folder of images>`."
        )
    try:
        loaders = image_partitions(  # sizes checked from the header, before decoding
            folder,
            suffix="",
            max_pixels=predict["max_image_pixels"],
            limit_setting="predict.max_image_pixels",
        )
    except DatasetError as exc:
        raise FileNotFoundError(f"predict.input_dir={folder!r} holds no files to inspect ({exc}).") from exc
    inspector = Inspector(
        model_checkpoint,
        decision_threshold,
        reference=normal_reference,
        resample=predict["resample"],
        batch_size=predict["batch_size"],
        device=predict["device"],
        precision=predict["precision"],
        max_image_pixels=predict["max_image_pixels"],
        min_image_side=predict["min_image_side"],
        keep_maps=predict["save_overlays"],
    )
    vmax = overlay_vmax(inspector.threshold, inspector.map_settings.heatmap.normal_reference)
    rows, overlays = [], {}
    for result in inspector.inspect(sorted(loaders.items())):
        rows.append(result.row())
        if result.anomaly_map is not None:
            overlays[result.file] = _png_loader(  # "a/b.jpg" -> a/b.jpg.png: no name clashes
                heatmap_overlay_image(result.image, result.anomaly_map, vmax=vmax)
            )
            result.image = result.anomaly_map = None  # keep only the compressed overlay
    table = pd.DataFrame(rows, columns=["file", "score", "ssim", "is_anomalous", "error", "width", "height"])
    failed = int(table["error"].notna().sum())
    outlook = decision_threshold.get("false_alarm_outlook")  # thresholds saved before: none
    log.info(
        "predict: %d files scanned, %d anomalous, %d failed (threshold %.5f%s)",
        len(table),
        int(table["is_anomalous"].fillna(False).astype(bool).sum()),
        failed,
        inspector.threshold,
        f"; a normal image like its {outlook['n_validation']} validation images is flagged at "
        f"{FalseAlarmOutlook.from_dict(outlook).describe()}"
        if outlook
        else "",
    )
    for row in table[table["error"].notna()].itertuples():
        log.warning("not judged: %s: %s", row.file, row.error)
    return table, overlays
