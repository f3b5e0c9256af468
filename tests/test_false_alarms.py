"""The false-alarm rate a threshold set on a few normal validation images can promise
(``anomaly_ae.evaluation.false_alarms``), its check on good test images, and where a user
sees both (the threshold node, the metrics, the report)."""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import pytest

from anomaly_ae.evaluation.false_alarms import (
    FalseAlarmOutlook,
    excess_false_alarm_p,
    expected_false_alarm_rate,
    false_alarm_outlook,
    validation_images_needed,
)
from anomaly_ae.evaluation.metrics import calibrate_threshold


def test_the_default_quantile_on_21_images_promises_4_5_to_9_1_percent_not_1():
    scores = np.arange(1.0, 22.0)  # 21 validation images, as bottle's
    threshold = calibrate_threshold(scores, rule="quantile", quantile=0.99)
    outlook = false_alarm_outlook(scores, threshold)
    assert outlook.above == 1
    assert (outlook.expected_low, outlook.expected_high) == pytest.approx((1 / 22, 2 / 22))
    assert expected_false_alarm_rate(scores, threshold) == pytest.approx((1 / 22, 2 / 22))
    # 21 images pin this threshold's own rate only loosely
    assert outlook.range_low < 0.01 and outlook.range_high > 0.2
    assert validation_images_needed(0.01) == 99
    assert validation_images_needed(0.05) == 19
    assert "4.5–9.1 %" in outlook.describe()
    assert FalseAlarmOutlook.from_dict(outlook.to_dict()) == outlook


def test_a_threshold_above_99_images_promises_one_percent():
    scores = np.linspace(0, 1, validation_images_needed(0.01))
    outlook = false_alarm_outlook(scores, 2.0)
    assert outlook.above == 0 and outlook.expected_low == 0 and outlook.range_low == 0
    assert outlook.expected_high == pytest.approx(0.01)
    below_all = false_alarm_outlook(scores, -1.0)
    assert below_all.above == 99 and below_all.range_high == 1.0
    assert excess_false_alarm_p(below_all, 5, 5) == 1.0


@pytest.mark.parametrize("rule", ["quantile", "mean_std"])
def test_the_promise_holds_for_new_normal_images_like_the_validation_ones(rule):
    """Simulated: normal scores from a skewed distribution whose exceedance is known. Over many
    validation sets of 21, the average false-alarm rate of the threshold lies in the expected
    range, and the 90 % range holds this threshold's own rate at least 90 % of the time."""
    rng = np.random.default_rng(0)
    rates, inside, lows, highs = [], 0, [], []
    trials = 3000
    for _ in range(trials):
        scores = rng.exponential(size=21)
        threshold = calibrate_threshold(scores, rule=rule, quantile=0.99, k_sigma=2.0)
        rate = math.exp(-threshold)  # P(new exponential score > threshold)
        outlook = false_alarm_outlook(scores, threshold)
        rates.append(rate)
        lows.append(outlook.expected_low)
        highs.append(outlook.expected_high)
        inside += outlook.range_low <= rate <= outlook.range_high
    assert np.mean(lows) - 0.005 <= np.mean(rates) <= np.mean(highs) + 0.005
    assert inside / trials >= 0.88


