"""The label-free calibration grid (library level): grid, vectorised scoring, rule, defects."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly_ae.data.defects import DEFAULT_KINDS, paste_synthetic_defects
from anomaly_ae.evaluation import calibration
from anomaly_ae.evaluation.metrics import aupro, image_auroc, pixel_auroc, rank_auroc
from anomaly_ae.scoring import MapSettings, anomaly_map, image_score
from anomaly_ae.scoring.anomaly_map import raw_map
from anomaly_ae.scoring.reference import ReferenceAccumulator, with_moved_copies

SIZE = 64
FULL_GRID = {
    "blend": ["ssim", "ssim+l2", "l2"],
    "win_size": [11, 7, [7, 11, 15]],
    "scale_combine": ["mean", "max"],
    "smoothing_sigma": [0, 2, 4, 8],
    "normal_reference": ["none", "mean", "zscore", "tail"],
    "lowpass_sigma": [0, 4, 8],
    "reference_shift": [0, 1],
    "shift_tolerance": [0, 1],
    "ssim_k2": [0.03],
    "score_reduction": ["max", "topk_mean", "mean"],
}
SMALL_GRID = {
    "blend": ["ssim", "ssim+l2"],
    "win_size": [11, [7, 11]],
    "scale_combine": ["mean", "max"],
    "smoothing_sigma": [0, 2],
    "normal_reference": ["none", "mean", "zscore", "tail"],
    "lowpass_sigma": [0, 4],
    "reference_shift": [0, 1],
    "shift_tolerance": [0, 1],
    "ssim_k2": [0.03, 0.01],
    "score_reduction": ["max", "mean"],
}
DEFECTS = {"per_image": 2, "seed": 0, "min_contrast": 0.08, "max_tries": 20}


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 0.5 + 0.3 * np.sin(6 * yy) * np.cos(4 * xx)
    return np.clip(base[None] + rng.normal(0, 0.02, size=(n, SIZE, SIZE)), 0, 1).astype(np.float32)[:, None]


def _recon(images: np.ndarray) -> np.ndarray:
    """A 'model' that reconstructs the normal pattern (so pasted defects are not reproduced)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = (0.5 + 0.3 * np.sin(6 * yy) * np.cos(4 * xx)).astype(np.float32)
    return np.broadcast_to(base, images.shape).copy()


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    train, normal = _images(rng, 8), _images(rng, 6)
    defects, masks, kinds = paste_synthetic_defects(normal, **DEFECTS)
    # the training images' reconstruction as a function, as the pipeline streams them (the
    # moved copies of reference_shift need it)
    return (train, _recon), (normal, _recon(normal)), (defects, _recon(defects), masks, kinds)


def test_full_grid_has_the_3024_settings_with_the_papers_map_first():
    points = calibration.build_grid(FULL_GRID, MapSettings(), scale=3.0)
    # 36 uncorrected maps x 3 reductions = 108 per reference: none and mean 108 each; zscore
    # and tail 108 x (3 low-pass channels) x (2 reference shifts) = 648 each; all x 2 shift
    # tolerances
    assert len(points) == 3024
    assert points[0].settings == MapSettings() and points[0].levers_changed(MapSettings()) == 0
    assert len({p.settings for p in points}) == 3024
    low = [p for p in points if p.settings.lowpass_sigma]
    assert len(low) == 1728 and {p.settings.normal_reference for p in low} == {"zscore", "tail"}
    assert all(p.levers_changed(MapSettings()) >= 2 for p in low)  # the channel and the reference
    moved = [p for p in points if p.settings.reference_shift]
    assert len(moved) == 1296 and {p.settings.normal_reference for p in moved} == {"zscore", "tail"}
    assert {p.settings.reference_shift for p in moved} == {1}
    assert all(p.levers_changed(MapSettings()) >= 2 for p in moved)  # the shift and the reference
    tolerant = [p for p in points if p.settings.shift_tolerance]
    assert len(tolerant) == 1512 and {p.settings.shift_tolerance for p in tolerant} == {1}
    # the tolerance goes with every reference (none included): the paper's map, aligned, is 1 lever
    assert min(p.levers_changed(MapSettings()) for p in tolerant) == 1
    assert tolerant[0].settings.describe() == "1-SSIM(11) align 1 max"
    l2_only = [p for p in points if p.blend == "l2"]
    assert len(l2_only) == 4 * 14 * 3 * 2 and all(p.settings.ssim_weight == 0 for p in l2_only)
    blended = next(p for p in points if p.blend == "ssim+l2")
    assert blended.settings.l2_weight == 3.0
    # 36 uncorrected maps x (none, mean, 6 z-scored, 6 tail) x 2 tolerances
    assert len({p.map_key for p in points}) == 1008
    assert len({p.raw_key for p in points}) == 72
    multi_max = [p for p in points if p.settings.scale_combine == "max"]
    assert len(multi_max) == 2 * 4 * 14 * 3 * 2 and all(len(p.settings.windows) == 3 for p in multi_max)
    with pytest.raises(ValueError, match="exactly the keys"):
        calibration.build_grid({**FULL_GRID, "extra": [1]}, MapSettings(), 1.0)


