"""Object-respecting augmentation of training batches (off by default: the paper has none).

Bottles seen from above are rotation-symmetric, so random flips, right-angle rotations,
small free rotations and small shifts produce plausible *normal* images. Everything runs
on the batch's device with a seeded generator, so a fixed seed gives the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anomaly_ae.config import from_settings


@dataclass(frozen=True)
class AugmentationConfig:
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    rotation_degrees: float = 0.0  # uniform in [-d, d]
    shift_fraction: float = 0.0  # uniform shift of up to this fraction of the side

    @classmethod
    def from_dict(cls, data: dict | None) -> AugmentationConfig:
        return from_settings(cls, data, "training.augmentation")

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.rot90 or self.rotation_degrees > 0 or self.shift_fraction > 0


def augment_batch(x: torch.Tensor, config: AugmentationConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly transformed copy of ``x`` (N, C, H, W); ``x`` itself is not modified.
    ``generator`` lives on the CPU; the random numbers are moved to ``x``'s device."""
    if not config.enabled:
        return x
    if (config.rot90 or config.rotation_degrees > 0) and x.shape[-2] != x.shape[-1]:
        raise ValueError(
            f"training.augmentation.rot90 / rotation_degrees need square images, but these are "
            f"{x.shape[-2]}x{x.shape[-1]} (height x width): a rotation would stretch them. "
            "Turn rotations off, or use a square preprocessing.image_size."
        )
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(x.device)

    out = x
    if config.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if config.vflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-2), out)
    angle = torch.zeros(n, device=x.device)
    if config.rot90:
        angle = angle + torch.randint(0, 4, (n,), generator=generator).to(x.device) * (math.pi / 2)
    if config.rotation_degrees > 0:
        angle = angle + uniform(-config.rotation_degrees, config.rotation_degrees) * (math.pi / 180)
    shift = torch.zeros(n, 2, device=x.device)
    if config.shift_fraction > 0:
        shift = torch.stack([uniform(-1, 1), uniform(-1, 1)], dim=1) * (2 * config.shift_fraction)
    if config.rot90 or config.rotation_degrees > 0 or config.shift_fraction > 0:
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
        )
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out
