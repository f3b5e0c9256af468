"""Nodes of the ``reporting`` pipeline."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly_ae.evaluation.anomaly_map import anomaly_map
from anomaly_ae.evaluation.metrics import image_auroc
from anomaly_ae.reporting import figures
from anomaly_ae.reporting.report import render_report


def _figure1_rows(
    test_images: dict[str, np.ndarray], test_scores: dict[str, np.ndarray], ssim_table: pd.DataFrame
) -> list[dict]:
    """First image of each defect type and one good image; error map = 1 - local SSIM."""
    picks = ssim_table.reset_index().groupby("defect_type", sort=True).first()
    order = ["good"] + [t for t in picks.index if t != "good"]
    rows = []
    for defect in (t for t in order if t in picks.index):
        i = int(picks.loc[defect, "index"])
        x = torch.from_numpy(test_images["images"][i : i + 1])
        recon = torch.from_numpy(test_scores["recon"][i : i + 1])
        error = anomaly_map(x, recon)[0, 0].numpy()  # the paper's map, whatever evaluation.anomaly_map says
        rows.append(
            {
                "image": x[0, 0].numpy(),
                "recon": recon[0, 0].numpy(),
                "error": error,
                "label": f"{defect}\n{picks.loc[defect, 'file']}\nSSIM {picks.loc[defect, 'ssim']:.3f}",
            }
        )
    return rows


def make_figures(
    test_images: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    evaluation_metrics: dict[str, Any],
) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    """Figure 1 of the paper, image and pixel ROC curves, and SSIM histograms."""
    figure1 = figures.figure_to_image(
        figures.reconstruction_figure(_figure1_rows(test_images, test_scores, ssim_table))
    )
    labels = test_images["labels"]
    image_roc = figures.figure_to_image(
        figures.roc_figure(
            {
                "image score": (labels, test_scores["score"], evaluation_metrics["image_auroc"]),
                "1 - SSIM": (labels, 1 - test_scores["ssim"], image_auroc(labels, 1 - test_scores["ssim"])),
            },
            "Image-level ROC",
        )
    )
    pixel_roc = figures.figure_to_image(
        figures.roc_figure(
            {
                "anomaly map": (
                    test_images["masks"].ravel() > 0,
                    test_scores["map"].ravel(),
                    evaluation_metrics["pixel_auroc"],
                )
            },
            "Pixel-level ROC (all test pixels)",
        )
    )
    histogram = figures.figure_to_image(figures.ssim_histogram_figure(ssim_table))
    return figure1, image_roc, pixel_roc, histogram


def make_heatmaps(
    test_images: dict[str, np.ndarray],
    test_scores: dict[str, np.ndarray],
    ssim_table: pd.DataFrame,
    decision_threshold: dict[str, Any],
) -> dict[str, Image.Image]:
    """One overlay per test image (input with its anomaly map on top), keyed like the data."""
    vmax = figures.overlay_vmax(
        decision_threshold["value"], decision_threshold["score"].get("normal_reference", "none")
    )
    return {
        str(PurePosixPath(row.file).with_suffix("")): figures.heatmap_overlay_image(
            test_images["images"][i, 0], test_scores["map"][i], vmax=vmax
        )
        for i, row in enumerate(ssim_table.itertuples())
    }


def build_report(
    table2: pd.DataFrame,
    evaluation_metrics: dict[str, Any],
    figure1: Image.Image,
    image_roc: Image.Image,
    pixel_roc: Image.Image,
    ssim_histogram: Image.Image,
    loss_curve: Image.Image,
    dataset_info: dict[str, Any],
    model: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
) -> str:
    """The single HTML report in 08_reporting: Table II, metrics and Figure 1 first."""
    import mlflow

    run = mlflow.active_run()
    return render_report(
        title=f"anomaly-ae report — {dataset_info['category']}",
        run_id=run.info.run_id if run else None,
        dataset_info=dataset_info,
        table2=table2,
        metrics=evaluation_metrics,
        figures={
            "Figure 1 — input, reconstruction, error map (1 − local SSIM)": figure1,
            "Image-level ROC": image_roc,
            "Pixel-level ROC": pixel_roc,
            "SSIM of normal vs defective test images": ssim_histogram,
            "Training loss": loss_curve,
        },
        configuration={
            "model": model,
            "training": training,
            "evaluation": evaluation,
            "loss_weights": evaluation_metrics.get("loss_weights"),
            "checkpoint_epoch": evaluation_metrics.get("checkpoint_epoch"),
        },
    )
