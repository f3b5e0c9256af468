"""All headline metrics of one evaluated model, in one dict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from anomaly_ae.evaluation.metrics import (
    aupro,
    auroc_interval,
    classification_report_at,
    f1_max,
    image_auroc,
    pixel_auroc,
    summarise_ssim,
)
from anomaly_ae.scoring.anomaly_map import image_score

#: The names logged to MLflow; the same in the evaluate pipeline and the loss study.
HEADLINE_METRICS = (
    "image_auroc",
    "image_auroc_ci_low",
    "image_auroc_ci_high",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "ssim_normal_mean",
    "ssim_normal_std",
    "ssim_defect_mean",
    "ssim_defect_std",
    "threshold",
)

#: Where the image score comes from (:func:`defect_region_metrics`); also logged to MLflow.
REGION_METRICS = ("image_auroc_at_defect", "image_auroc_off_defect")


def known_masks(has_mask: np.ndarray | None, n_images: int) -> np.ndarray:
    """Per image, whether its ground truth is known (good images, and defective ones with a
    mask). ``None`` (caches made before a defect type could lack masks): all of them."""
    return np.ones(n_images, dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)


def _pixel_metrics(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, valid: np.ndarray | None = None
) -> tuple[float, float]:
    """Pixel AUROC and AUPRO (over the ``valid`` pixels only, when given), or NaN for both
    when no image in the set has a defect pixel."""
    inside = np.asarray(masks) > 0 if valid is None else (np.asarray(masks) > 0) & (np.asarray(valid) > 0)
    if len(masks) == 0 or not np.any(inside):
        return float("nan"), float("nan")
    return pixel_auroc(masks, maps, valid), aupro(masks, maps, fpr_limit=fpr_limit, valid=valid)


def _subset(valid: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if valid is None else np.asarray(valid)[rows]


def detection_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    ssim: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float,
    fpr_limit: float = 0.3,
    has_mask: np.ndarray | None = None,
    confidence_level: float = 0.95,
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """Image AUROC with its ``confidence_level`` interval (:func:`auroc_interval`), pixel
    AUROC, AUPRO (to ``fpr_limit``, normalised), image F1-max, the paper's SSIM statistics,
    and accuracy/precision/recall at the calibrated threshold.

    ``has_mask`` (per image; default all): pixel metrics use only images whose ground truth
    is known (good images, and defective images that have a mask); NaN when no defective
    image has one. ``valid`` (``(N, H, W)``, optional): the pixels that are the image, not a
    padded frame's mirrored margin; pixel metrics count only those. Image metrics always use
    every image."""
    labels = np.asarray(labels).astype(int)
    known = known_masks(has_mask, len(labels))
    nan = float("nan")
    normal, defective = labels == 0, labels == 1
    both = bool(normal.any() and defective.any())
    # a test set of one class (or none: normal images only) has no ranking metric; what is
    # defined is still measured: the false-alarm rate on good images, the recall on defects
    f1, f1_threshold = f1_max(labels, scores) if both else (nan, nan)
    normal_mean, normal_std = summarise_ssim(ssim[normal]) if normal.any() else (nan, nan)
    defect_mean, defect_std = summarise_ssim(ssim[defective]) if defective.any() else (nan, nan)
    at_threshold = (
        classification_report_at(labels, scores, threshold)
        if len(labels)
        else dict.fromkeys(("accuracy", "precision", "recall", "f1", "tp", "fp", "tn", "fn"), nan)
    )
    if not both:  # ratios a missing class leaves undefined, not 0
        at_threshold.update(precision=nan, f1=nan, **({} if defective.any() else {"recall": nan}))
    flagged = np.asarray(scores) > threshold
    pixel, pro = _pixel_metrics(
        np.asarray(masks)[known], np.asarray(maps)[known], fpr_limit, _subset(valid, known)
    )
    low, high = auroc_interval(labels, scores, confidence_level) if both else (nan, nan)
    return {
        "test_set": kind_of_test_set(labels),
        "n_normal": int(normal.sum()),
        "n_defective": int(defective.sum()),
        "image_auroc": image_auroc(labels, scores) if both else nan,
        "image_auroc_ci_low": low,
        "image_auroc_ci_high": high,
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
        "false_alarm_rate_at_threshold": float(flagged[normal].mean()) if normal.any() else nan,
    }


def kind_of_test_set(labels: np.ndarray) -> str:
    """Which classes a test set holds: ``normal and defective`` (every metric), ``normal
    only`` (false alarms only), ``defective only`` (recall only) or ``none`` (normal
    training images only: the model is trained, calibrated and thresholded, not tested)."""
    labels = np.asarray(labels).astype(int)
    normal, defective = bool((labels == 0).any()), bool((labels == 1).any())
    if normal and defective:
        return "normal and defective"
    if normal or defective:
        return "normal only" if normal else "defective only"
    return "none"


#: Columns of :func:`per_defect_type`.
PER_TYPE_COLUMNS = (
    "defect_type",
    "n_images",
    "has_masks",
    "image_auroc",
    "image_auroc_ci_low",
    "image_auroc_ci_high",
    "pixel_auroc",
    "aupro",
    *REGION_METRICS,
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
    margin: int = 16,
    reduction: str = "max",
    topk_fraction: float = 0.01,
    typical: np.ndarray | float = 0.0,
    confidence_level: float = 0.95,
    detection_maps: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per test defect type: that type's images against every good test image.

    Image AUROC (with its ``confidence_level`` interval, :func:`auroc_interval`), pixel AUROC
    and AUPRO (good images' pixels as the negatives), the image
    AUROC at and off the defect (:func:`defect_region_metrics` with ``margin``, ``reduction``,
    ``topk_fraction`` and ``typical``: the map's own score), and the share of the type's images flagged
    at ``threshold``. Pixel metrics are NaN for a type without masks (``has_masks`` False),
    so a user sees which kind of defect a model misses. ``detection_maps`` (default: ``maps``)
    are the maps the scores come from, when the heat map ``maps`` is another one: the image
    AUROC at and off the defect is the image score's question. ``valid``: as in
    :func:`detection_metrics`."""
    detection_maps = np.asarray(maps if detection_maps is None else detection_maps)
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
            _pixel_metrics(
                np.asarray(masks)[masked], np.asarray(maps)[masked], fpr_limit, _subset(valid, masked)
            )
            if with_masks
            else (float("nan"), float("nan"))
        )
        nan = float("nan")
        low, high = (
            auroc_interval(labels[chosen], scores[chosen], confidence_level) if normal.any() else (nan, nan)
        )
        rows.append(
            {
                "defect_type": kind,
                "n_images": int(own.sum()),
                "has_masks": with_masks,
                "image_auroc": image_auroc(labels[chosen], scores[chosen]) if normal.any() else nan,
                "image_auroc_ci_low": low,
                "image_auroc_ci_high": high,
                "pixel_auroc": pixel,
                "aupro": pro,
                **defect_region_metrics(
                    labels[chosen],
                    detection_maps[chosen],
                    np.asarray(masks)[chosen],
                    margin,
                    reduction,
                    topk_fraction,
                    known[chosen],
                    typical,
                ),
                "recall_at_threshold": float(np.mean(scores[own] > threshold)),
            }
        )
    return pd.DataFrame(rows, columns=list(PER_TYPE_COLUMNS))


