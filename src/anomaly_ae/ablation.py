"""Ablation of the *evaluation* levers (anomaly map and image score), no retraining.

Run ``python -m anomaly_ae.ablation`` (``--help`` for the options). The trained model
reconstructs the images once; every setting of the grid then turns (image, reconstruction)
into an anomaly map (:func:`anomaly_ae.evaluation.anomaly_map.anomaly_map`) and an image
score (:func:`~anomaly_ae.evaluation.anomaly_map.image_score`).

Levers (each a parameter; the paper's default first):

* ``blend``: ``ssim`` (``1 - local SSIM``, default), ``l2`` (squared error) or ``ssim+l2``
  (``1 - SSIM + w * squared error`` with ``w = mean(1 - SSIM) / mean(squared error)`` over
  the NORMAL validation images, so both terms weigh about the same);
* ``window``: SSIM window ``11`` (default), ``7``, or ``ms`` = mean of the maps at 7/11/15;
* ``smoothing_sigma``: Gaussian smoothing of the map, ``0`` (default), 2, 4 or 8 px;
* ``reference``: normal-reference correction (:mod:`anomaly_ae.evaluation.reference`),
  ``none`` (default), ``mean`` (minus the per-pixel mean map of the NORMAL training images)
  or ``zscore`` (also divided by their per-pixel spread);
* ``reduction``: image score ``max`` (default), ``topk_mean`` (top 1% pixels) or ``mean``.

Selection rule (the same for every category; test labels are never read): synthetic
defects (:func:`paste_synthetic_defects`: contrasting blobs, thin scratches, cut-and-paste
patches, random size and position, seeded) are pasted onto the held-out NORMAL validation
images and reconstructed by the model. Each setting gets
``selection_score = (synthetic image AUROC + synthetic pixel AUROC) / 2`` (normal
validation images vs their synthetic-defect copies). The highest score wins; settings within
``--tie-tolerance`` of the best are ties, resolved towards the fewest levers changed from
the paper's default, then grid order. Only after the choice is made are the test images
loaded, and the test metrics (image AUROC, pixel AUROC, AUPRO to FPR 0.3) reported for every
setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anomaly_ae.evaluation.anomaly_map import _gaussian_blur, anomaly_map, image_score
from anomaly_ae.evaluation.inference import MapSettings, model_from_checkpoint, reconstruct_and_score
from anomaly_ae.evaluation.metrics import aupro, f1_max, image_auroc, pixel_auroc
from anomaly_ae.evaluation.reference import NormalReference
from anomaly_ae.training.checkpoint import load_checkpoint

__all__ = [
    "AblationSetting",
    "DEFAULT_SETTING",
    "grid",
    "paste_synthetic_defects",
    "compute_maps",
    "selection_metrics",
    "select_setting",
    "test_metrics",
    "run_ablation",
    "main",
]

CHECKPOINT_GLOB = "data/06_models/model_checkpoint.pt/*/model_checkpoint.pt"
MULTI_SCALE_WINDOWS = (7, 11, 15)
TOPK_FRACTION = 0.01
DEFECT_KINDS = ("blob", "scratch", "patch")

CSV_COLUMNS = (
    "setting", "blend", "ssim_weight", "l2_weight", "window", "smoothing_sigma", "reference", "reduction",
    "topk_fraction", "levers_changed", "syn_image_auroc", "syn_pixel_auroc", "syn_aupro",
    "selection_score", "test_image_auroc", "test_pixel_auroc", "test_aupro", "test_image_f1_max",
    "is_default", "is_selected",
)  # fmt: skip


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AblationSetting:
    """One point of the grid. ``window`` is ``"7"``, ``"11"``, ``"ms"`` or ``"-"`` (l2 only)."""

    blend: str = "ssim"
    window: str = "11"
    smoothing_sigma: float = 0.0
    reduction: str = "max"
    reference: str = "none"

    @property
    def raw_key(self) -> tuple[str, str, float]:
        """Settings that share this key share the uncorrected map (and its normal reference)."""
        return (self.blend, self.window, float(self.smoothing_sigma))

    @property
    def map_key(self) -> tuple[str, str, float, str]:
        """Settings that share this key share the anomaly map (only the reduction differs)."""
        return (*self.raw_key, self.reference)

    @property
    def name(self) -> str:
        win = "" if self.window == "-" else f" win{self.window}"
        red = "top1%" if self.reduction == "topk_mean" else self.reduction
        ref = "" if self.reference == "none" else f" ref-{self.reference}"
        return f"{self.blend}{win} smooth{self.smoothing_sigma:g}{ref} {red}"

    def levers_changed(self, default: AblationSetting | None = None) -> int:
        """How many levers differ from the paper's default (the tie-break: fewer is simpler)."""
        d = default or DEFAULT_SETTING
        window_changed = self.window not in (d.window, "-")
        return (
            int(self.blend != d.blend)
            + int(window_changed)
            + int(self.smoothing_sigma != d.smoothing_sigma)
            + int(self.reduction != d.reduction)
            + int(self.reference != d.reference)
        )

    def weights(self, l2_scale: float) -> tuple[float, float]:
        """``(ssim_weight, l2_weight)`` for this blend."""
        return {"ssim": (1.0, 0.0), "l2": (0.0, 1.0), "ssim+l2": (1.0, float(l2_scale))}[self.blend]

    def map_settings(self, l2_scale: float) -> MapSettings | None:
        """The equivalent :class:`MapSettings` (``None`` for the multi-scale window, which
        MapSettings cannot express)."""
        if self.window == "ms":
            return None
        ssim_w, l2_w = self.weights(l2_scale)
        return MapSettings(
            ssim_weight=ssim_w, l2_weight=l2_w, smoothing_sigma=float(self.smoothing_sigma),
            win_size=11 if self.window == "-" else int(self.window),
            score_reduction=self.reduction, topk_fraction=TOPK_FRACTION,
            normal_reference=self.reference,
        )  # fmt: skip


