"""The held-out stress table: per synthetic kind, and per band of measured contrast."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly_ae.evaluation.stress import (
    CONTRAST_BANDS,
    CONTRAST_KINDS,
    PLACE_BANDS,
    PLACE_KINDS,
    SIZE_BANDS,
    SIZE_KINDS,
    measured_contrast,
    normal_spread_percentile,
    per_kind_rows,
    stress_table,
)
from anomaly_ae.pipelines.evaluate.reporting_nodes import stress_section
from anomaly_ae.scoring import MapSettings


def test_measured_contrast_is_the_mean_change_inside_the_mask_against_its_own_normal():
    normal = np.stack([np.full((1, 8, 8), v, np.float32) for v in (0.2, 0.6)])
    defective = np.repeat(normal, 3, axis=0)  # per_image 3: copies 0-2 from image 0, 3-5 from image 1
    masks = np.zeros((6, 8, 8), np.uint8)
    for i, change in enumerate((0.05, 0.15, 0.3, -0.05, -0.15, -0.3)):
        masks[i, 2:4, 2:4] = 1
        defective[i, 0, 2:4, 2:4] += change
        defective[i, 0, 0, 0] += 0.9  # outside the mask: not counted
    np.testing.assert_allclose(
        measured_contrast(normal, defective, masks, 3), [0.05, 0.15, 0.3] * 2, atol=1e-6
    )


class _Blur(torch.nn.Module):
    """A stand-in 'reconstruction': the image blurred, so a defect's error grows with its contrast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def test_stress_rows_per_kind_and_per_contrast_band_and_the_report_section():
    rng = np.random.default_rng(0)
    normal = (0.5 + 0.02 * rng.standard_normal((12, 1, 48, 48))).astype(np.float32).clip(0, 1)
    table = stress_table(
        _Blur(),
        normal,
        {"in use": (MapSettings(smoothing_sigma=2.0), None), "paper": (MapSettings(), None)},
        {
            "per_image": 6,
            "seed": 3,
            "min_contrast": 0.05,
            "max_tries": 20,
            "kinds": ["spot", "thin_line", "blob"],
            "contrast": (0.05, 0.5),
        },
        batch_size=16,
    )
    overall = table[(table["contrast"] == "all") & (table["size"] == "all") & (table["place"] == "all")]
    pd.testing.assert_frame_equal(per_kind_rows(table), overall)
    assert sorted(set(overall["kind"])) == ["all", "blob", "spot", "thin_line"]
    split = (table[["contrast", "size", "place"]] != "all").sum(axis=1)
    assert split.max() == 1  # one split per row
    assert set(table.loc[table["contrast"] != "all", "kind"]) <= set(CONTRAST_KINDS) - {"smudge"}
    assert set(table.loc[table["size"] != "all", "kind"]) == {"spot", "thin_line"} <= set(SIZE_KINDS)
    assert set(table.loc[table["place"] != "all", "kind"]) == {"spot", "thin_line"} <= set(PLACE_KINDS)
    for column, median, bands in (
        ("contrast", "median_contrast", CONTRAST_BANDS),
        ("size", "median_area", SIZE_BANDS),
        ("place", "median_place", PLACE_BANDS),
    ):
        labels = {label: (low, high) for label, low, high in bands}
        for (name, kind), rows in table[table[column] != "all"].groupby(["map", "kind"]):
            whole = overall[(overall["map"] == name) & (overall["kind"] == kind)]
            assert rows["n_defective"].sum() == int(whole["n_defective"].iloc[0])  # the bands split the kind
            for row in rows.itertuples():
                low, high = labels[getattr(row, column)]
                assert low <= getattr(row, median) < high
    # a spot is a disc of radius 1.5-6 px: its area spans the small bands, a 1-3 px wide
    # curved line is longer
    sizes = table[(table["size"] != "all") & (table["map"] == "paper")]
    assert "< 25 px" in set(sizes.loc[sizes["kind"] == "spot", "size"])
    assert overall.loc[overall["kind"] == "spot", "median_area"].iloc[0] < 114  # pi * 6^2
    assert table["image_auroc"].between(0, 1).all() and (table["n_normal"] == 12).all()
    # every AUROC comes with its interval around it; fewer defective copies, a wider interval
    # (a band of one defective copy has none)
    assert (table["image_auroc_ci_low"].isna() == (table["n_defective"] < 2)).all()
    bounded = table.dropna(subset=["image_auroc_ci_low"])
    assert (bounded["image_auroc_ci_low"] <= bounded["image_auroc"]).all()
    assert (bounded["image_auroc"] <= bounded["image_auroc_ci_high"]).all()
    paper = overall[overall["map"] == "paper"].set_index("kind")
    width = paper["image_auroc_ci_high"] - paper["image_auroc_ci_low"]
    assert paper.loc["all", "n_defective"] == 3 * paper.loc["spot", "n_defective"]
    assert width["all"] < width["spot"]
    # the strongest band of spots is found at least as well as the faintest one
    spots = table[(table["map"] == "in use") & (table["kind"] == "spot") & (table["contrast"] != "all")]
    assert spots["image_auroc"].iloc[-1] >= spots["image_auroc"].iloc[0]

    page = stress_section(table)
    assert page.count("<table") == 4 and "how faint a defect of each kind can be" in page
    assert "split by where each copy lies" in page and "steadiest half" in page
    assert "how small a defect of each kind can be" in page and "&lt; 25 px" in page
    spot = overall[(overall["map"] == "in use") & (overall["kind"] == "spot")].iloc[0]
    assert f"{spot.image_auroc_ci_low:.3f}–{spot.image_auroc_ci_high:.3f}" in page
    assert "&lt; 0.10" in page or "&gt;= 0.20" in page
    # a table written before the bands existed still renders (one table), one written
    # before the size bands (two), one written before the place bands (three)
    bands = ["contrast", "median_contrast", "size", "median_area", "place", "median_place"]
    old = overall.drop(columns=bands)
    assert stress_section(pd.DataFrame(old)).count("<table") == 1
    before_places = table[table["place"] == "all"].drop(columns=["place", "median_place"])
    assert stress_section(before_places).count("<table") == 3
    before_sizes = before_places[before_places["size"] == "all"].drop(columns=["size", "median_area"])
    assert stress_section(before_sizes).count("<table") == 2
    assert len(per_kind_rows(before_sizes)) == len(overall)


