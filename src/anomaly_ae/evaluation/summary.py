"""All headline metrics of one evaluated model, in one dict."""

from __future__ import annotations

import numpy as np
import pandas as pd

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


def known_masks(has_mask: np.ndarray | None, n_images: int) -> np.ndarray:
    """Per image, whether its ground truth is known (good images, and defective ones with a
    mask). ``None`` (caches made before a defect type could lack masks): all of them."""
    return np.ones(n_images, dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)


def _pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> tuple[float, float]:
    """Pixel AUROC and AUPRO, or NaN for both when no image in the set has a defect pixel."""
    if len(masks) == 0 or not np.any(np.asarray(masks) > 0):
        return float("nan"), float("nan")
    return pixel_auroc(masks, maps), aupro(masks, maps, fpr_limit=fpr_limit)


def detection_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    ssim: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float,
    fpr_limit: float = 0.3,
    has_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Image AUROC, pixel AUROC, AUPRO (to ``fpr_limit``, normalised), image F1-max, the
    paper's SSIM statistics, and accuracy/precision/recall at the calibrated threshold.

    ``has_mask`` (per image; default all): pixel metrics use only images whose ground truth
    is known (good images, and defective images that have a mask); NaN when no defective
    image has one. Image metrics always use every image."""
    labels = np.asarray(labels).astype(int)
    known = known_masks(has_mask, len(labels))
    f1, f1_threshold = f1_max(labels, scores)
    normal_mean, normal_std = summarise_ssim(ssim[labels == 0])
    defect_mean, defect_std = summarise_ssim(ssim[labels == 1])
    at_threshold = classification_report_at(labels, scores, threshold)
    pixel, pro = _pixel_metrics(np.asarray(masks)[known], np.asarray(maps)[known], fpr_limit)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel,
        "aupro": pro,
        "image_f1_max": f1,
        "image_f1_max_threshold": f1_threshold,
        "ssim_normal_mean": normal_mean,
        "ssim_normal_std": normal_std,
        "ssim_defect_mean": defect_mean,
        "ssim_defect_std": defect_std,
        "ssim_gap": normal_mean - defect_mean,
        "threshold": float(threshold),
        "n_defective_without_mask": int(np.sum((labels == 1) & ~known)),
        **{f"{key}_at_threshold": float(value) for key, value in at_threshold.items()},
    }


#: Columns of :func:`per_defect_type`.
PER_TYPE_COLUMNS = (
    "defect_type",
    "n_images",
    "has_masks",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "recall_at_threshold",
)


def per_defect_type(
    defect_types: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float,
    fpr_limit: float = 0.3,
    has_mask: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per test defect type: that type's images against every good test image.

    Image AUROC, pixel AUROC and AUPRO (good images' pixels as the negatives), and the share
    of the type's images flagged at ``threshold``. Pixel metrics are NaN for a type without
    masks (``has_masks`` False), so a user sees which kind of defect a model misses."""
    defect_types = np.asarray(defect_types).astype(str)
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores)
    known = known_masks(has_mask, len(labels))
    normal = labels == 0
    rows = []
    for kind in sorted(set(defect_types[labels == 1])):
        own = (defect_types == kind) & (labels == 1)
        chosen = own | normal
        masked = chosen & known
        with_masks = bool(np.all(known[own]))
        pixel, pro = (
            _pixel_metrics(np.asarray(masks)[masked], np.asarray(maps)[masked], fpr_limit)
            if with_masks
            else (float("nan"), float("nan"))
        )
        rows.append(
            {
                "defect_type": kind,
                "n_images": int(own.sum()),
                "has_masks": with_masks,
                "image_auroc": image_auroc(labels[chosen], scores[chosen]) if normal.any() else float("nan"),
                "pixel_auroc": pixel,
                "aupro": pro,
                "recall_at_threshold": float(np.mean(scores[own] > threshold)),
            }
        )
    return pd.DataFrame(rows, columns=list(PER_TYPE_COLUMNS))