def near_defect(masks: np.ndarray, margin: int) -> np.ndarray:
    """Per image, the pixels within ``margin`` px (a square neighbourhood) of its labelled
    defect: the masks dilated by ``margin``."""
    masks = torch.as_tensor(np.asarray(masks) > 0)
    if margin < 0:
        raise ValueError(f"evaluation.defect_margin must be >= 0 px, got {margin}")
    if margin == 0 or masks.numel() == 0:
        return masks.numpy()
    grown = torch.nn.functional.max_pool2d(masks[:, None].float(), 2 * margin + 1, stride=1, padding=margin)
    return grown[:, 0].bool().numpy()


def hardest_cases(labels: np.ndarray, scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The images an inspector looks at first: the ``count`` good images with the highest
    image scores (the likeliest false alarms) and the ``count`` defective images with the
    lowest (the likeliest misses), each worst first; ties keep the images' order."""
    if count < 0:
        raise ValueError(f"evaluation.hardest_cases must be >= 0, got {count}")
    labels, scores = np.asarray(labels) != 0, np.asarray(scores, dtype=np.float64)
    good, bad = np.flatnonzero(~labels), np.flatnonzero(labels)
    good = good[np.argsort(-scores[good], kind="stable")][:count]
    bad = bad[np.argsort(scores[bad], kind="stable")][:count]
    return good, bad


def keep_region(maps: torch.Tensor, keep: torch.Tensor, typical: torch.Tensor) -> torch.Tensor:
    """``maps`` with only ``keep`` (bool, the maps' shape) kept and the rest replaced by
    ``typical`` (the normal images' mean map in the maps' units): as if everything outside
    ``keep`` looked normal."""
    return torch.where(keep, maps, torch.as_tensor(typical).to(maps.dtype))


def region_scores(
    maps: torch.Tensor, keep: torch.Tensor, typical: torch.Tensor, reduction: str, topk_fraction: float
) -> np.ndarray:
    """Image scores of ``maps`` kept in ``keep`` (:func:`keep_region`): the score an image
    would get if everything outside ``keep`` looked normal."""
    return image_score(keep_region(maps, keep, typical), reduction, topk_fraction).numpy()


def defect_region_metrics(
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    margin: int,
    reduction: str = "max",
    topk_fraction: float = 0.01,
    has_mask: np.ndarray | None = None,
    typical: np.ndarray | float = 0.0,
) -> dict[str, float]:
    """Where does the image score come from? Good images keep their score; each defective
    image with a mask is scored twice more, with the same reduction, on its map with one part
    replaced by ``typical`` (the normal images' mean map in the map's units,
    :meth:`~anomaly_ae.scoring.NormalReference.typical`: as if that part looked normal):

    * ``image_auroc_at_defect``: its map kept only within ``margin`` px of its labelled
      defect. Does the defect itself stand out above the good images? Nothing else in the
      image can help.
    * ``image_auroc_off_defect``: its map kept only farther than ``margin`` px from the
      defect. The label-leak check: about 0.5 or below (a mean map is calmer than a real
      image's) when the defect is what makes an image defective; high when the rest of a
      defective image already differs from the good ones (other lighting, wear, another
      batch), and then the plain image AUROC measures that difference, not the detection of
      the defect.

    NaN when there is no good image or no defective image with a mask (or, for
    ``off_defect``, when the margin covers a whole image)."""
    labels = np.asarray(labels).astype(int)
    result = {name: float("nan") for name in REGION_METRICS}
    if len(labels) == 0:
        return result
    known = known_masks(has_mask, len(labels))
    bad = (labels == 1) & known & (np.asarray(masks) > 0).reshape(len(labels), -1).any(axis=1)
    good = labels == 0
    if not good.any() or not bad.any():
        return result
    maps = torch.as_tensor(np.asarray(maps))
    typical = torch.as_tensor(np.asarray(typical, dtype=np.float32))
    near = torch.from_numpy(near_defect(np.asarray(masks)[bad], margin))
    near = near.reshape(maps[bad].shape)  # (N, H, W), or (N, 1, H, W) maps
    good_scores = image_score(maps[good], reduction, topk_fraction).numpy()
    y = np.r_[np.zeros(len(good_scores), int), np.ones(int(bad.sum()), int)]
    for name, keep in (("image_auroc_at_defect", near), ("image_auroc_off_defect", ~near)):
        if keep.flatten(1).any(dim=1).all():
            scores = region_scores(maps[bad], keep, typical, reduction, topk_fraction)
            result[name] = image_auroc(y, np.r_[good_scores, scores])
    return result