def test_grid_scores_equal_direct_computation_through_the_scoring_core(sets):
    """The vectorised grid (terms once, linear smoothing, shared references, rank AUROC)
    gives exactly the metrics of computing each map directly with anomaly_map()."""
    train, normal, defects = sets
    table, scale = calibration.score_grid(SMALL_GRID, MapSettings(), train, normal, defects, batch_size=4)
    points = calibration.build_grid(SMALL_GRID, MapSettings(), scale)
    assert len(table) == len(points)
    images = torch.from_numpy(np.concatenate([normal[0], defects[0]]))
    recon = torch.from_numpy(np.concatenate([normal[1], defects[1]]))
    masks = np.concatenate([np.zeros((len(normal[0]), SIZE, SIZE), np.uint8), defects[2]])
    labels = np.r_[np.zeros(len(normal[0])), np.ones(len(defects[0]))]
    first_lowpass = next(i for i, p in enumerate(points) if p.settings.lowpass_sigma)
    first_moved = next(i for i, p in enumerate(points) if p.settings.reference_shift)
    first_tail = next(i for i, p in enumerate(points) if p.settings.normal_reference == "tail")
    first_aligned = next(i for i, p in enumerate(points) if p.settings.shift_tolerance)
    aligned_lowpass = next(
        i for i, p in enumerate(points) if p.settings.shift_tolerance and p.settings.lowpass_sigma
    )
    first_k2 = next(i for i, p in enumerate(points) if p.settings.ssim_k2 != 0.03)
    aligned_k2 = next(
        i for i, p in enumerate(points) if p.settings.ssim_k2 != 0.03 and p.settings.shift_tolerance
    )
    last = points[-1].settings
    assert last.reference_shift and last.lowpass_sigma and last.normal_reference == "tail"
    assert last.shift_tolerance == 1 and last.ssim_k2 == 0.01
    assert "k2 0.01" in points[first_k2].settings.describe()
    checked = (
        0,
        5,
        first_lowpass,
        first_moved,
        first_tail,
        first_aligned,
        aligned_lowpass,
        first_k2,
        aligned_k2,
    )
    for i in (*checked, len(points) // 2, len(points) - 1):
        s = points[i].settings
        # the reference's normal images: the training images and, with a shift, their moved
        # copies, each copy counting as its image (the tail's largest value of a second image)
        normals = with_moved_copies(train[0], s.reference_shift)
        sources = np.tile(np.arange(len(train[0])), len(normals) // len(train[0]))
        reference = (
            ReferenceAccumulator()
            .add(raw_map(torch.from_numpy(normals), torch.from_numpy(train[1](normals)), s).float(), sources)
            .result()
        )
        ref = None if s.normal_reference == "none" else reference.as_tensors(s.normal_reference)
        maps = anomaly_map(images, recon, s, ref)[:, 0]
        scores = image_score(maps, s.score_reduction, s.topk_fraction).numpy()
        row = table.iloc[i]
        assert row["setting"] == s.describe()
        assert row["syn_image_auroc"] == pytest.approx(image_auroc(labels, scores), abs=1e-9)
        # the grid's float32 terms against float64 maps: a few near-tied pixel pairs may swap
        tolerance = 1e-5 if s.lowpass_sigma else 1e-6
        assert row["syn_pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps.numpy()), abs=tolerance), i
        # each kind's defect pixels against the pooled figure's negatives (every pixel outside
        # a defect: the normal images' and every copy's background); other kinds' defects out
        kinds = np.r_[[""] * len(normal[0]), np.asarray(defects[3])][:, None, None]
        for kind in set(defects[3]):
            keep = (masks == 0) | (kinds == kind)
            expected = rank_auroc(masks[keep], maps.numpy()[keep])
            # one kind has fewer defect pixels than the pooled figure: a swapped near-tied pair
            # moves it more (measured: 1.5e-5 on the last, tail-referenced setting, whose
            # division by the reference's narrow widths magnifies the float32 rounding)
            assert row[f"syn_pixel_auroc_{kind}"] == pytest.approx(expected, abs=3 * tolerance), (i, kind)
    assert scale == pytest.approx(
        float(anomaly_map(torch.from_numpy(normal[0]), torch.from_numpy(normal[1])).mean())
        / float(((normal[0] - normal[1]) ** 2).mean()),
        rel=1e-5,
    )


MEMORY_GRID = {
    "blend": ["ssim"],
    "win_size": [11],
    "scale_combine": ["mean"],
    "smoothing_sigma": [2],
    "normal_reference": ["none", "zscore", "tail"],
    "lowpass_sigma": [0, 4],
    "reference_shift": [0, 1],
    "shift_tolerance": [0],
    "ssim_k2": [0.03],
    "memory_pool": [0, 4],
    "memory_radius": [0, 1],
    "score_reduction": ["max"],
}


def test_memory_levers_go_with_the_scaled_references_only():
    points = calibration.build_grid(MEMORY_GRID, MapSettings(), 1.0)
    memory = [p for p in points if p.settings.memory_pool]
    # per scaled reference: 2 low-pass x 2 shifts x (no memory, pool 4 at radius 0 or 1)
    assert len(points) == 1 + 1 + 2 * 2 * 2 * 3  # the paper's map, none smoothed, the scaled
    assert len(memory) == 2 * 2 * 2 * 2
    assert {p.settings.normal_reference for p in memory} == {"zscore", "tail"}
    assert {(p.settings.memory_pool, p.settings.memory_radius) for p in memory} == {(4, 0), (4, 1)}
    # without the channel the radius stays the paper's (one setting, not one per radius)
    assert {p.settings.memory_radius for p in points if not p.settings.memory_pool} == {1}
    assert "memory 4 r1" in memory[-1].settings.describe()
    assert len({p.map_key for p in points}) == len(points)
    with pytest.raises(ValueError, match="memory_pool must list"):
        calibration.build_grid({**MEMORY_GRID, "memory_pool": [-4]}, MapSettings(), 1.0)


def test_memory_grid_scores_equal_direct_computation_through_the_scoring_core(sets):
    """The grid's memory channel (the training images matched against the others for the
    reference, the bank of every training image for new images) gives the metrics of the
    scoring core's own maps: the bank and reference as `kedro run --pipeline=evaluate` fits them."""
    from torch import nn

    from anomaly_ae.scoring.inference import fit_normal_reference

    class Pattern(nn.Module):  # _recon as a model, for the scoring core's own reference fit
        def forward(self, x):
            return torch.from_numpy(_recon(x.numpy()))

    train, normal, defects = sets
    table, scale = calibration.score_grid(MEMORY_GRID, MapSettings(), train, normal, defects, batch_size=4)
    points = calibration.build_grid(MEMORY_GRID, MapSettings(), scale)
    images = torch.from_numpy(np.concatenate([normal[0], defects[0]]))
    recon = torch.from_numpy(np.concatenate([normal[1], defects[1]]))
    masks = np.concatenate([np.zeros((len(normal[0]), SIZE, SIZE), np.uint8), defects[2]])
    labels = np.r_[np.zeros(len(normal[0])), np.ones(len(defects[0]))]
    checked = [i for i, p in enumerate(points) if p.settings.memory_pool]
    assert len(checked) == 16
    assert {points[i].settings.reference_shift for i in checked[::3] + [checked[-1]]} == {0, 1}
    for i in checked[::3] + [checked[-1]]:
        s = points[i].settings
        reference = fit_normal_reference(Pattern(), train[0], s, batch_size=4, device="cpu")
        assert reference.mean.shape[0] == s.channels == 2 + bool(s.lowpass_sigma)
        bank = torch.from_numpy(reference.memory_bank)
        maps = anomaly_map(images, recon, s, reference.as_tensors(s.normal_reference), bank)[:, 0]
        scores = image_score(maps, s.score_reduction, s.topk_fraction).numpy()
        row = table.iloc[i]
        assert row["setting"] == s.describe()
        assert (row["memory_pool"], row["memory_radius"]) == (4, s.memory_radius)
        assert row["syn_image_auroc"] == pytest.approx(image_auroc(labels, scores), abs=1e-9), i
        assert row["syn_pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps.numpy()), abs=1e-5), i


def test_a_defect_copy_scores_higher_than_its_normal_image(sets):
    train, normal, defects = sets
    table, _ = calibration.score_grid(SMALL_GRID, MapSettings(), train, normal, defects, batch_size=4)
    # the stand-in model reconstructs only the normal pattern, so every defect is visible
    assert table["syn_pixel_auroc"].max() > 0.9
    assert table["syn_image_auroc"].max() == 1.0
    assert set(DEFAULT_KINDS) == {
        c.removeprefix("syn_image_auroc_") for c in table if c.startswith("syn_image_auroc_")
    }


def test_rule_takes_the_best_and_breaks_ties_towards_the_paper():
    import pandas as pd

    table = pd.DataFrame({"selection_score": [0.90, 0.9005, 0.95, 0.9495], "levers_changed": [0, 1, 3, 2]})
    assert calibration.select(table, tie_tolerance=1e-3) == 3  # 0.9495 ties 0.95 with fewer levers
    assert calibration.select(table, tie_tolerance=0.0) == 2
    table.loc[2:3, "selection_score"] = 0.8
    assert calibration.select(table, tie_tolerance=1e-3) == 0  # the paper's map wins a tie with 0.9005
    with pytest.raises(ValueError, match="empty"):
        calibration.select(table.iloc[:0], 1e-3)


def test_localisation_rule_takes_the_best_pixel_auroc_ties_nearest_the_detection_map():
    import pandas as pd

    settings = [
        MapSettings(),  # the paper's map
        MapSettings(smoothing_sigma=4.0, normal_reference="zscore", reference_shift=1, lowpass_sigma=8.0),
        MapSettings(smoothing_sigma=8.0, normal_reference="zscore", lowpass_sigma=4.0),  # 3 from row 1
        MapSettings(
            smoothing_sigma=8.0, normal_reference="zscore", reference_shift=1, lowpass_sigma=4.0
        ),  # 2
        MapSettings(smoothing_sigma=8.0, normal_reference="zscore"),  # 2 from the paper, 3 from row 1
    ]
    table = pd.DataFrame(
        {
            "selection_score": [0.90, 0.99, 0.93, 0.92, 0.91],
            "syn_pixel_auroc": [0.90, 0.95, 0.9712, 0.9705, 0.971],
            "levers_changed": [0, 4, 3, 4, 2],
            "map_settings": [s.to_dict() for s in settings],
        }
    )
    assert calibration.select(table, tie_tolerance=1e-3) == 1  # the detection map
    assert calibration.map_levers_between(settings[3], settings[1]) == 2
    # 0.9712, 0.9705 and 0.971 tie: the nearest to the detection map wins, not the fewest levers
    assert calibration.select_localisation(table, 1e-3, detection=1) == 3
    assert calibration.select_localisation(table, 0.0, detection=1) == 2
    # as saved (JSON cells), the same
    saved = table.assign(map_settings=table["map_settings"].map(json.dumps))
    assert calibration.select_localisation(saved, 1e-3, detection=1) == 3
    # when the detection map ties, it is kept: one map
    table.loc[1, "syn_pixel_auroc"] = 0.9709
    assert calibration.select_localisation(table, 1e-3, detection=1) == 1
    assert "_distance" not in table.columns


def test_synthetic_defects_deterministic_and_inside_the_mask():
    images = _images(np.random.default_rng(1), 5)
    a_img, a_mask, a_kinds = paste_synthetic_defects(images, 3, 7, 0.08, 20)
    b_img, b_mask, b_kinds = paste_synthetic_defects(images, 3, 7, 0.08, 20)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_kinds == b_kinds and set(a_kinds) == set(DEFAULT_KINDS)
    assert a_img.shape == (15, 1, SIZE, SIZE) and a_mask.shape == (15, SIZE, SIZE)
    assert a_img.dtype == np.float32 and a_mask.dtype == np.uint8
    c_img, _, _ = paste_synthetic_defects(images, 3, 8, 0.08, 20)
    assert not np.array_equal(a_img, c_img)


SOFT_KINDS = {"thin_line", "smudge", "spot"}  # anti-aliased or blurred edges


def test_every_kind_changes_its_mask_and_soft_edges_stay_faint():
    images = _images(np.random.default_rng(2), 4)
    per_image = 2 * len(DEFAULT_KINDS)
    out, masks, kinds = paste_synthetic_defects(images, per_image, 3, 0.05, 20)
    assert sorted(set(kinds)) == sorted(DEFAULT_KINDS) and len(kinds) == 4 * per_image
    source = np.repeat(images, per_image, axis=0)[:, 0]
    for img, mask, src, kind in zip(out[:, 0], masks, source, kinds, strict=True):
        assert mask.any() and not mask.all(), kind
        change = np.abs(img - src)
        assert change[mask > 0].mean() >= 0.05 or kind in {"perlin", "cutpaste", "patch"}, kind
        if kind in SOFT_KINDS:  # a soft fringe outside the mask, weaker than the defect itself
            assert change[mask == 0].max() < change[mask > 0].max(), kind
            assert change[mask == 0].mean() < 0.01, kind
        else:
            assert not change[mask == 0].any(), kind  # pixels change only inside the mask


def test_small_kinds_are_small_at_model_resolution():
    images = _images(np.random.default_rng(3), 3)
    out, masks, kinds = paste_synthetic_defects(images, 24, 5, 0.05, 20, kinds=["thin_line", "spot"])
    areas = {
        k: [int(m.sum()) for m, kk in zip(masks, kinds, strict=True) if kk == k]
        for k in ("thin_line", "spot")
    }
    assert max(areas["spot"]) <= 150  # radius <= 6 px
    # a 1-3 px wide line: area / length stays within a few pixels (length >= 10% of the side)
    assert max(areas["thin_line"]) <= 4 * 0.4 * SIZE * 1.3


def test_kinds_and_contrast_are_checked():
    images = _images(np.random.default_rng(4), 2)
    with pytest.raises(ValueError, match="kinds"):
        paste_synthetic_defects(images, 1, 0, 0.05, 5, kinds=["crack"])
    with pytest.raises(ValueError, match="contrast"):
        paste_synthetic_defects(images, 1, 0, 0.05, 5, contrast=(0.6, 0.2))
    _, _, kinds = paste_synthetic_defects(images, 2, 0, 0.05, 5, kinds="spot+smudge")  # command-line form
    assert kinds == ["spot", "smudge", "spot", "smudge"]


def test_opacity_makes_every_kind_fainter_and_one_keeps_the_defects_unchanged():
    images = _images(np.random.default_rng(5), 4)
    per_image = 2 * len(DEFAULT_KINDS)
    plain, plain_masks, plain_kinds = paste_synthetic_defects(images, per_image, 3, 0.02, 20)
    same, same_masks, _ = paste_synthetic_defects(images, per_image, 3, 0.02, 20, opacity=(1.0, 1.0))
    np.testing.assert_array_equal(plain, same)  # [1, 1] draws nothing: the defects of before
    np.testing.assert_array_equal(plain_masks, same_masks)
    faint, faint_masks, faint_kinds = paste_synthetic_defects(
        images, per_image, 3, 0.02, 20, opacity=(0.2, 0.4)
    )
    assert faint_kinds == plain_kinds
    source = np.repeat(images, per_image, axis=0)[:, 0]

    def change(out, masks):  # mean |change| inside each copy's mask, per kind
        per_copy = [np.abs(o - s)[m > 0].mean() for o, s, m in zip(out[:, 0], source, masks, strict=True)]
        return {
            k: np.mean([c for c, kk in zip(per_copy, plain_kinds, strict=True) if kk == k])
            for k in DEFAULT_KINDS
        }

    strong, weak = change(plain, plain_masks), change(faint, faint_masks)
    for kind in DEFAULT_KINDS:  # scaled by 0.2-0.4 (each copy is a new draw: compare the means)
        assert weak[kind] < 0.6 * strong[kind], kind
    with pytest.raises(ValueError, match="opacity"):
        paste_synthetic_defects(images, 1, 0, 0.05, 5, opacity=(0.0, 1.0))


def test_aupro_of_a_perfect_map_is_one():
    masks = np.zeros((2, SIZE, SIZE), np.uint8)
    masks[1, 10:20, 10:20] = 1
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_agreement_ranks_the_grid_against_the_real_metrics():
    from anomaly_ae.evaluation.calibration import agreement

    settings = [f"s{i}" for i in range(6)]
    syn = pd.DataFrame(
        {
            "setting": settings,
            "selection_score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            "syn_image_auroc": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            "syn_pixel_auroc": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
            "is_paper": [True] + [False] * 5,
            "is_selected": [False, True] + [False] * 4,
        }
    )
    real = pd.DataFrame(
        {
            "setting": settings[::-1],
            "syn_image_auroc": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            "syn_pixel_auroc": [0.5] * 6,
        }
    )  # real image AUROC: s5 0.1 ... s0 0.6, the same order as the synthetic score
    table, rho = agreement(syn, real)
    assert rho["spearman_selection_vs_real_image_auroc"] == pytest.approx(1.0)
    assert (
        rho["spearman_syn_pixel_auroc_vs_real_pixel_auroc"]
        != rho["spearman_syn_pixel_auroc_vs_real_pixel_auroc"]
    )  # NaN: constant
    assert table.set_index("setting").loc["s0", "real_rank"] == 1
    reversed_real = real.assign(syn_image_auroc=real["syn_image_auroc"][::-1].to_numpy())
    assert agreement(syn, reversed_real)[1]["spearman_selection_vs_real_image_auroc"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same grid"):
        agreement(syn, real.iloc[:3])


def test_grid_scores_defect_images_at_their_defect_when_given_regions(sets):
    """With defect regions the grid adds the image AUROC with each defect image's map kept in
    its region and the normal mean map elsewhere, equal to computing it directly; without
    regions the table is as before."""
    train, normal, defects = sets
    plain, _ = calibration.score_grid(SMALL_GRID, MapSettings(), train, normal, defects, batch_size=4)
    regions = defects[2] > 0
    table, scale = calibration.score_grid(
        SMALL_GRID, MapSettings(), train, normal, defects, batch_size=4, defect_regions=regions
    )
    assert "syn_image_auroc_at_defect" not in plain
    pd.testing.assert_frame_equal(table.drop(columns="syn_image_auroc_at_defect"), plain)
    s = calibration.build_grid(SMALL_GRID, MapSettings(), scale)[0].settings  # the paper's map
    maps = anomaly_map(torch.from_numpy(defects[0]), torch.from_numpy(defects[1]), s)[:, 0]
    normal_maps = anomaly_map(torch.from_numpy(normal[0]), torch.from_numpy(normal[1]), s)[:, 0]
    train_maps = anomaly_map(torch.from_numpy(train[0]), torch.from_numpy(train[1](train[0])), s)[:, 0]
    # the normal mean map as the references have it (each pixel's highest image left out):
    # the mean reduction sees it, the max hardly
    typical = torch.from_numpy(ReferenceAccumulator().add(train_maps).result().typical("none"))
    # every reduction of the paper's map (the defect maps are kept in their regions once per map)
    same_map = (
        table["map_settings"].map(lambda d: {**d, "score_reduction": "max"}) == table["map_settings"].iloc[0]
    )
    assert set(table.loc[same_map, "score_reduction"]) == {"max", "mean"}
    for _, row in table[same_map].iterrows():
        reduction = row["score_reduction"]
        local = image_score(torch.where(torch.from_numpy(regions), maps, typical), reduction).numpy()
        y = np.r_[np.zeros(len(normal_maps)), np.ones(len(local))]
        expected = image_auroc(y, np.r_[image_score(normal_maps, reduction).numpy(), local])
        assert row["syn_image_auroc_at_defect"] == pytest.approx(expected, abs=1e-9), reduction


def test_grid_pixel_auroc_leaves_out_the_defect_images_without_a_mask(sets):
    """``pixel_known``: a defect image whose mask is unknown is left out of the pixel AUROC
    (its pixels are neither defect nor normal), as if it were not there; the image AUROC
    still counts it."""
    train, normal, defects = sets
    known = np.arange(len(defects[0])) % 3 != 0
    table, scale = calibration.score_grid(
        SMALL_GRID, MapSettings(), train, normal, defects, batch_size=4, pixel_known=known
    )
    subset = tuple(np.asarray(part)[known] for part in defects)
    without, _ = calibration.score_grid(
        SMALL_GRID, MapSettings(), train, normal, subset, batch_size=4, scale=scale
    )
    everything, _ = calibration.score_grid(SMALL_GRID, MapSettings(), train, normal, defects, batch_size=4)
    pixel = [c for c in without if c.startswith("syn_pixel_auroc")]
    assert "syn_pixel_auroc" in pixel and len(pixel) > 2
    pd.testing.assert_frame_equal(table[pixel], without[pixel])
    # a kind whose every copy lacks a mask has no pixel figure
    unknown = [c for c in table if c.startswith("syn_pixel_auroc") and c not in pixel]
    assert table[unknown].isna().all().all()
    assert not table["syn_pixel_auroc"].equals(everything["syn_pixel_auroc"])
    pd.testing.assert_series_equal(table["syn_image_auroc"], everything["syn_image_auroc"])


def test_agreement_compares_the_at_defect_image_auroc_when_present():
    settings = [f"s{i}" for i in range(5)]
    syn = pd.DataFrame(
        {
            "setting": settings,
            "selection_score": [0.9, 0.8, 0.7, 0.6, 0.5],
            "syn_image_auroc": [0.9, 0.8, 0.7, 0.6, 0.5],
            "syn_pixel_auroc": [0.9, 0.8, 0.7, 0.6, 0.5],
        }
    )
    real = pd.DataFrame(
        {
            "setting": settings,
            "syn_image_auroc": [0.5, 0.6, 0.7, 0.8, 0.9],  # a leaking label: reversed
            "syn_pixel_auroc": [0.9, 0.8, 0.7, 0.6, 0.5],
            "syn_image_auroc_at_defect": [0.95, 0.9, 0.85, 0.8, 0.7],  # the defects: in order
        }
    )
    table, rho = calibration.agreement(syn, real)
    assert rho["spearman_selection_vs_real_image_auroc"] == pytest.approx(-1.0)
    assert rho["spearman_selection_vs_real_image_auroc_at_defect"] == pytest.approx(1.0)
    assert rho["spearman_syn_image_auroc_vs_real_image_auroc_at_defect"] == pytest.approx(1.0)
    assert list(table["real_image_auroc_at_defect"]) == [0.95, 0.9, 0.85, 0.8, 0.7]
    old = calibration.agreement(syn, real.drop(columns="syn_image_auroc_at_defect"))[1]
    assert not any("at_defect" in name for name in old)


def test_the_grid_streams_the_training_images_with_the_same_result():
    """Reconstructing the training images batch by batch (a callable) gives the table that
    holding them all gives: the memory no longer grows with the training set."""
    rng = np.random.default_rng(0)
    train = rng.random((9, 1, 32, 32), dtype=np.float32)
    normal = rng.random((4, 1, 32, 32), dtype=np.float32)
    defects, masks, kinds = paste_synthetic_defects(normal, 2, seed=0, min_contrast=0.05, max_tries=5)
    blur = lambda x: np.clip(x * 0.9 + 0.05, 0, 1).astype(np.float32)  # noqa: E731 - a fake "network"
    grid = {
        "blend": ["ssim", "l2"],
        "win_size": [7, [7, 11]],
        "scale_combine": ["mean"],
        "smoothing_sigma": [0, 2],
        "normal_reference": ["none", "zscore"],
        "lowpass_sigma": [0, 4],
        "reference_shift": [0],
        "shift_tolerance": [0, 1],
        "ssim_k2": [0.03, 0.01],
        "score_reduction": ["max"],
    }
    args = (grid, MapSettings(), None, (normal, blur(normal)), (defects, blur(defects), masks, kinds), 4)
    held, _ = calibration.score_grid(*args[:2], (train, blur(train)), *args[3:])
    streamed, _ = calibration.score_grid(*args[:2], (train, blur), *args[3:])
    pd.testing.assert_frame_equal(held, streamed)
    # moved copies of the training images (reference_shift) need the reconstruction function
    moved = {**grid, "reference_shift": [0, 1]}
    with pytest.raises(ValueError, match="reference_shift > 0 needs"):
        calibration.score_grid(moved, MapSettings(), (train, blur(train)), *args[3:])
    table, _ = calibration.score_grid(moved, MapSettings(), (train, blur), *args[3:])
    assert set(table["reference_shift"]) == {0, 1}
    pd.testing.assert_frame_equal(  # the unmoved settings score as before
        table[table["reference_shift"] == 0].drop(columns="reference_shift").reset_index(drop=True),
        streamed.drop(columns="reference_shift").reset_index(drop=True),
        check_dtype=False,
    )


@pytest.mark.parametrize("keep_diff", [False, True])
def test_error_terms_filled_batch_by_batch_equal_one_batch_of_every_image(keep_diff):
    """The grid's error terms, written batch by batch into one tensor per term (a last batch
    shorter than the others, shift tolerance and SSIM's constant as keys), are the terms of
    every image in one batch: the same tensors, every term kept."""
    from anomaly_ae.scoring.anomaly_map import error_terms

    rng = np.random.default_rng(3)
    images = rng.random((7, 1, 24, 24), dtype=np.float32)
    recon = np.clip(images * 0.8 + 0.1, 0, 1).astype(np.float32)
    keys = ((0, 0.03), (1, 0.01))
    batched = calibration._terms(images, recon, (7, 11), 1.5, 3, keep_diff=keep_diff, term_keys=keys)
    assert set(batched) == set(keys)
    for tolerance, k2 in keys:
        whole = error_terms(
            torch.from_numpy(images),
            torch.from_numpy(recon),
            (7, 11),
            1.5,
            keep_diff=keep_diff,
            tolerance=tolerance,
            k2=k2,
        )
        got = batched[(tolerance, k2)]
        assert set(got) == set(whole)
        for name, value in whole.items():
            if name == "ssim_err":
                assert set(got[name]) == {7, 11}
                for w in (7, 11):
                    torch.testing.assert_close(got[name][w], value[w], rtol=0, atol=1e-12)
            elif isinstance(value, torch.Tensor):
                assert got[name].shape[0] == 7
                torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12)
            else:
                assert got[name] == value


def test_references_fitted_once_serve_every_scoring_of_the_grid(sets):
    """fit_grid_references streams the training images once; scoring the grid with them (as
    the calibration and then the grid agreement on the test images do) gives the table that
    fitting inside score_grid gives, and never reconstructs a training image again."""
    (train, recon), normal, defects = sets
    calls = []

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return recon(batch)

    paper = MapSettings()
    scale = calibration.normal_l2_scale(normal, paper, 4)
    inline, inline_scale = calibration.score_grid(
        SMALL_GRID, paper, (train, recon), normal, defects, batch_size=4
    )
    assert scale == inline_scale  # what score_grid measures when given no scale
    references = calibration.fit_grid_references(SMALL_GRID, paper, scale, (train, counted), 4)
    streamed = sum(calls)
    assert streamed == 5 * len(train)  # the training images and their 4 moved copies (reference_shift 1)
    for _ in range(2):  # the calibration's scoring, then another set's (the real test images)
        table, used = calibration.score_grid(SMALL_GRID, paper, references, normal, defects, batch_size=4)
        pd.testing.assert_frame_equal(table, inline)
        assert used == scale
    assert sum(calls) == streamed
    with pytest.raises(ValueError, match="fitted at ssim\\+l2 scale"):
        calibration.score_grid(SMALL_GRID, paper, references, normal, defects, 4, scale=2 * scale)
    wider = {**SMALL_GRID, "smoothing_sigma": [0, 2, 4]}
    with pytest.raises(ValueError, match="fitted for another grid"):
        calibration.score_grid(wider, paper, references, normal, defects, 4)


def test_grid_maps_are_the_maps_the_grid_is_scored_on(sets):
    """grid_maps yields each distinct map once, with every setting sharing it: the pixel AUROC
    of each equals score_grid's for those settings."""
    (train, recon), normal, defects = sets
    paper = MapSettings()
    references = calibration.fit_grid_references(
        SMALL_GRID, paper, calibration.normal_l2_scale(normal, paper, 4), (train, recon), 4
    )
    table, _ = calibration.score_grid(SMALL_GRID, paper, references, normal, defects, batch_size=4)
    images = (np.concatenate([normal[0], defects[0]]), np.concatenate([normal[1], defects[1]]))
    truth = np.concatenate([np.zeros((len(normal[0]), SIZE, SIZE), np.uint8), defects[2]])
    seen = []
    for group, maps in calibration.grid_maps(SMALL_GRID, paper, references, images, 4):
        assert maps.shape == (len(images[0]), SIZE, SIZE)
        assert len({p.map_key for p in group}) == 1
        rows = table[table["setting"].isin([p.settings.describe() for p in group])]
        assert len(rows) == len(group)
        np.testing.assert_allclose(rows["syn_pixel_auroc"], pixel_auroc(truth, maps.numpy()), atol=1e-12)
        seen += group
    assert len(seen) == len(table)  # every setting, each once


def test_the_report_names_both_maps_and_marks_the_heat_maps_row():
    import pandas as pd

    from anomaly_ae.pipelines.evaluate.reporting_nodes import map_section

    detection = MapSettings(smoothing_sigma=4.0, normal_reference="zscore", score_reduction="topk_mean")
    heat = MapSettings(smoothing_sigma=8.0, normal_reference="zscore")
    settings = MapSettings(**{**vars(detection), "localisation": heat})
    table = pd.DataFrame(
        {
            "rank": range(1, 13),
            "setting": [f"s{i}" for i in range(1, 13)],
            "syn_image_auroc": 0.9,
            "syn_pixel_auroc": 0.9,
            "selection_score": 0.9,
            "levers_changed": 1,
            "is_paper": [False] * 11 + [True],
            "is_selected": [True] + [False] * 11,
            "is_localisation": [False] * 10 + [True, False],  # rank 11: below the top 10, still shown
        }
    )
    chosen = {
        "n_settings": 12,
        "n_tied": 1,
        "tie_tolerance": 0.001,
        "rule": "r",
        "localisation_syn_pixel_auroc": 0.95,
    }
    html = map_section(settings.to_dict(), chosen, table, "calibrated")
    assert "The image score comes from <code>1-SSIM(11) smooth 4 ref-zscore top1%</code>" in html
    assert "heat maps, pixel AUROC and AUPRO from <code>1-SSIM(11) smooth 8 ref-zscore</code>" in html
    assert "s11 (heat map)" in html and "s1 (chosen)" in html and "s12 (paper)" in html
    # every part of a setting's name the grid can produce is explained beside the table
    assert "<code>align r</code>: each pixel&#x27;s error at the reconstruction&#x27;s best alignment" in html
    for part in (
        "smooth s",
        "ref-mean / ref-zscore / ref-tail",
        "moved 1",
        "+ lowpass s",
        "max / top1% / mean",
    ):
        assert f"<code>{part}</code>" in html
    one_map = map_section(detection.to_dict(), chosen, table.drop(columns="is_localisation"), "calibrated")
    assert "heat map" not in one_map and "s11" not in one_map


def test_the_report_gives_the_synthetic_kinds_of_the_chosen_heat_and_paper_maps():
    import pandas as pd

    from anomaly_ae.pipelines.evaluate.reporting_nodes import calibration_kinds_table, map_section

    table = pd.DataFrame(
        {
            "rank": [1, 2, 3],
            "setting": ["a", "b", "c"],
            "syn_image_auroc": 0.9,
            "syn_pixel_auroc": 0.9,
            "selection_score": 0.9,
            "levers_changed": 1,
            "syn_image_auroc_spot": [0.81, 0.82, 0.83],
            "syn_image_auroc_blob": [0.91, 0.92, 0.93],
            "syn_pixel_auroc_spot": [0.71, 0.72, 0.73],
            "syn_pixel_auroc_blob": [0.61, 0.62, 0.63],
            "is_paper": [False, False, True],
            "is_selected": [True, False, False],
            "is_localisation": [False, True, False],
        }
    )
    kinds = calibration_kinds_table(table).set_index("kind")
    assert list(kinds.index) == ["blob", "spot"]
    assert kinds.loc["spot"].tolist() == [0.81, 0.72, 0.83, 0.73]  # chosen image, heat pixel, paper's
    assert kinds.loc["blob"].tolist() == [0.91, 0.62, 0.93, 0.63]
    chosen = {"n_settings": 3, "n_tied": 1, "tie_tolerance": 0.001, "rule": "r"}
    html = map_section(MapSettings().to_dict(), chosen, table, "calibrated")
    assert "The same synthetic defects per kind" in html and "0.7200" in html
    # a table saved before the per-kind pixel AUROC existed: no such section
    older = table.drop(columns=["syn_pixel_auroc_spot", "syn_pixel_auroc_blob"])
    assert calibration_kinds_table(older).empty
    assert "per kind" not in map_section(MapSettings().to_dict(), chosen, older, "calibrated")
