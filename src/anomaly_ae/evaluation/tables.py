"""Result tables: the per-image SSIM table and the paper's Table II."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from anomaly_ae.evaluation.metrics import summarise_ssim


def ssim_table(manifest: pd.DataFrame, scores: dict[str, np.ndarray], threshold: float) -> pd.DataFrame:
    """One row per test image: file, defect type, label, the paper's SSIM, MSE, anomaly
    score and the decision at ``threshold`` (score > threshold means anomalous)."""
    rows = manifest.sort_values("array_index").reset_index(drop=True)
    if len(rows) != len(scores["ssim"]):
        raise ValueError(f"{len(rows)} test images in the manifest but {len(scores['ssim'])} scores")
    return pd.DataFrame(
        {
            "file": rows["image_file"],
            "defect_type": rows["defect_type"],
            "label": rows["label"].astype(int),
            "ssim": scores["ssim"].astype(float),
            "mse": scores["mse"].astype(float),
            "score": scores["score"].astype(float),
            "is_anomalous": scores["score"] > threshold,
        }
    )


def table2(
    table: pd.DataFrame,
    paper: dict[str, dict],
    loss_weights: dict[str, float],
    protocol_defects: Sequence[str],
) -> pd.DataFrame:
    """Mean ± std of SSIM for normal and defective images (full test set, per defect type,
    and the paper's protocol), with the paper's column for the same loss weights beside.
    Another product than the paper's: ``paper`` empty (the paper's columns stay empty) and no
    ``protocol_defects`` (no protocol rows)."""
    variant = next(
        (
            name
            for name, entry in paper.items()
            if np.isclose(entry["mse_weight"], loss_weights["mse_weight"])
            and np.isclose(entry["ssim_weight"], loss_weights["ssim_weight"])
        ),
        None,
    )
    normal = table[table["label"] == 0]
    defective = table[table["label"] == 1]
    protocol = defective[defective["defect_type"].isin(list(protocol_defects))]
    groups: list[tuple[str, str, pd.DataFrame, str | None]] = [
        ("full test set", "normal", normal, "normal"),
        ("full test set", "defective", defective, "defective"),
    ]
    groups += [
        ("full test set", f"defective: {kind}", defective[defective["defect_type"] == kind], None)
        for kind in sorted(defective["defect_type"].unique())
    ]
    if protocol_defects:  # the paper's protocol, for the paper's product
        groups += [
            ("paper protocol", "normal", normal, "normal"),
            ("paper protocol", f"defective: {'+'.join(protocol_defects)}", protocol, "defective"),
        ]
    rows = []
    for subset, images, frame, paper_key in groups:
        mean, std = summarise_ssim(frame["ssim"]) if len(frame) else (float("nan"), float("nan"))
        paper_mean, paper_std = (
            paper[variant][paper_key] if variant is not None and paper_key is not None else (None, None)
        )
        rows.append(
            {
                "subset": subset,
                "images": images,
                "n": len(frame),
                "ssim_mean": mean,
                "ssim_std": std,
                "paper_variant": variant,
                "paper_ssim_mean": paper_mean,
                "paper_ssim_std": paper_std,
            }
        )
    return pd.DataFrame(rows)


def format_table2(frame: pd.DataFrame) -> str:
    """Table II as Markdown, ours beside the paper's."""
    lines = [
        "| subset | images | n | ours: SSIM mean ± std | paper |",
        "|---|---|---|---|---|",
    ]
    for row in frame.itertuples():
        paper = (
            f"{row.paper_ssim_mean:.4f} ± {row.paper_ssim_std:.4f} ({row.paper_variant})"
            if isinstance(row.paper_ssim_mean, float) and not np.isnan(row.paper_ssim_mean)
            else "–"
        )
        lines.append(
            f"| {row.subset} | {row.images} | {row.n} | {row.ssim_mean:.4f} ± {row.ssim_std:.4f} | {paper} |"
        )
    return "\n".join(lines)
