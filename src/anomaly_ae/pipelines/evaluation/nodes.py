"""Nodes of the ``evaluation`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from anomaly_ae.evaluation import tables
from anomaly_ae.evaluation.inference import (
    MapSettings,
    fit_normal_reference,
    model_from_checkpoint,
    reconstruct_and_score,
)
from anomaly_ae.evaluation.metrics import calibrate_threshold
from anomaly_ae.evaluation.reference import NormalReference
from anomaly_ae.evaluation.summary import HEADLINE_METRICS, detection_metrics
from anomaly_ae.model import AutoencoderConfig
from anomaly_ae.training.checkpoint import checkpoint_fingerprint

log = logging.getLogger(__name__)


def _network(model_checkpoint: dict, model: dict[str, Any], images: dict[str, np.ndarray]):
    return model_from_checkpoint(
        model_checkpoint, AutoencoderConfig.from_dict(model), image_size=images["images"].shape[-1]
    )


def _inference_options(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_size": evaluation["batch_size"],
        "device": evaluation["device"],
        "precision": evaluation["precision"],
    }


def fit_reference(
    model_checkpoint: dict,
    train_images: dict[str, np.ndarray],
    model: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Per-pixel mean/std of the anomaly maps of the NORMAL training images (never validation
    or test images); used when ``evaluation.anomaly_map.normal_reference`` is not ``none``."""
    network = _network(model_checkpoint, model, train_images)
    settings = MapSettings.from_dict(evaluation["anomaly_map"])
    reference = fit_normal_reference(
        network, train_images["images"], settings, **_inference_options(evaluation)
    )
    log.info(
        "Normal reference from %d training images: mean map %.4f, std map %.4f (applied: %s)",
        reference.n_images,
        float(reference.mean.mean()),
        float(reference.std.mean()),
        settings.normal_reference,
    )
    return {
        **reference.to_arrays(),
        "checkpoint_fingerprint": np.asarray(checkpoint_fingerprint(model_checkpoint)),
    }


def score_images(
    model_checkpoint: dict,
    test_images: dict[str, np.ndarray],
    validation_images: dict[str, np.ndarray],
    normal_reference: dict[str, np.ndarray],
    model: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reconstruct and score the test images and the held-out normal validation images."""
    network = _network(model_checkpoint, model, test_images)
    settings = MapSettings.from_dict(evaluation["anomaly_map"])
    reference = NormalReference.from_arrays(normal_reference)
    options = {**_inference_options(evaluation), "reference": reference}
    test_scores = reconstruct_and_score(network, test_images["images"], settings, **options)
    validation_scores = reconstruct_and_score(network, validation_images["images"], settings, **options)
    validation_scores.pop("map", None)
    return test_scores, validation_scores


def calibrate(
    validation_scores: dict[str, np.ndarray], model_checkpoint: dict, evaluation: dict[str, Any]
) -> dict[str, Any]:
    """The decision threshold from NORMAL validation images only (never test images), tagged
    with the fingerprint of the model it belongs to."""
    rule = evaluation["threshold"]
    scores = validation_scores["score"]
    if len(scores) == 0:
        raise ValueError(
            "No validation images to calibrate the threshold on; set "
            "preprocessing.validation_fraction > 0 and rerun data_processing."
        )
    value = calibrate_threshold(scores, rule=rule["rule"], quantile=rule["quantile"], k_sigma=rule["k_sigma"])
    log.info("Threshold %.5f (%s on %d normal validation images)", value, rule["rule"], len(scores))
    return {
        "value": float(value),
        **rule,
        "n_validation_images": int(len(scores)),
        "score": evaluation["anomaly_map"],
        "checkpoint_fingerprint": checkpoint_fingerprint(model_checkpoint),
        "checkpoint_epoch": int(model_checkpoint.get("epoch", 0)),
    }


def build_ssim_table(
    test_scores: dict[str, np.ndarray], image_manifest: pd.DataFrame, threshold: dict[str, Any]
) -> pd.DataFrame:
    test_rows = image_manifest[image_manifest["split"] == "test"]
    return tables.ssim_table(test_rows, test_scores, threshold["value"])


def build_table2(
    ssim_table: pd.DataFrame, model_checkpoint: dict, paper_table2: dict, evaluation: dict[str, Any]
) -> pd.DataFrame:
    frame = tables.table2(
        ssim_table, paper_table2, model_checkpoint["loss"], evaluation["paper_protocol_defects"]
    )
    log.info("Table II (SSIM of original vs reconstruction):\n%s", tables.format_table2(frame))
    return frame


def compute_metrics(
    test_scores: dict[str, np.ndarray],
    test_images: dict[str, np.ndarray],
    threshold: dict[str, Any],
    model_checkpoint: dict,
    dataset_info: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """All metrics (versioned JSON) and the headline ones for MLflow."""
    metrics = detection_metrics(
        test_images["labels"],
        test_scores["score"],
        test_scores["ssim"],
        test_images["masks"],
        test_scores["map"],
        threshold["value"],
        evaluation["aupro_fpr_limit"],
    )
    log.info(
        "image AUROC %.4f | pixel AUROC %.4f | AUPRO %.4f | F1-max %.4f | threshold %.4f",
        metrics["image_auroc"],
        metrics["pixel_auroc"],
        metrics["aupro"],
        metrics["image_f1_max"],
        metrics["threshold"],
    )
    record = {
        **metrics,
        "n_test_images": int(len(test_images["labels"])),
        "data_source": dataset_info["source"],
        "category": dataset_info["category"],
        "checkpoint_epoch": int(model_checkpoint.get("epoch", 0)),
        "loss_weights": model_checkpoint["loss"],
        "anomaly_map": evaluation["anomaly_map"],
        "threshold_rule": {k: v for k, v in threshold.items() if k != "value"},
    }
    mlflow_metrics = {name: {"value": float(metrics[name]), "step": 0} for name in HEADLINE_METRICS}
    return record, mlflow_metrics
