"""A memory bank per place: how far is each part of an image from the nearest NORMAL image's
same part?

The normal reference (:mod:`anomaly_ae.scoring.reference`) holds one mean and one spread per
pixel. Where normal images vary (a reflection that moves from image to image) the spread is
wide, and a small defect there must be strong to count. A memory bank holds every normal
image instead, so a place can have several normal looks: an image is compared, position by
position, with the nearest of the training images' vectors at the same position or a few
positions away (PatchCore's nearest neighbour, kept local so that an aligned product's parts
are compared with the same parts). A look that some training image has is near; a spot that
none has is far.

The vectors need no network: at each position of a grid ``pool`` px apart, the image's
``pool`` x ``pool`` averages with their 3x3 neighbourhood (9 values per colour channel,
:func:`pooled_patches`). The map channel (``MapSettings.memory_pool``) is the distance to the
nearest training vector within ``radius`` positions, brought back to the image's size and
smoothed over one grid step (:func:`memory_map`); the normal reference then z-scores it like
the other channels. Measured: ``scripts/map_study.py memory``, docs/STUDIES.md ("A memory
bank per place").

Everything here is slices, matrix products and minima, so it traces into the exported ONNX
graph as it is. Plain PyTorch, no Kedro.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly_ae.scoring.ssim import gaussian_blur

__all__ = ["memory_map", "nearest_distance", "neighbourhood", "pooled_images", "pooled_patches"]


def pooled_images(images: Tensor, pool: int) -> Tensor:
    """``(N, C, H, W)`` images in [0, 1] -> their ``pool`` x ``pool`` averages ``(N, C, H //
    pool, W // pool)`` (the rows and columns beyond the last whole block dropped): what the
    memory bank stores (``NormalReference.memory_bank``)."""
    if images.dim() != 4:
        raise ValueError(f"images must be shaped (N, C, H, W), got {tuple(images.shape)}")
    if not 1 <= pool <= min(images.shape[-2:]):
        raise ValueError(
            f"evaluation.anomaly_map.memory_pool must be 1 to the image's shorter side "
            f"{min(images.shape[-2:])} px, got {pool}"
        )
    n, c, height, width = images.shape
    h, w = height // pool, width // pool
    # block means by a reshape: traces into ONNX in any float type (AveragePool has no float64)
    blocks = images[..., : h * pool, : w * pool].reshape(n, c, h, pool, w, pool)
    return blocks.mean(dim=(3, 5))


def neighbourhood(small: Tensor) -> Tensor:
    """``(N, C, h, w)`` -> ``(N, 9 C, h, w)``: each position's values with those of its 3x3
    neighbourhood (the border replicated), the vector compared at each position."""
    h, w = small.shape[-2:]
    padded = F.pad(small, (1, 1, 1, 1), mode="replicate")
    return torch.cat([padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], dim=1)


def pooled_patches(images: Tensor, pool: int) -> Tensor:
    """``(N, C, H, W)`` images -> ``(N, 9 C, H // pool, W // pool)``: :func:`neighbourhood` of
    :func:`pooled_images`."""
    return neighbourhood(pooled_images(images, pool))


def nearest_distance(queries: Tensor, bank: Tensor, radius: int, own: np.ndarray | None = None) -> Tensor:
    """Per query position, the Euclidean distance to the nearest of the ``bank`` images'
    vectors at positions up to ``radius`` away (the square window; the bank's border
    replicated): ``(B, h, w)``, in the queries' dtype.

    queries: ``(B, C, h, w)``; bank: ``(N, C, h, w)``, the normal images' vectors
    (:func:`pooled_patches` of the training images). ``own[b]``: query ``b``'s own index in
    the bank, which it never matches (a training image scored against the others), or -1.

    One fused matrix product per offset, ``|m|^2 - 2 q.m`` (``baddbmm``), its minimum over the
    bank, then ``|q|^2`` added once (the same for every bank vector, so it leaves the nearest
    unchanged): two passes over the ``B N h w`` distances instead of four, half the time of
    the plain expansion (measured: docs/PERFORMANCE.md, "The memory channel's search"). Its rounding
    is relative to ``|q|^2``; the maps are float64 (:func:`~anomaly_ae.scoring.ssim.map_dtype`),
    where it is about 1e-8 of a distance. Memory: ``B N h w`` numbers (the caller batches)."""
    if queries.dim() != 4 or bank.dim() != 4 or queries.shape[1:] != bank.shape[1:]:
        raise ValueError(
            f"queries (B, C, h, w) and bank (N, C, h, w) must share C, h, w: got {tuple(queries.shape)} "
            f"and {tuple(bank.shape)}"
        )
    if radius < 0:
        raise ValueError(f"evaluation.anomaly_map.memory_radius must be 0 or more positions, got {radius}")
    if own is not None:
        own = np.asarray(own, np.int64)
        if own.shape != (len(queries),) or (own >= len(bank)).any():
            raise ValueError(
                f"own must give each of the {len(queries)} queries a bank index below {len(bank)}, or -1"
            )
        if len(bank) < 1 + int((own >= 0).any()):
            raise ValueError("the memory bank needs an image besides a query's own")
    h, w = bank.shape[-2:]
    channels = bank.shape[1]
    bank = bank.to(queries.dtype)
    padded = F.pad(bank, (radius,) * 4, mode="replicate") if radius else bank
    vectors = padded.permute(2, 3, 1, 0).contiguous()  # (h + 2r, w + 2r, C, N)
    squares = vectors.square().sum(2, keepdim=True)  # (h + 2r, w + 2r, 1, N)
    q = queries.permute(2, 3, 0, 1).reshape(h * w, -1, channels)  # (h w, B, C)
    mine = None
    if own is not None and (own >= 0).any():
        rows = np.flatnonzero(own >= 0)
        mine = (torch.from_numpy(rows), torch.from_numpy(own[rows]))
    best = None
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            m = vectors[dy : dy + h, dx : dx + w].reshape(h * w, channels, -1)  # (h w, C, N)
            m_sq = squares[dy : dy + h, dx : dx + w].reshape(h * w, 1, -1)
            d = torch.baddbmm(m_sq, q, m, alpha=-2)  # |m|^2 - 2 q.m: (h w, B, N)
            if mine is not None:
                d[:, mine[0], mine[1]] = torch.inf  # a training image never matches itself
            nearest = d.amin(-1)  # (h w, B)
            best = nearest if best is None else torch.minimum(best, nearest)
    best = best + q.square().sum(-1)
    return best.clamp_min(0).sqrt().reshape(h, w, -1).permute(2, 0, 1)


def upsample_matrix(n_out: int, n_in: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(n_out, n_in)``: linear interpolation from ``n_in`` samples to ``n_out`` (PyTorch's
    ``align_corners=False``: source ``(i + 0.5) n_in / n_out - 0.5``, clamped at 0 and at the
    last sample) as a matrix, so that the bilinear upsampling of a map is two matrix products
    (any float type, in ONNX too). Built in numpy: a constant in a traced graph."""
    source = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(source.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    weight = source - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(n_out), high), weight)
    return torch.from_numpy(matrix).to(dtype)


def memory_map(images: Tensor, bank: Tensor, pool: int, radius: int, own: np.ndarray | None = None) -> Tensor:
    """The memory channel of ``(N, C, H, W)`` images: per pixel, the distance of its
    position's vector (:func:`pooled_patches`) to the nearest of ``bank``'s within ``radius``
    positions (:func:`nearest_distance`, ``own`` as there), bilinearly upsampled to ``H x W``
    and smoothed with a Gaussian of sigma ``pool`` px (one grid step): ``(N, 1, H, W)`` in
    ``bank``'s dtype. ``bank``: the training images' :func:`pooled_images` (``(N, C, h, w)``,
    ``NormalReference.memory_tensor``); their neighbourhoods are taken here, so that the bank
    stored (and shipped in the ONNX graph) is 9 times smaller."""
    height, width = images.shape[-2:]
    queries = pooled_patches(images.to(bank.dtype), pool)
    bank = neighbourhood(bank)
    if queries.shape[1:] != bank.shape[1:]:
        raise ValueError(
            f"the memory bank holds {tuple(bank.shape[1:])} vectors but these images give "
            f"{tuple(queries.shape[1:])} at memory_pool {pool}; refit the normal reference "
            "(kedro run --pipeline=evaluate) for this image size, colour mode and memory_pool."
        )
    distance = nearest_distance(queries, bank, radius, own)  # (N, h, w)
    # the sizes as ints: constants of a traced graph (only the batch is dynamic)
    rows = upsample_matrix(int(height), int(distance.shape[-2]), distance.dtype)
    cols = upsample_matrix(int(width), int(distance.shape[-1]), distance.dtype)
    full = torch.matmul(torch.matmul(rows, distance), cols.T)  # (N, H, W)
    return gaussian_blur(full[:, None], float(pool))
