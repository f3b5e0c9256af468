"""Batched inference (anomaly_ae.scoring.inference) and rebuilding a model from a checkpoint
(anomaly_ae.model.checkpoint.model_from_checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.model.checkpoint import CheckpointError, model_from_checkpoint
from anomaly_ae.scoring import MapSettings, anomaly_map, per_image_ssim
from anomaly_ae.scoring.inference import reconstruct, reconstruct_and_score
from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    return build_checkpoint(
        build_model(AutoencoderConfig(image_size=SIZE)).eval(),
        None,
        epoch=1,
        history=[],
        config=TrainingConfig(),
    )


@pytest.fixture(scope="module")
def model(checkpoint):
    return model_from_checkpoint(checkpoint, image_size=SIZE)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((5, 1, SIZE, SIZE), dtype=np.float32)


def test_model_from_checkpoint_rebuilds_the_weights_in_eval_mode(checkpoint, model):
    assert not model.training
    assert model.config == AutoencoderConfig(image_size=SIZE)
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model_state"][name]), name


def test_checkpoint_of_another_image_size_is_refused(checkpoint):
    with pytest.raises(
        CheckpointError, match=r"64px images but the data is 256px; set preprocessing\.image_size=64, or"
    ):
        model_from_checkpoint(checkpoint, image_size=256)
    # a square model against data that kept its aspect: the message names keep_aspect too
    with pytest.raises(
        CheckpointError,
        match=r"the data is 64x128px \(height x width\); set preprocessing\.image_size=64 "
        r"and preprocessing\.keep_aspect=false",
    ):
        model_from_checkpoint(checkpoint, image_size=(64, 128))


def test_checkpoint_of_another_architecture_is_refused(checkpoint):
    other = dict(checkpoint, model_config={**checkpoint["model_config"], "architecture": "something_else"})
    with pytest.raises((CheckpointError, ValueError), match="architecture"):
        model_from_checkpoint(other, AutoencoderConfig(image_size=SIZE))
    with pytest.raises(CheckpointError, match="architecture"):
        model_from_checkpoint(checkpoint, AutoencoderConfig(image_size=SIZE, architecture="paper_table1_v2"))
    with pytest.raises(CheckpointError, match="not an anomaly-ae checkpoint"):
        model_from_checkpoint({"epoch": 1})


def test_checkpoint_of_another_tiling_is_refused_saying_what_to_set(checkpoint):
    """Params that describe another tiling than the checkpoint's are refused (so the
    report's configuration is the evaluated model's), naming model.tile_size."""
    with pytest.raises(
        CheckpointError,
        match=r"whole image.*model\.tile_size=32 \(2x2 tiles of 32 px\); set model\.tile_size=null",
    ):
        model_from_checkpoint(checkpoint, AutoencoderConfig(image_size=SIZE, tile_size=SIZE // 2))
    tiled = build_checkpoint(
        build_model(AutoencoderConfig(image_size=SIZE, tile_size=SIZE // 2)),
        None,
        epoch=1,
        history=[],
        config=TrainingConfig(),
    )
    with pytest.raises(CheckpointError, match=r"2x2 tiles of 32 px.*set model\.tile_size=32"):
        model_from_checkpoint(tiled, AutoencoderConfig(image_size=SIZE))
    assert model_from_checkpoint(
        tiled, AutoencoderConfig(image_size=SIZE, tile_size=SIZE // 2)
    ).config.tile_grid == (2, 2)


def test_reconstruct_and_score_outputs(model, images):
    out = reconstruct_and_score(model, images, MapSettings(), 2, device="cpu", precision="fp32")
    assert set(out) == {"recon", "map", "ssim", "mse", "score"}
    assert out["recon"].shape == (5, 1, SIZE, SIZE) and out["map"].shape == (5, SIZE, SIZE)
    assert all(v.dtype == np.float32 for v in out.values())
    for key in ("ssim", "mse", "score"):
        assert out[key].shape == (5,)
    with torch.no_grad():
        recon = model(torch.from_numpy(images))
    np.testing.assert_allclose(out["recon"], recon.numpy(), atol=1e-6, rtol=0)
    # the map is the scoring core's, the score its maximum (the paper's default)
    expected_map = anomaly_map(torch.from_numpy(images), recon)[:, 0].numpy()
    # (1 - SSIM amplifies the float32 differences of batches of 2 and of 5 to ~2e-6 at a few pixels)
    np.testing.assert_allclose(out["map"], expected_map, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["score"], out["map"].reshape(5, -1).max(axis=1), atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["mse"], ((images - out["recon"]) ** 2).mean(axis=(1, 2, 3)), atol=1e-6)
    expected_ssim = per_image_ssim(torch.from_numpy(images), recon).numpy()
    np.testing.assert_allclose(out["ssim"], expected_ssim, atol=1e-5, rtol=0)
    # noise is reconstructed badly by an untrained model: SSIM well below 1, scores high
    assert out["ssim"].max() < 0.5 and out["score"].min() > 0.5


def test_settings_and_batch_size(model, images):
    settings = MapSettings(l2_weight=1.0, smoothing_sigma=2.0, score_reduction="mean")
    whole = reconstruct_and_score(model, images, settings, 5, device="cpu", precision="fp32")
    split = reconstruct_and_score(model, images, settings, 2, device="cpu", precision="fp32")
    for key in whole:  # batches are independent in eval mode
        np.testing.assert_allclose(split[key], whole[key], atol=1e-5, rtol=0, err_msg=key)
    np.testing.assert_allclose(whole["score"], whole["map"].reshape(5, -1).mean(axis=1), rtol=1e-5)
    paper = reconstruct_and_score(model, images, MapSettings(), 5, device="cpu", precision="fp32")
    assert not np.allclose(whole["map"], paper["map"], atol=1e-3)  # the settings change the map ...
    np.testing.assert_array_equal(whole["ssim"], paper["ssim"])  # ... never the paper's SSIM


def test_without_maps_and_reconstruct_only(model, images):
    out = reconstruct_and_score(
        model, images, MapSettings(), 2, device="cpu", precision="fp32", keep_maps=False
    )
    assert set(out) == {"recon", "ssim", "mse", "score"}
    recon = reconstruct(model, images, 3, device="cpu")
    assert recon.shape == (5, 1, SIZE, SIZE) and recon.dtype == np.float32
    np.testing.assert_allclose(recon, out["recon"], atol=1e-6, rtol=0)
    # the same batches give the same reconstructions, bit for bit, without any map computed
    np.testing.assert_array_equal(reconstruct(model, images, 2, device="cpu"), out["recon"])
    as_bytes = np.round(images * 255).astype(np.uint8)  # the compact cache's uint8
    np.testing.assert_array_equal(
        reconstruct(model, as_bytes, 2, device="cpu"),
        reconstruct_and_score(model, as_bytes, MapSettings(), 2, precision="fp32", keep_maps=False)["recon"],
    )
    assert reconstruct(model, images[:0], 2, device="cpu").shape == (0, 1, SIZE, SIZE)
    empty = reconstruct_and_score(model, images[:0], MapSettings(), 2, device="cpu", precision="fp32")
    assert all(len(v) == 0 for v in empty.values())


def test_without_reconstructions_the_same_maps_and_scores(model, images):
    """``keep_recon=False`` (the stress test, the references) leaves the reconstructions out
    and changes nothing else, bit for bit."""
    settings = MapSettings(smoothing_sigma=2.0)
    full = reconstruct_and_score(model, images, settings, 2, device="cpu", precision="fp32")
    lean = reconstruct_and_score(model, images, settings, 2, device="cpu", precision="fp32", keep_recon=False)
    assert set(lean) == {"map", "ssim", "mse", "score"}
    for key in lean:
        np.testing.assert_array_equal(lean[key], full[key], err_msg=key)
    # the last, partial batch lands at the end of each output (5 images in batches of 2)
    single = reconstruct_and_score(model, images[4:], settings, 2, device="cpu", precision="fp32")
    np.testing.assert_allclose(full["map"][4], single["map"][0], atol=1e-6, rtol=0)
    assert reconstruct_and_score(model, images[:0], settings, 2, keep_recon=False)["map"].shape == (
        0,
        SIZE,
        SIZE,
    )
