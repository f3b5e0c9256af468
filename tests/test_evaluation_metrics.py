"""Tests for anomaly_ae.evaluation.metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomaly_ae.evaluation.metrics import (
    aupro,
    auroc_interval,
    calibrate_threshold,
    classification_report_at,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    rank_auroc,
    summarise_ssim,
)

# ----------------------------------------------------------------------------- image level


def test_image_auroc_perfect_inverted_and_single_class() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_auroc(labels, np.ones(5)) == 0.5
    with pytest.raises(ValueError, match="one class"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_auroc_equals_sklearn_with_ties(seed, dtype) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 2000))
    labels = rng.random(n) < rng.uniform(0.05, 0.5)
    labels[:2] = [True, False]  # both classes present
    # overlapping classes, rounded to two decimals: many ties within and across classes
    scores = np.round(rng.normal(0.0, 1.0, n) + 0.7 * labels, 2).astype(dtype)
    assert len(np.unique(scores)) < n
    expected = roc_auc_score(labels, scores)
    assert 0.55 < expected < 0.95  # neither trivial nor degenerate
    assert rank_auroc(labels, scores) == pytest.approx(expected, abs=1e-12)
    # labels as {0, 255} masks and 2-D maps, as for pixels (both classes: see labels[:2])
    side = int(np.sqrt(n))
    masks = (labels[: side * side] * 255).astype(np.uint8).reshape(side, side)
    maps = scores[: side * side].reshape(side, side)
    expected = roc_auc_score(masks.ravel() > 0, maps.ravel())
    assert rank_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bits", [4, 20])
def test_binned_pair_count_equals_the_sorted_one(dtype, bits, chunk, monkeypatch) -> None:
    """The large-input path of rank_auroc counts exactly the pairs the sort does: ties, -0.0
    against 0.0, negative scores, subnormals and the dtype's extremes (few bits: most
    negatives share a bin with a positive; 20, the default: few do), per positive as well
    (grouped_auroc's count), whether the scores fit one of its chunks or span many (7: ties
    and bins split across chunks, chunks without a positive or without a negative)."""
    from anomaly_ae.evaluation import metrics
    from anomaly_ae.evaluation.metrics import _binned_counts, _binned_pairs, _sorted_counts, _sorted_pairs

    if chunk is not None:
        monkeypatch.setattr(metrics, "_BIN_CHUNK", chunk)

    rng = np.random.default_rng(bits)
    info = np.finfo(dtype)
    special = np.array(
        [
            0.0,
            -0.0,
            info.smallest_subnormal,
            -info.smallest_subnormal,
            info.tiny,
            -3.5,
            3.5,
            info.max,
            -info.max,
        ],
        dtype,
    )
    for _ in range(10):
        n = int(rng.integers(50, 5000))
        plain = np.round(rng.normal(0, 3, n), 1)
        scores = np.where(rng.random(n) < 0.3, rng.choice(special, n), plain).astype(dtype)
        labels = rng.random(n) < 0.2
        labels[:2] = [True, False]
        assert _binned_pairs(labels, scores, bits) == _sorted_pairs(labels, scores)
        per_positive = _binned_counts(labels, scores, bits), _sorted_counts(labels, scores)
        for binned, plain in zip(*per_positive, strict=True):
            np.testing.assert_array_equal(binned, plain)
    # only -0.0 and 0.0, one class each: every pair a tie
    assert _binned_pairs(np.array([True, False]), np.array([-0.0, 0.0], dtype), bits) == (0.0, 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binned_count_where_the_positives_span_nothing_or_everything(dtype) -> None:
    """The bins are spaced between the lowest and the highest positive: one positive, equal
    positives, positives at the dtype's extremes (a span that overflows float64 for float64
    scores) and subnormal spans (a scale beyond the dtype's range) still count exactly."""
    from anomaly_ae.evaluation.metrics import _binned_counts, _sorted_counts

    info = np.finfo(dtype)
    rng = np.random.default_rng(7)
    negatives = np.r_[rng.normal(0, 2, 300), 0.0, -0.0, info.max, -info.max, info.smallest_subnormal]
    cases = {
        "one positive": [1.5],
        "equal positives": [0.25, 0.25, 0.25],
        "the extremes": [-info.max, info.max, 0.0],
        "a subnormal span": [0.0, info.smallest_subnormal, 2 * info.smallest_subnormal],
        "minus zero and zero": [-0.0, 0.0],
    }
    for name, positives in cases.items():
        scores = np.r_[negatives, positives].astype(dtype)
        labels = np.r_[np.zeros(len(negatives), bool), np.ones(len(positives), bool)]
        order = rng.permutation(len(scores))
        for binned, plain in zip(
            _binned_counts(labels[order], scores[order]),
            _sorted_counts(labels[order], scores[order]),
            strict=True,
        ):
            np.testing.assert_array_equal(binned, plain, err_msg=name)


@pytest.mark.parametrize("binned", [True, False])
def test_rank_auroc_on_a_million_pixels_equals_sklearn(binned, monkeypatch) -> None:
    """From BINNED_FROM scores on, rank_auroc (and pixel_auroc through it) takes the binned
    count where that is faster on the machine: either way scikit-learn's AUROC."""
    from anomaly_ae.evaluation import metrics
    from anomaly_ae.evaluation.metrics import BINNED_FROM

    assert isinstance(metrics.binned_count_is_faster(), bool)  # the real probe runs
    monkeypatch.setattr(metrics, "binned_count_is_faster", lambda: binned)
    calls = []
    counted = metrics._binned_pairs if binned else metrics._sorted_pairs
    monkeypatch.setattr(metrics, counted.__name__, lambda *a: calls.append(1) or counted(*a))

    rng = np.random.default_rng(0)
    masks = rng.random((BINNED_FROM // 4096 + 1, 64, 64)) < 0.01
    maps = (rng.gamma(2.0, 1.0, masks.shape) + 1.5 * masks).astype(np.float32)
    maps[:, :8] = np.round(maps[:, :8], 1)  # ties as well
    assert masks.size >= BINNED_FROM
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert rank_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)  # the evaluation's pixel AUROC
    assert len(calls) == 2  # both took the path asked for


def test_rank_auroc_hand_cases_and_errors() -> None:
    assert rank_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert rank_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert rank_auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all ties count one half
    # positives {0.3, 0.5}, negatives {0.3, 0.1}: 0.5 beats both (2), 0.3 beats 0.1 and ties 0.3 (1.5)
    assert rank_auroc([1, 1, 0, 0], [0.3, 0.5, 0.3, 0.1]) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="only one class"):
        rank_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        rank_auroc(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same length"):
        rank_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        rank_auroc([0, 1], [0.1, np.nan])


def test_f1_max_perfect_and_threshold() -> None:
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.2, 0.7, 0.9]
    f1, thr = f1_max(labels, scores)
    assert f1 == 1.0
    assert thr == pytest.approx(0.7)  # sklearn: predicted anomalous iff score >= thr
    # hand case: t=0.9 -> F1 0; t=0.3 -> P=R=1/2, F1 0.5; t=0.2 -> P=2/3, R=1, F1 0.8 (best)
    f1, thr = f1_max([0, 1, 1], [0.9, 0.2, 0.3])
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.2)


