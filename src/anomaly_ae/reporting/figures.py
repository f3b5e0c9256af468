"""Matplotlib figures of the project (headless: the Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def loss_curve_figure(history: pd.DataFrame, title: str = "Training loss") -> Figure:
    """Train (and validation) loss per epoch, with the best validation epoch marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(history["epoch"], history["train_loss"], label="train")
    if "val_loss" in history and history["val_loss"].notna().any():
        ax.plot(history["epoch"], history["val_loss"], label="validation")
        best = history.loc[history["val_loss"].idxmin()]
        ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch {int(best['epoch'])}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def reconstruction_figure(
    rows: list[dict], title: str = "Input, reconstruction and error map (1 - local SSIM)"
) -> Figure:
    """The paper's Figure 1: one row per image with input, reconstruction and the error
    map on a 'jet' colormap over [0, 1]. ``rows``: dicts with image, recon, error, label."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        ax_row[0].imshow(row["image"], cmap="gray", vmin=0, vmax=1)
        ax_row[0].set_ylabel(row["label"], fontsize=9)
        ax_row[1].imshow(row["recon"], cmap="gray", vmin=0, vmax=1)
        im = ax_row[2].imshow(row["error"], cmap="jet", vmin=0, vmax=1)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], ("input", "reconstruction", "error map"), strict=True):
        ax.set_title(name)
    fig.colorbar(im, ax=axes[:, 2].tolist(), fraction=0.046, pad=0.04)
    fig.suptitle(title)
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> Figure:
    """ROC curves; ``curves`` maps a name to (labels, scores, auroc)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (labels, scores, auc) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def ssim_histogram_figure(ssim_table: pd.DataFrame, threshold_ssim: float | None = None) -> Figure:
    """SSIM(original, reconstruction) of normal vs defective test images."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(ssim_table["ssim"].min(), ssim_table["ssim"].max(), 25)
    for label, name in ((0, "normal"), (1, "defective")):
        values = ssim_table.loc[ssim_table["label"] == label, "ssim"]
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} (n={len(values)})")
    ax.set_xlabel("SSIM(original, reconstruction)")
    ax.set_ylabel("images")
    ax.set_title("SSIM of test images")
    ax.legend()
    fig.tight_layout()
    return fig


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, title: str = "", alpha: float = 0.45) -> Figure:
    """An input image with its anomaly map ('jet', [0, 1]) on top."""
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(np.clip(amap, 0, 1), cmap="jet", vmin=0, vmax=1, alpha=alpha)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig
