"""Synthetic defects pasted onto NORMAL images, with ground-truth masks.

The calibration pipeline scores every anomaly-map setting on held-out normal validation
images against defective copies of them made here, so a map is chosen without test
labels. Category-agnostic and deterministic (seeded): every size is a fraction of the
image side or a pixel count at model resolution, every contrast is relative to the
defect's local surroundings.

Kinds (``DEFECT_KINDS``; :func:`paste_synthetic_defects` cycles through the chosen ones):

* ``blob``: an ellipse (3-10 % of the side) pushed towards dark on bright areas, towards
  bright on dark ones, with a little noise.
* ``scratch``: a straight line segment 1-9 px wide, bright or dark.
* ``patch``: a rectangle (6-18 % of the side) cut from a random normal image, possibly
  flipped, pasted elsewhere.
* ``thin_line``: a curved line 1-3 px wide (a quadratic Bézier curve, anti-aliased), darker
  or brighter than its surroundings by a contrast drawn from ``contrast``.
* ``smudge``: a soft, blurred stain (Gaussian fall-off, 2-8 % of the side), faint: a
  contrast from the lower half of ``contrast``; the mask is where it changes the image by
  at least half its peak.
* ``spot``: a small disc (radius 1.5-6 px), darker or brighter than its local surroundings
  by a contrast from ``contrast``.
* ``perlin``: a Perlin-noise-shaped region (as DRAEM) filled with texture taken from
  elsewhere in the image (shifted, flipped), blended with opacity 0.5-1.
* ``cutpaste``: a small patch (2-6 % of the side) of the same image pasted elsewhere.
* ``tint`` (colour images only; skipped on grayscale ones): a soft stain of another hue at
  the same brightness - the shape of a ``smudge`` (4-12 % of the side), the colour shifted
  in a random direction that keeps the ITU-R 601 luma, by a contrast from ``contrast``. A
  grayscale model cannot see it at all; it tells whether a colour model does.

``opacity`` (``calibration.synthetic_defects.opacity``) scales every copy's whole change by a
factor drawn from its range, so every kind runs from subtle to strong (``[1, 1]``, the
default, scales nothing and draws nothing: the defects above, as drawn).
"""

from __future__ import annotations

import numpy as np

from anomaly_ae.data.transforms import _LUMA as LUMA_WEIGHTS

__all__ = [
    "COLOUR_KINDS",
    "DEFECT_KINDS",
    "DEFAULT_KINDS",
    "LUMA",
    "defect_kinds",
    "shown_kinds",
    "paste_synthetic_defects",
    "perlin_noise",
    "synthesis_options",
]

DEFAULT_KINDS = ("blob", "scratch", "patch", "thin_line", "smudge", "spot", "perlin", "cutpaste")
#: Kinds that exist only in colour: left out for grayscale images.
COLOUR_KINDS = ("tint",)
DEFECT_KINDS = (*DEFAULT_KINDS, *COLOUR_KINDS)

LUMA = LUMA_WEIGHTS.astype(np.float64)  # the weights of the gray conversion


def shown_kinds(kinds, channels: int) -> tuple[str, ...]:
    """The ``kinds`` images of ``channels`` (1 or 3) can show: grayscale images leave the
    :data:`COLOUR_KINDS` out."""
    kinds = defect_kinds(kinds)
    return kinds if channels == 3 else tuple(k for k in kinds if k not in COLOUR_KINDS)


def defect_kinds(value) -> tuple[str, ...]:
    """Kinds from a list, or from ``thin_line+spot`` on the command line (where Kedro's
    ``--params`` splits on commas)."""
    if isinstance(value, str):
        return tuple(k for k in value.replace("+", " ").split() if k)
    return tuple(value or ())


def _per_pixel(values: np.ndarray, img: np.ndarray) -> np.ndarray:
    """A per-pixel ``(H, W)`` weight made to broadcast over a colour image's ``(H, W, C)``:
    every defect changes all colour channels alike (a darker or brighter mark)."""
    return values[..., None] if img.ndim == 3 else values


