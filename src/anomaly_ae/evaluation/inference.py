"""Batched inference: reconstruction, the paper's SSIM, anomaly maps and image scores."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_ae.config import from_settings
from anomaly_ae.evaluation.anomaly_map import _gaussian_blur, anomaly_map, image_score, per_image_ssim
from anomaly_ae.evaluation.reference import NormalReference, check_mode, correct
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.training.checkpoint import CheckpointError, validate_checkpoint
from anomaly_ae.training.device import autocast, resolve_device, resolve_precision
from anomaly_ae.training.trainer import gaussian_taps, ssim_map_separable


@dataclass(frozen=True)
class MapSettings:
    """How a reconstruction becomes an anomaly map and an image score.

    Defaults give the paper's error map (1 - local SSIM, 11x11 Gaussian window, sigma 1.5)
    and score an image by the maximum of that map. ``normal_reference`` (``none`` | ``mean``
    | ``zscore``) compares the map with the per-pixel statistics of normal training maps
    (:mod:`anomaly_ae.evaluation.reference`) before the score is taken.
    """

    ssim_weight: float = 1.0
    l2_weight: float = 0.0
    smoothing_sigma: float = 0.0
    win_size: int = 11
    win_sigma: float = 1.5
    score_reduction: str = "max"
    topk_fraction: float = 0.01
    normal_reference: str = "none"

    def __post_init__(self) -> None:
        check_mode(self.normal_reference)

    @classmethod
    def from_dict(cls, data: dict) -> MapSettings:
        return from_settings(cls, data, "evaluation.anomaly_map")


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


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fast_maps(x, recon, settings: MapSettings, map_taps, paper_taps):
    """anomaly_map(...) and per_image_ssim(...) with the same math, written so torch.compile
    fuses the Gaussian filtering (the SSIM map is computed once when the windows agree:
    the same-size map's interior IS the valid-mode map of per_image_ssim)."""
    p = len(map_taps) // 2
    h, w = x.shape[-2:]
    mode = "reflect" if p < h and p < w else "replicate"
    pads = (p, p, p, p)
    local = ssim_map_separable(F.pad(x, pads, mode=mode), F.pad(recon, pads, mode=mode), map_taps)
    amap = torch.zeros_like(x)
    if settings.ssim_weight:
        amap = amap + settings.ssim_weight * (1.0 - local).clamp(0.0, 1.0)
    if settings.l2_weight:
        amap = amap + settings.l2_weight * (x - recon).pow(2)
    if settings.smoothing_sigma > 0:
        amap = _gaussian_blur(amap, settings.smoothing_sigma)
    if map_taps == paper_taps and p and 2 * p < min(h, w):
        valid = local[..., p : h - p, p : w - p]
    else:
        valid = ssim_map_separable(x, recon, paper_taps)
    return amap, valid.flatten(1).mean(-1)


def _score_batch_fn(
    model: nn.Module,
    settings: MapSettings,
    dev: torch.device,
    dtype,
    keep_maps: bool,
    fast_ssim: bool = False,
    reference: NormalReference | None = None,
):
    """The per-batch computation: reconstruction, anomaly map, SSIM, MSE, score (float32)."""
    use_reference = settings.normal_reference != "none"
    if use_reference and reference is None:
        raise ValueError(
            f"evaluation.anomaly_map.normal_reference={settings.normal_reference!r} needs the "
            "normal reference maps fitted by `kedro run --pipeline=evaluate` (normal_reference.npz)"
        )
    if use_reference:
        ref_mean, ref_scale = reference.as_tensors(settings.normal_reference, dev)
    if fast_ssim:
        map_taps = gaussian_taps(settings.win_size, settings.win_sigma)
        paper_taps = gaussian_taps(11, 1.5)
        if settings.ssim_weight < 0 or settings.l2_weight < 0 or settings.smoothing_sigma < 0:
            fast_ssim = False  # let anomaly_map raise its error

    def score_batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(dev, dtype):
            recon = model(x)
        recon = recon.float().contiguous()  # maps and SSIM in float32, standard layout
        x = x.contiguous()
        if fast_ssim:
            amap, ssim_values = _fast_maps(x, recon, settings, map_taps, paper_taps)
        else:
            amap = anomaly_map(
                x,
                recon,
                ssim_weight=settings.ssim_weight,
                l2_weight=settings.l2_weight,
                smoothing_sigma=settings.smoothing_sigma,
                win_size=settings.win_size,
                sigma=settings.win_sigma,
            )
            ssim_values = per_image_ssim(x, recon)
        if use_reference:
            amap = correct(amap, ref_mean, ref_scale)
        result = {
            "recon": recon,
            "ssim": ssim_values,
            "mse": ((x - recon) ** 2).mean(dim=(1, 2, 3)),
            "score": image_score(amap, settings.score_reduction, settings.topk_fraction),
        }
        if keep_maps:
            result["map"] = amap[:, 0]
        return result

    return score_batch


def _compiled_score_batch(model, settings, dev, dtype, keep_maps, mode, reference):
    """torch.compile the whole per-batch computation once per model, settings and reference
    (the cache entry holds the reference, so its ``id`` cannot be reused while cached)."""
    key = (settings, str(dev), dtype, keep_maps, mode, id(reference))
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        fn = _score_batch_fn(model, settings, dev, dtype, keep_maps, fast_ssim=True, reference=reference)
        per_model[key] = (torch.compile(fn, mode=mode), reference)
    return per_model[key][0]


def reconstruct_and_score(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    settings: MapSettings = MapSettings(),
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    keep_maps: bool = True,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    reference: NormalReference | None = None,
) -> dict[str, np.ndarray]:
    """Run ``images`` (N, 1, H, W) in [0, 1] through the model in batches.

    Returns float32 arrays: ``recon`` (N, 1, H, W), ``map`` (N, H, W) when ``keep_maps``,
    ``ssim`` (the paper's per-image SSIM), ``mse`` and ``score`` (N,).
    Convolutions may run under autocast; SSIM, maps and scores are float32. With
    ``settings.normal_reference`` other than ``none``, ``reference`` (fitted by
    :func:`fit_normal_reference`) corrects the map before the score is taken, and ``map`` is
    the corrected map.

    Speed levers (same math): ``channels_last`` runs the network in NHWC memory format
    (the model's parameters are converted in place); ``compile`` makes the network and
    the map/score computation one ``torch.compile`` graph (compiled once per model and
    settings, and per batch shape), with the Gaussian filtering of the SSIM maps written as
    shifted multiply-adds that the compiler fuses (same math; oneDNN's single-channel
    depthwise conv is the slowest part of eager inference on CPU). Runs under
    ``torch.inference_mode``.
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        score_batch = _compiled_score_batch(model, settings, dev, dtype, keep_maps, compile_mode, reference)
    else:
        score_batch = _score_batch_fn(model, settings, dev, dtype, keep_maps, reference=reference)
    images = torch.as_tensor(images, dtype=torch.float32)
    if reference is not None and settings.normal_reference != "none":
        reference.check_shape(images.shape)
    n = len(images)
    keys = ("recon", "map", "ssim", "mse", "score") if keep_maps else ("recon", "ssim", "mse", "score")
    out: dict[str, list] = {key: [] for key in keys}
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            result = score_batch(x)
            for key in keys:
                out[key].append(result[key].to("cpu", non_blocking=True))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {
        key: torch.cat(values).numpy().astype(np.float32) if values else np.zeros((0,), np.float32)
        for key, values in out.items()
        if values or key != "map"
    }


def fit_normal_reference(
    model: nn.Module,
    normal_images: np.ndarray | torch.Tensor,
    settings: MapSettings = MapSettings(),
    **kwargs,
) -> NormalReference:
    """Per-pixel mean/std of the anomaly maps (``settings`` without any reference correction)
    of NORMAL images, normally the training images. ``kwargs`` go to
    :func:`reconstruct_and_score`."""
    raw = dataclasses.replace(settings, normal_reference="none")
    maps = reconstruct_and_score(model, normal_images, raw, keep_maps=True, **kwargs)["map"]
    return NormalReference.fit(maps)