def test_classification_report_at_hand_case() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.6, 0.3, 0.7, 0.5, 0.2]
    # threshold 0.4, strict '>': predicted anomalous = {0.6 (normal), 0.7, 0.5}
    rep = classification_report_at(labels, scores, 0.4)
    assert (rep["tp"], rep["fp"], rep["tn"], rep["fn"]) == (2.0, 1.0, 2.0, 1.0)
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["precision"] == pytest.approx(2 / 3)
    assert rep["recall"] == pytest.approx(2 / 3)
    assert rep["f1"] == pytest.approx(2 / 3)
    # score equal to threshold is NOT anomalous
    assert classification_report_at([1], [0.5], 0.5)["tp"] == 0.0
    # nothing predicted anomalous: zero division -> 0.0, no warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = classification_report_at(labels, scores, 10.0)
    assert rep["precision"] == 0.0 and rep["recall"] == 0.0 and rep["f1"] == 0.0
    assert rep["accuracy"] == pytest.approx(0.5)


def test_calibrate_threshold_rules() -> None:
    normal = np.arange(101, dtype=float)  # 0..100
    assert calibrate_threshold(normal, "quantile", quantile=0.99) == pytest.approx(99.0)
    assert calibrate_threshold(normal, "quantile", quantile=0.5) == pytest.approx(50.0)
    vals = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population std sqrt(1.25)
    assert calibrate_threshold(vals, "mean_std", k_sigma=2.0) == pytest.approx(2.5 + 2 * np.sqrt(1.25))
    with pytest.raises(ValueError, match="bogus"):
        calibrate_threshold(normal, "bogus")
    with pytest.raises(ValueError, match="empty"):
        calibrate_threshold(np.array([]), "quantile")