def _local_mean(img: np.ndarray, mask: np.ndarray) -> float:
    return float(img[mask].mean()) if mask.any() else float(img.mean())


def _surroundings(img: np.ndarray, mask: np.ndarray, grow: int = 4) -> float:
    """Mean of a ring of ``grow`` px around ``mask`` (the defect's local background)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return float(img.mean())
    h, w = img.shape[:2]
    y0, y1 = max(ys.min() - grow, 0), min(ys.max() + grow + 1, h)
    x0, x1 = max(xs.min() - grow, 0), min(xs.max() + grow + 1, w)
    window, inside = img[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    ring = window[~inside]
    return float(ring.mean()) if ring.size else float(window.mean())


def _signed(rng, base: float, contrast: float) -> float:
    """``+contrast`` or ``-contrast``: darker or brighter at random, flipped when that would
    leave [0, 1]."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if not 0.0 <= base + sign * contrast <= 1.0:
        sign = -sign
    return sign * contrast


def _blob(img, rng, h, w, contrast):
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
    out[mask] = (1 - alpha) * img[mask] + alpha * (target + _per_pixel(noise, img)[mask])
    return out, mask


def _scratch(img, rng, h, w, contrast):
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


def _patch(img, rng, h, w, contrast, sources, low=0.06, high=0.18):
    ph = max(int(round(rng.uniform(low, high) * h)), 2)
    pw = max(int(round(rng.uniform(low, high) * w)), 2)
    src = sources[rng.integers(len(sources))] if sources is not None else img
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


def _cutpaste(img, rng, h, w, contrast):
    return _patch(img, rng, h, w, contrast, None, low=0.02, high=0.06)


