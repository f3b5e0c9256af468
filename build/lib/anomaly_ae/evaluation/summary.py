"""All headline metrics of one evaluated model, in one dict."""

from __future__ import annotations

import numpy as np

from anomaly_ae.evaluation.metrics import (
    aupro,
    classification_report_at,
    f1_max,
    image_auroc,
    pixel_auroc,
    summarise_ssim,
)

#: The names logged to MLflow; the same in the evaluate pipeline and the loss study.
HEADLINE_METRICS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "ssim_normal_mean",
    "ssim_normal_std",
    "ssim_defect_mean",
    "ssim_defect_std",
    "threshold",
)


def detection_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    ssim: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Image AUROC, pixel AUROC, AUPRO (to ``fpr_limit``, normalised), image F1-max, the
    paper's SSIM statistics, and accuracy/precision/recall at the calibrated threshold."""
    labels = np.asarray(labels).astype(int)
    f1, f1_threshold = f1_max(labels, scores)
    normal_mean, normal_std = summarise_ssim(ssim[labels == 0])
    defect_mean, defect_std = summarise_ssim(ssim[labels == 1])
    at_threshold = classification_report_at(labels, scores, threshold)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, fpr_limit=fpr_limit),
        "image_f1_max": f1,
        "image_f1_max_threshold": f1_threshold,
        "ssim_normal_mean": normal_mean,
        "ssim_normal_std": normal_std,
        "ssim_defect_mean": defect_mean,
        "ssim_defect_std": defect_std,
        "ssim_gap": normal_mean - defect_mean,
        "threshold": float(threshold),
        **{f"{key}_at_threshold": float(value) for key, value in at_threshold.items()},
    }
