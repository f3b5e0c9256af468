"""Pixel-level anomaly maps and image-level scores from SSIM/L2 reconstruction error.

All functions take batches shaped ``(N, C, H, W)`` (``C`` is 1 for the grayscale
MVTec AD images used here) with intensities in ``[0, data_range]`` and compute in
``float32`` whatever the input dtype is.

SSIM conventions follow :mod:`pytorch_msssim` (Wang et al. 2004): an 11x11
Gaussian window with sigma 1.5 applied separably (rows then columns),
``C1 = (k1 * data_range)**2``, ``C2 = (k2 * data_range)**2``, population
(biased) local variances, and ``alpha = beta = gamma = 1``.

* :func:`per_image_ssim` is the scalar reported per image in the paper: exactly
  ``pytorch_msssim.ssim(..., size_average=False)``, i.e. the mean of the
  *valid-mode* SSIM map (the ``win_size // 2`` border is not used).
* :func:`local_ssim_map` returns a *same-size* SSIM map: the images are
  reflect-padded by ``win_size // 2`` before filtering, so the map can be used as
  a per-pixel anomaly map and compared against ground-truth masks. Its interior
  (``win_size // 2`` pixels away from each border) equals pytorch_msssim's
  valid-mode map.
"""

from __future__ import annotations

import math

import pytorch_msssim
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gaussian_window",
    "local_ssim_map",
    "per_image_ssim",
    "anomaly_map",
    "image_score",
]

_REDUCTIONS = ("max", "mean", "topk_mean")