def _thin_line(img, rng, h, w, contrast):
    """A quadratic Bézier curve 1-3 px wide, anti-aliased (coverage falls off over 1 px)."""
    length = rng.uniform(0.1, 0.4) * min(h, w)
    theta = rng.uniform(0, np.pi)
    margin = 0.5 * length + 3
    cy, cx = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
    direction = np.array([np.sin(theta), np.cos(theta)])
    p0 = np.array([cy, cx]) - 0.5 * length * direction
    p2 = np.array([cy, cx]) + 0.5 * length * direction
    bend = rng.uniform(-0.3, 0.3) * length * np.array([-direction[1], direction[0]])
    p1 = 0.5 * (p0 + p2) + bend
    t = np.linspace(0.0, 1.0, max(int(4 * length), 8))[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (K, 2) points
    half_width = 0.5 * rng.uniform(1.0, 3.0)
    y0, y1 = int(max(curve[:, 0].min() - 3, 0)), int(min(curve[:, 0].max() + 4, h))
    x0, x1 = int(max(curve[:, 1].min() - 3, 0)), int(min(curve[:, 1].max() + 4, w))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.full(yy.shape, np.inf, dtype=np.float32)
    for py, px in curve:
        np.minimum(dist, np.hypot(yy - py, xx - px), out=dist)
    coverage = np.clip(half_width + 0.5 - dist, 0.0, 1.0)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = coverage >= 0.5
    delta = _signed(rng, _surroundings(img, mask), contrast)
    out = img.copy()
    out[y0:y1, x0:x1] += _per_pixel(coverage, img) * delta
    return out, mask


def _stain(rng, h, w, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, mask)`` of a soft round stain: a Gaussian fall-off whose sigma is
    ``low``-``high`` of half the shorter side; the mask is where the weight is >= 0.5."""
    sigma = max(rng.uniform(low, high) * min(h, w) / 2, 1.5)
    cy, cx = rng.uniform(2 * sigma, h - 2 * sigma), rng.uniform(2 * sigma, w - 2 * sigma)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return weight, weight >= 0.5


def _smudge(img, rng, h, w, contrast):
    weight, mask = _stain(rng, h, w, 0.02, 0.08)
    delta = _signed(rng, _surroundings(img, mask), contrast)
    out = img + _per_pixel(weight, img) * delta
    return out, mask


def _spot(img, rng, h, w, contrast):
    radius = rng.uniform(1.5, 6.0)
    cy, cx = rng.uniform(radius + 1, h - radius - 1), rng.uniform(radius + 1, w - radius - 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coverage = np.clip(radius + 0.5 - np.hypot(yy - cy, xx - cx), 0.0, 1.0)
    mask = coverage >= 0.5
    delta = _signed(rng, _surroundings(img, mask), contrast)
    return img + _per_pixel(coverage, img) * delta, mask


def _tint(img, rng, h, w, contrast):
    """A smudge-shaped stain of another hue at the same luma (colour images ``(H, W, 3)``)."""
    weight, mask = _stain(rng, h, w, 0.04, 0.12)
    direction = rng.normal(size=3)
    direction -= (direction @ LUMA) / (LUMA @ LUMA) * LUMA  # no change of luma
    direction /= np.abs(direction).max()
    return img + weight[..., None] * (contrast * direction).astype(np.float32), mask


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1] with ``cells`` lattice cells per axis."""
    h, w = shape
    gy, gx = cells
    angles = rng.uniform(0, 2 * np.pi, size=(gy + 1, gx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, gy, h, endpoint=False)
    x = np.linspace(0, gx, w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grad[yi[:, None] + oy, xi[None, :] + ox]
        return g[..., 0] * (yf - oy) + g[..., 1] * (xf - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(yf), fade(xf)
    top = dot(0, 0) * (1 - v) + dot(0, 1) * v
    bottom = dot(1, 0) * (1 - v) + dot(1, 1) * v
    return ((1 - u) * top + u * bottom).astype(np.float32) * np.sqrt(2)


def _perlin(img, rng, h, w, contrast):
    """DRAEM-style: a thresholded Perlin-noise region, kept to one window of 8-25 % of the
    side, filled with the image's own texture from elsewhere (shifted, maybe flipped)."""
    cells = int(rng.choice([2, 4, 8]))
    noise = perlin_noise((h, w), (cells, cells), rng)
    wh, ww = int(rng.uniform(0.08, 0.25) * h), int(rng.uniform(0.08, 0.25) * w)
    y0, x0 = rng.integers(0, h - wh + 1), rng.integers(0, w - ww + 1)
    window = np.zeros((h, w), dtype=bool)
    window[y0 : y0 + wh, x0 : x0 + ww] = True
    mask = (noise > 0.3 * noise[window].max()) & window
    texture = np.roll(
        img, (int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))), (0, 1)
    )
    if rng.random() < 0.5:
        texture = texture[::-1]
    alpha = rng.uniform(0.5, 1.0)
    out = img.copy()
    out[mask] = (1 - alpha) * img[mask] + alpha * texture[mask]
    return out, mask


_MAKERS = {
    "blob": _blob,
    "scratch": _scratch,
    "thin_line": _thin_line,
    "smudge": _smudge,
    "spot": _spot,
    "perlin": _perlin,
    "cutpaste": _cutpaste,
    "tint": _tint,
}


def _unit_range(key: str, value) -> tuple[float, float]:
    """``(low, high)`` of ``calibration.synthetic_defects.<key>``, refused unless 0 < low <= high <= 1."""
    low, high = (float(c) for c in value)
    if not 0 < low <= high <= 1:
        raise ValueError(f"calibration.synthetic_defects.{key} must be 0 < low <= high <= 1, got {value}")
    return low, high


def synthesis_options(options: dict) -> dict:
    """The keyword arguments of :func:`paste_synthetic_defects` that the calibration and the
    held-out stress test share, from ``calibration.synthetic_defects``: ``min_contrast``,
    ``max_tries``, ``contrast`` and ``opacity`` (each caller adds its own images, copies,
    seed and kinds)."""
    return {
        "min_contrast": float(options["min_contrast"]),
        "max_tries": int(options["max_tries"]),
        "contrast": tuple(float(c) for c in options["contrast"]),
        "opacity": tuple(float(c) for c in options["opacity"]),
    }


def paste_synthetic_defects(
    images: np.ndarray,
    per_image: int,
    seed: int,
    min_contrast: float,
    max_tries: int,
    kinds: tuple[str, ...] | list[str] = DEFAULT_KINDS,
    contrast: tuple[float, float] = (0.05, 0.5),
    opacity: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paste synthetic defects onto NORMAL images; category-agnostic and deterministic.

    For each image ``per_image`` defective copies are made, the defect kind cycling through
    ``kinds`` (see the module docstring). A placement whose mean absolute change inside the
    mask is below ``min_contrast`` (e.g. a cut-and-paste of a flat region onto a flat
    region) is redrawn, up to ``max_tries`` times; the kinds whose contrast is drawn from
    ``contrast`` (``thin_line``, ``smudge``, ``spot``) use at least ``min_contrast``.

    Args:
        images: Normal images ``(N, 1, H, W)`` (or ``(N, 3, H, W)``, colour) in [0, 1].
        per_image: Defective copies per normal image.
        seed: Seed of ``numpy.random.default_rng``.
        min_contrast: Minimum mean |change| inside the defect mask.
        max_tries: Redraws per defect before accepting the last one.
        kinds: Defect kinds to cycle through (names in :data:`DEFECT_KINDS`); the
            :data:`COLOUR_KINDS` are left out for grayscale images.
        contrast: ``(low, high)`` range of the intensity change of the contrast-driven kinds
            (``smudge`` uses the lower half: faint stains).
        opacity: ``(low, high)``: each copy's change from its normal image scaled by a
            factor drawn from it (before clipping to [0, 1] and the ``min_contrast`` check).

    Returns:
        ``(defective (N * per_image, C, H, W) float32, masks (N * per_image, H, W) uint8,
        kinds)``.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1, H, W) or (N, 3, H, W) images, got shape {images.shape}")
    if len(images) == 0 or per_image < 1:
        raise ValueError("need at least one normal image and per_image >= 1")
    kinds = defect_kinds(kinds)
    unknown = sorted(set(kinds) - set(DEFECT_KINDS))
    if not kinds or unknown:
        raise ValueError(
            f"calibration.synthetic_defects.kinds: unknown {unknown} or empty; choose from {DEFECT_KINDS}"
        )
    low, high = _unit_range("contrast", contrast)
    low = max(low, min_contrast)
    faint = _unit_range("opacity", opacity)
    rng = np.random.default_rng(seed)
    n, channels, h, w = images.shape
    if channels == 1:
        kinds = shown_kinds(kinds, channels)
        if not kinds:
            raise ValueError(
                f"calibration.synthetic_defects.kinds: {COLOUR_KINDS} need colour images "
                "(preprocessing.color rgb or auto); add a kind that grayscale images can show"
            )
    # each maker works on one (H, W) plane, or (H, W, C) channels-last for colour
    planes = images[:, 0] if channels == 1 else np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    sources = list(planes)
    # the copies written straight into their float32 output, in its (N, C, H, W) layout: a
    # list of float64 copies stacked and converted at the end held about five times as much
    out_images = np.empty((n * per_image, channels, h, w), np.float32)
    out_masks = np.empty((n * per_image, h, w), np.uint8)
    out_kinds = []
    for i in range(n):
        base = planes[i]
        for j in range(per_image):
            kind = kinds[(i * per_image + j) % len(kinds)]
            for _ in range(max_tries):
                strength = rng.uniform(low, max(low, (low + high) / 2 if kind == "smudge" else high))
                if kind == "patch":
                    defective, mask = _patch(base, rng, h, w, strength, sources)
                else:
                    defective, mask = _MAKERS[kind](base, rng, h, w, strength)
                if faint != (1.0, 1.0):  # the whole change scaled down: subtle to strong
                    defective = base + rng.uniform(*faint) * (defective - base)
                defective = np.clip(defective, 0.0, 1.0)
                if mask.any() and np.abs(defective - base)[mask].mean() >= min_contrast:
                    break
            k = i * per_image + j
            out_images[k] = defective if channels == 1 else defective.transpose(2, 0, 1)
            out_masks[k] = mask
            out_kinds.append(kind)
    return out_images, out_masks, out_kinds
