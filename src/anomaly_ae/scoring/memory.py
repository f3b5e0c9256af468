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

Measured, not yet a channel of the pipeline's maps: ``scripts/map_study.py memory`` and
docs/STUDIES.md ("A memory bank per place"). Plain PyTorch, no Kedro.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def pooled_patches(images: Tensor, pool: int) -> Tensor:
    """``(N, C, H, W)`` images in [0, 1] -> ``(N, 9 C, H // pool, W // pool)``: each ``pool`` x
    ``pool`` average with its 3x3 neighbourhood of averages (the border replicated), the
    vector compared at each position."""
    if images.dim() != 4:
        raise ValueError(f"images must be shaped (N, C, H, W), got {tuple(images.shape)}")
    if pool < 1 or images.shape[-2] < pool or images.shape[-1] < pool:
        raise ValueError(f"pool must be 1 to the image's shorter side {min(images.shape[-2:])}, got {pool}")
    small = F.avg_pool2d(images.float(), pool)
    n, c, h, w = small.shape
    return F.unfold(F.pad(small, (1, 1, 1, 1), mode="replicate"), 3).view(n, c * 9, h, w)


def nearest_distance(
    queries: Tensor,
    bank: Tensor,
    radius: int,
    own: np.ndarray | None = None,
    rows: int = 2,
    block: int = 48,
) -> dict[int, Tensor]:
    """Per query position, the Euclidean distance to the nearest of the ``bank`` images'
    vectors at positions up to ``r`` away (the square window, each ``r`` in ``0..radius``; the
    bank's border replicated): ``{r: (B, h, w)}``.

    queries: ``(B, C, h, w)``; bank: ``(N, C, h, w)``, the normal images' vectors (e.g.
    :func:`pooled_patches` of the training images). ``own[b]``: query ``b``'s own index in the
    bank, which it never matches (a training image scored against the others), or -1.
    ``rows`` positions' rows and ``block`` queries at a time bound the memory:
    ``rows * w * block * N * (2 radius + 1)^2`` floats."""
    if queries.dim() != 4 or bank.dim() != 4 or queries.shape[1:] != bank.shape[1:]:
        raise ValueError(
            f"queries (B, C, h, w) and bank (N, C, h, w) must share C, h, w: got {tuple(queries.shape)} "
            f"and {tuple(bank.shape)}"
        )
    if radius < 0:
        raise ValueError(f"radius must be 0 or more positions, got {radius}")
    own = np.full(len(queries), -1) if own is None else np.asarray(own, np.int64)
    if own.shape != (len(queries),) or (own >= len(bank)).any():
        raise ValueError(
            f"own must give each of the {len(queries)} queries a bank index below {len(bank)}, or -1"
        )
    if len(bank) < 1 + int((own >= 0).any()):
        raise ValueError("the bank needs an image besides a query's own")
    n, c, h, w = bank.shape
    k = 2 * radius + 1
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    within = {  # per r, the offsets' indices in its window
        r: torch.tensor([i for i, (dy, dx) in enumerate(offsets) if max(abs(dy), abs(dx)) <= r])
        for r in range(radius + 1)
    }
    bank, queries = bank.float(), queries.float()
    padded = F.pad(bank, (radius,) * 4, mode="replicate")
    out = {r: torch.empty(len(queries), h, w) for r in within}
    own_t = torch.from_numpy(own)
    for y0 in range(0, h, rows):
        y1 = min(y0 + rows, h)
        # every bank vector each position of these rows may match: (p, c, n k k)
        windows = F.unfold(padded[:, :, y0 : y1 + 2 * radius], k)  # (n, c k k, p)
        p = windows.shape[-1]
        windows = windows.view(n, c, k * k, p).permute(3, 1, 0, 2).reshape(p, c, n * k * k)
        sq_bank = windows.square().sum(1)[:, None]  # (p, 1, n k k)
        for b0 in range(0, len(queries), block):
            q = queries[b0 : b0 + block, :, y0:y1].reshape(-1, c, p).permute(2, 0, 1)  # (p, b, c)
            b = q.shape[1]
            # |m|^2 - 2 q.m in one product (|q|^2 is the same for every candidate): the ranking
            d = torch.baddbmm(sq_bank.expand(p, b, -1), q, windows, alpha=-2).view(p, b, n, k * k)
            mine = own_t[b0 : b0 + block]
            hit = torch.nonzero(mine >= 0)[:, 0]
            if len(hit):
                d[:, hit, mine[hit]] = torch.inf
            nearest, image = d.min(2)  # per offset, the nearest bank image: (p, b, k k)
            for r, idx in within.items():
                # the nearest candidate by the product, its distance then taken exactly: the
                # expansion loses the small distances (a look a bank image shares) to rounding
                offset = idx[nearest[..., idx].argmin(2)]  # (p, b)
                column = image.gather(2, offset[..., None])[..., 0] * k * k + offset
                chosen = windows.gather(2, column[:, None].expand(p, c, b))  # (p, c, b)
                best = (q.transpose(1, 2) - chosen).square().sum(1).sqrt()  # (p, b)
                out[r][b0 : b0 + b, y0:y1] = best.T.reshape(b, y1 - y0, w)
    return out