def gaussian_window(win_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Return a normalised 1-D Gaussian kernel of length ``win_size`` (float32).

    Identical to pytorch_msssim's ``_fspecial_gauss_1d``: taps at integer offsets
    ``-(win_size // 2) .. win_size // 2`` from the centre, ``exp(-d**2 / (2 sigma**2))``,
    divided by their sum.

    Args:
        win_size: Odd, positive number of taps.
        sigma: Standard deviation in pixels (> 0).

    Returns:
        Tensor of shape ``(win_size,)`` summing to 1.

    Raises:
        ValueError: If ``win_size`` is not a positive odd integer or ``sigma <= 0``.
    """
    if not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    coords = torch.arange(win_size, dtype=torch.float32) - win_size // 2
    g = torch.exp(-(coords**2) / (2 * float(sigma) ** 2))
    return g / g.sum()


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) tensors, got shape {tuple(x.shape)}")


def _pad_mode(h: int, w: int, pad: int) -> str:
    # torch's "reflect" (mirror about the edge pixel, edge not repeated, like
    # numpy "reflect" / scipy "mirror") needs pad < size; fall back otherwise.
    return "reflect" if pad < h and pad < w else "replicate"


def _separable_filter(img: Tensor, win: Tensor, pad: bool) -> Tensor:
    """Depthwise separable filtering of ``img`` (N, C, H, W) with 1-D ``win``.

    Filters along H first, then W (pytorch_msssim's order). With ``pad=True`` the
    input is first reflect-padded by ``len(win) // 2`` so the output keeps the
    input size; otherwise the output is the valid region.
    """
    c = img.shape[1]
    k = win.numel()
    if pad:
        p = k // 2
        img = F.pad(img, (p, p, p, p), mode=_pad_mode(img.shape[2], img.shape[3], p))
    w = win.to(device=img.device, dtype=img.dtype)
    w_h = w.view(1, 1, k, 1).expand(c, 1, k, 1)
    w_w = w.view(1, 1, 1, k).expand(c, 1, 1, k)
    out = F.conv2d(img, w_h, groups=c)
    return F.conv2d(out, w_w, groups=c)


def local_ssim_map(
    x: Tensor,
    y: Tensor,
    win_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Same-size local SSIM map between two image batches.

    The local statistics (means, variances, covariance) are computed with a
    separable Gaussian filter (``gaussian_window(win_size, sigma)``, rows then
    columns) after **reflect padding** each image by ``win_size // 2`` pixels
    (``torch.nn.functional.pad(mode="reflect")``: mirrored about the edge pixel,
    the edge itself not repeated, e.g. ``[c b | a b c d | c b]``). Hence the
    output has the same spatial size as the input. In the interior (at least
    ``win_size // 2`` pixels from every border) the map is exactly
    pytorch_msssim's valid-mode SSIM map; near the border it uses mirrored
    context. Computation is done in float32 regardless of the input dtype.

    Args:
        x: Images ``(N, C, H, W)`` in ``[0, data_range]``.
        y: Images of the same shape (e.g. reconstructions).
        win_size: Odd Gaussian window size.
        sigma: Gaussian standard deviation.
        data_range: Dynamic range of the intensities (1.0 for [0, 1] floats).
        k1: SSIM stabiliser constant for the luminance term.
        k2: SSIM stabiliser constant for the contrast-structure term.

    Returns:
        Float32 tensor ``(N, C, H, W)`` of local SSIM values (1 where identical).
    """
    _check_pair(x, y)
    x = x.to(torch.float32)
    y = y.to(torch.float32)
    win = gaussian_window(win_size, sigma).to(x.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2

    mu_x = _separable_filter(x, win, pad=True)
    mu_y = _separable_filter(y, win, pad=True)
    mu_x_sq = mu_x.pow(2)
    mu_y_sq = mu_y.pow(2)
    mu_xy = mu_x * mu_y
    sigma_x_sq = _separable_filter(x * x, win, pad=True) - mu_x_sq
    sigma_y_sq = _separable_filter(y * y, win, pad=True) - mu_y_sq
    sigma_xy = _separable_filter(x * y, win, pad=True) - mu_xy

    cs_map = (2 * sigma_xy + c2) / (sigma_x_sq + sigma_y_sq + c2)
    return ((2 * mu_xy + c1) / (mu_x_sq + mu_y_sq + c1)) * cs_map


def per_image_ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM as reported in the paper (one number per image).

    Exactly ``pytorch_msssim.ssim(x, y, data_range=data_range, size_average=False)``
    evaluated in float32: 11x11 Gaussian window with sigma 1.5, valid filtering
    (no padding), mean of the SSIM map over pixels (and channels).

    Args:
        x: Images ``(N, C, H, W)``; H and W should be >= 11.
        y: Images of the same shape.
        data_range: Dynamic range of the intensities.

    Returns:
        Float32 tensor of shape ``(N,)``.
    """
    _check_pair(x, y)
    return pytorch_msssim.ssim(
        x.to(torch.float32),
        y.to(torch.float32),
        data_range=data_range,
        size_average=False,
        win_size=11,
        win_sigma=1.5,
    )


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Same-size Gaussian blur, kernel size ``2 * ceil(2 sigma) + 1`` (~4 sigma + 1), reflect padding."""
    size = 2 * math.ceil(2 * sigma) + 1
    return _separable_filter(img, gaussian_window(size, sigma).to(img.device), pad=True)


def anomaly_map(
    x: Tensor,
    recon: Tensor,
    ssim_weight: float = 1.0,
    l2_weight: float = 0.0,
    smoothing_sigma: float = 0.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Per-pixel anomaly map from an image batch and its reconstruction.

    ``amap = ssim_weight * clip(1 - local_ssim_map(x, recon), 0, 1)
    + l2_weight * (x - recon) ** 2``, optionally followed by a Gaussian blur
    with ``smoothing_sigma`` (kernel size ``2 * ceil(2 * smoothing_sigma) + 1``,
    reflect padding) when ``smoothing_sigma > 0``.

    With the default weights (``ssim_weight=1, l2_weight=0, smoothing_sigma=0``)
    this is exactly the paper's Figure 1 error map, ``1 - local SSIM``
    (clipping only affects pixels with negative local SSIM, i.e. anti-correlated
    structure, which get the maximal error 1). The SSIM map is same-size with
    reflect padding; see :func:`local_ssim_map`. The map is computed in float32
    and is zero where ``x == recon`` (with default smoothing).

    Args:
        x: Input images ``(N, C, H, W)`` in [0, 1].
        recon: Reconstructions, same shape.
        ssim_weight: Weight of the ``1 - SSIM`` term (>= 0).
        l2_weight: Weight of the per-pixel squared error term (>= 0).
        smoothing_sigma: Gaussian smoothing sigma in pixels; 0 disables it.
        win_size: SSIM window size.
        sigma: SSIM Gaussian sigma.

    Returns:
        Float32 tensor ``(N, C, H, W)``.
    """
    _check_pair(x, recon)
    if ssim_weight < 0 or l2_weight < 0:
        raise ValueError(f"ssim_weight and l2_weight must be >= 0, got {ssim_weight!r} and {l2_weight!r}")
    if smoothing_sigma < 0:
        raise ValueError(f"smoothing_sigma must be >= 0, got {smoothing_sigma!r}")
    x = x.to(torch.float32)
    recon = recon.to(torch.float32)
    amap = torch.zeros_like(x)
    if ssim_weight:
        ssim_err = (1.0 - local_ssim_map(x, recon, win_size=win_size, sigma=sigma)).clamp(0.0, 1.0)
        amap = amap + ssim_weight * ssim_err
    if l2_weight:
        amap = amap + l2_weight * (x - recon).pow(2)
    if smoothing_sigma > 0:
        amap = _gaussian_blur(amap, smoothing_sigma)
    return amap


def image_score(amap: Tensor, reduction: str = "max", topk_fraction: float = 0.01) -> Tensor:
    """Reduce anomaly maps to one anomaly score per image.

    Args:
        amap: Anomaly maps ``(N, C, H, W)`` or ``(N, H, W)``.
        reduction: ``"max"`` (maximum pixel), ``"mean"`` (mean pixel) or
            ``"topk_mean"`` (mean of the ``ceil(topk_fraction * pixels)``
            highest pixels, at least one).
        topk_fraction: Fraction of pixels used by ``"topk_mean"``, in (0, 1].

    Returns:
        Float32 tensor of shape ``(N,)``.

    Raises:
        ValueError: For an unknown ``reduction`` or ``topk_fraction`` outside (0, 1].
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction!r}")
    if amap.dim() < 2:
        raise ValueError(f"amap must have a batch dimension and pixels, got shape {tuple(amap.shape)}")
    flat = amap.to(torch.float32).reshape(amap.shape[0], -1)
    if reduction == "max":
        return flat.max(dim=1).values
    if reduction == "mean":
        return flat.mean(dim=1)
    k = max(1, math.ceil(topk_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)
