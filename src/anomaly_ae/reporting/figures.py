"""Matplotlib figures of the project (headless: the Agg backend)."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")

import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def message_figure(text: str, width: float = 6.0) -> Figure:
    """A figure that only says why there is nothing to draw (e.g. no test images)."""
    fig, ax = plt.subplots(figsize=(width, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 90)), ha="center", va="center", fontsize=10)
    return fig


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
    map on a 'jet' colormap over [0, 1]. ``rows``: dicts with image, recon, error, label.
    A row is as tall as its images' aspect ratio needs (non-square images leave no gaps)."""
    if not rows:
        return message_figure("No test images to show.")
    height, width = np.shape(rows[0]["error"])[-2:]
    row_height = min(3 * height / width, 6.0) + 0.6  # 3 in wide panels, room for the labels
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, row_height * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        ax_row[0].imshow(np.clip(display_image(row["image"]), 0, 1), cmap="gray", vmin=0, vmax=1)
        ax_row[0].set_ylabel(row["label"], fontsize=9)
        ax_row[1].imshow(np.clip(display_image(row["recon"]), 0, 1), cmap="gray", vmin=0, vmax=1)
        im = ax_row[2].imshow(row["error"], cmap="jet", vmin=0, vmax=1)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], ("input", "reconstruction", "error map"), strict=True):
        ax.set_title(name)
    fig.colorbar(im, ax=axes[:, 2].tolist(), fraction=0.046, pad=0.04)
    fig.suptitle(title)
    return fig


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str, empty: str | None = None
) -> Figure:
    """ROC curves; ``curves`` maps a name to (labels, scores, auroc). No curves and an
    ``empty`` text: a figure that says why (e.g. a test set of one class)."""
    if not curves and empty:
        return message_figure(f"{title}: {empty}")
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