#: The paper's setting: 1 - local SSIM (11x11 Gaussian window), no smoothing, max pixel.
DEFAULT_SETTING = AblationSetting("ssim", "11", 0.0, "max", "none")

_GRIDS = {
    # blends, windows (for SSIM blends), smoothing sigmas, references, reductions
    "full": (
        ("ssim", "ssim+l2", "l2"), ("11", "7", "ms"), (0.0, 2.0, 4.0, 8.0),
        ("none", "mean", "zscore"), ("max", "topk_mean", "mean"),
    ),
    "small": (("ssim", "l2"), ("11",), (0.0, 2.0), ("none", "mean"), ("max", "mean")),
}  # fmt: skip


def grid(name: str = "full") -> list[AblationSetting]:
    """The settings of grid ``name`` (``full``: 252 settings over 84 distinct maps;
    ``small``: 16). The paper's default is always the first."""
    if name not in _GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose from {sorted(_GRIDS)}")
    blends, windows, sigmas, references, reductions = _GRIDS[name]
    out = [DEFAULT_SETTING]
    for blend in blends:
        for window in windows if blend != "l2" else ("-",):
            for sigma in sigmas:
                for reference in references:
                    for reduction in reductions:
                        s = AblationSetting(blend, window, float(sigma), reduction, reference)
                        if s != DEFAULT_SETTING:
                            out.append(s)
    return out


# --------------------------------------------------------------------------- synthetic defects
def _local_mean(img: np.ndarray, mask: np.ndarray) -> float:
    return float(img[mask].mean()) if mask.any() else float(img.mean())


