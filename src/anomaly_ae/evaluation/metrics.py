"""Image- and pixel-level anomaly-detection metrics (numpy / scikit-learn).

Conventions used throughout:

* Label 1 (or ``True``) means *anomalous*, 0 means normal. Ground-truth masks may
  be bool, {0, 1} or {0, 255}: any non-zero pixel is anomalous.
* Higher scores / map values mean *more anomalous*.
* ROC, AUROC and precision-recall curves come from scikit-learn. The one exception is
  :func:`rank_auroc`, the same exact AUROC (ties count one half) computed by sorting the
  normal scores once, or on millions of float scores, where numpy's sort is not vectorised,
  by binning them and sorting only the normal scores that share a bin with an anomalous one:
  20-40 times faster than scikit-learn on a calibration map's pixels, which the grid needs
  for every one of its maps (tests pin both to scikit-learn).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm, rankdata
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "rank_auroc",
    "auroc_interval",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "aupro",
    "f1_max",
    "calibrate_threshold",
    "classification_report_at",
    "summarise_ssim",
]

#: Each threshold rule and the one ``evaluation.threshold`` setting it reads.
THRESHOLD_SETTINGS = {"quantile": "quantile", "mean_std": "k_sigma", "false_alarm_rate": "false_alarm_rate"}
_THRESHOLD_RULES = tuple(THRESHOLD_SETTINGS)


# --------------------------------------------------------------------------- helpers
def _labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten image labels/scores; labels become bool."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise ValueError("labels and scores must not be empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (found NaN or inf)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be binary (0 = normal, 1 = anomalous), got values {np.unique(y)[:10]}")
    return y.astype(bool), s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{what} is undefined when only one class is present (all {y.size} samples are "
            f"{present}); need both normal (0) and anomalous (1) samples"
        )


def _as_stack(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (bool masks, float32 maps), both shaped (N, H, W).

    Accepts (H, W), (N, H, W) or (N, 1, H, W) arrays of identical shape.
    """
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks and maps must have the same shape, got {m.shape} and {a.shape}")
    if m.ndim == 2:
        m, a = m[None], a[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m, a = m[:, 0], a[:, 0]
    elif m.ndim != 3:
        raise ValueError(f"expected (N, H, W) arrays (or (H, W) / (N, 1, H, W)), got shape {m.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError("maps must be finite (found NaN or inf)")
    return m != 0, a


# --------------------------------------------------------------------------- AUROC
def rank_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact AUROC as the Mann-Whitney statistic: the fraction of (anomalous, normal) pairs
    ordered correctly, ties counting one half. Equal to ``roc_auc_score``; scores keep their
    dtype (float32 maps sort twice as fast as float64); any non-zero label is anomalous.
    Float scores from :data:`BINNED_FROM` values on are counted by :func:`_binned_pairs`
    where that is faster on this machine (:func:`binned_count_is_faster`): the same exact
    count, faster where numpy's sort is not vectorised."""
    y, s = _checked(labels, scores, "rank_auroc")
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if _counts_by_bins(s):
        below, equal = _binned_pairs(y, s)
    else:
        below, equal = _sorted_pairs(y, s)
    return float((below + 0.5 * equal) / (n_pos * n_neg))


def grouped_auroc(groups: ArrayLike, scores: ArrayLike) -> tuple[float, dict[int, float]]:
    """:func:`rank_auroc` of every positive (``groups != 0``) against the negatives (group
    0), and of each group's positives alone against the same negatives, from one count: e.g.
    a map's synthetic defect pixels, coded by their kind, against every pixel outside a
    defect. The first is the groups' AUROCs weighted by their positives' counts."""
    g = np.asarray(groups).ravel()
    y, s = _checked(g, scores, "grouped_auroc")
    n_neg = int(y.size - y.sum())
    if _counts_by_bins(s):
        below, equal = _binned_counts(y, s)
    else:
        below, equal = _sorted_counts(y, s)
    pairs = below + 0.5 * equal  # per positive, in the order of s[y]
    codes = g[y]
    by_group = {int(c): float(pairs[codes == c].mean() / n_neg) for c in np.unique(codes)}
    return float(pairs.mean() / n_neg), by_group


def _counts_by_bins(s: np.ndarray) -> bool:
    """Whether the pairs of scores ``s`` are counted by :func:`_binned_pairs`' bins."""
    return s.size >= BINNED_FROM and s.dtype in (np.float32, np.float64) and binned_count_is_faster()


def _checked(labels: ArrayLike, scores: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel() != 0
    s = np.asarray(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (found NaN or inf)")
    _require_both_classes(y, name)
    return y, s


BINNED_FROM = 1 << 20
"""Score count from which :func:`rank_auroc` counts the pairs by bins instead of one sort."""


@functools.cache
def binned_count_is_faster() -> bool:
    """Whether :func:`_binned_pairs` counts a calibration-sized input faster than
    :func:`_sorted_pairs` here: timed once per process (best of three each, about 0.1 s) on
    :data:`BINNED_FROM` fixed pseudo-random float32 scores, as ``cudnn.benchmark`` picks a
    kernel. Both count exactly the same pairs, so the answer changes the speed only, never
    an AUROC. numpy's sort is vectorised where the CPU has AVX2 or AVX-512 (x86-simd-sort);
    there one sort of the normal scores beat the bins on 2026-12-04 (on a real calibration
    map's 6.9 M pixels, AVX-512: 44 ms against 80 ms); on an earlier machine (its CPU flags
    were not recorded) the bins won (the whole bottle calibration 1.8 times faster), and on
    2026-12-06 (AVX-512, numpy 2.4.6, the bins counted a chunk at a time) they won again:
    82-197 ms against 280-290 ms on 6.95 M pixels of a real BSData map; on 2026-12-07, the
    bins spaced between the positives' extremes, 0.35-0.44 s against 1.7-2.8 s on 34.6 M."""
    rng = np.random.default_rng(0)
    labels = rng.random(BINNED_FROM) < 0.005  # a map's few defect pixels, scored higher
    scores = (rng.gamma(2.0, 1.0, BINNED_FROM) + 1.5 * labels).astype(np.float32)

    def best(count) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            count(labels, scores)
            times.append(time.perf_counter() - started)
        return min(times)

    return best(_binned_pairs) < best(_sorted_pairs)


def _sorted_pairs(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(pairs with the positive above the negative, tied pairs), from one sort of the negatives."""
    below, equal = _sorted_counts(y, s)
    return below.sum(dtype=np.float64), equal.sum(dtype=np.float64)


def _sorted_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per positive (in the order of ``s[y]``): the negatives below it and those equal to it."""
    negatives = s[~y]  # a copy already: sorted in place, not copied again
    negatives.sort()
    positives = s[y]
    below = np.searchsorted(negatives, positives, "left")
    equal = np.searchsorted(negatives, positives, "right") - below
    return below, equal


def _binned_pairs(y: np.ndarray, s: np.ndarray, bits: int = 20) -> tuple[float, float]:
    """:func:`_sorted_pairs` without sorting every negative: the scores are put in ``2**bits``
    bins spaced evenly between the lowest and the highest positive (:func:`_bin_index`); a
    negative in a lower bin than a positive is below it (one ``bincount``), and only the
    negatives that share a bin with some positive (few where the positives are few) are
    sorted to count the pairs within a bin exactly."""
    below, equal = _binned_counts(y, s, bits)
    return below.sum(dtype=np.float64), equal.sum(dtype=np.float64)


_BIN_CHUNK = 1 << 20
"""Scores :func:`_binned_counts` bins at a time: its temporaries stay a few MB (in cache)
whatever the map's size, instead of an integer array or two per score."""


def _bin_index(s: np.ndarray, low, scale, top: int, work: np.ndarray) -> np.ndarray:
    """``trunc(clip((s - low) * scale + 1, 0, top))`` in ``s``' dtype (``work``: a buffer of
    that dtype, at least ``s``' size): a bin per score that never decreases as the score
    grows, since every step rounds monotonically. ``low`` (the lowest positive) gets bin 1, so
    bin 0 holds negatives only. ``scale`` is positive and finite, so no step makes a NaN."""
    x = work[: s.size]
    with np.errstate(over="ignore"):  # a score far from the positives overflows to +-inf: bin 0 or top
        np.subtract(s, low, out=x)
        x *= scale
    x += 1
    np.clip(x, 0, top, out=x)
    return x.astype(np.intp)


def _binned_counts(y: np.ndarray, s: np.ndarray, bits: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sorted_counts` by :func:`_binned_pairs`' bins, :data:`_BIN_CHUNK` scores at a
    time: one pass counts the negatives per bin, a second keeps the negatives that share a
    bin with a positive. Besides its input it holds the positives and those negatives only.

    Any bins that keep the scores' order count exactly. Bins spaced evenly in value between
    the positives' extremes leave 1.4 % of the negatives of BSData's detection map (34.6 M
    pixels, 0.16 % of them positive) sharing a bin with a positive, against 29 % for bins by
    the top 20 bits of the floats' bit patterns, which spend most bins on exponents no score
    has; on bottle's (5.4 M pixels, 5.8 % positive, so most bins hold a positive) 37 %
    against 44 %. Where one positive lies far from the rest, most negatives share its
    neighbours' bins and the count costs about one sort of the negatives: slower, never
    wrong."""
    n_bins, top = 1 << bits, (1 << bits) - 1
    positives = s[y]
    low = positives.min()
    span = float(positives.max()) - float(low)  # in float64: no overflow for float32 scores
    info = np.finfo(s.dtype)
    scale = s.dtype.type(
        np.clip((n_bins - 3) / span if 0 < span < np.inf else 1.0, info.smallest_subnormal, info.max)
    )
    work = np.empty(min(_BIN_CHUNK, s.size), s.dtype)
    chunks = [slice(start, start + _BIN_CHUNK) for start in range(0, s.size, _BIN_CHUNK)]
    counts = np.zeros(n_bins, np.intp)
    for part in chunks:  # every score's bin: the positives' bins are left out below
        counts += np.bincount(_bin_index(s[part], low, scale, top, work), minlength=n_bins)
    pos_bins = _bin_index(positives, low, scale, top, np.empty_like(positives))
    shared = np.zeros(n_bins, bool)
    shared[pos_bins] = True
    # a positive is above every negative in a lower bin that holds no positive (such a bin
    # holds negatives only); those in a bin with a positive are counted one by one below
    in_lower_bins = np.cumsum(np.where(shared, 0, counts))
    near = []  # the negatives in a bin with a positive (bins made again: not held for every score) ...
    for part in chunks:
        keep = shared[_bin_index(s[part], low, scale, top, work)]
        keep &= ~y[part]
        near.append(s[part][keep])
    near = np.concatenate(near)
    near.sort()  # ... sorted in place (-0.0 and 0.0 compare equal, as in the sort of every negative)
    lower = np.searchsorted(near, positives, "left")
    equal = np.searchsorted(near, positives, "right") - lower
    return in_lower_bins[pos_bins] + lower, equal


def _hanley_mcneil_variance(theta: float, n_anomalous: int, n_normal: int) -> float:
    """The AUROC's variance at ``theta`` under Hanley and McNeil's (1982) exponential model."""
    q1, q2 = theta / (2 - theta), 2 * theta**2 / (1 + theta)
    return (theta * (1 - theta) + (n_anomalous - 1) * (q1 - theta**2) + (n_normal - 1) * (q2 - theta**2)) / (
        n_anomalous * n_normal
    )


def _score_interval(auc: float, n_anomalous: int, n_normal: int, z: float) -> tuple[float, float]:
    """Every ``theta`` with ``|auc - theta| <= z * sd(theta)`` (Hanley-McNeil's sd): a score
    interval, like Wilson's for a proportion, that keeps a width where the sample shows no
    spread (every pair ordered, or every score tied)."""

    def gap(theta: float) -> float:
        return (auc - theta) ** 2 - z**2 * _hanley_mcneil_variance(theta, n_anomalous, n_normal)

    inner = 1e-12  # the ends, where the variance is 0, are roots themselves when auc is 0 or 1
    low = brentq(gap, 0.0, min(auc, 1 - inner)) if auc > 0 else 0.0
    high = brentq(gap, max(auc, inner), 1.0) if auc < 1 else 1.0
    return float(low), float(high)


def auroc_interval(labels: ArrayLike, scores: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the AUROC from the sampling of the images: DeLong's standard
    error (DeLong, DeLong and Clarke-Pearson 1988; computed from midranks as Sun and Xu 2014)
    on the logit scale, the AUROC's logit plus or minus the normal quantile of ``level`` times
    it, mapped back - so the interval stays inside [0, 1] and keeps its level near 1, where
    the plain +/- interval covers too little (simulated, 20 + 20 images at a true AUROC of
    0.99, 600 draws: a 95 % plain interval held it 86 % of the time, this one 98 %).

    A few dozen test images measure an AUROC only to a few hundredths; this says how far a
    figure, or its difference to a target, can be read. Where the AUROC is 0 or 1, or every
    score is tied, the sample shows no spread and DeLong's interval has zero width; there the
    interval is the score interval of Hanley and McNeil's variance (every AUROC that the
    observed one is within ``z`` standard errors of): 20 good and 20 defective images, all
    ordered correctly, read 0.90-1.00, not 1.00-1.00. Each image counts once: not for pixels,
    which are not independent samples.

    Args:
        labels: Per-image labels, 1 = anomalous, 0 = normal.
        scores: Per-image anomaly scores (higher = more anomalous).
        level: Confidence level in (0, 1), e.g. 0.95.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when a class has fewer than two images.

    Raises:
        ValueError: If ``level`` is outside (0, 1), or as :func:`image_auroc` (lengths differ,
            labels not binary, scores not finite, one class only).
    """
    if not 0 < float(level) < 1:
        raise ValueError(f"evaluation.confidence_level must be in (0, 1), got {level!r}")
    y, s = _labels_scores(labels, scores)
    _require_both_classes(y, "auroc_interval")
    positives, negatives = s[y], s[~y]
    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:
        return float("nan"), float("nan")
    ranks = rankdata(np.r_[positives, negatives])
    # per anomalous image: the share of normal images it outscores (ties one half); per normal
    # image: the share of anomalous images that outscore it. Their means are the AUROC.
    v10 = (ranks[:m] - rankdata(positives)) / n
    v01 = 1.0 - (ranks[m:] - rankdata(negatives)) / m
    auc = float(v10.mean())
    z = float(norm.ppf(0.5 + float(level) / 2))
    variance = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    if variance <= 1e-15 or not 0 < auc < 1:
        return _score_interval(auc, m, n, z)
    logit = np.log(auc / (1 - auc))
    half = z * float(np.sqrt(variance)) / (auc * (1 - auc))  # delta method
    return float(expit(logit - half)), float(expit(logit + half))


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC (``sklearn.metrics.roc_auc_score``).

    Args:
        labels: Per-image labels, 1 = anomalous, 0 = normal.
        scores: Per-image anomaly scores (higher = more anomalous).

    Returns:
        AUROC in [0, 1] (1 = perfect separation, 0 = perfectly inverted).

    Raises:
        ValueError: If only one class is present, lengths differ, or scores are not finite.
    """
    y, s = _labels_scores(labels, scores)
    _require_both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def _valid(valid: ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``valid`` as a bool ``(N, H, W)`` stack (the pixels that are the image, not a frame's
    mirrored margin: :class:`~anomaly_ae.data.transforms.Framing` ``pad``), or None."""
    if valid is None:
        return None
    v = np.asarray(valid).astype(bool)
    v = v.reshape(shape) if v.size == int(np.prod(shape)) else v
    if v.shape != shape:
        raise ValueError(f"valid must have the masks' shape {shape}, got {np.asarray(valid).shape}")
    return v


def pixel_auroc(masks: ArrayLike, maps: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Pixel-level AUROC pooled over all pixels of all images.

    Every pixel of every image (including normal test images, whose masks are
    empty) is one sample. Maps are cast to float32 and masks to bool to keep
    memory low (83 x 256 x 256 = 5.4 M pixels is fine). Counted by :func:`rank_auroc`,
    as the calibration grid counts its maps' pixels.

    Args:
        masks: Ground-truth masks ``(N, H, W)``; non-zero = anomalous.
        maps: Anomaly maps of the same shape.
        valid: Optional, same shape: only these pixels count (the image inside a padded
            frame; its mirrored margins are left out).

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: If shapes differ, maps are not finite, or all pixels share one class.
    """
    m, a = _as_stack(masks, maps)
    v = _valid(valid, m.shape)
    y, scores = (m.ravel(), a.ravel()) if v is None else (m[v], a[v])
    _require_both_classes(y, "pixel AUROC")
    return rank_auroc(y, scores)  # scikit-learn's AUROC (tests pin it), the calibration's count


# --------------------------------------------------------------------------- PRO
def pro_curve(
    masks: ArrayLike, maps: ArrayLike, valid: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap (PRO) curve, as in the MVTec AD evaluation code.

    Regions are the connected components (8-connectivity,
    ``scipy.ndimage.label`` with a 3x3 structure of ones) of each ground-truth
    mask. A pixel is predicted anomalous at threshold ``t`` iff its map value
    ``>= t``. For each threshold:

    * ``PRO(t)`` = mean over *all* regions of all images of
      ``|region & predicted| / |region|``;
    * ``FPR(t)`` = (#normal pixels predicted anomalous) / (#normal pixels), normal
      pixels being mask == 0 across all images (good images included).

    Computed exactly for every distinct map value: all pixel scores are sorted
    once (descending); each normal pixel adds ``1 / #normal`` to the FPR and each
    region pixel adds ``1 / (|region| * #regions)`` to the PRO; cumulative sums
    taken at the last position of each group of tied scores give the curve.

    ``valid`` (optional, the masks' shape): only these pixels count, and regions are those of
    ``mask & valid`` (a padded frame's mirrored margins left out).

    Returns:
        ``(fpr, pro)``: non-decreasing float64 arrays starting at ``(0, 0)`` and
        ending at ``(1, 1)``. FPR may repeat (vertical steps).

    Raises:
        ValueError: If there are no anomalous regions, no normal pixels, shapes
            differ, or maps are not finite.
    """
    m, a = _as_stack(masks, maps)
    v = _valid(valid, m.shape)
    if v is not None:
        m = m & v
    structure = np.ones((3, 3), dtype=int)
    pro_weight = np.zeros(m.shape, dtype=np.float64)
    num_regions = 0
    for i in range(m.shape[0]):
        labeled, n = ndimage.label(m[i], structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(labeled.ravel())
        inv = np.zeros(sizes.shape, dtype=np.float64)
        inv[1:] = 1.0 / sizes[1:]
        pro_weight[i] = inv[labeled]
        num_regions += n
    if num_regions == 0:
        raise ValueError("AUPRO is undefined: the ground-truth masks contain no anomalous regions")
    normal = ~m.ravel() if v is None else (~m & v).ravel()
    num_normal = int(normal.sum())
    if num_normal == 0:
        raise ValueError("AUPRO is undefined: the ground-truth masks contain no normal pixels")

    scores = a.ravel()
    if v is not None:  # left-out pixels: neither normal nor in a region, so they add nothing
        scores = scores[v.ravel()]
        normal = normal[v.ravel()]
        pro_weight = pro_weight.ravel()[v.ravel()]
    order = np.argsort(scores, kind="stable")[::-1]  # descending
    scores_sorted = scores[order]
    # last index of each run of equal scores: every tied pixel enters together
    keep = np.empty(scores_sorted.size, dtype=bool)
    np.not_equal(scores_sorted[1:], scores_sorted[:-1], out=keep[:-1])
    keep[-1] = True
    del scores_sorted

    fp_cum = np.cumsum(normal[order], dtype=np.int64)[keep]
    fpr = fp_cum / float(num_normal)
    del fp_cum
    pro_sorted = pro_weight.ravel()[order]
    del pro_weight, order
    np.cumsum(pro_sorted, out=pro_sorted)
    pro = pro_sorted[keep] / float(num_regions)
    del pro_sorted

    fpr = np.clip(np.concatenate(([0.0], fpr)), 0.0, 1.0)
    pro = np.clip(np.concatenate(([0.0], pro)), 0.0, 1.0)
    # remove cumulative round-off at the end: all pixels included => (1, 1)
    fpr[-1] = 1.0
    pro[-1] = 1.0
    return fpr, pro


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], x_max]; x non-decreasing.

    If ``x_max`` falls between two samples, y is linearly interpolated at
    ``x_max`` (same as ``trapezoid_area`` in the MVTec AD evaluation code).
    """
    n_in = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if n_in < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_interp) * (x_max - x0)
    return area


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, valid: ArrayLike | None = None) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (Bergmann et al., IJCV 2021).

    The exact PRO curve of :func:`pro_curve` (every distinct map value is a
    threshold; no threshold grid) is integrated over FPR in ``[0, fpr_limit]``
    with the trapezoid rule, interpolating PRO linearly at exactly
    ``fpr_limit``, and divided by ``fpr_limit`` so that a perfect detector
    scores 1.0. A constant map scores ``fpr_limit / 2`` (the curve is the
    diagonal), an inverted map ~0.

    Args:
        masks: Ground-truth masks ``(N, H, W)``, non-zero = anomalous; include
            the normal test images (empty masks) - they contribute normal pixels.
        maps: Anomaly maps of the same shape (higher = more anomalous).
        fpr_limit: Upper FPR integration limit in (0, 1]; 0.3 is the MVTec AD standard.
        valid: Optional, the masks' shape: only these pixels count (see :func:`pro_curve`).

    Returns:
        AUPRO in [0, 1].

    Raises:
        ValueError: If ``fpr_limit`` is outside (0, 1], or see :func:`pro_curve`.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(masks, maps, valid)
    value = _trapezoid_up_to(fpr, pro, float(fpr_limit)) / float(fpr_limit)
    return float(min(max(value, 0.0), 1.0))


# --------------------------------------------------------------------------- F1 / thresholds
def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds, from ``sklearn.metrics.precision_recall_curve``.

    Note sklearn's convention: a sample is predicted anomalous iff
    ``score >= threshold``. (:func:`classification_report_at` uses ``score >
    threshold``; to reproduce the F1 there, pass a value just below the returned
    threshold, e.g. ``np.nextafter(thr, -np.inf)``.)

    Args:
        labels: Per-image labels, 1 = anomalous.
        scores: Per-image anomaly scores.

    Returns:
        ``(best_f1, threshold)``.

    Raises:
        ValueError: If only one class is present.
    """
    y, s = _labels_scores(labels, scores)
    _require_both_classes(y, "image F1-max")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def calibrate_threshold(
    normal_scores: ArrayLike,
    rule: str = "quantile",
    quantile: float = 0.99,
    k_sigma: float = 3.0,
    false_alarm_rate: float = 0.01,
) -> float:
    """Choose an image-score decision threshold from NORMAL validation scores.

    The input must be the scores of held-out NORMAL (defect-free) validation
    images - never test images (that would leak test labels into the
    threshold and inflate the reported accuracy/F1).

    Rules:
        * ``"quantile"``: ``np.quantile(normal_scores, quantile)`` (linear
          interpolation). The false-positive rate to expect is about
          ``1 - quantile`` only with many scores: with ``n`` of them it is at
          least ``1 / (n + 1)`` (:mod:`anomaly_ae.evaluation.false_alarms`).
        * ``"mean_std"``: ``mean + k_sigma * std`` (population std, ddof=0).
        * ``"false_alarm_rate"``: the lowest validation score that promises
          at most ``false_alarm_rate`` (split conformal): the ``k``-th
          smallest, ``k = ceil((n + 1) * (1 - false_alarm_rate))``, which a
          new normal image like the validation images exceeds with
          probability ``(n + 1 - k) / (n + 1)``. With too few scores
          (``k > n``) the highest one, which promises ``1 / (n + 1)``.

    Args:
        normal_scores: 1-D anomaly scores of normal validation images.
        rule: ``"quantile"``, ``"mean_std"`` or ``"false_alarm_rate"``.
        quantile: Quantile in [0, 1] for the ``"quantile"`` rule.
        k_sigma: Number of standard deviations for the ``"mean_std"`` rule.
        false_alarm_rate: The rate in (0, 1) the ``"false_alarm_rate"`` rule
            must promise.

    Returns:
        Threshold; an image is anomalous iff ``score > threshold``.

    Raises:
        ValueError: Unknown ``rule``, empty or non-finite ``normal_scores``,
            ``quantile`` outside [0, 1] or ``false_alarm_rate`` outside (0, 1).
    """
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    if rule not in _THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {_THRESHOLD_RULES}")
    if s.size == 0:
        raise ValueError(f"normal_scores is empty; cannot calibrate a threshold with rule {rule!r}")
    if not np.all(np.isfinite(s)):
        raise ValueError("normal_scores must be finite (found NaN or inf)")
    if rule == "quantile":
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        return float(np.quantile(s, quantile))
    if rule == "false_alarm_rate":
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate!r}")
        n = s.size
        k = min(max(math.ceil((n + 1) * (1 - false_alarm_rate) - 1e-9), 1), n)
        return float(np.sort(s)[k - 1])
    return float(s.mean() + k_sigma * s.std(ddof=0))


def threshold_options(rule: dict) -> dict:
    """``evaluation.threshold`` as :func:`calibrate_threshold`'s keyword arguments (each rule
    reads only its own setting, so a configuration written before a rule existed still runs)."""
    options = {"rule": rule["rule"]}
    name = THRESHOLD_SETTINGS.get(rule["rule"])
    if name is not None:
        if name not in rule:
            raise ValueError(
                f"evaluation.threshold.rule {rule['rule']!r} needs evaluation.threshold.{name} "
                "(conf/base/parameters_evaluation.yml)"
            )
        options[name] = rule[name]
    return options


def classification_report_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Confusion counts and derived metrics at a fixed threshold.

    An image is predicted anomalous iff ``score > threshold``. Ratios with a
    zero denominator (e.g. precision with no positive predictions) are 0.0, with
    no warning.

    Returns:
        Dict with float values for ``accuracy``, ``precision``, ``recall``,
        ``f1``, ``tp``, ``fp``, ``tn``, ``fn``.
    """
    y, s = _labels_scores(labels, scores)
    pred = s > threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    tn = int(np.sum(~pred & ~y))
    fn = int(np.sum(~pred & y))

    def _ratio(num: float, den: float) -> float:
        return float(num) / den if den > 0 else 0.0

    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
    }


# --------------------------------------------------------------------------- SSIM summary
def summarise_ssim(values: Sequence[float] | ArrayLike) -> tuple[float, float]:
    """Mean and standard deviation of per-image SSIM values.

    Uses the population standard deviation (``np.std`` default, ddof=0), which is
    what a numpy/Keras notebook such as the paper's most likely reported.

    Returns:
        ``(mean, std)``.

    Raises:
        ValueError: If ``values`` is empty or not finite.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values is empty; cannot summarise SSIM")
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite (found NaN or inf)")
    return float(v.mean()), float(v.std(ddof=0))
