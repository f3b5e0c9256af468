"""Compare loss variants side by side (the paper's Table II and the detection metrics)."""

from __future__ import annotations

from typing import Any

import pandas as pd


def compare_variants(
    metrics: dict[str, dict[str, Any]], paper_table2: dict[str, dict[str, Any]]
) -> pd.DataFrame:
    """One row per variant: SSIM mean ± std for normal and defective test images, their
    gap, image AUROC, pixel AUROC and AUPRO, with the paper's Table II values beside."""
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
                "pixel_auroc": m["pixel_auroc"],
                "aupro": m["aupro"],
                "paper_ssim_normal": paper["normal"][0] if paper else None,
                "paper_ssim_normal_std": paper["normal"][1] if paper else None,
                "paper_ssim_defect": paper["defective"][0] if paper else None,
                "paper_ssim_defect_std": paper["defective"][1] if paper else None,
                "paper_ssim_gap": paper["normal"][0] - paper["defective"][0] if paper else None,
                "data_source": m.get("data_source"),
            }
        )
    return pd.DataFrame(rows)
