"""Where does the image score come from? Scoring defective images near / away from their defect."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_ae.evaluation.summary import defect_region_metrics, hardest_cases, near_defect, per_defect_type

H = W = 48


def _set(rng: np.random.Generator, leak: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20 good and 20 defective maps of noise; each defect lights up a 4x4 square, and the
    defective images' whole map is raised by ``leak`` (another batch, other lighting)."""
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    maps = rng.normal(0, 1, (40, H, W)).astype(np.float32)
    masks = np.zeros((40, H, W), np.uint8)
    for i in range(20, 40):
        y, x = rng.integers(4, H - 8, 2)
        masks[i, y : y + 4, x : x + 4] = 1
        maps[i, y : y + 4, x : x + 4] += 6.0
        maps[i] += leak
    return labels, maps, masks


def test_near_defect_grows_the_mask_by_the_margin():
    masks = np.zeros((1, 9, 9), np.uint8)
    masks[0, 4, 4] = 1
    assert near_defect(masks, 0).sum() == 1
    grown = near_defect(masks, 2)
    assert grown.sum() == 25 and grown[0, 2:7, 2:7].all()
    with pytest.raises(ValueError, match="defect_margin"):
        near_defect(masks, -1)


def test_a_clean_label_is_found_at_the_defect_and_not_away_from_it():
    labels, maps, masks = _set(np.random.default_rng(0), leak=0.0)
    result = defect_region_metrics(labels, maps, masks, margin=4)
    assert result["image_auroc_at_defect"] == 1.0
    assert result["image_auroc_off_defect"] < 0.7  # chance or below: nothing there


def test_a_leaking_label_is_caught_away_from_the_defect():
    labels, maps, masks = _set(np.random.default_rng(0), leak=1.0)
    result = defect_region_metrics(labels, maps, masks, margin=4)
    assert result["image_auroc_off_defect"] > 0.95  # the rest of the image gives it away
    assert result["image_auroc_at_defect"] == 1.0
    # with mean scores the leak is all there is away from the defect
    assert defect_region_metrics(labels, maps, masks, 4, reduction="mean")["image_auroc_off_defect"] == 1.0


def test_images_without_masks_are_left_out_and_nan_when_none_is_left():
    labels, maps, masks = _set(np.random.default_rng(1), leak=0.0)
    known = np.ones(40, bool)
    known[20:30] = False
    partial = defect_region_metrics(labels, maps, masks, 4, has_mask=known)
    assert partial["image_auroc_at_defect"] == 1.0
    none = defect_region_metrics(labels, maps, masks, 4, has_mask=labels == 0)
    assert np.isnan(none["image_auroc_at_defect"]) and np.isnan(none["image_auroc_off_defect"])
    # a margin that covers every image leaves nothing away from the defect
    covered = defect_region_metrics(labels, maps, masks, margin=H)
    assert covered["image_auroc_at_defect"] == 1.0 and np.isnan(covered["image_auroc_off_defect"])


def test_the_unscored_part_looks_like_the_normal_mean_map():
    """Mean scores stay fair: a defect image is not scored on its small region alone (that
    would inflate its mean) but on its map with the rest replaced by the typical normal map."""
    labels, maps, masks = _set(np.random.default_rng(3), leak=0.0)
    maps = maps + 5.0  # an uncorrected map: normal images light up at 5 everywhere
    fair = defect_region_metrics(labels, maps, masks, 0, reduction="mean", typical=np.full((H, W), 5.0))
    unfair = defect_region_metrics(labels, maps, masks, 0, reduction="mean", typical=0.0)
    assert fair["image_auroc_off_defect"] < 0.75  # no leak here
    assert unfair["image_auroc_off_defect"] < 0.1 and unfair["image_auroc_at_defect"] < 0.1  # all "normal"


def test_per_defect_type_reports_both_per_type():
    labels, maps, masks = _set(np.random.default_rng(2), leak=0.0)
    types = np.array(["good"] * 20 + ["scratch"] * 10 + ["dent"] * 10)
    maps[30:] += 1.0  # dents come from another batch
    table = per_defect_type(types, labels, maps.reshape(40, -1).max(1), masks, maps, threshold=3.0, margin=4)
    rows = table.set_index("defect_type")
    assert rows.loc["dent", "image_auroc_off_defect"] > 0.9 > rows.loc["scratch", "image_auroc_off_defect"]
    assert (rows["image_auroc_at_defect"] == 1.0).all()


def test_the_report_section_shows_both_and_warns_when_the_label_leaks():
    from anomaly_ae.pipelines.evaluate.reporting_nodes import LEAK_WARNING, defect_region_section

    clean = defect_region_section(
        {"image_auroc": 0.99, "image_auroc_at_defect": 0.98, "image_auroc_off_defect": 0.52}, 16
    )
    assert "0.9800" in clean and "0.5200" in clean and "16 px" in clean and "leaks" not in clean
    leaky = defect_region_section(
        {"image_auroc": 0.97, "image_auroc_at_defect": 0.87, "image_auroc_off_defect": LEAK_WARNING + 0.2}, 16
    )
    assert "the label leaks" in leaky
    assert "Not computed" in defect_region_section({"image_auroc": 0.9}, 16)


def test_hardest_cases_are_the_top_scoring_good_and_bottom_scoring_defective_images():
    labels = np.array([0, 1, 0, 1, 0, 1, 0])
    scores = np.array([0.2, 0.9, 0.8, 0.1, 0.5, 0.3, 0.8])
    good, bad = hardest_cases(labels, scores, 2)
    assert good.tolist() == [2, 6]  # 0.8 and 0.8 (tie: image order), not 0.5 or 0.2
    assert bad.tolist() == [3, 5]  # 0.1, then 0.3; never the found 0.9
    good, bad = hardest_cases(labels, scores, 10)  # fewer images than asked: all of them
    assert good.tolist() == [2, 6, 4, 0] and bad.tolist() == [3, 5, 1]
    assert [len(x) for x in hardest_cases(labels, scores, 0)] == [0, 0]
    with pytest.raises(ValueError, match="hardest_cases"):
        hardest_cases(labels, scores, -1)


def test_the_hardest_cases_figure_marks_the_map_peak_inside_the_image():
    from anomaly_ae.reporting.figures import figure_to_image, hardest_cases_figure, peak_window

    assert peak_window((64, 96), (2, 90), 12) == (slice(0, 24), slice(72, 96))  # moved inside
    assert peak_window((10, 96), (5, 40), 12) == (slice(0, 10), slice(28, 52))  # no taller than the image
    image, amap = np.zeros((40, 60)), np.zeros((40, 60))
    amap[30, 55] = 5.0
    mask = np.zeros((40, 60), np.uint8)
    mask[28:33, 52:58] = 1
    rows = [
        {"image": image, "map": amap, "mask": mask, "label": "contamination: missed"},
        {"image": image, "map": amap, "mask": None, "label": "good: flagged"},
    ]
    fig = hardest_cases_figure(rows, vmax=4.0)
    marker = fig.axes[0].lines[0].get_data()
    assert (marker[0][0], marker[1][0]) == (55, 30)  # the peak, in (x, y)
    assert len(fig.axes[0].collections) == 1 and not fig.axes[4].collections  # mask outlined only where known
    assert figure_to_image(fig).size[0] > 500
    assert figure_to_image(hardest_cases_figure([], vmax=1.0)).size[0] > 0
