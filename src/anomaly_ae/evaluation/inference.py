"""Batched inference: reconstruction, the paper's SSIM, anomaly maps and image scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anomaly_ae.evaluation.anomaly_map import anomaly_map, image_score, per_image_ssim
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.training.checkpoint import CheckpointError, validate_checkpoint
from anomaly_ae.training.device import autocast, resolve_device, resolve_precision


@dataclass(frozen=True)
class MapSettings:
    """How a reconstruction becomes an anomaly map and an image score.

    Defaults give the paper's error map (1 - local SSIM, 11x11 Gaussian window, sigma 1.5)
    and score an image by the maximum of that map.
    """

    ssim_weight: float = 1.0
    l2_weight: float = 0.0
    smoothing_sigma: float = 0.0
    win_size: int = 11
    win_sigma: float = 1.5
    score_reduction: str = "max"
    topk_fraction: float = 0.01

    @classmethod
    def from_dict(cls, data: dict) -> MapSettings:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown anomaly map settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def model_from_checkpoint(
    checkpoint: dict, expected: AutoencoderConfig | None = None, image_size: int | None = None
) -> nn.Module:
    """Rebuild the trained model in eval mode; refuse a checkpoint of another architecture
    or image size with a clear message."""
    validate_checkpoint(checkpoint)
    saved = AutoencoderConfig.from_dict(checkpoint["model_config"])
    if expected is not None and saved.architecture != expected.architecture:
        raise CheckpointError(
            f"The checkpoint holds architecture {saved.architecture!r} but model.architecture is "
            f"{expected.architecture!r}; retrain or pick a matching checkpoint version."
        )
    if image_size is not None and saved.image_size != image_size:
        raise CheckpointError(
            f"The checkpoint was trained on {saved.image_size}px images but the data is "
            f"{image_size}px; set preprocessing.image_size={saved.image_size} or retrain."
        )
    model = build_model(saved)
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


@torch.no_grad()
def reconstruct_and_score(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    settings: MapSettings = MapSettings(),
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    keep_maps: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``images`` (N, 1, H, W) in [0, 1] through the model in batches.

    Returns float32 arrays: ``recon`` (N, 1, H, W), ``map`` (N, H, W) when ``keep_maps``,
    ``ssim`` (the paper's per-image SSIM), ``mse`` and ``score`` (N,).
    Convolutions may run under autocast; SSIM, maps and scores are float32.
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    images = torch.as_tensor(images, dtype=torch.float32)
    n = len(images)
    out: dict[str, list] = {"recon": [], "map": [], "ssim": [], "mse": [], "score": []}
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size].to(dev)
        with autocast(dev, dtype):
            recon = model(x)
        recon = recon.float()
        amap = anomaly_map(
            x, recon, ssim_weight=settings.ssim_weight, l2_weight=settings.l2_weight,
            smoothing_sigma=settings.smoothing_sigma, win_size=settings.win_size, sigma=settings.win_sigma,
        )
        out["recon"].append(recon.cpu())
        if keep_maps:
            out["map"].append(amap[:, 0].cpu())
        out["ssim"].append(per_image_ssim(x, recon).cpu())
        out["mse"].append(((x - recon) ** 2).mean(dim=(1, 2, 3)).cpu())
        out["score"].append(image_score(amap, settings.score_reduction, settings.topk_fraction).cpu())
    return {
        key: torch.cat(values).numpy().astype(np.float32) if values else np.zeros((0,), np.float32)
        for key, values in out.items()
        if values or key != "map"
    }