def _blob(img, rng, h, w):
    ry = rng.uniform(0.03, 0.10) * h
    rx = rng.uniform(0.03, 0.10) * w
    r = max(ry, rx)
    cy = rng.uniform(r, h - 1 - r)
    cx = rng.uniform(r, w - 1 - r)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    m = _local_mean(img, mask)
    delta = rng.uniform(0.3, 0.6)
    target = m - delta if m >= 0.35 else m + delta  # darken bright areas, brighten dark ones
    alpha = rng.uniform(0.7, 1.0)
    noise = rng.normal(0.0, 0.03, size=(h, w)).astype(np.float32)
    out = img.copy()
    out[mask] = (1 - alpha) * img[mask] + alpha * (target + noise[mask])
    return out, mask


def _scratch(img, rng, h, w):
    length = rng.uniform(0.15, 0.45) * min(h, w)
    half_width = rng.uniform(0.5, 0.5 + 0.008 * min(h, w))
    theta = rng.uniform(0, np.pi)
    hy, hx = 0.5 * length * np.sin(theta), 0.5 * length * np.cos(theta)
    cy = rng.uniform(abs(hy) + 2, h - 3 - abs(hy))
    cx = rng.uniform(abs(hx) + 2, w - 3 - abs(hx))
    p0 = np.array([cy - hy, cx - hx])
    d = np.array([2 * hy, 2 * hx])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(d @ d, 1e-9), 0.0, 1.0)
    dist = np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
    mask = dist <= half_width
    m = _local_mean(img, mask)
    value = rng.uniform(0.85, 1.0) if m < 0.6 else rng.uniform(0.0, 0.15)  # bright or dark line
    out = img.copy()
    out[mask] = value
    return out, mask


def _patch(img, rng, h, w, sources):
    ph = int(round(rng.uniform(0.06, 0.18) * h))
    pw = int(round(rng.uniform(0.06, 0.18) * w))
    ph, pw = max(ph, 2), max(pw, 2)
    src = sources[rng.integers(len(sources))]
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    piece = src[sy : sy + ph, sx : sx + pw]
    if rng.random() < 0.5:
        piece = piece[::-1]
    if rng.random() < 0.5:
        piece = piece[:, ::-1]
    out = img.copy()
    out[ty : ty + ph, tx : tx + pw] = piece
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return out, mask


def paste_synthetic_defects(
    images: np.ndarray,
    per_image: int = 2,
    seed: int = 0,
    min_contrast: float = 0.08,
    max_tries: int = 20,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paste synthetic defects onto NORMAL images; category-agnostic and deterministic.

    For each image ``per_image`` defective copies are made, the defect kind cycling through
    ``blob`` (an ellipse pushed 0.3-0.6 towards dark on bright areas, towards bright on dark
    ones, with a little noise), ``scratch`` (a thin bright or dark line segment) and
    ``patch`` (a rectangle cut from a random normal image, possibly flipped, pasted at a
    random position). Sizes are fractions of the image side; every defect lies fully inside
    the image. A placement whose mean absolute change inside the mask is below
    ``min_contrast`` (e.g. dark on dark background) is redrawn, up to ``max_tries`` times.

    Args:
        images: Normal images ``(N, 1, H, W)`` in [0, 1].
        per_image: Defective copies per normal image.
        seed: Seed of ``numpy.random.default_rng``.
        min_contrast: Minimum mean |change| inside the defect mask.
        max_tries: Redraws per defect before accepting the last one.

    Returns:
        ``(defective (N * per_image, 1, H, W) float32, masks (N * per_image, H, W) uint8,
        kinds)``.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W) images, got shape {images.shape}")
    if len(images) == 0 or per_image < 1:
        raise ValueError("need at least one normal image and per_image >= 1")
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    sources = [im[0] for im in images]
    out_images, out_masks, kinds = [], [], []
    for i in range(n):
        base = images[i, 0]
        for j in range(per_image):
            kind = DEFECT_KINDS[(i * per_image + j) % len(DEFECT_KINDS)]
            for _ in range(max_tries):
                if kind == "blob":
                    defective, mask = _blob(base, rng, h, w)
                elif kind == "scratch":
                    defective, mask = _scratch(base, rng, h, w)
                else:
                    defective, mask = _patch(base, rng, h, w, sources)
                if mask.any() and np.abs(defective - base)[mask].mean() >= min_contrast:
                    break
            out_images.append(np.clip(defective, 0.0, 1.0))
            out_masks.append(mask.astype(np.uint8))
            kinds.append(kind)
    return (
        np.stack(out_images)[:, None].astype(np.float32),
        np.stack(out_masks).astype(np.uint8),
        kinds,
    )


