"""Colour input (``preprocessing.color``): RGB conversion, the ``auto`` rule, the scoring core's
colour channels, colour synthetic defects, and a colour category end to end (train, calibrate,
evaluate, report, ONNX bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_ae.data.defects import DEFAULT_KINDS, paste_synthetic_defects
from anomaly_ae.data.transforms import (
    COLOURFUL,
    colourfulness,
    model_channels,
    to_grayscale_float,
    to_model_array,
    to_rgb_float,
)
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.model.checkpoint import CheckpointError, model_from_checkpoint
from anomaly_ae.reporting.figures import display_image, heatmap_overlay_image
from anomaly_ae.scoring.anomaly_map import MapSettings, raw_map, score_maps


def _colour_image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# ---- conversion ------------------------------------------------------------------------


def test_rgb_conversion_keeps_channels_composites_alpha_and_scales_16_bit():
    rgb = _colour_image()
    arr = np.asarray(rgb, dtype=np.float32) / 255
    np.testing.assert_allclose(to_rgb_float(rgb), arr, atol=1e-7)
    rgba = rgb.copy()
    rgba.putalpha(128)
    np.testing.assert_allclose(to_rgb_float(rgba), arr * 128 / 255, atol=1e-6)  # on black, as gray
    gray = Image.fromarray((arr[..., 0] * 255).astype(np.uint8), "L")
    assert np.array_equal(to_rgb_float(gray), np.repeat(to_grayscale_float(gray)[..., None], 3, axis=2))
    deep = Image.fromarray(np.full((6, 5), 65535 // 2, dtype=np.uint16))
    np.testing.assert_allclose(to_rgb_float(deep), 0.5, atol=1e-4)
    palette = rgb.convert("P")
    np.testing.assert_allclose(to_rgb_float(palette), np.asarray(palette.convert("RGB")) / 255, atol=1e-7)


def test_model_array_in_colour_is_channels_first_and_each_channel_resized_like_gray():
    rgb = _colour_image(1)
    out = to_model_array(rgb, size=(16, 20), channels=3)
    assert out.shape == (3, 16, 20) and out.dtype == np.float32
    for c, band in enumerate(rgb.split()):
        assert np.array_equal(out[c], to_model_array(band, size=(16, 20)))
    assert to_model_array(rgb, size=16).shape == (16, 16)  # the paper's gray stays 2-D
    with pytest.raises(ValueError, match="1 .gray. or 3 .RGB."):
        to_model_array(rgb, size=16, channels=2)


def test_the_auto_rule_chooses_colour_from_the_training_images_only():
    gray = Image.new("L", (10, 10), 90)
    assert colourfulness(gray) == 0.0
    assert colourfulness(gray.convert("RGB")) == 0.0  # a gray product saved as RGB
    tinted = Image.new("RGB", (10, 10), (100, 100, 103))  # 3 levels: below the rule's bound
    assert colourfulness(tinted) < COLOURFUL
    orange = Image.new("RGB", (10, 10), (200, 120, 40))
    assert colourfulness(orange) == pytest.approx(160 / 255)
    assert model_channels("auto", [0.0, 0.001, 0.5]) == 1  # median below the bound
    assert model_channels("auto", [0.03, 0.04, 0.0]) == 3
    assert model_channels("gray") == 1 and model_channels("rgb") == 3
    with pytest.raises(ValueError, match="preprocessing.color must be one of"):
        model_channels("colour")


# ---- scoring ---------------------------------------------------------------------------


def _settings(**kw) -> MapSettings:
    base = {"smoothing_sigma": 4, "normal_reference": "zscore", "lowpass_sigma": 8}
    return MapSettings.from_dict({**base, **kw})


def test_a_gray_image_in_three_equal_channels_scores_as_in_one():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.uniform(0.2, 0.8, (2, 1, 48, 40)).astype(np.float32))
    recon = (x + 0.05 * torch.from_numpy(rng.normal(size=x.shape).astype(np.float32))).clamp(0, 1)
    for settings in (_settings(), MapSettings(), _settings(l2_weight=0.5, ssim_weight=0.5, win_size=[7, 11])):
        gray = raw_map(x, recon, settings)
        colour = raw_map(x.repeat(1, 3, 1, 1), recon.repeat(1, 3, 1, 1), settings)
        assert colour.shape == gray.shape
        torch.testing.assert_close(colour, gray, atol=1e-12, rtol=0)
    _, _, ssim_gray = score_maps(x, recon, MapSettings())
    _, _, ssim_colour = score_maps(x.repeat(1, 3, 1, 1), recon.repeat(1, 3, 1, 1), MapSettings())
    torch.testing.assert_close(ssim_colour, ssim_gray, atol=1e-6, rtol=0)


def test_a_change_of_hue_at_equal_brightness_is_seen_in_colour_and_not_in_gray():
    """An orange stain on a gray surface drawn at the surface's own luma: the gray map is
    flat, the colour map's low-pass channel lights up on the stain."""
    base = np.full((1, 3, 64, 64), 0.5, dtype=np.float32)
    stained = base.copy()
    luma = np.array([0.299, 0.587, 0.114])
    shift = np.array([0.2, -0.05, 0.0])
    shift[2] = -(luma[:2] @ shift[:2]) / luma[2]  # keep 0.299 R + 0.587 G + 0.114 B
    stained[0, :, 24:40, 24:40] += shift[:, None, None].astype(np.float32)
    x, recon = torch.from_numpy(stained), torch.from_numpy(base)  # the model gives back the clean surface
    to_gray = torch.from_numpy(luma.astype(np.float32))[None, :, None, None]
    settings = _settings()
    gray = raw_map((x * to_gray).sum(1, keepdim=True), (recon * to_gray).sum(1, keepdim=True), settings)
    colour = raw_map(x, recon, settings)
    assert float(gray.abs().max()) < 1e-6
    lowpass = colour[0, 1].numpy()
    assert lowpass[32, 32] > 0.05 and lowpass[32, 32] > 10 * lowpass[2, 2]