def test_the_check_on_good_images_is_calibrated_and_finds_a_shift():
    """Good test images like the validation images: p < 0.05 at most about 5 % of the time.
    Good test images whose scores are shifted up: p < 0.05 most of the time."""
    rng = np.random.default_rng(1)
    trials = 2000
    false_warnings = found = 0
    for _ in range(trials):
        validation = rng.normal(size=21)
        threshold = calibrate_threshold(validation, quantile=0.99)
        outlook = false_alarm_outlook(validation, threshold)
        like = rng.normal(size=20)
        shifted = rng.normal(loc=1.5, size=20)
        false_warnings += excess_false_alarm_p(outlook, int(np.sum(like > threshold)), 20) < 0.05
        found += excess_false_alarm_p(outlook, int(np.sum(shifted > threshold)), 20) < 0.05
    assert false_warnings / trials <= 0.06
    assert found / trials >= 0.6


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="no validation scores"):
        false_alarm_outlook([], 1.0)
    with pytest.raises(ValueError, match="finite"):
        expected_false_alarm_rate([1.0, float("nan")], 1.0)
    with pytest.raises(ValueError, match="coverage"):
        false_alarm_outlook([1.0, 2.0], 1.5, coverage=1.0)
    with pytest.raises(ValueError, match="n_flagged"):
        excess_false_alarm_p(false_alarm_outlook([1.0, 2.0], 1.5), 3, 2)
    with pytest.raises(ValueError, match="rate"):
        validation_images_needed(0)
    assert math.isnan(excess_false_alarm_p(false_alarm_outlook([1.0, 2.0], 1.5), 0, 0))


def test_the_threshold_node_ships_the_outlook_and_warns_when_too_few_images(caplog, monkeypatch):
    from anomaly_ae.pipelines.evaluate import nodes
    from anomaly_ae.pipelines.evaluate.nodes import calibrate_threshold_node

    monkeypatch.setattr(nodes, "checkpoint_fingerprint", lambda checkpoint: "0" * 16)
    checkpoint = {"epoch": 3}
    evaluation = {"threshold": {"rule": "quantile", "quantile": 0.99, "k_sigma": 3.0}}
    with caplog.at_level(logging.WARNING):
        threshold = calibrate_threshold_node({"score": np.arange(21.0)}, checkpoint, {}, evaluation)
    outlook = FalseAlarmOutlook.from_dict(threshold["false_alarm_outlook"])
    assert outlook.n_validation == 21 and outlook.above == 1
    assert "needs 99" in caplog.text and "preprocessing.validation_fraction" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calibrate_threshold_node({"score": np.arange(120.0)}, checkpoint, {}, evaluation)
    assert "cannot promise" not in caplog.text


def _metrics(flagged: int, good: int = 20, n_validation: int = 21) -> dict:
    from anomaly_ae.pipelines.evaluate.nodes import _false_alarm_check

    validation = np.arange(float(n_validation))
    value = calibrate_threshold(validation, quantile=0.99)
    rule = {"rule": "quantile", "quantile": 0.99, "n_validation_images": n_validation}
    rule["false_alarm_outlook"] = false_alarm_outlook(validation, value).to_dict()
    metrics = _false_alarm_check({"value": value, **rule}, flagged, good)
    return {
        **metrics,
        "threshold": value,
        "threshold_rule": rule,
        "n_normal": good,
        "fp_at_threshold": float(flagged),
        "false_alarm_rate_at_threshold": flagged / good,
    }


def test_the_report_says_what_rate_to_expect_and_warns_when_good_images_break_it():
    from anomaly_ae.pipelines.evaluate.reporting_nodes import false_alarm_section

    kept = _metrics(flagged=1)
    assert kept["false_alarm_excess_p"] > 0.5
    text = false_alarm_section(kept)
    assert "4.5–9.1 %" in text and "at least 99" in text and "1 of 20" in text
    assert "Warning" not in text
    broken = _metrics(flagged=8)
    assert broken["false_alarm_excess_p"] < 0.01
    assert "Warning — the good test images are flagged more often" in false_alarm_section(broken)
    # a threshold saved before the outlook: said, not guessed
    assert "Not computed" in false_alarm_section({"threshold": 1.0, "threshold_rule": {"rule": "quantile"}})
    from anomaly_ae.pipelines.evaluate.nodes import _false_alarm_check

    assert all(math.isnan(v) for v in _false_alarm_check({"value": 1.0}, 0, 3).values())