def score_histogram_figure(groups: dict[str, np.ndarray], threshold: float, rule: str) -> Figure:
    """Image scores per group (e.g. the normal validation images the threshold comes from,
    good and defective test images) with the decision ``threshold`` (``rule`` says how it
    was set). Empty groups are left out; a wide positive range gets log-spaced bins."""
    groups = {name: np.asarray(v, dtype=np.float64) for name, v in groups.items() if len(v)}
    values = np.concatenate([*groups.values(), [threshold]])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    low, high = float(values.min()), float(values.max())
    log_scale = low > 0 and high / low > 20
    bins = np.geomspace(low, high, 31) if log_scale else np.linspace(low, high if high > low else low + 1, 31)
    for name, v in groups.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (n={len(v)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel("image score" + (" (log scale)" if log_scale else ""))
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title("\n".join(textwrap.wrap(f"Image scores and the threshold ({rule})", 70)), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ssim_histogram_figure(ssim_table: pd.DataFrame, threshold_ssim: float | None = None) -> Figure:
    """SSIM(original, reconstruction) of normal vs defective test images."""
    if ssim_table.empty:
        return message_figure("SSIM of test images: no test images to show.")
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


def figure_to_image(fig: Figure, dpi: int = 110) -> Image.Image:
    """Render a figure to an RGB PIL image (loadable again through pillow.ImageDataset)
    and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image.convert("RGB")


def overlay_vmax(threshold: float, normal_reference: str = "none") -> float:
    """Top of the heat-map colour scale: 1 for the paper's ``1 - SSIM`` map (on [0, 1]); for a
    reference-corrected map (any range) twice the decision threshold, so the threshold sits
    mid-scale (green) and red means well above it."""
    if normal_reference == "none" or not threshold > 0:
        return 1.0
    return 2.0 * float(threshold)


def display_image(image: np.ndarray) -> np.ndarray:
    """A model image as matplotlib and PIL show it: ``(H, W)`` for grayscale (``(H, W)`` or
    ``(1, H, W)``), ``(H, W, 3)`` for colour (``(3, H, W)``, ``preprocessing.color``)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 1:
        return image[0]
    if image.ndim == 3 and image.shape[0] == 3:
        return np.moveaxis(image, 0, -1)
    return image


def heatmap_overlay_image(
    image: np.ndarray, amap: np.ndarray, alpha: float = 0.45, vmax: float = 1.0
) -> Image.Image:
    """``image`` in [0, 1] (grayscale, or colour as :func:`display_image` gives it) with
    ``amap`` on [0, ``vmax``] in the 'jet' colormap blended on top, as an RGB PIL image of
    the same size (fast: no matplotlib figure)."""
    image = display_image(image)
    gray = np.clip(image, 0, 1) if image.ndim == 3 else np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=2)
    heat = matplotlib.colormaps["jet"](np.clip(np.asarray(amap) / vmax, 0, 1))[..., :3]
    blended = (1 - alpha) * gray + alpha * heat
    return Image.fromarray((blended * 255).round().astype(np.uint8), mode="RGB")


def peak_window(shape: tuple[int, int], peak: tuple[int, int], half: int) -> tuple[slice, slice]:
    """A square window of side ``2 * half`` around ``peak``, moved inside an image of
    ``shape`` (and no larger than it)."""
    window = []
    for size, centre in zip(shape, peak, strict=True):
        side = min(2 * half, size)
        start = int(np.clip(centre - side // 2, 0, size - side))
        window.append(slice(start, start + side))
    return window[0], window[1]


def hardest_cases_figure(rows: list[dict], vmax: float) -> Figure:
    """One row per image: the input with its map's peak marked (and the labelled defect
    outlined, when there is a mask), the heat-map overlay (colour scale [0, ``vmax``], as
    the per-image heat maps), and both again enlarged around the peak - where the image
    score comes from. ``rows``: dicts with image, map, mask (or None), label and file (both
    shown under the input, the file name wrapped)."""
    if not rows:
        return message_figure("No test images to show.")
    height, width = np.shape(rows[0]["map"])[-2:]
    row_height = min(2.4 * height / width, 5.0) + 1.0  # room for the titles and the file name
    fig, axes = plt.subplots(len(rows), 4, figsize=(11, row_height * len(rows)), squeeze=False)
    half = max(12, min(height, width) // 8)
    for ax_row, row in zip(axes, rows, strict=True):
        image, amap = np.clip(display_image(row["image"]), 0, 1), np.asarray(row["map"], dtype=np.float64)
        peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
        window = peak_window(amap.shape, peak, half)
        overlay = np.asarray(heatmap_overlay_image(image, amap, vmax=vmax))
        panels = (image, overlay, image[window], overlay[window])
        for ax, panel in zip(ax_row, panels, strict=True):
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        whole = (slice(0, amap.shape[0]), slice(0, amap.shape[1]))
        for ax, region in ((ax_row[0], whole), (ax_row[2], window)):
            ax.plot(peak[1] - region[1].start, peak[0] - region[0].start, "+", color="red", ms=14, mew=2)
            if row.get("mask") is not None and np.any(row["mask"]):
                shown = (np.asarray(row["mask"]) > 0)[region]
                ax.contour(shown, levels=[0.5], colors="lime", linewidths=1)
        ax_row[1].add_patch(
            matplotlib.patches.Rectangle(
                (window[1].start - 0.5, window[0].start - 0.5),
                window[1].stop - window[1].start,
                window[0].stop - window[0].start,
                fill=False,
                edgecolor="white",
                linewidth=1,
            )
        )
        # under the input, horizontal: long file names and short wide images both fit
        ax_row[0].set_xlabel(f"{row['label']}\n{textwrap.fill(row.get('file', ''), 40)}", fontsize=7.5)
    names = ("input, peak +", "anomaly map", "input at the peak", "map at the peak")
    for ax, name in zip(axes[0], names, strict=True):
        ax.set_title(name, fontsize=10)
    return fig


def place_figure(image: np.ndarray, percentile: np.ndarray, bands: tuple) -> Figure:
    """Where on the frame the normal images vary: left, ``image`` (e.g. their mean, in [0, 1])
    with each band of ``bands`` but the first tinted (``(label, low, high)`` on the
    ``percentile`` field, as :data:`~anomaly_ae.evaluation.stress.PLACE_BANDS`); right, the
    field itself."""
    image = np.clip(display_image(image), 0, 1)
    gray = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    percentile = np.asarray(percentile, dtype=np.float64)
    height, width = percentile.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, min(5.5 * height / width, 7.0) + 1.4))
    tinted, handles = gray.copy(), []
    for (label, low, high), colour in zip(bands[1:], ((1.0, 0.85, 0.0), (1.0, 0.1, 0.1)), strict=False):
        inside = (percentile >= low) & (percentile < high)
        tinted[inside] = 0.45 * tinted[inside] + 0.55 * np.asarray(colour)
        handles.append(matplotlib.patches.Patch(color=colour, label=f"{label} of the frame"))
    left.imshow(tinted, interpolation="nearest")
    left.set_title("where the good images vary most", fontsize=10)
    shown = right.imshow(percentile, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    right.set_title("their per-pixel spread, as a percentile of the frame", fontsize=10)
    fig.colorbar(shown, cax=make_axes_locatable(right).append_axes("right", size="4%", pad=0.08))
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    left.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def variant_comparison_figure(comparison: pd.DataFrame) -> Figure:
    """Left: SSIM of normal vs defective images per variant, ours and the paper's.
    Right: image AUROC, pixel AUROC and AUPRO per variant. Each panel's legend sits below
    its axes, never on the bars (``figure_to_image`` keeps it in the picture)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(comparison))
    width = 0.2
    left.bar(
        x - 1.5 * width,
        comparison["ssim_normal_mean"],
        width,
        yerr=comparison["ssim_normal_std"],
        label="ours normal",
    )
    left.bar(
        x - 0.5 * width,
        comparison["ssim_defect_mean"],
        width,
        yerr=comparison["ssim_defect_std"],
        label="ours defective",
    )
    paper = comparison["paper_ssim_normal"].astype(float)
    left.bar(x + 0.5 * width, paper, width, alpha=0.5, label="paper normal")
    left.bar(
        x + 1.5 * width,
        comparison["paper_ssim_defect"].astype(float),
        width,
        alpha=0.5,
        label="paper defective",
    )
    left.set_xticks(x, comparison["variant"])
    left.set_ylabel("SSIM(original, reconstruction)")
    left.set_title("Table II")
    labels = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
    for i, (name, label) in enumerate(labels.items()):
        right.bar(x + (i - 1) * width, comparison[name].astype(float), width, label=label)
    right.set_xticks(x, comparison["variant"])
    right.set_ylim(0, 1)
    right.set_title("Detection metrics")
    for ax in (left, right):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
