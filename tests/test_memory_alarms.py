"""scripts/memory_alarms.py: the reference without its memory channel, and the memory
channel's peak where a normal image has a look no training image has."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_ae.scoring.anomaly_map import MapSettings
from anomaly_ae.scoring.inference import memory_bank
from anomaly_ae.scoring.memory import memory_map
from anomaly_ae.scoring.reference import NormalReference

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_alarms.py"


def _module():
    spec = importlib.util.spec_from_file_location("memory_alarms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normal_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth gray images that differ a little: (n, 1, size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.3, 0.7, size)[None, :] * np.ones((size, 1))
    return np.clip(ramp + rng.normal(0, 0.01, (n, 1, size, size)), 0, 1).astype(np.float32)


def _reference(train: np.ndarray, pool: int) -> NormalReference:
    """A two-channel reference (a map channel, then the memory channel) fitted by hand: the
    memory channel's statistics from the training images each matched against the others."""
    bank = memory_bank(train, pool)
    own = np.arange(len(train))
    memory = memory_map(torch.from_numpy(train).double(), torch.from_numpy(bank).double(), pool, 1, own)
    memory = memory[:, 0].float().numpy()
    ssim_like = np.abs(np.random.default_rng(1).normal(0, 0.1, memory.shape)).astype(np.float32)
    maps = np.stack([ssim_like, memory], axis=1)
    fitted = NormalReference.fit(maps)
    return NormalReference(
        mean=fitted.mean, std=fitted.std, n_images=fitted.n_images, upper=fitted.upper, memory_bank=bank
    )


def test_without_memory_keeps_the_other_channels_only():
    module = _module()
    reference = _reference(_normal_images(12), pool=4)
    plain = module.without_memory(reference)
    assert plain.mean.shape == (1, 32, 32) and plain.memory_bank is None
    np.testing.assert_array_equal(plain.mean[0], reference.mean[0])
    np.testing.assert_array_equal(plain.upper[0], reference.upper[0])


def test_memory_peak_lies_at_a_look_no_training_image_has():
    module = _module()
    train = _normal_images(12)
    reference = _reference(train, pool=4)
    settings = MapSettings(normal_reference="tail", memory_pool=4, memory_radius=1)
    normal, marked = _normal_images(2, seed=5), _normal_images(1, seed=6)
    marked[0, 0, 18:22, 8:12] = 1.0  # a bright speck
    peaks = module.memory_peaks(np.concatenate([normal, marked]), settings, reference, batch=2)
    (speck_peak, (row, col), raw, normal_mean) = peaks[-1]
    assert 14 <= row <= 26 and 4 <= col <= 16, (row, col)
    assert speck_peak > 3 * max(p[0] for p in peaks[:2])
    assert raw > 5 * normal_mean


def test_memory_scales_are_the_references_own():
    """Each scaling's scale is what the reference corrects the memory channel by
    (as_tensors): the larger of the width and its mean for tail, the spread plus its mean
    for zscore; never below its floor."""
    module = _module()
    reference = _reference(_normal_images(12), pool=4)
    scales = module.memory_scales(reference)
    assert set(scales) == {"tail", "zscore"}
    width = np.clip(reference.upper[-1] - reference.mean[-1], 0, None)
    tail, tail_floor = scales["tail"]
    np.testing.assert_allclose(tail_floor, width.mean(), rtol=1e-5)
    np.testing.assert_allclose(tail, np.maximum(width, width.mean()), rtol=1e-5)
    z, z_floor = scales["zscore"]
    np.testing.assert_allclose(z_floor, reference.std[-1].mean(), rtol=1e-5)
    np.testing.assert_allclose(z, reference.std[-1] + reference.std[-1].mean(), rtol=1e-5)
    assert (tail >= tail_floor * (1 - 1e-6)).all() and (z >= z_floor * (1 - 1e-6)).all()


def test_additive_tail_changes_only_the_memory_channels_scale():
    """AdditiveTail: the memory channel's scale is its width plus the mean width; the other
    channels' scales and every mean are the reference's own."""
    module = _module()
    reference = _reference(_normal_images(12), pool=4)
    fields = {f.name: getattr(reference, f.name) for f in dataclasses.fields(reference)}
    additive = module.AdditiveTail(**fields)
    mean, scale = reference.as_tensors("tail")
    mean2, scale2 = additive.as_tensors("tail")
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(scale2[0], scale[0])
    width = np.clip(reference.upper[-1] - reference.mean[-1], 0, None)
    np.testing.assert_allclose(scale2[-1].numpy(), width + width.mean(), rtol=1e-5)
    assert (scale2[-1] > scale[-1]).all()  # width + mean > max(width, mean) for a positive width
    torch.testing.assert_close(additive.as_tensors("zscore")[1], reference.as_tensors("zscore")[1])