def test_the_false_alarm_rate_rule_keeps_its_promise():
    """``rule: false_alarm_rate``: the lowest validation score that promises the rate asked
    for; over many validation sets the true rate averages at most that (simulated), where the
    0.99-quantile-like rules on the same images do not."""
    scores = np.arange(1.0, 22.0)
    by_rate = functools.partial(calibrate_threshold, rule="false_alarm_rate")
    assert by_rate(scores, false_alarm_rate=0.01) == 21.0  # too few images: the highest score
    assert by_rate(scores, false_alarm_rate=0.1) == 20.0  # k = ceil(22 * 0.9) = 20
    assert false_alarm_outlook(scores, 20.0).expected_high <= 0.1
    rng = np.random.default_rng(2)
    rates, quantile_rates = [], []
    for _ in range(3000):
        normal = rng.exponential(size=50)
        rates.append(math.exp(-by_rate(normal, false_alarm_rate=0.1)))
        quantile_rates.append(math.exp(-calibrate_threshold(normal, rule="quantile", quantile=0.9)))
    assert 0.09 <= np.mean(rates) <= 0.1 + 0.005  # kept, and no more cautious than 50 images need
    assert np.mean(quantile_rates) > 0.105  # the 0.9 quantile of 50 images: 9.8-11.8 %
    with pytest.raises(ValueError, match="false_alarm_rate must be in"):
        calibrate_threshold(scores, rule="false_alarm_rate", false_alarm_rate=1.0)


def test_each_threshold_rule_reads_its_own_setting_and_names_a_missing_one():
    from anomaly_ae.evaluation.false_alarms import asked_false_alarm_rate
    from anomaly_ae.evaluation.metrics import threshold_options

    assert threshold_options({"rule": "quantile", "quantile": 0.9, "k_sigma": 3}) == {
        "rule": "quantile",
        "quantile": 0.9,
    }
    assert threshold_options({"rule": "quantile", "quantile": 0.9}) == {"rule": "quantile", "quantile": 0.9}
    with pytest.raises(ValueError, match="evaluation.threshold.false_alarm_rate"):
        threshold_options({"rule": "false_alarm_rate", "quantile": 0.99})
    assert asked_false_alarm_rate({"rule": "quantile", "quantile": 0.99}) == pytest.approx(0.01)
    assert asked_false_alarm_rate({"rule": "false_alarm_rate", "false_alarm_rate": 0.05}) == 0.05
    assert asked_false_alarm_rate({"rule": "mean_std", "k_sigma": 3}) is None


def test_the_node_calibrates_by_the_rate_rule_and_says_when_it_cannot_promise_it(caplog, monkeypatch):
    from anomaly_ae.pipelines.evaluate import nodes
    from anomaly_ae.pipelines.evaluate.reporting_nodes import threshold_rule_text

    monkeypatch.setattr(nodes, "checkpoint_fingerprint", lambda checkpoint: "0" * 16)
    rule = {"rule": "false_alarm_rate", "quantile": 0.99, "k_sigma": 3.0, "false_alarm_rate": 0.01}
    with caplog.at_level(logging.WARNING):
        threshold = nodes.calibrate_threshold_node(
            {"score": np.arange(21.0)}, {"epoch": 1}, {}, {"threshold": rule}
        )
    assert threshold["value"] == 20.0 and threshold["false_alarm_rate"] == 0.01
    assert "false-alarm rate of 1 %" in caplog.text and "needs 99" in caplog.text
    assert "lowest promising a 0.01 false-alarm rate" in threshold_rule_text(threshold)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        threshold = nodes.calibrate_threshold_node(
            {"score": np.arange(200.0)}, {"epoch": 1}, {}, {"threshold": rule}
        )
    assert threshold["value"] == 198.0  # k = ceil(201 * 0.99) = 199: the 199th smallest of 0..199
    assert threshold["false_alarm_outlook"]["expected_high"] <= 0.01
    assert "cannot promise" not in caplog.text