def test_normal_spread_percentile_ranks_where_the_normal_images_vary():
    rng = np.random.default_rng(1)
    normal = np.full((10, 3, 20, 20), 0.5, np.float32)
    normal[:, :, :, :10] += 0.2 * rng.standard_normal((10, 1, 20, 10)).astype(np.float32)  # left half varies
    normal[:, :, 0, 19] += np.linspace(-0.01, 0.01, 10, dtype=np.float32)[:, None]  # one pixel barely
    masks = np.zeros((3, 20, 20), np.uint8)
    masks[0, 5:8, 2:5] = 1  # on the varying half
    masks[1, 5:8, 12:15] = 1  # on the steady half
    masks[2, 0, 19] = 1  # the steady half's one varying pixel: above every constant pixel
    place = normal_spread_percentile(normal, masks)
    assert place[0] >= 0.5 > place[1]
    assert place[2] == pytest.approx(199 / 400)  # ranked over the 400 pixels, from 0
    assert np.isnan(normal_spread_percentile(normal, np.zeros((1, 20, 20), np.uint8))[0])


def test_the_place_split_shows_a_kind_missed_where_the_normal_images_vary():
    """Spots are found on the steady half of the frame and hidden on the half where every
    normal image is textured differently: the place bands show what the overall figure mixes."""
    from anomaly_ae.scoring import NormalReference
    from anomaly_ae.scoring.inference import reconstruct_and_score

    rng = np.random.default_rng(0)
    images = np.full((36, 1, 48, 48), 0.5, np.float32)
    images += 0.004 * rng.standard_normal(images.shape).astype(np.float32)
    images[:, :, :, :24] += 0.15 * rng.standard_normal((36, 1, 48, 24)).astype(np.float32)
    images = images.clip(0, 1)
    train, normal = images[:24], images[24:]
    settings = MapSettings(smoothing_sigma=1.0, normal_reference="zscore")
    maps = reconstruct_and_score(_Blur(), train, MapSettings(smoothing_sigma=1.0), 32, keep_maps=True)["map"]
    table = stress_table(
        _Blur(),
        normal,
        {"in use": (settings, NormalReference.fit(maps))},
        {
            "per_image": 10,
            "seed": 5,
            "min_contrast": 0.05,
            "max_tries": 20,
            "kinds": ["spot"],
            "contrast": (0.2, 0.5),
        },
        batch_size=32,
    )
    places = table[(table["kind"] == "spot") & (table["place"] != "all")].set_index("place")
    steady = places.loc["steadiest half"]
    varying = places.drop(index="steadiest half")
    assert steady["n_defective"] >= 20 and varying["n_defective"].sum() >= 20
    assert steady["image_auroc"] >= 0.95
    assert (varying["image_auroc"] < steady["image_auroc"] - 0.2).all()