# --------------------------------------------------------------------------- maps
def l2_scale_from_normals(images: np.ndarray, recon: np.ndarray) -> float:
    """``mean(1 - SSIM map, win 11) / mean(squared error)`` over NORMAL validation images:
    the weight that puts the squared error on the scale of ``1 - SSIM`` in ``ssim+l2``."""
    x, r = torch.from_numpy(images), torch.from_numpy(recon)
    ssim_err = float(anomaly_map(x, r, 1.0, 0.0).mean())
    sq = float((x - r).pow(2).mean())
    return ssim_err / sq if sq > 0 else 1.0


def compute_maps(
    images: np.ndarray,
    recon: np.ndarray,
    setting: AblationSetting,
    l2_scale: float,
    batch_size: int = 16,
    references: dict[tuple, NormalReference] | None = None,
) -> np.ndarray:
    """Anomaly maps ``(N, H, W)`` float32 for ``setting`` from images and reconstructions;
    ``references`` (from :func:`fit_references`) when ``setting.reference`` is not ``none``."""
    maps = _raw_maps(images, recon, setting, l2_scale, batch_size)
    if setting.reference == "none":
        return maps
    if not references or setting.raw_key not in references:
        raise ValueError(f"setting {setting.name!r} needs a normal reference; see fit_references()")
    corrected = references[setting.raw_key].apply(torch.from_numpy(maps), setting.reference)
    return corrected.numpy().astype(np.float32)


def fit_references(
    settings: Sequence[AblationSetting],
    normal_images: np.ndarray,
    normal_recon: np.ndarray,
    l2_scale: float,
    batch_size: int = 16,
) -> dict[tuple, NormalReference]:
    """One normal reference per uncorrected map that some setting corrects, fitted on the
    maps of NORMAL training images (never validation or test images)."""
    refs: dict[tuple, NormalReference] = {}
    for s in settings:
        if s.reference != "none" and s.raw_key not in refs:
            refs[s.raw_key] = NormalReference.fit(
                _raw_maps(normal_images, normal_recon, s, l2_scale, batch_size)
            )
    return refs


def _raw_maps(
    images: np.ndarray, recon: np.ndarray, setting: AblationSetting, l2_scale: float, batch_size: int
) -> np.ndarray:
    ssim_w, l2_w = setting.weights(l2_scale)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        r = torch.from_numpy(np.ascontiguousarray(recon[start : start + batch_size]))
        if setting.window == "ms":
            amap = sum(anomaly_map(x, r, ssim_w, 0.0, 0.0, win_size=k) for k in MULTI_SCALE_WINDOWS)
            amap = amap / len(MULTI_SCALE_WINDOWS)
            if l2_w:
                amap = amap + l2_w * (x - r).pow(2)
            if setting.smoothing_sigma > 0:
                amap = _gaussian_blur(amap, float(setting.smoothing_sigma))
        else:
            win = 11 if setting.window == "-" else int(setting.window)
            amap = anomaly_map(x, r, ssim_w, l2_w, float(setting.smoothing_sigma), win_size=win)
        out.append(amap[:, 0].numpy())
    return np.concatenate(out).astype(np.float32)


def _scores(maps: np.ndarray, reduction: str) -> np.ndarray:
    return image_score(torch.from_numpy(maps), reduction, TOPK_FRACTION).numpy()


