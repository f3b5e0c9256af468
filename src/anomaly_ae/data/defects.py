"""Synthetic defects pasted onto NORMAL images, with ground-truth masks.

The calibration pipeline scores every anomaly-map setting on held-out normal validation
images against defective copies of them made here, so a map is chosen without test
labels. Category-agnostic and deterministic (seeded).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFECT_KINDS", "paste_synthetic_defects"]

DEFECT_KINDS = ("blob", "scratch", "patch")


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
    per_image: int,
    seed: int,
    min_contrast: float,
    max_tries: int,
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