class _Blur(torch.nn.Module):
    """A stand-in 'reconstruction': the image blurred, so a defect leaves an error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def test_held_out_prints_each_arms_real_auroc_and_every_kind(capsys):
    """--held-out: a line per arm with the real test image AUROC (bright specks on smooth
    images: found by the blurred stand-in's map, so near 1) and every held-out kind."""
    import yaml

    module = _module()
    root = SCRIPT.parents[1] / "conf" / "base"
    evaluation = yaml.safe_load((root / "parameters_evaluation.yml").read_text())["evaluation"]
    synthetic = yaml.safe_load((root / "parameters_calibrate.yml").read_text())["calibration"][
        "synthetic_defects"
    ]
    evaluation["stress_test"] = {**evaluation["stress_test"], "per_image": 8}  # a few copies: fast
    good = _normal_images(6, seed=2)
    marked = _normal_images(6, seed=3)
    marked[:, 0, 12:16, 12:16] = 1.0
    images = (np.concatenate([good, marked]) * 255).round().astype(np.uint8)
    test = {"images": images, "labels": np.r_[np.zeros(6, int), np.ones(6, int)]}
    arms = {"smoothed": (MapSettings(smoothing_sigma=2.0), None), "paper": (MapSettings(), None)}
    module.held_out(_Blur(), test, arms, evaluation, synthetic, batch=8)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert [line.split(":")[0].strip() for line in lines] == ["smoothed", "paper"]
    for line in lines:
        real = float(line.split("real ")[1].split(";")[0])
        assert real > 0.9, line
        assert all(f"{kind} " in line for kind in ("all", "spot", "thin_line", "smudge")), line
    # the good images' scores handed in (as main does): only the defective ones scored again
    from anomaly_ae.scoring.inference import reconstruct_and_score

    good_scores = {
        arm: reconstruct_and_score(_Blur(), images[:6], s, 8, keep_maps=False, keep_recon=False, reference=r)[
            "score"
        ]
        for arm, (s, r) in arms.items()
    }
    module.held_out(_Blur(), test, arms, evaluation, synthetic, batch=8, good_scores=good_scores)
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert again == lines


def test_selection_is_the_calibration_grids_own_figure():
    """--selection: each arm's selection score (and its image and pixel AUROC) on the
    calibration's synthetic copies is the figure ``score_grid`` gives the same setting; a
    map that sees the defects better scores higher."""
    import yaml

    from anomaly_ae.evaluation.calibration import score_grid
    from anomaly_ae.pipelines.calibrate.nodes import synthesise_defects

    module = _module()
    root = SCRIPT.parents[1] / "conf" / "base"
    calibration = yaml.safe_load((root / "parameters_calibrate.yml").read_text())["calibration"]
    calibration["synthetic_defects"] = {**calibration["synthetic_defects"], "per_image": 3}
    validation = {"images": (_normal_images(8, seed=4) * 255).round().astype(np.uint8)}
    train = _normal_images(6, seed=5)
    smoothed = MapSettings(smoothing_sigma=2.0)
    arms = {"paper": (MapSettings(), None), "smoothed": (smoothed, None)}
    got = module.selection(_Blur(), validation, calibration, arms, batch=8)

    synthetic = synthesise_defects(validation, calibration)
    recon = lambda x: _Blur()(torch.from_numpy(np.asarray(x, np.float32))).numpy()  # noqa: E731
    grid = {
        "blend": ["ssim"],
        "win_size": [11],
        "scale_combine": ["mean"],
        "smoothing_sigma": [2],
        "normal_reference": ["none"],
        "lowpass_sigma": [0],
        "reference_shift": [0],
        "shift_tolerance": [0],
        "ssim_k2": [0.03],
        "score_reduction": ["max"],
    }
    table, _ = score_grid(
        grid,
        MapSettings(),
        (train, recon),
        (synthetic["normal"], recon(synthetic["normal"])),
        (synthetic["images"], recon(synthetic["images"]), synthetic["masks"], synthetic["kinds"]),
        batch_size=8,
    )
    by_setting = table.set_index("setting")
    for arm, (settings, _) in arms.items():
        row = by_setting.loc[settings.describe()]
        assert got[arm]["selection_score"] == pytest.approx(row["selection_score"], abs=1e-6), arm
        assert got[arm]["image_auroc"] == pytest.approx(row["syn_image_auroc"], abs=1e-6), arm
        assert got[arm]["pixel_auroc"] == pytest.approx(row["syn_pixel_auroc"], abs=1e-6), arm
    assert len({round(g["selection_score"], 6) for g in got.values()}) == 2  # the two maps differ
