"""SSIM, the one implementation: Gaussian filtering, local SSIM maps and per-image SSIM.

Conventions follow :mod:`pytorch_msssim` (Wang et al. 2004), i.e. ``tf.image.ssim`` of the
paper: an 11x11 Gaussian window with sigma 1.5 applied separably (rows, then columns),
``C1 = (k1 * data_range)**2``, ``C2 = (k2 * data_range)**2``, population (biased) local
variances, ``alpha = beta = gamma = 1``.

Precision: the local variances are ``E[x**2] - E[x]**2``, a difference of two numbers near
``x**2`` whose result, on flat regions, is orders of magnitude smaller. In float32 that
cancellation leaves errors of ~2e-4 in ``1 - SSIM`` on real bottle images (measured against
float64), and two engines that round differently (PyTorch, ONNX Runtime) disagree by as
much; a normal reference's z-score then magnifies it. The anomaly maps therefore compute the
statistics in float64 (``precise=True``: :func:`local_ssim_map` and :func:`per_image_ssim`,
which return float32, and the maps of :mod:`anomaly_ae.scoring.anomaly_map`, which stay in
float64 to the score); the training loss (:func:`mean_ssim`) stays float32. Apple's MPS has
no float64: there everything stays float32.

* :func:`ssim_map` with ``same_size=False`` is pytorch_msssim's *valid-mode* map; its mean
  is :func:`per_image_ssim`, the number per image of the paper's Table II;
* with ``same_size=True`` the images are reflect-padded by ``win_size // 2`` first, so the
  map has the input's size and can be compared with ground-truth masks. Its interior equals
  the valid-mode map.

The Gaussian filter is written as shifted multiply-adds: the same sums as a depthwise
``conv2d``, in a form ``torch.compile`` fuses into a few loops (oneDNN's single-channel
depthwise convolution, forward and backward, is the slowest part of a CPU step otherwise).
The training loss's SSIM under ``torch.compile``, every anomaly map, the calibration grid,
``predict``/``Inspector`` and the benchmark all filter through :func:`gaussian_filter`.
The scalar training loss in eager mode keeps :func:`pytorch_msssim.ssim`; a test pins both
against each other and against scikit-image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "exact_scalar",
    "map_dtype",
    "PAPER_WIN_SIZE",
    "PAPER_WIN_SIGMA",
    "PAPER_K2",
    "gaussian_taps",
    "blur_taps",
    "gaussian_filter",
    "gaussian_blur",
    "ssim_map",
    "local_ssim_map",
    "per_image_ssim",
    "mean_ssim",
]

#: The SSIM window of the paper (``tf.image.ssim`` / pytorch_msssim defaults).
PAPER_WIN_SIZE = 11
PAPER_WIN_SIGMA = 1.5
#: SSIM's contrast constant ``C2 = (k2 * data_range)**2`` (Wang et al. 2004; the paper's).
PAPER_K2 = 0.03


def gaussian_taps(win_size: int = PAPER_WIN_SIZE, sigma: float = PAPER_WIN_SIGMA) -> tuple[float, ...]:
    """The normalised 1-D Gaussian window of pytorch_msssim (``_fspecial_gauss_1d``) as
    Python floats (constants for ``torch.compile``; plain arithmetic, so it is cheap to call
    and Dynamo traces it as constants): taps at integer offsets
    ``-(win_size // 2) .. win_size // 2``, ``exp(-d**2 / (2 sigma**2))``, divided by their sum.

    Raises:
        ValueError: If ``win_size`` is not a positive odd integer or ``sigma <= 0``.
    """
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"SSIM/smoothing window size must be a positive odd integer, got {win_size!r}")
    if not sigma > 0:
        raise ValueError(f"Gaussian sigma must be > 0, got {sigma!r}")
    half = win_size // 2
    g = [math.exp(-(d**2) / (2.0 * float(sigma) ** 2)) for d in range(-half, half + 1)]
    total = math.fsum(g)
    return tuple(v / total for v in g)


def blur_taps(sigma: float) -> tuple[float, ...]:
    """Taps of the smoothing blur: kernel size ``2 * ceil(2 sigma) + 1`` (about 4 sigma + 1)."""
    return gaussian_taps(2 * math.ceil(2 * sigma) + 1, float(sigma))


def map_dtype(device: torch.device) -> torch.dtype:
    """The dtype anomaly maps are computed in: float64 (see the module docstring), float32 on
    Apple's MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def exact_scalar(value: float, like: Tensor) -> Tensor | float:
    """``value`` as a 0-d tensor of ``like``'s dtype when that is float64, else ``value``.

    Arithmetic with a Python float keeps its full precision in PyTorch, but torch's ONNX
    exporter (2.13, dynamo) writes such a scalar into the graph rounded to float32: in the
    exported float64 maps that alone moved scores by 1e-5. A tensor constant keeps every bit.
    """
    return torch.tensor(value, dtype=like.dtype, device=like.device) if like.dtype == torch.float64 else value


def _pad(img: Tensor, p: int) -> Tensor:
    # torch's "reflect" (mirror about the edge pixel, the edge not repeated, like numpy
    # "reflect" / scipy "mirror") needs p < size; "replicate" otherwise.
    h, w = img.shape[-2:]
    return F.pad(img, (p, p, p, p), mode="reflect" if p < h and p < w else "replicate")


def gaussian_filter(img: Tensor, taps: tuple[float, ...], same_size: bool = False) -> Tensor:
    """Separable filtering of ``(N, C, H, W)`` with the 1-D window ``taps``, rows then
    columns. ``same_size=False``: the valid region (``H - k + 1``, ``W - k + 1``);
    ``same_size=True``: reflect-padded by ``k // 2`` first, so the output keeps the size."""
    k = len(taps)
    if same_size and k > 1:
        img = _pad(img, k // 2)
    h, w = img.shape[-2] - k + 1, img.shape[-1] - k + 1
    if h < 1 or w < 1:
        raise ValueError(f"images of {tuple(img.shape[-2:])} px are smaller than the {k}-tap window")
    # float64: the taps as tensors (exact_scalar), since torch's ONNX exporter would round
    # Python scalars to float32; float32: Python floats, as before
    weights = [exact_scalar(t, img) for t in taps]
    return _weighted_sum(_weighted_sum(img, weights, h, dim=-2), weights, w, dim=-1)


def _weighted_sum(img: Tensor, weights: list, length: int, dim: int) -> Tensor:
    """``sum_i weights[i] * img.narrow(dim, i, length)``, accumulated in place: one buffer
    per pass instead of two temporaries per tap (~8x faster in eager mode; autograd and
    torch.compile handle it like the out-of-place sum). ``add_`` takes a Python weight,
    ``addcmul_`` a tensor one."""
    out = img.narrow(dim, 0, length) * weights[0]
    for i in range(1, len(weights)):
        if isinstance(weights[i], Tensor):
            out.addcmul_(img.narrow(dim, i, length), weights[i])
        else:
            out.add_(img.narrow(dim, i, length), alpha=weights[i])
    return out


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Same-size Gaussian smoothing (:func:`blur_taps`, reflect padding); ``sigma <= 0``:
    the input unchanged."""
    if sigma <= 0:
        return img
    return gaussian_filter(img, blur_taps(sigma), same_size=True)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) tensors, got shape {tuple(x.shape)}")


def ssim_map(
    x: Tensor,
    y: Tensor,
    taps: tuple[float, ...],
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = PAPER_K2,
    same_size: bool = False,
    precise: bool = False,
) -> Tensor:
    """The SSIM map of two image batches ``(N, C, H, W)``, filtered with ``taps``: float32, or
    with ``precise`` the statistics and the map in float64 (see the module docstring; float32
    on MPS, which has no float64)."""
    _check_pair(x, y)
    dtype = map_dtype(x.device) if precise else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    c1, c2 = exact_scalar((k1 * data_range) ** 2, x), exact_scalar((k2 * data_range) ** 2, x)
    mu1, mu2 = gaussian_filter(x, taps, same_size), gaussian_filter(y, taps, same_size)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = gaussian_filter(x * x, taps, same_size) - mu1_sq
    sigma2_sq = gaussian_filter(y * y, taps, same_size) - mu2_sq
    sigma12 = gaussian_filter(x * y, taps, same_size) - mu1_mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    return ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map


def local_ssim_map(
    x: Tensor,
    y: Tensor,
    win_size: int = PAPER_WIN_SIZE,
    sigma: float = PAPER_WIN_SIGMA,
    data_range: float = 1.0,
) -> Tensor:
    """Same-size local SSIM map (reflect padding; statistics in float64, see the module
    docstring); 1 where ``x == y``."""
    return ssim_map(x, y, gaussian_taps(win_size, sigma), data_range, same_size=True, precise=True).float()


def per_image_ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """The paper's SSIM per image, shape ``(N,)``: the mean of the valid-mode 11x11 map
    (``pytorch_msssim.ssim(x, y, data_range, size_average=False)``)."""
    return ssim_map(x, y, gaussian_taps(), data_range, precise=True).flatten(1).mean(-1).float()


def mean_ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    win_size: int = PAPER_WIN_SIZE,
    win_sigma: float = PAPER_WIN_SIGMA,
) -> Tensor:
    """``pytorch_msssim.ssim(x, y, data_range, size_average=True)``: one scalar for the batch
    (the SSIM term of the training loss on the compiled path)."""
    return ssim_map(x, y, gaussian_taps(win_size, win_sigma), data_range).flatten(2).mean(-1).mean()
