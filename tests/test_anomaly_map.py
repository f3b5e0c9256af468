"""Tests for anomaly_ae.evaluation.anomaly_map (SSIM maps, anomaly maps, image scores)."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_msssim
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from anomaly_ae.evaluation.anomaly_map import (
    anomaly_map,
    gaussian_window,
    image_score,
    local_ssim_map,
    per_image_ssim,
)


def _smooth_pair(n: int = 2, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random smooth images in [0, 1] and a noisy, slightly shifted 'reconstruction'."""
    rng = np.random.default_rng(seed)
    x = np.stack([gaussian_filter(rng.random((size, size)), 3) for _ in range(n)])
    x = (x - x.min()) / (x.max() - x.min())
    y = np.clip(0.8 * x + 0.1 + 0.05 * rng.standard_normal(x.shape), 0.0, 1.0)
    return torch.from_numpy(x[:, None]).float(), torch.from_numpy(y[:, None]).float()


def test_gaussian_window_normalised_and_symmetric() -> None:
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,)
    assert g.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(g, g.flip(0))
    assert int(g.argmax()) == 5
    with pytest.raises(ValueError, match="win_size"):
        gaussian_window(10)


def test_local_ssim_identical_is_one_and_same_shape() -> None:
    x, _ = _smooth_pair(n=2, size=64)
    smap = local_ssim_map(x, x)
    assert smap.shape == x.shape
    assert smap.dtype == torch.float32
    assert torch.allclose(smap, torch.ones_like(smap), atol=1e-5)


def test_local_ssim_float64_input_computed_in_float32() -> None:
    x, y = _smooth_pair(n=1, size=32)
    assert local_ssim_map(x.double(), y.double()).dtype == torch.float32


def test_local_ssim_interior_matches_pytorch_msssim() -> None:
    x, y = _smooth_pair(n=2, size=64)
    smap = local_ssim_map(x, y, win_size=11, sigma=1.5, data_range=1.0)
    p = 11 // 2
    interior_mean = smap[:, :, p:-p, p:-p].mean(dim=(1, 2, 3))
    ref = pytorch_msssim.ssim(x, y, data_range=1.0, win_size=11, win_sigma=1.5, size_average=False)
    assert torch.allclose(interior_mean, ref, atol=1e-5)


def test_per_image_ssim_matches_pytorch_msssim_and_skimage() -> None:
    x, y = _smooth_pair(n=2, size=256)
    ours = per_image_ssim(x, y)
    assert ours.shape == (2,)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False))
    for i in range(2):
        sk = structural_similarity(
            x[i, 0].double().numpy(),
            y[i, 0].double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert ours[i].item() == pytest.approx(sk, abs=1e-4)


def test_anomaly_map_zero_for_identical_and_higher_on_changed_patch() -> None:
    x, _ = _smooth_pair(n=1, size=64)
    amap0 = anomaly_map(x, x)
    assert amap0.shape == x.shape
    assert torch.allclose(amap0, torch.zeros_like(amap0), atol=1e-5)

    recon = x.clone()
    recon[:, :, 20:30, 20:30] = 1.0 - recon[:, :, 20:30, 20:30]
    amap = anomaly_map(x, recon)
    assert float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0
    inside = amap[:, :, 20:30, 20:30].mean()
    far = amap[:, :, 45:, 45:]
    assert inside > 0.3
    assert torch.allclose(far, torch.zeros_like(far), atol=1e-5)

    # default weights = 1 - local SSIM exactly (clipped to [0, 1])
    expected = (1 - local_ssim_map(x, recon)).clamp(0, 1)
    assert torch.allclose(amap, expected)

    # L2 term and smoothing
    l2_only = anomaly_map(x, recon, ssim_weight=0.0, l2_weight=1.0)
    assert torch.allclose(l2_only, (x - recon) ** 2)
    smoothed = anomaly_map(x, recon, smoothing_sigma=2.0)
    assert smoothed.shape == x.shape
    assert float(smoothed.max()) < float(amap.max())
    assert smoothed.sum().item() == pytest.approx(amap.sum().item(), rel=0.05)


def test_image_score_reductions() -> None:
    amap = torch.zeros(2, 1, 10, 10)
    amap[0, 0, 0, :] = torch.arange(10, dtype=torch.float32)  # 0..9 in one row
    amap[1] = 0.5
    assert torch.allclose(image_score(amap, "max"), torch.tensor([9.0, 0.5]))
    assert torch.allclose(image_score(amap, "mean"), torch.tensor([0.45, 0.5]))
    # top 5 % of 100 pixels = 5 pixels: 9, 8, 7, 6, 5 -> 7
    assert torch.allclose(image_score(amap, "topk_mean", topk_fraction=0.05), torch.tensor([7.0, 0.5]))
    # tiny fraction still uses at least one pixel
    assert torch.allclose(image_score(amap, "topk_mean", topk_fraction=1e-6), torch.tensor([9.0, 0.5]))
    # (N, H, W) input works as well
    assert torch.allclose(image_score(amap[:, 0], "max"), torch.tensor([9.0, 0.5]))
    with pytest.raises(ValueError, match="reduction"):
        image_score(amap, "median")
    with pytest.raises(ValueError, match="topk_fraction"):
        image_score(amap, "topk_mean", topk_fraction=0.0)
