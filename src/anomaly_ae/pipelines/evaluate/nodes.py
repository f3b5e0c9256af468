"""Nodes of the ``evaluate`` pipeline: scoring, threshold, tables and metrics."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np
import pandas as pd

from anomaly_ae.data.defects import DEFECT_KINDS, synthesis_options
from anomaly_ae.data.preprocess import VALID_KEY, framing_of
from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation import calibration, tables
from anomaly_ae.evaluation.false_alarms import (
    FalseAlarmOutlook,
    asked_false_alarm_rate,
    excess_false_alarm_p,
    false_alarm_outlook,
    validation_images_needed,
)
from anomaly_ae.evaluation.metrics import calibrate_threshold, threshold_options
from anomaly_ae.evaluation.stress import STRESS_COLUMNS, copies_per_image, per_kind_rows, stress_table
from anomaly_ae.evaluation.summary import (
    HEADLINE_METRICS,
    REGION_METRICS,
    defect_region_metrics,
    detection_metrics,
    kind_of_test_set,
    known_masks,
    near_defect,
    per_defect_type,
)
from anomaly_ae.model import AutoencoderConfig, config_for_images
from anomaly_ae.model.checkpoint import checkpoint_fingerprint, checkpoint_framing, model_from_checkpoint
from anomaly_ae.scoring import MapSettings, NormalReference
from anomaly_ae.scoring.inference import fit_normal_reference, reconstruct_and_score

MAP_SOURCES = ("calibrated", "configured")

log = logging.getLogger(__name__)


def _network(model_checkpoint: dict, model: dict[str, Any], images: dict[str, np.ndarray]):
    shape = images["images"].shape[-2:]
    config = config_for_images(model, shape, images["images"].shape[1])
    return model_from_checkpoint(model_checkpoint, config, image_size=shape, framing=framing_of(images))


def _inference_options(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_size": evaluation["batch_size"],
        "device": evaluation["device"],
        "precision": evaluation["precision"],
    }


def resolve_map(calibrated_map: dict[str, Any], model_checkpoint: dict, evaluation: dict[str, Any]) -> dict:
    """The map settings this evaluation uses: the calibrated choice for THIS model
    (``evaluation.map: calibrated``, the default) or ``evaluation.anomaly_map`` as configured
    (``evaluation.map: configured``; its defaults are the paper's map: ``--env paper``)."""
    source = evaluation["map"]
    if source not in MAP_SOURCES:
        raise ValueError(f"evaluation.map must be one of {MAP_SOURCES}, got {source!r}")
    if source == "configured":
        settings = MapSettings.from_dict(evaluation["anomaly_map"])
        log.info("Anomaly map as configured (evaluation.anomaly_map): %s", settings.describe())
        return settings.to_dict()
    fingerprint = checkpoint_fingerprint(model_checkpoint)
    if calibrated_map.get("checkpoint_fingerprint") != fingerprint:
        raise ValueError(
            f"The calibrated map was chosen for model {calibrated_map.get('checkpoint_fingerprint')}, "
            f"not for this checkpoint ({fingerprint}). Run `kedro run --pipeline=calibrate` for it, or "
            "pick a matching version with --load-versions."
        )
    settings = MapSettings.from_dict(calibrated_map["map_settings"])
    log.info("Anomaly map chosen by calibration: %s", settings.describe())
    return settings.to_dict()


def fit_reference(
    model_checkpoint: dict,
    train_images: dict[str, np.ndarray],
    map_settings: dict[str, Any],
    model: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Per-pixel mean/std of the anomaly maps of the NORMAL training images (never validation
    or test images); used when the map's ``normal_reference`` is not ``none``."""
    network = _network(model_checkpoint, model, train_images)
    settings = MapSettings.from_dict(map_settings)
    reference = fit_normal_reference(
        network, train_images["images"], settings, **_inference_options(evaluation)
    )
    for what, ref, mode in (
        ("Normal reference", reference, settings.normal_reference),
        ("Heat map's normal reference", reference.localisation, settings.heatmap.normal_reference),
    ):
        if ref is not None:
            log.info(
                "%s from %d training images: mean map %.4f, std map %.4f (applied: %s)",
                what,
                ref.n_images,
                float(ref.mean.mean()),
                float(ref.std.mean()),
                mode,
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
    map_settings: dict[str, Any],
    model: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reconstruct and score the test images and the held-out normal validation images."""
    network = _network(model_checkpoint, model, test_images)
    settings = MapSettings.from_dict(map_settings)
    reference = NormalReference.from_arrays(normal_reference)
    options = {**_inference_options(evaluation), "reference": reference}
    test_scores = reconstruct_and_score(network, test_images["images"], settings, **options)
    # the validation maps stay: without good test images they show the normal variation the
    # model comes closest to flagging (hardest cases); 10 % of the training images, small
    validation_scores = reconstruct_and_score(network, validation_images["images"], settings, **options)
    return test_scores, validation_scores


def calibrate_threshold_node(
    validation_scores: dict[str, np.ndarray],
    model_checkpoint: dict,
    map_settings: dict[str, Any],
    evaluation: dict[str, Any],
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
    value = calibrate_threshold(scores, **threshold_options(rule))
    outlook = false_alarm_outlook(scores, value)
    log.info(
        "Threshold %.5f (%s on %d normal validation images): a normal image like them is flagged at %s",
        value,
        rule["rule"],
        len(scores),
        outlook.describe(),
    )
    asked = asked_false_alarm_rate(rule)
    if asked is not None and len(scores) < validation_images_needed(asked):
        log.warning(
            "evaluation.threshold asks for a false-alarm rate of %g %%, which %d normal validation "
            "images cannot promise (it needs %d; the rate to expect is %s). Add normal training "
            "images or raise preprocessing.validation_fraction, or ask for what they support.",
            100 * asked,
            len(scores),
            validation_images_needed(asked),
            outlook.describe(),
        )
    return {
        "value": float(value),
        **rule,
        "n_validation_images": int(len(scores)),
        "false_alarm_outlook": outlook.to_dict(),
        "score": map_settings,
        "checkpoint_fingerprint": checkpoint_fingerprint(model_checkpoint),
        "checkpoint_epoch": int(model_checkpoint.get("epoch", 0)),
    }


def build_ssim_table(
    test_scores: dict[str, np.ndarray], image_manifest: pd.DataFrame, threshold: dict[str, Any]
) -> pd.DataFrame:
    test_rows = image_manifest[image_manifest["split"] == "test"]
    return tables.ssim_table(test_rows, test_scores, threshold["value"])


def build_table2(
    ssim_table: pd.DataFrame,
    model_checkpoint: dict,
    dataset_info: dict[str, Any],
    paper_table2: dict,
    evaluation: dict[str, Any],
) -> pd.DataFrame:
    """Table II: our SSIM statistics, with the paper's beside them for the paper's product
    only (``evaluation.paper_category``): another product is not compared with bottle."""
    papers = dataset_info["category"] == evaluation["paper_category"]
    frame = tables.table2(
        ssim_table,
        paper_table2 if papers else {},
        model_checkpoint["loss"],
        evaluation["paper_protocol_defects"] if papers else (),
    )
    log.info("Table II (SSIM of original vs reconstruction):\n%s", tables.format_table2(frame))
    return frame


def _metric_name(text: str) -> str:
    """A defect-type folder name as part of an MLflow metric name (letters, digits, _-. /)."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", text)


#: Below this chance the report and the log warn that the good test images are flagged more
#: often than the validation images promise (a presentation cue; the number is always shown).
EXCESS_FALSE_ALARM_P = 0.05
#: the false-alarm figures of ``compute_metrics`` (MLflow metrics where finite); the first
#: comes from ``detection_metrics``, the rest from ``_false_alarm_check``
FALSE_ALARM_METRICS = (
    "false_alarm_rate_at_threshold",
    "false_alarm_rate_expected_low",
    "false_alarm_rate_expected_high",
    "false_alarm_excess_p",
)


def _false_alarm_check(threshold: dict[str, Any], flagged: float, n_good: int) -> dict[str, float]:
    """The false-alarm rate the threshold's validation images promise, and the chance of at
    least ``flagged`` false alarms on the ``n_good`` good test images, if they were like the
    validation images (:mod:`anomaly_ae.evaluation.false_alarms`). NaN for a threshold saved
    before the outlook was (no validation scores to recompute it from)."""
    nan = float("nan")
    if "false_alarm_outlook" not in threshold:
        return dict.fromkeys(FALSE_ALARM_METRICS[1:], nan)
    outlook = FalseAlarmOutlook.from_dict(threshold["false_alarm_outlook"])
    p = excess_false_alarm_p(outlook, int(flagged), n_good) if n_good else nan
    if np.isfinite(p) and p < EXCESS_FALSE_ALARM_P:
        log.warning(
            "%d of %d good test images flagged, more than %d normal validation images like them "
            "would give (a rate of %s; chance of this many or more %.3g): the good test images "
            "differ from the validation images, and the threshold's promise does not carry over.",
            flagged,
            n_good,
            outlook.n_validation,
            outlook.describe(),
            p,
        )
    return {
        "false_alarm_rate_expected_low": outlook.expected_low,
        "false_alarm_rate_expected_high": outlook.expected_high,
        "false_alarm_excess_p": p,
    }


def compute_metrics(
    test_scores: dict[str, np.ndarray],
    test_images: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    threshold: dict[str, Any],
    model_checkpoint: dict,
    dataset_info: dict[str, Any],
    map_settings: dict[str, Any],
    normal_reference: dict[str, np.ndarray],
    evaluation: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, float]], pd.DataFrame, dict[str, str]]:
    """All metrics (versioned JSON), the headline ones for MLflow, the metrics per test
    defect type (versioned CSV; also in the JSON and in MLflow as ``<metric>.<type>``), and
    the run's tag ``test_set`` (what the test set allowed to be measured: a run without image
    AUROC says why in the MLflow UI)."""
    labels = test_images["labels"]
    has_mask = test_images.get("has_mask")  # caches made before masks could be missing: all
    valid = test_images.get(VALID_KEY)  # padded frames: pixel metrics leave the mirrored margins out
    metrics = detection_metrics(
        labels,
        test_scores["score"],
        test_scores["ssim"],
        test_images["masks"],
        test_scores["map"],
        threshold["value"],
        evaluation["aupro_fpr_limit"],
        has_mask=has_mask,
        confidence_level=evaluation["confidence_level"],
        valid=valid,
    )
    # the good test images flagged: detection_metrics' false positives
    metrics.update(_false_alarm_check(threshold, metrics["fp_at_threshold"], metrics["n_normal"]))
    score = MapSettings.from_dict(map_settings)
    region_options = {
        "margin": int(evaluation["defect_margin"]),
        "reduction": score.score_reduction,
        "topk_fraction": score.topk_fraction,
        "has_mask": has_mask,
        # the part of a map not scored looks like the normal images' mean map
        "typical": NormalReference.from_arrays(normal_reference).typical(score.normal_reference),
    }
    # the image score's question (at / off the defect) on the map the score comes from
    detection_maps = test_scores.get("detection_map", test_scores["map"])
    metrics.update(defect_region_metrics(labels, detection_maps, test_images["masks"], **region_options))
    by_type = per_defect_type(
        ssim_table["defect_type"].to_numpy(),
        labels,
        test_scores["score"],
        test_images["masks"],
        test_scores["map"],
        threshold["value"],
        evaluation["aupro_fpr_limit"],
        **region_options,
        confidence_level=evaluation["confidence_level"],
        detection_maps=detection_maps,
        valid=valid,
    )
    if metrics["test_set"] != "normal and defective":
        log.warning(
            "Test set: %s (%d good, %d defective images): image AUROC, F1-max and their "
            "interval need both; %s. Add test/good/ and test/<defect_type>/ images (masks in "
            "ground_truth/<defect_type>/) to measure the model.",
            metrics["test_set"],
            metrics["n_normal"],
            metrics["n_defective"],
            {
                "none": "the model is trained, its map chosen and its threshold set on normal images only",
                "normal only": "false-alarm rate at the threshold "
                f"{metrics['false_alarm_rate_at_threshold']:.4f}",
                "defective only": f"recall at the threshold {metrics['recall_at_threshold']:.4f}",
            }[metrics["test_set"]],
        )
    log.info(
        "image AUROC %.4f (%g %% interval %.4f-%.4f; at the defect %.4f, off it %.4f) | "
        "pixel AUROC %.4f | AUPRO %.4f | F1-max %.4f | threshold %.4f",
        metrics["image_auroc"],
        100 * evaluation["confidence_level"],
        metrics["image_auroc_ci_low"],
        metrics["image_auroc_ci_high"],
        metrics["image_auroc_at_defect"],
        metrics["image_auroc_off_defect"],
        metrics["pixel_auroc"],
        metrics["aupro"],
        metrics["image_f1_max"],
        metrics["threshold"],
    )
    if len(by_type):
        log.info("Per defect type:\n%s", by_type.round(4).to_string(index=False))
    unmasked = by_type.loc[~by_type["has_masks"], "defect_type"].tolist()
    if unmasked:
        log.info("No masks for %s: image metrics only for them.", ", ".join(unmasked))
    record = {
        **metrics,
        "n_test_images": int(len(labels)),
        "data_source": dataset_info["source"],
        "category": dataset_info["category"],
        "checkpoint_epoch": int(model_checkpoint.get("epoch", 0)),
        # the evaluated network as the checkpoint holds it (size and tiles included)
        "model": AutoencoderConfig.from_dict(model_checkpoint["model_config"]).describe(),
        "loss_weights": model_checkpoint["loss"],
        # how images of any size became the model's frame (preprocessing.fit made concrete)
        "framing": checkpoint_framing(model_checkpoint).to_dict(),
        "anomaly_map": map_settings,
        "map_source": evaluation["map"],
        "threshold_rule": {k: v for k, v in threshold.items() if k != "value"},
        "per_defect_type": json.loads(by_type.to_json(orient="records")),  # NaN -> null
        "defect_types_without_masks": unmasked,
    }
    # what a test set of one class (or none) leaves undefined is left out, not logged as NaN
    mlflow_metrics = {
        name: {"value": float(metrics[name]), "step": 0}
        for name in (*HEADLINE_METRICS, *REGION_METRICS, *FALSE_ALARM_METRICS)
        if np.isfinite(metrics[name])
    }
    for row in by_type.itertuples():
        for name in ("image_auroc", "pixel_auroc", "aupro", *REGION_METRICS):
            value = getattr(row, name)
            if np.isfinite(value):
                mlflow_metrics[f"{name}.{_metric_name(row.defect_type)}"] = {"value": float(value), "step": 0}
    return record, mlflow_metrics, by_type, {"test_set": metrics["test_set"]}


