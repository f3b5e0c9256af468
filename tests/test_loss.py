"""Tests for the hybrid MSE + SSIM loss (anomaly_ae.model.loss): HybridLoss (pytorch_msssim's
SSIM) and SeparableHybridLoss (the scoring core's separable SSIM, used when compiled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.filters import gaussian
from skimage.metrics import structural_similarity

from anomaly_ae.data.synthetic import generate_synthetic_category
from anomaly_ae.data.transforms import to_model_array
from anomaly_ae.model import HybridLoss, SeparableHybridLoss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = 128
BOTH = pytest.mark.parametrize("loss_cls", [HybridLoss, SeparableHybridLoss], ids=["msssim", "separable"])


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        structural_similarity(
            a.astype(np.float64),
            b.astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
    )


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, np.ndarray]:
    root = generate_synthetic_category(
        tmp_path_factory.mktemp("loss") / "bottle",
        n_train=2,
        n_test_good=1,
        n_test_per_defect=1,
        size=SIZE,
        seed=7,
    )

    def load(p: Path) -> np.ndarray:
        with Image.open(p) as img:
            return to_model_array(img, SIZE)

    good = load(root / "train" / "good" / "000.png")
    other = load(root / "train" / "good" / "001.png")
    defect = load(root / "test" / "contamination" / "000.png")
    rng = np.random.default_rng(0)
    blurred = gaussian(good, sigma=1.2, preserve_range=True)
    noisy = np.clip(blurred + rng.normal(0, 0.05, good.shape), 0, 1).astype(np.float32)
    return {
        "good": good,
        "other": other,
        "defect": defect,
        "noisy": noisy,
        "blurred": blurred.astype(np.float32),
    }


def test_fixture_images_are_realistic(images):
    good = images["good"]
    assert good.shape == (SIZE, SIZE) and good.dtype == np.float32
    assert 0 <= good.min() and good.max() <= 1 and good.std() > 0.1


@BOTH
@pytest.mark.parametrize("other", ["noisy", "blurred", "defect", "other", "good"])
def test_ssim_matches_scikit_image(images, other, loss_cls):
    a, b = images["good"], images[other]
    expected = _skimage_ssim(a, b)
    got = float(loss_cls().components(_t(a), _t(b))["ssim"])
    assert got == pytest.approx(expected, abs=1e-5)


def test_ssim_is_sensitive_and_symmetric_enough(images):
    # not a constant: a very different image gives a clearly lower SSIM
    loss = HybridLoss()
    s_noisy = float(loss.components(_t(images["good"]), _t(images["noisy"]))["ssim"])
    s_same = float(loss.components(_t(images["good"]), _t(images["good"]))["ssim"])
    assert s_same == pytest.approx(1.0, abs=1e-6)
    assert s_noisy < 0.95


@BOTH
def test_ssim_of_batch_is_mean_of_per_image_ssims(images, loss_cls):
    target = np.stack([images["good"], images["other"]])
    recon = np.stack([images["noisy"], images["defect"]])
    expected = np.mean([_skimage_ssim(t, r) for t, r in zip(target, recon, strict=True)])
    got = loss_cls().components(torch.from_numpy(target)[:, None], torch.from_numpy(recon)[:, None])
    assert float(got["ssim"]) == pytest.approx(expected, abs=1e-5)
    assert float(got["mse"]) == pytest.approx(float(np.mean((target - recon) ** 2)), rel=1e-5)


@BOTH
@pytest.mark.parametrize("w_mse, w_ssim", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.2, 0.7)])
def test_loss_is_weighted_sum(images, w_mse, w_ssim, loss_cls):
    a, b = images["good"], images["noisy"]
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    ssim = _skimage_ssim(a, b)
    expected = w_mse * mse + w_ssim * (1.0 - ssim)
    loss_fn = loss_cls(mse_weight=w_mse, ssim_weight=w_ssim)
    loss = loss_fn(_t(a), _t(b))
    assert loss.shape == ()
    assert float(loss) == pytest.approx(expected, abs=1e-4)
    parts = loss_fn.components(_t(a), _t(b))
    assert float(parts["loss"]) == pytest.approx(
        w_mse * float(parts["mse"]) + w_ssim * (1 - float(parts["ssim"])), abs=1e-6
    )
    assert float(parts["mse"]) == pytest.approx(mse, rel=1e-5)


def test_weights_change_the_loss(images):
    a, b = _t(images["good"]), _t(images["noisy"])
    values = {w: float(HybridLoss(*w)(a, b)) for w in [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]}
    assert values[(1.0, 0.0)] != pytest.approx(values[(0.0, 1.0)], abs=1e-3)
    assert values[(0.5, 0.5)] == pytest.approx(0.5 * values[(1.0, 0.0)] + 0.5 * values[(0.0, 1.0)], abs=1e-6)


def test_default_weights_are_papers():
    loss = HybridLoss()
    assert loss.mse_weight == 0.5 and loss.ssim_weight == 0.5 and loss.data_range == 1.0


@BOTH
@pytest.mark.parametrize("w", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_identical_images_give_zero_loss(images, w, loss_cls):
    x = _t(images["good"])
    assert abs(float(loss_cls(*w)(x, x.clone()))) < 1e-6


@BOTH
def test_bfloat16_inputs_give_float32_loss(images, loss_cls):
    a, b = _t(images["good"]), _t(images["noisy"])
    loss_fn = loss_cls()
    ref = loss_fn(a, b)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    low = loss_fn(a16, b16)
    assert ref.dtype == torch.float32
    assert low.dtype == torch.float32
    for value in loss_fn.components(a16, b16).values():
        assert value.dtype == torch.float32
    # computed in float32 from the bf16 values, so equal to the fp32 loss of the rounded inputs
    assert float(low) == pytest.approx(float(loss_fn(a16.float(), b16.float())), abs=1e-6)
    # and close to the full-precision value (bf16 rounding of the inputs only)
    assert float(low) == pytest.approx(float(ref), abs=5e-3)


@BOTH
def test_bfloat16_under_autocast(images, loss_cls):
    a, b = _t(images["good"]), _t(images["noisy"])
    ref = float(loss_cls()(a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_cls()(a, b.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(ref, abs=5e-3)


@BOTH
@pytest.mark.parametrize("w_mse, w_ssim", [(-0.1, 0.5), (0.5, -1.0), (0.0, 0.0), (-1.0, -1.0), (-0.5, 1.0)])
def test_invalid_weights_raise(w_mse, w_ssim, loss_cls):
    with pytest.raises(ValueError, match="weight"):
        loss_cls(mse_weight=w_mse, ssim_weight=w_ssim)


def test_separable_loss_validates_its_window():
    with pytest.raises(ValueError, match="window size"):
        SeparableHybridLoss(win_size=10)


@BOTH
def test_gradients_flow(images, loss_cls):
    target = _t(images["good"])
    recon = _t(images["noisy"]).requires_grad_(True)
    loss = loss_cls()(target, recon)
    loss.backward()
    assert recon.grad is not None
    assert recon.grad.shape == recon.shape
    assert torch.isfinite(recon.grad).all()
    assert recon.grad.abs().sum() > 0
    # a small step against the gradient lowers the loss
    with torch.no_grad():
        stepped = (recon - 1.0 * recon.grad / recon.grad.abs().max() * 1e-2).clamp(0, 1)
    assert float(loss_cls()(target, stepped)) < loss.item()


def test_gradients_flow_to_model_parameters():
    from anomaly_ae.model import AutoencoderConfig, build_model

    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=64))
    x = torch.rand(2, 1, 64, 64)
    HybridLoss()(x, model(x)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder[0].weight.grad.abs().sum() > 0
