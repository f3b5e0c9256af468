"""Compare loss variants side by side (the paper's Table II and the detection metrics)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from anomaly_ae.reporting.report import interval_column


def compare_variants(
    metrics: dict[str, dict[str, Any]], paper_table2: dict[str, dict[str, Any]]
) -> pd.DataFrame:
    """One row per variant: SSIM mean ± std for normal and defective test images, their
    gap, image AUROC (with its confidence interval), pixel AUROC, AUPRO, image F1-max and
    the decision threshold, with the paper's Table II values beside."""
    rows = []
    for variant, m in metrics.items():
        weights = m["loss_weights"]
        paper = next(
            (
                entry
                for entry in paper_table2.values()
                if abs(entry["mse_weight"] - weights["mse_weight"]) < 1e-9
                and abs(entry["ssim_weight"] - weights["ssim_weight"]) < 1e-9
            ),
            None,
        )
        rows.append(
            {
                "variant": variant,
                "mse_weight": weights["mse_weight"],
                "ssim_weight": weights["ssim_weight"],
                "epochs": m.get("checkpoint_epoch"),
                "ssim_normal_mean": m["ssim_normal_mean"],
                "ssim_normal_std": m["ssim_normal_std"],
                "ssim_defect_mean": m["ssim_defect_mean"],
                "ssim_defect_std": m["ssim_defect_std"],
                "ssim_gap": m["ssim_normal_mean"] - m["ssim_defect_mean"],
                "image_auroc": m["image_auroc"],
                # absent from metrics written before intervals existed
                "image_auroc_ci_low": m.get("image_auroc_ci_low"),
                "image_auroc_ci_high": m.get("image_auroc_ci_high"),
                "pixel_auroc": m["pixel_auroc"],
                "aupro": m["aupro"],
                "image_f1_max": m.get("image_f1_max"),
                "threshold": m.get("threshold"),
                "paper_ssim_normal": paper["normal"][0] if paper else None,
                "paper_ssim_normal_std": paper["normal"][1] if paper else None,
                "paper_ssim_defect": paper["defective"][0] if paper else None,
                "paper_ssim_defect_std": paper["defective"][1] if paper else None,
                "paper_ssim_gap": paper["normal"][0] - paper["defective"][0] if paper else None,
                "data_source": m.get("data_source"),
            }
        )
    return pd.DataFrame(rows)


def _mean_std(mean: Any, std: Any) -> str | None:
    if mean is None or pd.isna(mean):
        return None
    return f"{mean:.4f}" if std is None or pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def table2_view(comparison: pd.DataFrame) -> pd.DataFrame:
    """Table II of the loss study as a reader wants it: one row per variant, ``mean ± std``
    of SSIM(original, reconstruction) for normal and defective test images and their gap,
    ours beside the paper's (``–`` where the paper has no such variant)."""
    return pd.DataFrame(
        {
            "variant": comparison["variant"],
            "normal (ours)": [
                _mean_std(m, s)
                for m, s in zip(comparison["ssim_normal_mean"], comparison["ssim_normal_std"], strict=True)
            ],
            "defective (ours)": [
                _mean_std(m, s)
                for m, s in zip(comparison["ssim_defect_mean"], comparison["ssim_defect_std"], strict=True)
            ],
            "gap (ours)": comparison["ssim_gap"].astype(float),
            "normal (paper)": [
                _mean_std(m, s)
                for m, s in zip(
                    comparison["paper_ssim_normal"], comparison["paper_ssim_normal_std"], strict=True
                )
            ],
            "defective (paper)": [
                _mean_std(m, s)
                for m, s in zip(
                    comparison["paper_ssim_defect"], comparison["paper_ssim_defect_std"], strict=True
                )
            ],
            "gap (paper)": comparison["paper_ssim_gap"].astype(float),
        }
    )


#: The detection columns of :func:`detection_view`, with their headings.
DETECTION_COLUMNS = {
    "variant": "variant",
    "loss": "loss",
    "epochs": "checkpoint epoch",
    "image_auroc": "image AUROC",
    "interval": "interval (evaluation.confidence_level)",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "image_f1_max": "image F1-max",
    "threshold": "threshold",
}


def detection_view(comparison: pd.DataFrame) -> pd.DataFrame:
    """The detection metrics of the loss study: one row per variant with its loss weights,
    checkpoint epoch, image AUROC and its confidence interval (are two variants apart beyond
    the test set's sampling?), pixel AUROC, AUPRO, image F1-max and threshold."""
    view = comparison.copy()
    view["loss"] = [
        f"{mse:g}·MSE + {ssim:g}·(1 − SSIM)"
        for mse, ssim in zip(view["mse_weight"], view["ssim_weight"], strict=True)
    ]
    view["epochs"] = [None if e is None or pd.isna(e) else int(e) for e in view["epochs"]]
    view["interval"] = interval_column(view)
    for column in DETECTION_COLUMNS:
        if column not in view:  # a comparison CSV written before the column existed
            view[column] = None
    return view[list(DETECTION_COLUMNS)].rename(columns=DETECTION_COLUMNS)
