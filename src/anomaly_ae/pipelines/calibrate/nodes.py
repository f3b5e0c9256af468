"""Nodes of the ``calibrate`` pipeline: thin adapters over :mod:`anomaly_ae.evaluation.calibration`."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from anomaly_ae.data.defects import paste_synthetic_defects, synthesis_options
from anomaly_ae.data.preprocess import framing_of
from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation import calibration
from anomaly_ae.model import config_for_images
from anomaly_ae.model.checkpoint import checkpoint_fingerprint, model_from_checkpoint
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.inference import reconstruct

log = logging.getLogger(__name__)

RULE = (
    "selection = (synthetic image AUROC + synthetic pixel AUROC) / 2 on the held-out normal "
    "validation images vs synthetic-defect copies of them; ties within the tolerance go to the "
    "fewest levers changed from the paper's map, then grid order. The heat map (pixel AUROC, "
    "AUPRO) is chosen by the synthetic pixel AUROC alone, ties going to the map nearest the "
    "detection map (itself, when it ties) (calibration.separate_localisation). Test images are "
    "never used."
)


def synthesise_defects(validation_images: dict[str, np.ndarray], calibration_params: dict[str, Any]) -> dict:
    """Synthetic-defect copies of the NORMAL validation images, with masks and kinds."""
    images = as_unit_float(validation_images["images"])  # the synthesiser paints in [0, 1]
    if "labels" in validation_images:  # validation images are normal by construction
        images = images[np.asarray(validation_images["labels"]) == 0]
    if len(images) < 2:
        raise ValueError(
            f"calibration needs at least 2 normal validation images, got {len(images)}; raise "
            "preprocessing.validation_fraction or add training images."
        )
    options = calibration_params["synthetic_defects"]
    defects, masks, kinds = paste_synthetic_defects(
        images, options["per_image"], options["seed"], kinds=options["kinds"], **synthesis_options(options)
    )
    log.info("Synthetic defects on %d validation images: %s", len(images), dict(Counter(kinds)))
    return {"normal": images, "images": defects, "masks": masks, "kinds": kinds}


def score_lever_grid(
    model_checkpoint: dict,
    train_images: dict[str, np.ndarray],
    synthetic_defects: dict,
    model: dict[str, Any],
    evaluation: dict[str, Any],
    calibration_params: dict[str, Any],
) -> tuple[pd.DataFrame, calibration.GridReferences]:
    """Reconstruct the normal and defective sets once, fit every normal reference of
    ``calibration.grid`` on the training images, then score every setting. The references
    are an output too: the evaluate pipeline's grid agreement scores the same grid on the
    test images with them, instead of streaming the training images again."""
    started = time.perf_counter()
    shape = train_images["images"].shape[-2:]
    config = config_for_images(model, shape, train_images["images"].shape[1])
    network = model_from_checkpoint(
        model_checkpoint, config, image_size=shape, framing=framing_of(train_images)
    )
    batch, device = calibration_params["batch_size"], calibration_params["device"]
    grid, paper = calibration_params["grid"], MapSettings.from_dict(evaluation["anomaly_map"])
    sets = {
        name: (images, reconstruct(network, images, batch, device))
        for name, images in (
            ("normal", synthetic_defects["normal"]),
            ("defects", synthetic_defects["images"]),
        )
    }
    reconstructed = time.perf_counter()
    scale = calibration.normal_l2_scale(sets["normal"], paper, batch)
    # the training images only feed the normal references: reconstructed batch by batch as
    # they are streamed (memory independent of their number)
    references = calibration.fit_grid_references(
        grid,
        paper,
        scale,
        (train_images["images"], lambda batch_images: reconstruct(network, batch_images, batch, device)),
        batch,
    )
    fitted = time.perf_counter()
    table, _ = calibration.score_grid(
        grid,
        paper,
        references,
        sets["normal"],
        (*sets["defects"], synthetic_defects["masks"], synthetic_defects["kinds"]),
        batch,
    )
    table["l2_scale"] = scale
    log.info(
        "Calibration grid: %d settings scored in %.1f s (reconstruction %.1f s, %d normal "
        "references from %d training images %.1f s)",
        len(table),
        time.perf_counter() - started,
        reconstructed - started,
        len(references.maps),
        len(train_images["images"]),
        fitted - reconstructed,
    )
    return table, references


def select_map(
    calibration_table: pd.DataFrame, model_checkpoint: dict, calibration_params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Apply the rule; the choice (versioned JSON, tied to the model's fingerprint) and the
    table sorted best first with ``rank``, ``is_selected`` and ``is_localisation`` columns.
    With ``calibration.separate_localisation`` the heat map is chosen on its own, by the
    synthetic pixel AUROC (:func:`~anomaly_ae.evaluation.calibration.select_localisation`);
    ``map_settings`` then holds it as ``localisation`` (the detection map's own settings when
    one map serves both; :class:`MapSettings` reads that as one map)."""
    tolerance = calibration_params["tie_tolerance"]
    chosen = calibration.select(calibration_table, tolerance)
    row, paper = calibration_table.loc[chosen], calibration_table[calibration_table["is_paper"]].iloc[0]
    located = (
        calibration.select_localisation(calibration_table, tolerance, chosen)
        if calibration_params["separate_localisation"]
        else chosen
    )
    settings = MapSettings.from_dict(
        {**row["map_settings"], "localisation": calibration_table.loc[located, "map_settings"]}
    )
    heat = calibration_table.loc[located] if settings.localisation else row
    table = calibration_table.copy()
    table["is_selected"] = table.index == chosen
    table["is_localisation"] = table.index == (located if settings.localisation else chosen)
    table = table.sort_values(["selection_score", "levers_changed"], ascending=[False, True], kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table["map_settings"] = table["map_settings"].map(json.dumps)
    choice = {
        # the heat map always spelt out (the detection map's own when there is one map): the
        # JSON, and the MLflow parameters made from it, have the same keys whatever the choice
        "map_settings": {**settings.to_dict(), "localisation": settings.heatmap.map_part().to_dict()},
        "setting": settings.describe(),
        "detection_setting": row["setting"],
        "selection_score": float(row["selection_score"]),
        "syn_image_auroc": float(row["syn_image_auroc"]),
        "syn_pixel_auroc": float(row["syn_pixel_auroc"]),
        "localisation_setting": settings.heatmap.describe_map(),
        "localisation_syn_pixel_auroc": float(heat["syn_pixel_auroc"]),
        "separate_localisation": bool(calibration_params["separate_localisation"]),
        "paper_setting": paper["setting"],
        "paper_selection_score": float(paper["selection_score"]),
        "n_settings": int(len(table)),
        "n_tied": int((table["selection_score"] >= table["selection_score"].max() - tolerance).sum()),
        "tie_tolerance": tolerance,
        "rule": RULE,
        "checkpoint_fingerprint": checkpoint_fingerprint(model_checkpoint),
        "checkpoint_epoch": int(model_checkpoint.get("epoch", 0)),
    }
    log.info(
        "Calibrated map: %s (selection %.4f; the paper's map %s: %.4f); "
        "heat map %s (synthetic pixel AUROC %.4f)",
        choice["detection_setting"],
        choice["selection_score"],
        choice["paper_setting"],
        choice["paper_selection_score"],
        choice["localisation_setting"],
        choice["localisation_syn_pixel_auroc"],
    )
    return choice, table.reset_index(drop=True)