def _per_map(settings: Sequence[AblationSetting]) -> dict[tuple, list[AblationSetting]]:
    groups: dict[tuple, list[AblationSetting]] = {}
    for s in settings:
        groups.setdefault(s.map_key, []).append(s)
    return groups


# --------------------------------------------------------------------------- selection / test
def _maps_and_pixel_metrics(settings, images, recon, masks, l2_scale, references):
    """Per distinct map: the settings sharing it, the maps, pixel AUROC and AUPRO (FPR 0.3)."""
    for members in _per_map(settings).values():
        maps = compute_maps(images, recon, members[0], l2_scale, references=references)
        yield members, maps, pixel_auroc(masks, maps), aupro(masks, maps, fpr_limit=0.3)


def selection_metrics(
    settings: Sequence[AblationSetting],
    normal_images: np.ndarray,
    normal_recon: np.ndarray,
    defect_images: np.ndarray,
    defect_recon: np.ndarray,
    defect_masks: np.ndarray,
    l2_scale: float,
    references: dict[tuple, NormalReference] | None = None,
) -> dict[AblationSetting, dict[str, float]]:
    """Per setting: synthetic image AUROC (normal validation vs synthetic defects), pixel
    AUROC and AUPRO on the synthetic masks, and ``selection_score`` (mean of the two AUROCs).
    Uses validation images only."""
    images = np.concatenate([normal_images, defect_images])
    recon = np.concatenate([normal_recon, defect_recon])
    h, w = normal_images.shape[-2:]
    masks = np.concatenate([np.zeros((len(normal_images), h, w), np.uint8), defect_masks])
    labels = np.r_[np.zeros(len(normal_images), int), np.ones(len(defect_images), int)]
    result = {}
    for members, maps, pix, pro in _maps_and_pixel_metrics(
        settings, images, recon, masks, l2_scale, references
    ):
        for s in members:
            img = image_auroc(labels, _scores(maps, s.reduction))
            result[s] = {
                "syn_image_auroc": img,
                "syn_pixel_auroc": pix,
                "syn_aupro": pro,
                "selection_score": 0.5 * (img + pix),
            }
    return result


def select_setting(
    settings: Sequence[AblationSetting],
    metrics: dict[AblationSetting, dict[str, float]],
    tie_tolerance: float = 1e-3,
) -> AblationSetting:
    """Highest ``selection_score``; within ``tie_tolerance`` of the best, the setting with
    the fewest levers changed from the paper's default wins (then grid order)."""
    best = max(metrics[s]["selection_score"] for s in settings)
    tied = [s for s in settings if metrics[s]["selection_score"] >= best - tie_tolerance]
    return min(tied, key=lambda s: (s.levers_changed(), settings.index(s)))


def test_metrics(
    settings: Sequence[AblationSetting],
    images: np.ndarray,
    recon: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    l2_scale: float,
    references: dict[tuple, NormalReference] | None = None,
) -> dict[AblationSetting, dict[str, float]]:
    """Per setting: test image AUROC, pixel AUROC, AUPRO (FPR 0.3) and image F1-max."""
    labels = np.asarray(labels).astype(int)
    result = {}
    for members, maps, pix, pro in _maps_and_pixel_metrics(
        settings, images, recon, masks, l2_scale, references
    ):
        for s in members:
            scores = _scores(maps, s.reduction)
            result[s] = {
                "test_image_auroc": image_auroc(labels, scores),
                "test_pixel_auroc": pix,
                "test_aupro": pro,
                "test_image_f1_max": f1_max(labels, scores)[0],
            }
    return result


# --------------------------------------------------------------------------- driver
def latest_checkpoint(pattern: str = CHECKPOINT_GLOB) -> Path:
    """The newest version (timestamp folders sort lexically) of the model checkpoint."""
    found = sorted(Path().glob(pattern))
    if not found:
        raise FileNotFoundError(
            f"no checkpoint matches {pattern!r} (run `kedro run` first or pass --checkpoint)"
        )
    return found[-1]