def stress_test(
    model_checkpoint: dict,
    test_images: dict[str, np.ndarray],
    normal_reference: dict[str, np.ndarray],
    map_settings: dict[str, Any],
    model: dict[str, Any],
    evaluation: dict[str, Any],
    calibration: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Image/pixel AUROC per synthetic defect kind on the GOOD test images (another seed than
    calibration, every kind), for the map in use and the paper's map: a held-out report. Also
    the map in use's figures per kind for MLflow (``stress_image_auroc.<kind>``,
    ``stress_pixel_auroc.<kind>``; ``all`` for every kind together), so runs compare by kind."""
    options = evaluation["stress_test"]
    normal = as_unit_float(test_images["images"][np.asarray(test_images["labels"]) == 0])
    if len(normal) < 2:
        log.warning(
            "Held-out synthetic check skipped: fewer than 2 good test images to paste defects onto "
            "(the validation images serve the calibration). Add images to test/good/ for it."
        )
        return pd.DataFrame(columns=STRESS_COLUMNS), {}
    synthetic = calibration["synthetic_defects"]
    per_image = copies_per_image(options, len(normal), DEFECT_KINDS, normal.shape[1])
    log.info("Stress test: %d defective copies of each of the %d good test images", per_image, len(normal))
    table = stress_table(
        _network(model_checkpoint, model, test_images),
        normal,
        {
            "in use": (MapSettings.from_dict(map_settings), NormalReference.from_arrays(normal_reference)),
            "paper": (MapSettings(), None),  # the paper's map (MapSettings' defaults; no reference)
        },
        {
            "per_image": per_image,
            "seed": options["seed"],
            "kinds": DEFECT_KINDS,
            **synthesis_options(synthetic),
        },
        **_inference_options(evaluation),
        confidence_level=evaluation["confidence_level"],
    )
    overall = per_kind_rows(table)
    pivot = overall.pivot(index="kind", columns="map", values="image_auroc")
    log.info(
        "Held-out synthetic defects on the good test images, image AUROC per kind:\n%s",
        pivot.round(3).to_string(),
    )
    return table, stress_mlflow_metrics(overall)


def stress_mlflow_metrics(overall: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The map in use's held-out image and pixel AUROC per kind (the stress table's rows over
    every contrast and size) as MLflow metrics; NaN (a kind without a pixel figure) left out."""
    metrics = {}
    for row in overall[overall["map"] == "in use"].itertuples():
        for name in ("image_auroc", "pixel_auroc"):
            value = float(getattr(row, name))
            if np.isfinite(value):
                metrics[f"stress_{name}.{_metric_name(str(row.kind))}"] = {"value": value, "step": 0}
    return metrics