def test_summarise_ssim_population_std() -> None:
    mean, std = summarise_ssim([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(np.std([0.5, 0.7, 0.9]))  # ddof=0
    with pytest.raises(ValueError):
        summarise_ssim([])


# ----------------------------------------------------------------------------- pixel level


def test_pixel_auroc_hand_case() -> None:
    masks = np.zeros((2, 2, 2), dtype=np.uint8)
    masks[0, 0, 0] = 1
    masks[1, 1, 1] = 1
    maps = np.array(
        [
            [[0.9, 0.1], [0.2, 0.3]],
            [[0.4, 0.5], [0.6, 0.35]],
        ]
    )
    # positives {0.9, 0.35}; negatives {0.1, 0.2, 0.3, 0.4, 0.5, 0.6}
    # pairs won: 0.9 beats 6, 0.35 beats 3 (0.1, 0.2, 0.3) -> 9 / 12
    assert pixel_auroc(masks, maps) == pytest.approx(0.75)
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(np.zeros((1, 2, 2)), maps[:1])


def _random_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[0, 20:30, 20:22] = 1
    masks[1, 10:12, 10:12] = 1
    masks[2, 0:16, 0:16] = 1  # image 3 stays normal
    maps = 0.5 * masks + rng.random(masks.shape)
    maps = np.round(maps, 2)  # plenty of ties
    return masks, maps


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Direct definition: every distinct value is a threshold (pred = map >= t)."""
    labeled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, lab == k) for i, lab in enumerate(labeled) for k in range(1, lab.max() + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    grid_x = np.append(fprs[fprs <= fpr_limit], fpr_limit)
    grid_y = np.append(pros[fprs <= fpr_limit], np.interp(fpr_limit, fprs, pros))
    return float(np.trapezoid(grid_y, grid_x) / fpr_limit)


def test_aupro_perfect_is_one() -> None:
    masks, _ = _random_case()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # also with normal-pixel scores that vary but stay below every anomaly score
    rng = np.random.default_rng(1)
    maps = np.where(masks > 0, 2.0 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(masks, maps) == pytest.approx(1.0)


def test_aupro_constant_map_is_half_limit() -> None:
    # all pixels tie: a single threshold takes the curve from (0, 0) to (1, 1);
    # PRO(0.3) = 0.3 by interpolation, area = 0.5 * 0.3 * 0.3, / 0.3 -> 0.15
    masks, _ = _random_case()
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)
    assert aupro(masks, np.zeros(masks.shape), fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_inverted_is_zero() -> None:
    masks, _ = _random_case()
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_two_regions_hand_computed() -> None:
    # one 10x10 image: region A = 2x2 (4 px), region B = 4x4 (16 px), 80 normal px
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[0:2, 0:2] = 1  # A
    mask[5:9, 5:9] = 1  # B (not touching A, even diagonally)
    amap = np.zeros((10, 10))
    amap[0:2, 0:2] = 0.9  # A detected first
    amap[9, 0:8] = 0.8  # 8 normal px: FPR step of 8 / 80 = 0.1
    amap[5:9, 5:9] = 0.2  # B detected only at t <= 0.2
    # remaining 72 normal px have score 0.0
    # thresholds (pred = amap >= t):
    #   t=0.9: FPR 0.0, PRO = (1 + 0) / 2 = 0.5   (only A; pixel-wise overlap would be 4/20)
    #   t=0.8: FPR 0.1, PRO 0.5
    #   t=0.2: FPR 0.1, PRO 1.0
    #   t=0.0: FPR 1.0, PRO 1.0
    # curve (0,0) (0,.5) (.1,.5) (.1,1) (1,1); area on [0, 0.3]:
    #   [0, 0.1]: 0.5 * 0.1 = 0.05 ; [0.1, 0.3]: 1.0 * 0.2 = 0.2  -> 0.25 / 0.3 = 5/6
    fpr, pro = pro_curve(mask[None], amap[None])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.1, 0.1, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0, 1.0])
    assert aupro(mask[None], amap[None]) == pytest.approx(5 / 6)
    # limit falling inside the first flat segment: [0, 0.05] at PRO 0.5 -> 0.025 / 0.05 = 0.5
    assert aupro(mask[None], amap[None], fpr_limit=0.05) == pytest.approx(0.5)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(fpr_limit: float) -> None:
    masks, maps = _random_case()
    assert aupro(masks, maps, fpr_limit) == pytest.approx(
        _brute_force_aupro(masks, maps, fpr_limit), abs=1e-9
    )


def test_aupro_eight_connectivity() -> None:
    # diagonal pixels (1,1),(2,2) form ONE region under 8-connectivity; (4,4) is a second one
    mask = np.zeros((1, 5, 5), dtype=np.uint8)
    mask[0, 1, 1] = mask[0, 2, 2] = mask[0, 4, 4] = 1
    amap = np.zeros((1, 5, 5))
    amap[0, 1, 1] = 1.0  # top threshold detects half of the diagonal region, nothing else
    _, pro = pro_curve(mask, amap)
    # 8-connectivity: (1/2 + 0) / 2 = 0.25; 4-connectivity would give (1 + 0 + 0) / 3
    np.testing.assert_allclose(pro[1], 0.25)


def test_aupro_errors_and_memory_dtype() -> None:
    with pytest.raises(ValueError, match="no anomalous regions"):
        aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.ones((1, 2, 2)), np.ones((1, 3, 3)))
    # (N, 1, H, W) input accepted
    masks, maps = _random_case()
    assert aupro(masks[:, None], maps[:, None]) == pytest.approx(aupro(masks, maps))


# --------------------------------------------------------------------------- AUROC interval
def _delong_by_pairs(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong's variance from its definition, pair by pair (O(m n))."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    return auc, psi.mean(1).var(ddof=1) / len(pos) + psi.mean(0).var(ddof=1) / len(neg)


def test_auroc_interval_is_delong_on_the_logit_scale() -> None:
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(23), np.ones(41)].astype(int)
    scores = np.round(np.r_[rng.normal(0, 1, 23), rng.normal(1, 1, 41)], 1)  # ties included
    auc, var = _delong_by_pairs(labels, scores)
    low, high = auroc_interval(labels, scores, level=0.95)
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert (logit(low) + logit(high)) / 2 == pytest.approx(logit(auc))
    half = 1.959964 * np.sqrt(var) / (auc * (1 - auc))  # the delta method on the logit scale
    assert (logit(high) - logit(low)) / 2 == pytest.approx(half, rel=1e-5)
    narrow = auroc_interval(labels, scores, level=0.5)
    assert low < narrow[0] < auc < narrow[1] < high


@pytest.mark.parametrize(
    ("shift", "truth"),
    [(1.2, 0.8019), (3.3, 0.9902)],  # Phi(shift / sqrt 2)
)
def test_auroc_interval_covers_the_true_auroc_at_its_level(shift: float, truth: float) -> None:
    """Normal scores N(0, 1), anomalous N(shift, 1), 20 + 20 images as bottle's smallest
    comparisons. Near 1 a plain DeLong +/- interval covers only ~86 %."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(20), np.ones(20)]
    hits = []
    for _ in range(400):
        low, high = auroc_interval(labels, np.r_[rng.normal(0, 1, 20), rng.normal(shift, 1, 20)])
        hits.append(low <= truth <= high)
    assert 0.93 <= np.mean(hits) <= 0.99


def test_auroc_interval_keeps_a_width_without_spread() -> None:
    """All pairs ordered (or all tied): the score interval of Hanley-McNeil's variance."""
    labels = np.r_[np.zeros(20), np.ones(20)]
    low, high = auroc_interval(labels, labels)
    assert high == 1.0 and 0.89 < low < 0.91
    assert auroc_interval(labels, 1 - labels) == pytest.approx((1 - high, 1 - low))
    tied = auroc_interval(labels, np.ones(40))
    assert tied[0] < 0.5 < tied[1] and tied[0] + tied[1] == pytest.approx(1.0)
    more = auroc_interval(np.r_[np.zeros(20), np.ones(63)], np.r_[np.zeros(20), np.ones(63)])
    assert low < more[0] < 1.0  # more images, a tighter bound


def test_auroc_interval_edges() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    low, high = auroc_interval(labels, [0.1, 0.9, 0.3, 0.8, 0.2])
    assert 0.0 < low < high < 1.0
    assert all(np.isnan(auroc_interval([0, 0, 1], [0.1, 0.2, 0.3])))  # one anomalous image
    with pytest.raises(ValueError, match="confidence_level"):
        auroc_interval(labels, [0.1, 0.2, 0.3, 0.8, 0.9], level=1.0)
    with pytest.raises(ValueError, match="finite"):
        auroc_interval(labels, [0.1, np.nan, 0.3, 0.8, 0.9])


@pytest.mark.parametrize("n, binned", [(3000, False), (1 << 20, False), (1 << 20, True)])
def test_grouped_auroc_is_each_groups_auroc_against_the_negatives(n, binned, monkeypatch) -> None:
    """One count gives the AUROC of all positives and of each group's alone against the
    same negatives (both counting paths: the binned one from BINNED_FROM scores on)."""
    from anomaly_ae.evaluation import metrics
    from anomaly_ae.evaluation.metrics import grouped_auroc

    monkeypatch.setattr(metrics, "binned_count_is_faster", lambda: binned)
    rng = np.random.default_rng(n)
    groups = np.where(rng.random(n) < 0.05, rng.integers(1, 4, n), 0)
    scores = (rng.normal(0, 1, n) + 0.4 * groups).astype(np.float32)  # group 3 easiest
    scores[:50] = np.round(scores[:50], 1)  # ties
    overall, by_group = grouped_auroc(groups, scores)
    assert overall == pytest.approx(roc_auc_score(groups != 0, scores), abs=1e-12)
    assert set(by_group) == {1, 2, 3}
    for g, value in by_group.items():
        keep = (groups == 0) | (groups == g)
        assert value == pytest.approx(roc_auc_score(groups[keep] == g, scores[keep]), abs=1e-12)
    assert by_group[1] < by_group[2] < by_group[3]