def _reconstruct(model, images: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    return reconstruct_and_score(
        model, images, batch_size=batch_size, device=device, precision="fp32", keep_maps=False
    )["recon"]


def run_ablation(
    checkpoint: Path,
    model_input: Path,
    grid_name: str = "full",
    per_image: int = 2,
    seed: int = 0,
    tie_tolerance: float = 1e-3,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """Select on validation + synthetic defects, then report test metrics. Returns a dict with
    ``rows`` (one per setting, :data:`CSV_COLUMNS`), ``selected``, ``default``, ``l2_scale``
    and run info."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    settings = grid(grid_name)

    # ---- normal references: training images only
    with np.load(Path(model_input) / "train_images.npz") as train:
        train_images = train["images"].astype(np.float32)
    train_recon = _reconstruct(model, train_images, batch_size, device)

    # ---- selection: validation normals and synthetic defects only
    with np.load(Path(model_input) / "validation_images.npz") as val:
        val_images = val["images"].astype(np.float32)
        if "labels" in val.files:  # validation images are normal by construction
            val_images = val_images[np.asarray(val["labels"]) == 0]
    defect_images, defect_masks, kinds = paste_synthetic_defects(val_images, per_image, seed)
    val_recon = _reconstruct(model, val_images, batch_size, device)
    defect_recon = _reconstruct(model, defect_images, batch_size, device)
    l2_scale = l2_scale_from_normals(val_images, val_recon)
    references = fit_references(settings, train_images, train_recon, l2_scale, batch_size)
    sel = selection_metrics(
        settings, val_images, val_recon, defect_images, defect_recon, defect_masks, l2_scale, references
    )
    selected = select_setting(settings, sel, tie_tolerance)

    # ---- only now: the test set, for reporting
    with np.load(Path(model_input) / "test_images.npz") as test:
        test_images = test["images"].astype(np.float32)
        test_labels, test_masks = test["labels"], test["masks"]
    test_recon = _reconstruct(model, test_images, batch_size, device)
    tst = test_metrics(settings, test_images, test_recon, test_labels, test_masks, l2_scale, references)

    rows = []
    for s in settings:
        ssim_w, l2_w = s.weights(l2_scale)
        rows.append({
            "setting": s.name, "blend": s.blend, "ssim_weight": ssim_w, "l2_weight": l2_w,
            "window": s.window, "smoothing_sigma": s.smoothing_sigma, "reference": s.reference,
            "reduction": s.reduction,
            "topk_fraction": TOPK_FRACTION if s.reduction == "topk_mean" else "",
            "levers_changed": s.levers_changed(), **sel[s], **tst[s],
            "is_default": s == DEFAULT_SETTING, "is_selected": s == selected,
        })  # fmt: skip
    return {
        "checkpoint": str(checkpoint),
        "epoch": ckpt.get("epoch"),
        "grid": grid_name,
        "n_train_normal": len(train_images),
        "n_validation_normal": len(val_images),
        "n_synthetic": len(defect_images),
        "synthetic_kinds": {k: kinds.count(k) for k in DEFECT_KINDS},
        "n_test": len(test_images),
        "seed": seed,
        "tie_tolerance": tie_tolerance,
        "l2_scale": l2_scale,
        "selected": selected.name,
        "selected_map_settings": (ms.__dict__ if (ms := selected.map_settings(l2_scale)) else None),
        "default": DEFAULT_SETTING.name,
        "rows": rows,
    }


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(rows: Iterable[dict]) -> list[str]:
    cols = ("setting", "syn_image_auroc", "syn_pixel_auroc", "selection_score",
            "test_image_auroc", "test_pixel_auroc", "test_aupro")  # fmt: skip
    heads = ("setting", "syn img AUROC", "syn pix AUROC", "selection", "test img AUROC",
             "test pix AUROC", "test AUPRO@0.3")  # fmt: skip
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        mark = (" **(paper default)**" if r["is_default"] else "") + (
            " **(selected)**" if r["is_selected"] else ""
        )
        cells = [r["setting"] + mark] + [_fmt(r[c]) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(result: dict) -> str:
    """The ablation report: the rule, one-lever-at-a-time table, and the full grid."""
    rows = result["rows"]
    default = next(r for r in rows if r["is_default"])
    selected = next(r for r in rows if r["is_selected"])
    kinds = ", ".join(f"{n} {k}" for k, n in result["synthetic_kinds"].items())
    one_lever = [r for r in rows if r["levers_changed"] <= 1 or r["is_selected"]]
    lines = [
        "# Evaluation-lever ablation (no retraining)",
        "",
        f"Checkpoint `{result['checkpoint']}` (epoch {result['epoch']}), grid `{result['grid']}` "
        f"({len(rows)} settings), seed {result['seed']}.",
        "",
        "**The setting was chosen on validation + synthetic defects only; test labels were not "
        "used for the choice.** Rule (the same for every category): "
        f"{result['n_validation_normal']} held-out normal validation images vs "
        f"{result['n_synthetic']} synthetic-defect copies of them ({kinds}), reconstructed by the "
        "model; `selection = (synthetic image AUROC + synthetic pixel AUROC) / 2`; ties within "
        f"{result['tie_tolerance']:g} go to the setting with the fewest levers changed from the "
        "paper's default. Test metrics are reported afterwards, for every setting.",
        "",
        f"`ssim+l2` weighs the squared error by {result['l2_scale']:.3g} = mean(1 - SSIM) / "
        "mean(squared error) on the normal validation images; `ms` averages the SSIM maps of "
        "windows 7/11/15; `top1%` is the mean of the top 1% pixels; `ref-mean` subtracts the "
        f"per-pixel mean map of the {result['n_train_normal']} normal training images, `ref-zscore` "
        "also divides by their per-pixel spread (+ its mean).",
        "",
        f"**Selected:** `{selected['setting']}` — test image AUROC {selected['test_image_auroc']:.3f}, "
        f"pixel AUROC {selected['test_pixel_auroc']:.3f}, AUPRO {selected['test_aupro']:.3f} "
        f"(paper default `{default['setting']}`: {default['test_image_auroc']:.3f}, "
        f"{default['test_pixel_auroc']:.3f}, {default['test_aupro']:.3f}).",
        "",
        "## One lever at a time (from the paper's default)",
        "",
        *_table(one_lever),
        "",
        "## Full grid",
        "",
        *_table(rows),
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "ablation.csv", out / "ablation.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({k: r[k] for k in CSV_COLUMNS})
    md_path.write_text(to_markdown(result))
    return csv_path, md_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m anomaly_ae.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"model checkpoint (default: the newest {CHECKPOINT_GLOB})",
    )
    p.add_argument(
        "--model-input",
        type=Path,
        default=Path("data/05_model_input"),
        help="folder with validation_images.npz and test_images.npz (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("data/08_reporting/ablation"),
        help="where ablation.csv and ablation.md go (default: %(default)s)",
    )
    p.add_argument(
        "--grid", choices=sorted(_GRIDS), default="full", help="settings grid (default: %(default)s)"
    )
    p.add_argument(
        "--per-image", type=int, default=2, help="synthetic defects per normal validation image (default: 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic-defect seed (default: 0)")
    p.add_argument(
        "--tie-tolerance",
        type=float,
        default=1e-3,
        help="selection scores this close to the best are ties (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="inference batch size (default: 16)")
    p.add_argument("--device", default="cpu", help="inference device: cpu, cuda, auto (default: cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of Markdown")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    checkpoint = args.checkpoint or latest_checkpoint()
    result = run_ablation(
        checkpoint, args.model_input, args.grid, args.per_image, args.seed,
        args.tie_tolerance, args.batch_size, args.device,
    )  # fmt: skip
    csv_path, md_path = write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(md_path.read_text())
        print(f"Wrote {csv_path} and {md_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