def grid_agreement(
    calibration_references: calibration.GridReferences,
    test_images: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    calibration_table: pd.DataFrame,
    evaluation: dict[str, Any],
    calibration_params: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """The calibration grid scored on the real test images, beside the synthetic scores,
    and the Spearman correlations over the grid (``evaluation.grid_agreement``): does the
    label-free rule's score predict the real metrics? Development data: it chooses nothing.
    The normal references are the calibration's (``calibration_references``, fitted on the
    same training images for the same grid): the training images are not streamed again."""
    labels = np.asarray(test_images["labels"])
    kind = kind_of_test_set(labels)
    if not evaluation.get("grid_agreement") or kind != "normal and defective":
        log.info(
            "Grid agreement not computed (%s).",
            "off" if not evaluation.get("grid_agreement") else f"test set: {kind}",
        )
        return pd.DataFrame(columns=["setting"]), {}
    batch = calibration_params["batch_size"]
    has_mask = known_masks(test_images.get("has_mask"), len(labels))
    good, bad = labels == 0, labels == 1
    real, _ = calibration.score_grid(
        calibration_params["grid"],
        MapSettings.from_dict(evaluation["anomaly_map"]),
        calibration_references,
        (test_images["images"][good], test_scores["recon"][good]),
        (
            test_images["images"][bad],
            test_scores["recon"][bad],
            test_images["masks"][bad],
            ssim_table["defect_type"].to_numpy()[bad],
        ),
        batch,
        scale=float(calibration_table["l2_scale"].iloc[0]),
        pixel_known=has_mask[bad],
        defect_regions=near_defect(test_images["masks"][bad], int(evaluation["defect_margin"])),
    )
    table, correlations = calibration.agreement(calibration_table, real)
    log.info(
        "Synthetic selection score vs real test metrics over %d settings, Spearman: image AUROC %.3f "
        "(defective images scored at the defect: %.3f), pixel AUROC %.3f",
        len(table),
        correlations["spearman_selection_vs_real_image_auroc"],
        correlations.get("spearman_selection_vs_real_image_auroc_at_defect", float("nan")),
        correlations["spearman_selection_vs_real_pixel_auroc"],
    )
    return table, {
        name: {"value": value, "step": 0} for name, value in correlations.items() if np.isfinite(value)
    }