def test_copies_per_kind_sets_the_copies_per_good_image_for_any_test_set():
    from anomaly_ae.data.defects import DEFAULT_KINDS, DEFECT_KINDS
    from anomaly_ae.evaluation.stress import copies_per_image

    auto = {"per_image": "auto", "copies_per_kind": 100}
    assert copies_per_image(auto, 20, DEFECT_KINDS, channels=1) == 40  # bottle: 8 gray kinds x 100 / 20
    assert copies_per_image(auto, 20, DEFECT_KINDS, channels=3) == 45  # + tint in colour
    assert copies_per_image(auto, 97, DEFAULT_KINDS) == 9  # BSData: 800 / 97, rounded up
    assert copies_per_image(auto, 1000, ["spot"]) == 1
    assert copies_per_image({"per_image": 8, "copies_per_kind": 100}, 20, DEFECT_KINDS) == 8
    with pytest.raises(ValueError, match="evaluation.stress_test.per_image"):
        copies_per_image({"per_image": 0}, 20, DEFECT_KINDS)
    with pytest.raises(ValueError, match="evaluation.stress_test.copies_per_kind"):
        copies_per_image({"per_image": "auto", "copies_per_kind": "many"}, 20, DEFECT_KINDS)


def test_the_map_in_uses_held_out_figures_per_kind_go_to_mlflow():
    from anomaly_ae.pipelines.evaluate.nodes import stress_mlflow_metrics

    overall = pd.DataFrame(
        {
            "map": ["in use", "in use", "in use", "paper"],
            "kind": ["all", "spot", "odd kind?", "spot"],
            "image_auroc": [0.9, 0.8, 0.7, 0.5],
            "pixel_auroc": [0.99, np.nan, 0.95, 0.6],
        }
    )
    assert stress_mlflow_metrics(overall) == {
        "stress_image_auroc.all": {"value": 0.9, "step": 0},
        "stress_pixel_auroc.all": {"value": 0.99, "step": 0},
        "stress_image_auroc.spot": {"value": 0.8, "step": 0},  # no pixel figure: left out
        "stress_image_auroc.odd kind_": {"value": 0.7, "step": 0},  # a name MLflow accepts
        "stress_pixel_auroc.odd kind_": {"value": 0.95, "step": 0},
    }


def test_the_place_map_figure_and_its_message_without_good_images():
    from anomaly_ae.pipelines.evaluate.reporting_nodes import make_place_map

    rng = np.random.default_rng(2)
    images = (255 * rng.uniform(0.3, 0.7, (4, 3, 32, 48))).astype(np.uint8)
    drawn = make_place_map({"images": images, "labels": np.array([0, 0, 1, 0])})
    one_good = make_place_map({"images": images, "labels": np.array([1, 1, 1, 0])})
    assert drawn.mode == one_good.mode == "RGB"
    assert drawn.size[1] > 2 * one_good.size[1]  # two panels of the frame against one line of text
