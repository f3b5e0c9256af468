"""The false-alarm rate a threshold set on a few normal images can promise.

A threshold calibrated on ``n`` normal validation images (any rule) is exceeded by ``m`` of
them. If a new normal image is *like* them (exchangeable: the same product, camera and
lighting, in random order), the rank of its score among the ``n + 1`` scores is uniform, so
it exceeds the threshold with probability between ``m / (n + 1)`` and ``(m + 1) / (n + 1)``
— whatever the scores' distribution. With 21 validation images the 0.99 quantile is exceeded
by one of them, so a normal image is flagged at 4.5–9.1 %, not 1 %: a rate of 1 % needs at
least 99 validation images.

That is an average over validation sets. The threshold this run actually set has its own
false-alarm rate ``F``, and ``F`` is random with the validation set: at most the rate of the
validation score just below the threshold, which is ``Beta(m + 1, n - m)`` distributed, and at
least that of the one just above it, ``Beta(m, n - m + 1)``. :func:`false_alarm_outlook` gives
both, and the central ``coverage`` range they bound.

Good test images check the promise: under exchangeability the number of them flagged is at
most ``BetaBinomial(g, m + 1, n - m)``; :func:`excess_false_alarm_p` is the chance of flagging
at least as many as were flagged. A small value says the good test images are not like the
validation images (another batch, lighting, camera, unlabelled defects), and the threshold's
promise does not carry over to them.

Nothing here knows Kedro or torch; :func:`expected_false_alarm_rate` is numpy only (the
inspection runtime uses it), the rest imports scipy when called.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class FalseAlarmOutlook:
    """What a threshold's ``n`` normal validation images promise about its false alarms."""

    n_validation: int
    #: validation scores strictly above the threshold
    above: int
    #: a new normal image like the validation images is flagged with probability in
    #: [expected_low, expected_high] (averaged over validation sets)
    expected_low: float
    expected_high: float
    #: this threshold's own false-alarm rate lies in [range_low, range_high] with
    #: probability at least ``coverage``
    range_low: float
    range_high: float
    coverage: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FalseAlarmOutlook:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def describe(self) -> str:
        """E.g. "4.5-9.1 % (this threshold: 0.2-21 % with 90 % probability)"."""
        return (
            f"{_percent(self.expected_low)}–{_percent(self.expected_high)} % "
            f"(this threshold's own rate: {_percent(self.range_low)}–{_percent(self.range_high)} % "
            f"with {100 * self.coverage:g} % probability)"
        )


def _percent(rate: float) -> str:
    value = 100 * rate
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def _finite_scores(validation_scores: ArrayLike) -> np.ndarray:
    scores = np.asarray(validation_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no validation scores: a threshold set on none promises nothing")
    if not np.all(np.isfinite(scores)):
        raise ValueError("validation scores must be finite (found NaN or inf)")
    return scores


def expected_false_alarm_rate(validation_scores: ArrayLike, threshold: float) -> tuple[float, float]:
    """``(m / (n + 1), (m + 1) / (n + 1))``: a new normal image like the ``n`` validation
    images, ``m`` of which score above ``threshold``, is flagged with a probability in this
    range (averaged over validation sets; any scores' distribution)."""
    scores = _finite_scores(validation_scores)
    n, m = scores.size, int(np.sum(scores > threshold))
    return m / (n + 1), (m + 1) / (n + 1)


def false_alarm_outlook(
    validation_scores: ArrayLike, threshold: float, coverage: float = 0.9
) -> FalseAlarmOutlook:
    """The false-alarm rate a ``threshold`` set on ``validation_scores`` (NORMAL images) can
    promise for new normal images like them (see the module docstring).

    Raises:
        ValueError: no scores, a non-finite one, or ``coverage`` outside (0, 1).
    """
    from scipy.stats import beta

    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
    scores = _finite_scores(validation_scores)
    n = int(scores.size)
    m = int(np.sum(scores > threshold))
    low_mean, high_mean = expected_false_alarm_rate(scores, threshold)
    tail = (1 - coverage) / 2
    # F(t) <= F(s_(n-m)) ~ Beta(m + 1, n - m) (for m = n: the lowest score, or none below: 1)
    high = float(beta.ppf(1 - tail, m + 1, n - m)) if m < n else 1.0
    # F(t) >= F(s_(n-m+1)) ~ Beta(m, n - m + 1) (for m = 0: the highest score is not above t)
    low = float(beta.ppf(tail, m, n - m + 1)) if m > 0 else 0.0
    return FalseAlarmOutlook(
        n_validation=n,
        above=m,
        expected_low=low_mean,
        expected_high=high_mean,
        range_low=low,
        range_high=high,
        coverage=float(coverage),
    )


def excess_false_alarm_p(outlook: FalseAlarmOutlook, n_flagged: int, n_good: int) -> float:
    """The chance that ``n_good`` new normal images like the validation images have at least
    ``n_flagged`` false alarms at the threshold of ``outlook`` (an upper bound, whatever the
    scores' distribution). NaN without good images."""
    from scipy.stats import betabinom

    if n_good <= 0:
        return math.nan
    if not 0 <= n_flagged <= n_good:
        raise ValueError(f"n_flagged must be in [0, {n_good}], got {n_flagged!r}")
    if n_flagged == 0:
        return 1.0
    n, m = outlook.n_validation, outlook.above
    if m >= n:  # every validation image is above the threshold: any number of alarms is possible
        return 1.0
    return float(betabinom(n_good, m + 1, n - m).sf(n_flagged - 1))


def validation_images_needed(rate: float) -> int:
    """The fewest normal validation images for which a threshold can promise ``rate`` (a
    threshold above all of them: ``1 / (n + 1) <= rate``)."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    return max(1, math.ceil(1 / rate - 1 - 1e-9))


def asked_false_alarm_rate(rule: dict) -> float | None:
    """The false-alarm rate a threshold rule asks for (``1 - quantile``, ``false_alarm_rate``);
    None for ``mean_std``, which asks for none."""
    if rule.get("rule") == "quantile" and float(rule.get("quantile", 1)) < 1:
        return 1 - float(rule["quantile"])
    if rule.get("rule") == "false_alarm_rate":
        return float(rule["false_alarm_rate"])
    return None