def test_synthetic_defects_on_colour_images_match_their_gray_placement():
    rng = np.random.default_rng(3)
    gray = rng.uniform(0.2, 0.8, (3, 1, 48, 48)).astype(np.float32)
    colour = np.repeat(gray, 3, axis=1)
    d1, m1, k1 = paste_synthetic_defects(gray, 8, 5, 0.05, 10, kinds=DEFAULT_KINDS)
    d3, m3, k3 = paste_synthetic_defects(colour, 8, 5, 0.05, 10, kinds=DEFAULT_KINDS)
    assert d3.shape == (24, 3, 48, 48) and np.array_equal(m1, m3) and k1 == k3
    for c in range(3):
        np.testing.assert_allclose(d3[:, c], d1[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\) or \(N, 3, H, W\)"):
        paste_synthetic_defects(np.zeros((2, 2, 8, 8), np.float32), 1, 0, 0.05, 3)


def test_a_tint_changes_hue_not_brightness_and_is_left_out_for_gray_images():
    rng = np.random.default_rng(4)
    gray = rng.uniform(0.3, 0.7, (2, 1, 48, 48)).astype(np.float32)
    colour = np.repeat(gray, 3, axis=1)
    defects, masks, kinds = paste_synthetic_defects(colour, 3, 1, 0.05, 10, kinds=["tint"])
    assert kinds == ["tint"] * 6
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
    source = np.repeat(colour, 3, axis=0)
    inside = masks.astype(bool)
    change = np.abs(defects - source).mean(axis=1)
    assert all(change[i][inside[i]].mean() >= 0.05 for i in range(6))  # a visible change of colour ...
    unclipped = ((defects > 0) & (defects < 1)).all(axis=1)  # [0, 1] clipping may move a pixel's luma
    assert unclipped.mean() > 0.99
    same = np.abs((defects * luma).sum(1) - (source * luma).sum(1))
    assert same[unclipped].max() < 2e-6  # ... at equal luma
    _, _, gray_kinds = paste_synthetic_defects(gray, 2, 1, 0.05, 10, kinds=["spot", "tint"])
    assert gray_kinds == ["spot"] * 4
    with pytest.raises(ValueError, match="need colour images"):
        paste_synthetic_defects(gray, 1, 1, 0.05, 10, kinds=["tint"])


# ---- model, checkpoint, figures ----------------------------------------------------------


def test_a_colour_checkpoint_is_refused_for_gray_data_with_the_setting_to_change():
    from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

    model = build_model(AutoencoderConfig(image_size=32, in_channels=3, latent_dim=8))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert model.config.describe() == "paper_table1, 32 px, RGB"
    checkpoint = build_checkpoint(model.eval(), None, epoch=1, history=[], config=TrainingConfig())
    with pytest.raises(CheckpointError, match="preprocessing.color=rgb"):
        gray = AutoencoderConfig(image_size=32, in_channels=1, latent_dim=8)
        model_from_checkpoint(checkpoint, gray, image_size=32)
    assert model_from_checkpoint(checkpoint).config.in_channels == 3


def test_figures_show_colour_images_in_colour():
    image = np.zeros((3, 8, 10), np.float32)
    image[0] = 1.0  # red
    shown = display_image(image)
    assert shown.shape == (8, 10, 3) and shown[..., 0].min() == 1.0
    assert display_image(image[:1]).shape == (8, 10)
    overlay = np.asarray(heatmap_overlay_image(image, np.zeros((8, 10)), alpha=0.0))
    assert overlay.shape == (8, 10, 3) and (overlay[..., 0] == 255).all() and (overlay[..., 1:] == 0).all()


# ---- end to end ------------------------------------------------------------------------------


def _colour_category(root: Path) -> Path:
    """The synthetic object tinted orange-brown, with one more defect type that only colour
    shows: a blue stain drawn at the surface's own luma."""
    from anomaly_ae.data.synthetic import generate_synthetic_category

    folder = generate_synthetic_category(
        root / "tinted", category="tinted", n_train=24, n_test_good=6, n_test_per_defect=4, size=96, seed=5
    )
    tint = np.array([1.0, 0.75, 0.45], dtype=np.float32)
    for path in sorted(p for p in folder.rglob("*.png") if "ground_truth" not in p.parts):
        gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
        tinted = np.rint(np.clip(gray[..., None] * tint, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(tinted, "RGB").save(path)
    stain_dir, mask_dir = folder / "test" / "stain", folder / "ground_truth" / "stain"
    stain_dir.mkdir()
    mask_dir.mkdir()
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    for i, good in enumerate(sorted((folder / "test" / "good").glob("*.png"))[:4]):
        rgb = np.asarray(Image.open(good), dtype=np.float32) / 255
        mask = np.zeros(rgb.shape[:2], bool)
        mask[30 + 5 * i : 50 + 5 * i, 30:52] = True
        blue = rgb[mask] @ luma  # gray at the same luma, then pushed towards blue
        shifted = np.stack([blue - 0.08, blue - 0.08, blue + 0.08 * (0.299 + 0.587) / 0.114], axis=-1)
        rgb[mask] = np.clip(shifted, 0, 1)
        Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB").save(stain_dir / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_dir / f"{i:03d}_mask.png")
    return folder


@pytest.mark.slow
def test_a_colour_category_runs_end_to_end_in_rgb_and_exports(kedro_project, tmp_path, one_torch_thread):
    """preprocessing.color=auto on colour images: the cache, the network, the heat maps and the
    ONNX bundle all carry three channels, and the bundle scores the colour-only stain like
    torch."""
    from anomaly_ae.runtime import load_bundle

    _colour_category(tmp_path / "root")
    kedro_project.session_run(
        env="quick",
        params={
            "data": {"root": str(tmp_path / "root"), "category": "tinted", "source": "mvtec"},
            "preprocessing": {"color": "auto"},
            "training": {"epochs": 2},
        },
        extra_pipelines=["export"],
        pipeline="__default__",
    )
    with np.load(kedro_project.latest("data/05_model_input/tinted/test_images.npz")) as cached:
        assert cached["images"].shape[1] == 3
    checkpoint_file = kedro_project.latest("data/06_models/tinted/model_checkpoint.pt")
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    assert checkpoint["model_config"]["in_channels"] == 3
    heatmap = next(kedro_project.latest("data/08_reporting/tinted/heatmaps").rglob("*.png"))
    rgb = np.asarray(Image.open(heatmap).convert("RGB"), dtype=np.int16)
    assert rgb.shape[-1] == 3
    metrics = kedro_project.latest("data/08_reporting/tinted/evaluation_metrics.json")
    assert 0 <= json.loads(metrics.read_text())["image_auroc"] <= 1
    bundle_dir = kedro_project.latest("data/06_models/tinted/inspection_bundle")
    bundle = load_bundle(bundle_dir, threads=1)
    assert bundle.channels == 3 and bundle.manifest["input"]["color"] == "rgb"
    assert bundle.manifest["input"]["shape"][1] == 3 and bundle.manifest["input"]["luma_weights"] is None
    stains = sorted((tmp_path / "root" / "tinted" / "test" / "stain").glob("*.png"))
    verdicts = list(bundle.iter_inspect((p.name, p) for p in stains))
    assert all(v.error is None and np.isfinite(v.score) for v in verdicts)
    assert bundle.manifest["export_check"]["n_images"] >= 1
