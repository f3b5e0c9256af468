"""Tests for the training loop (anomaly_ae.training.trainer), on CPU with tiny 64 px images."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_ae.data.synthetic import generate_synthetic_category
from anomaly_ae.data.transforms import to_model_array
from anomaly_ae.model import AutoencoderConfig, HybridLoss, SeparableHybridLoss, build_model
from anomaly_ae.model.checkpoint import load_checkpoint, save_checkpoint_atomic, weights_only
from anomaly_ae.training.trainer import (
    TrainingConfig,
    TrainingDivergedError,
    batch_slices,
    build_checkpoint,
    build_loss,
    train_autoencoder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = 64
MODEL = AutoencoderConfig(image_size=SIZE)


def _cfg(**kwargs) -> TrainingConfig:
    base = dict(progress=False, device="cpu", precision="fp32", batch_size=4, epochs=2, seed=0, compile=False)
    base.update(kwargs)
    return TrainingConfig(**base)


def _losses(history: list[dict]) -> list[tuple]:
    return [(row["epoch"], row["train_loss"], row.get("val_loss")) for row in history]


def _states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = generate_synthetic_category(
        tmp_path_factory.mktemp("train") / "bottle",
        n_train=17,
        n_test_good=4,
        n_test_per_defect=1,
        size=SIZE,
        seed=1,
    )

    def load(folder: Path) -> torch.Tensor:
        arrays = []
        for p in sorted(folder.glob("*.png")):
            with Image.open(p) as img:
                arrays.append(to_model_array(img, SIZE))
        return torch.from_numpy(np.stack(arrays))[:, None]

    train = load(root / "train" / "good")
    val = load(root / "test" / "good")
    assert train.shape == (17, 1, SIZE, SIZE) and val.shape == (4, 1, SIZE, SIZE)
    return {"train17": train, "train": train[:8], "val": val}


# ------------------------------------------------------------------ batch_slices


def _sizes(slices: list[slice]) -> list[int]:
    return [s.stop - s.start for s in slices]


def test_batch_slices_209_by_8():
    slices = batch_slices(209, 8)
    assert len(slices) == 26
    assert _sizes(slices) == [8] * 25 + [9]
    assert slices[-1] == slice(200, 209)


@pytest.mark.parametrize(
    "n, bs, sizes",
    [
        (17, 8, [8, 9]),
        (16, 8, [8, 8]),
        (18, 8, [8, 8, 2]),
        (8, 8, [8]),
        (3, 8, [3]),
        (9, 8, [9]),
        (2, 1, [2]),  # batch_size 1: the final batch of one is merged too
    ],
)
def test_batch_slices_sizes(n, bs, sizes):
    assert _sizes(batch_slices(n, bs)) == sizes


@pytest.mark.parametrize("n, bs", [(209, 8), (17, 8), (16, 8), (100, 7), (33, 32), (5, 2)])
def test_batch_slices_cover_every_item_once(n, bs):
    slices = batch_slices(n, bs)
    covered = [i for s in slices for i in range(s.start, s.stop)]
    assert covered == list(range(n))
    if bs > 1:
        assert all(size >= 2 for size in _sizes(slices))


def test_single_image_batch_would_break_batchnorm():
    """Why batch_slices merges a final batch of one: BatchNorm1d refuses it in train mode."""
    model = build_model(MODEL).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.rand(1, 1, SIZE, SIZE))


def test_training_with_17_images_batch_8(data):
    result = train_autoencoder(data["train17"], None, MODEL, _cfg(epochs=1, batch_size=8))
    assert len(result.history) == 1
    assert math.isfinite(result.history[0]["train_loss"])


# ------------------------------------------------------------------ learning and determinism


def test_training_lowers_the_loss(data):
    result = train_autoencoder(data["train"], None, MODEL, _cfg(epochs=5, learning_rate=0.002))
    losses = [row["train_loss"] for row in result.history]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert result.device == "cpu"
    assert not result.stopped_early
    assert next(result.model.parameters()).device.type == "cpu"
    assert not result.model.training


@pytest.fixture(scope="module")
def seeded_runs(data) -> dict[str, object]:
    cfg = dict(epochs=2)
    return {
        "a": train_autoencoder(data["train"], data["val"], MODEL, _cfg(seed=5, **cfg)),
        "b": train_autoencoder(data["train"], data["val"], MODEL, _cfg(seed=5, **cfg)),
        "c": train_autoencoder(data["train"], data["val"], MODEL, _cfg(seed=6, **cfg)),
    }


def test_same_seed_is_bit_identical(seeded_runs):
    a, b = seeded_runs["a"], seeded_runs["b"]
    assert _losses(a.history) == _losses(b.history)  # exact float equality
    assert _states_equal(a.model.state_dict(), b.model.state_dict())


def test_different_seed_differs(seeded_runs):
    a, c = seeded_runs["a"], seeded_runs["c"]
    for row_a, row_c in zip(a.history, c.history, strict=True):
        assert row_a["train_loss"] != row_c["train_loss"]
    assert not _states_equal(a.model.state_dict(), c.model.state_dict())


def test_history_rows(seeded_runs):
    for row in seeded_runs["a"].history:
        assert {"epoch", "train_loss", "val_loss", "epoch_seconds", "images_per_second"} <= set(row)
        assert math.isfinite(row["val_loss"]) and row["epoch_seconds"] > 0


def test_returned_checkpoint_rebuilds_the_model(data, seeded_runs):
    result = seeded_runs["a"]
    ckpt = result.checkpoint
    assert ckpt["model_config"] == MODEL.to_dict()
    model = build_model(AutoencoderConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    x = data["val"]
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))


# ------------------------------------------------------------------ divergence guard


def test_nan_image_raises_and_keeps_previous_checkpoint(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    train_autoencoder(data["train"], None, MODEL, _cfg(epochs=1, checkpoint_path=str(path)))
    before = path.read_bytes()

    bad = data["train"].clone()
    bad[3, 0, 10, 10] = float("nan")
    with pytest.raises(TrainingDivergedError) as info:
        train_autoencoder(bad, None, MODEL, _cfg(epochs=3, checkpoint_path=str(path)))
    message = str(info.value)
    assert re.search(r"epoch 1\b", message), message
    assert re.search(r"step [12]/2\b", message), message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_nan_loss_names_epoch_and_step(data, tmp_path, monkeypatch):
    """A loss that turns NaN at epoch 2, step 2 (of 2): the message says so, and the
    checkpoint keeps the last good epoch (1)."""
    original = HybridLoss.components
    calls = {"n": 0}

    def components(self, target, recon):
        out = original(self, target, recon)
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] == 4:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(HybridLoss, "components", components)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TrainingDivergedError) as info:
        train_autoencoder(
            data["train"], data["val"], MODEL, _cfg(epochs=5, checkpoint_path=str(path), checkpoint_seconds=0)
        )
    message = str(info.value)
    assert re.search(r"epoch 2\b", message), message
    assert re.search(r"step 2/2\b", message), message
    assert calls["n"] == 4
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values() if v.is_floating_point())


# ------------------------------------------------------------------ early stopping


def test_early_stopping_and_restore_best(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    # min_delta is so large that no epoch after the first can count as an improvement.
    cfg = _cfg(
        epochs=10,
        early_stopping_patience=2,
        early_stopping_min_delta=1e9,
        restore_best=True,
        checkpoint_path=str(path),
    )
    result = train_autoencoder(data["train"], data["val"], MODEL, cfg)
    assert result.stopped_early
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.best_epoch == 1

    saved = load_checkpoint(path)  # written at the stopping epoch
    assert saved["epoch"] == 3 and saved["best_epoch"] == 1
    best, last = saved["best_model_state"], saved["model_state"]
    assert not _states_equal(best, last), "the weights did not change after epoch 1"
    final = result.model.state_dict()
    assert _states_equal(final, best)
    assert _states_equal(result.checkpoint["model_state"], best)

    # The stored best state really is epoch 1's: a 1-epoch run with the same seed.
    one = train_autoencoder(data["train"], data["val"], MODEL, _cfg(epochs=1))
    assert _states_equal(one.model.state_dict(), best)
    assert one.history[0]["train_loss"] == result.history[0]["train_loss"]


def test_without_restore_best_keeps_last_weights(data, tmp_path):
    path = tmp_path / "ckpt.pt"
    cfg = _cfg(
        epochs=10,
        early_stopping_patience=1,
        early_stopping_min_delta=1e9,
        restore_best=False,
        checkpoint_path=str(path),
    )
    result = train_autoencoder(data["train"], data["val"], MODEL, cfg)
    assert result.stopped_early and len(result.history) == 2
    saved = load_checkpoint(path)
    assert _states_equal(result.model.state_dict(), saved["model_state"])
    assert not _states_equal(result.model.state_dict(), saved["best_model_state"])


def test_no_early_stopping_without_validation(data):
    cfg = _cfg(epochs=3, early_stopping_patience=1, early_stopping_min_delta=1e9, restore_best=False)
    result = train_autoencoder(data["train"], None, MODEL, cfg)
    assert not result.stopped_early and len(result.history) == 3


# ------------------------------------------------------------------ resume


def test_resume_matches_straight_run(data, tmp_path):
    straight = train_autoencoder(data["train"], data["val"], MODEL, _cfg(epochs=4))

    path = tmp_path / "ckpt.pt"
    first = train_autoencoder(data["train"], data["val"], MODEL, _cfg(epochs=2, checkpoint_path=str(path)))
    assert _losses(first.history) == _losses(straight.history)[:2]
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 2
    resumed = train_autoencoder(data["train"], data["val"], MODEL, _cfg(epochs=4), resume_checkpoint=ckpt)

    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert _losses(resumed.history) == _losses(straight.history), (
        f"straight {_losses(straight.history)} vs resumed {_losses(resumed.history)}"
    )
    assert resumed.best_epoch == straight.best_epoch
    assert _states_equal(resumed.model.state_dict(), straight.model.state_dict())


def test_resume_from_a_finished_runs_checkpoint_goes_on_from_its_last_epoch(data, tmp_path):
    """A finished run's checkpoint holds the restored best epoch's weights (what evaluation
    and export use) and, apart, its last epoch's: ``training.resume_from`` goes on from the
    last, so 3 + 2 epochs equal 5 straight even when the best epoch is not the last."""
    lr = 0.01  # large steps: on this data the validation loss is best early (epoch 1 or 2 by machine)
    straight = train_autoencoder(data["train"], data["val"], MODEL, _cfg(epochs=5, learning_rate=lr))
    first = train_autoencoder(data["train"], data["val"], MODEL, _cfg(epochs=3, learning_rate=lr))
    best = straight.best_epoch
    assert first.best_epoch == best < 3, _losses(straight.history)  # the case under test: best < last
    path = tmp_path / "model_checkpoint.pt"
    save_checkpoint_atomic(first.checkpoint, path)
    ckpt = load_checkpoint(path)
    assert _states_equal(ckpt["model_state"], first.model.state_dict())  # the best epoch's weights
    assert ckpt["last_model_state"] is not None and not _states_equal(
        ckpt["last_model_state"], ckpt["model_state"]
    )
    assert "last_model_state" not in weights_only(ckpt)  # not in the copy logged to MLflow

    resumed = train_autoencoder(
        data["train"], data["val"], MODEL, _cfg(epochs=5, learning_rate=lr), resume_checkpoint=ckpt
    )
    assert _losses(resumed.history) == _losses(straight.history)
    assert resumed.best_epoch == best
    assert _states_equal(resumed.model.state_dict(), straight.model.state_dict())


def test_resume_with_different_model_config_raises(data):
    torch.manual_seed(0)
    ckpt = build_checkpoint(build_model(MODEL), None, epoch=1, history=[], config=_cfg())
    other = AutoencoderConfig(image_size=SIZE, latent_dim=64)
    with pytest.raises(ValueError, match="resume"):
        train_autoencoder(data["train"], None, other, _cfg(epochs=2), resume_checkpoint=ckpt)


def test_resume_rejects_non_checkpoint(data):
    with pytest.raises(ValueError):
        train_autoencoder(data["train"], None, MODEL, _cfg(epochs=2), resume_checkpoint={"epoch": 1})


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(batch_size=0), dict(learning_rate=0.0)])
def test_invalid_training_config(kwargs):
    with pytest.raises(ValueError, match="training"):
        TrainingConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(), HybridLoss),  # eager: pytorch_msssim's SSIM
        (dict(compile=True), SeparableHybridLoss),  # compiled: the fusable separable filter
        (dict(ssim_impl="separable"), SeparableHybridLoss),
        (dict(compile=True, ssim_impl="pytorch_msssim"), HybridLoss),
    ],
)
def test_build_loss_picks_the_ssim_implementation(kwargs, expected):
    loss = build_loss(_cfg(**{**kwargs, "mse_weight": 0.3, "ssim_weight": 0.7}))
    assert type(loss) is expected
    assert (loss.mse_weight, loss.ssim_weight) == (0.3, 0.7)


def test_invalid_ssim_impl():
    with pytest.raises(ValueError, match="training.ssim_impl"):
        TrainingConfig(ssim_impl="fft")


def test_training_config_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        TrainingConfig.from_dict({"epochs": 3, "bogus": 1})


def test_needs_two_images(data):
    with pytest.raises(ValueError, match="at least 2"):
        train_autoencoder(data["train"][:1], None, MODEL, _cfg(epochs=1))


def test_resume_from_a_checkpoint_written_before_tiles_existed(data):
    """Checkpoints stored before ``model.tile_size`` existed have no such key (nor do those of
    untiled models now); they resume under a config that spells ``tile_size: null``."""
    torch.manual_seed(0)
    ckpt = build_checkpoint(build_model(MODEL), None, epoch=1, history=[], config=_cfg())
    assert "tile_size" not in ckpt["model_config"]
    configured = AutoencoderConfig.from_dict({**ckpt["model_config"], "tile_size": None})
    resumed = train_autoencoder(data["train"], None, configured, _cfg(epochs=2), resume_checkpoint=ckpt)
    assert [row["epoch"] for row in resumed.history] == [2]
    tiled = AutoencoderConfig.from_dict({**ckpt["model_config"], "image_size": 2 * SIZE, "tile_size": SIZE})
    with pytest.raises(ValueError, match="resume with the same model settings"):
        train_autoencoder(data["train"], None, tiled, _cfg(epochs=2), resume_checkpoint=ckpt)


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", "cuda", "reduce-overhead"),
        ("auto", "cpu", "default"),
        ("auto", "mps", "default"),
        ("reduce-overhead", "cpu", "default"),
        ("max-autotune", "cpu", "max-autotune-no-cudagraphs"),
        ("max-autotune", "cuda", "max-autotune"),
        ("default", "cuda", "default"),
    ],
)
def test_compile_mode_auto_is_cuda_graphs_on_cuda_only(name, device, expected):
    from anomaly_ae.device import resolve_compile_mode

    assert resolve_compile_mode(name, torch.device(device)) == expected


def test_unknown_compile_mode_is_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="training.compile_mode must be one of"):
        TrainingConfig(compile_mode="fast")
