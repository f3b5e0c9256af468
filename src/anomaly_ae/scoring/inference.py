"""Batched inference: reconstruction, then the scoring core (map, the paper's SSIM, score)."""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import torch
from torch import nn

from anomaly_ae.device import autocast, resolve_device, resolve_precision
from anomaly_ae.scoring.anomaly_map import (
    MapSettings,
    image_score,
    map_dtype,
    memory_channel,
    memory_pair,
    raw_map,
    reference_pair,
    score_maps,
)
from anomaly_ae.scoring.memory import pooled_images
from anomaly_ae.scoring.reference import NormalReference, ReferenceAccumulator, with_moved_copies

__all__ = ["reconstruct", "reconstruct_and_score", "fit_normal_reference"]

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """A batch of model images as float32 in [0, 1]: uint8 (the compact cache, 0..255) is
    divided by 255; float tensors become float32 (no copy when they are)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


def _score_batch_fn(model: nn.Module, settings: MapSettings, dev, dtype, keep_maps: bool, reference):
    """The per-batch computation: reconstruction (maybe under autocast), then map and score
    in float64 (:func:`~anomaly_ae.scoring.ssim.map_dtype`), returned as float32 with
    SSIM and MSE. Reference tensors are made once, outside any compiled region."""
    ref, loc_ref = reference_pair(reference, settings, dev)
    banks = memory_pair(reference, settings, dev)

    def score_batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(dev, dtype):
            recon = model(x)
        recon = recon.float().contiguous()  # float32, standard layout
        x = x.contiguous()
        detection, heat, ssim_values = score_maps(x, recon, settings, ref, loc_ref, banks=banks)
        result = {
            "recon": recon,
            "ssim": ssim_values,
            "mse": ((x - recon) ** 2).mean(dim=(1, 2, 3)),
            "score": image_score(detection, settings.score_reduction, settings.topk_fraction),
        }
        if keep_maps:
            result["map"] = heat[:, 0].float()
            if settings.localisation:
                result["detection_map"] = detection[:, 0].float()
        return result

    return score_batch


def _compiled_score_batch(model, settings, dev, dtype, keep_maps, mode, reference):
    """``torch.compile`` the whole per-batch computation once per model, settings and
    reference (the cache entry holds the reference, so its ``id`` cannot be reused)."""
    key = (settings, str(dev), dtype, keep_maps, mode, id(reference))
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        fn = _score_batch_fn(model, settings, dev, dtype, keep_maps, reference)
        per_model[key] = (torch.compile(fn, mode=mode), reference)
    return per_model[key][0]


def reconstruct_and_score(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    settings: MapSettings,
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
    keep_maps: bool = True,
    *,
    keep_recon: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    reference: NormalReference | None = None,
) -> dict[str, np.ndarray]:
    """Run ``images`` ``(N, 1, H, W)`` in [0, 1] through the model in batches.

    Returns float32 arrays: ``recon`` (N, 1, H, W) when ``keep_recon``, ``map`` (N, H, W) when ``keep_maps``,
    ``ssim`` (the paper's per-image SSIM), ``mse`` and ``score`` (N,). With
    ``settings.normal_reference`` other than ``none``, ``reference`` corrects the map before
    the score is taken. With a localisation map (``settings.localisation``) ``map`` is that
    map (the heat map) and, when ``keep_maps``, ``detection_map`` the map ``score`` comes
    from. ``channels_last`` and ``compile`` are speed levers with the same math (the network
    and the scoring core become one ``torch.compile`` graph).
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        score_batch = _compiled_score_batch(model, settings, dev, dtype, keep_maps, compile_mode, reference)
    else:
        score_batch = _score_batch_fn(model, settings, dev, dtype, keep_maps, reference)
    images = torch.as_tensor(images)  # uint8 caches stay uint8: one batch at a time becomes float
    if reference is not None and settings.normal_reference != "none":
        reference.check_shape(images.shape, settings.channels)
    if settings.localisation and settings.localisation.normal_reference != "none" and reference is not None:
        if reference.localisation is not None:
            reference.localisation.check_shape(images.shape, settings.localisation.channels)
    keys = ("recon", "ssim", "mse", "score") if keep_recon else ("ssim", "mse", "score")
    if keep_maps:
        keys += ("map", "detection_map") if settings.localisation else ("map",)
    per_image = {
        "recon": tuple(images.shape[1:]),
        "map": tuple(images.shape[2:]),
        "detection_map": tuple(images.shape[2:]),
    }
    # each output allocated once at its full size and filled batch by batch: no list of
    # batches concatenated (and copied again) at the end, so the peak is the outputs themselves
    out = {key: np.empty((len(images), *per_image.get(key, ())), np.float32) for key in keys}
    with torch.inference_mode():
        for start in range(0, len(images), int(batch_size)):
            x = unit_float(images[start : start + int(batch_size)].to(dev, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            result = score_batch(x)
            for key in keys:
                out[key][start : start + len(x)] = result[key].float().cpu().numpy()
    return out


def reconstruct(model: nn.Module, images: np.ndarray, batch_size: int, device: str = "cpu") -> np.ndarray:
    """Reconstructions only (float32, in fp32), batch by batch: the calibration grid scores
    them many ways, so no map or score is computed here (:func:`reconstruct_and_score`
    gives the same ``recon``)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    images = torch.as_tensor(images)
    out = np.empty(tuple(images.shape), np.float32)  # filled batch by batch (see reconstruct_and_score)
    with torch.inference_mode():
        for start in range(0, len(images), int(batch_size)):
            x = unit_float(images[start : start + int(batch_size)].to(dev, non_blocking=True))
            out[start : start + len(x)] = model(x).float().cpu().numpy()
    return out


def fit_normal_reference(
    model: nn.Module, normal_images: np.ndarray | torch.Tensor, settings: MapSettings, **kwargs
) -> NormalReference:
    """Per-pixel mean/std of the uncorrected maps of NORMAL images (the training images; each
    channel of a two-channel map, :func:`~anomaly_ae.scoring.anomaly_map.raw_map`), with their
    moved copies when ``settings.reference_shift`` is set (:func:`with_moved_copies`; a memory
    channel's reference is fitted on the unmoved images only, :func:`_fit_references`);
    ``kwargs`` go to :func:`reconstruct_and_score`. With a localisation map that needs a
    reference (``settings.localisation``), its reference is fitted too, the same way, and
    returned as the result's ``localisation``; when both maps use the same moved copies, each
    image is reconstructed once for both."""
    localisation = settings.localisation
    if localisation is None or localisation.normal_reference == "none":
        return _fit_references(model, normal_images, [settings.map_part()], **kwargs)[0]
    if localisation.reference_shift == settings.reference_shift:
        reference, heat = _fit_references(model, normal_images, [settings.map_part(), localisation], **kwargs)
    else:
        reference = _fit_references(model, normal_images, [settings.map_part()], **kwargs)[0]
        heat = _fit_references(model, normal_images, [localisation], **kwargs)[0]
    return dataclasses.replace(reference, localisation=heat)


def _fit_references(
    model: nn.Module, normal_images, settings: list[MapSettings], **kwargs
) -> list[NormalReference]:
    """One reference per map of ``settings`` (all with the same ``reference_shift``), from one
    reconstruction of each normal image (and its moved copies), a few batches at a time."""
    shift = settings[0].reference_shift
    chunk = max(int(kwargs.get("batch_size", 32)), 1) * 8  # a few batches at a time, not every map at once
    if shift:
        chunk = max(chunk // 5, 1)  # each image comes with its four moved copies
    accumulators = [ReferenceAccumulator() for _ in settings]
    # with moved copies, a memory channel's reference is fitted apart, on the unmoved images
    # only: its search leaves each image out of the bank, so an unmoved image is already one the
    # bank has not seen, and the four copies would make the search five times as long
    # (docs/STUDIES.md, "A memory bank per place")
    memory_accumulators = [ReferenceAccumulator() if shift and one.memory_pool else None for one in settings]
    # the memory channels' banks: every normal image's block averages (unmoved), once per pool
    banks = {
        one.memory_pool: memory_bank(normal_images, one.memory_pool, chunk)
        for one in settings
        if one.memory_pool
    }
    vectors = {pool: torch.from_numpy(bank) for pool, bank in banks.items()}
    for start in range(0, len(normal_images), chunk):
        part = np.asarray(normal_images[start : start + chunk])
        images = np.arange(start, start + len(part))
        part = torch.as_tensor(with_moved_copies(part, shift))
        sources = np.tile(images, len(part) // len(images))  # moved copies count as their image
        if len(settings) == 1 and settings[0].channels == 1:
            # the map as inference computes it (device, precision, compile)
            raw = dataclasses.replace(settings[0], normal_reference="none", reference_shift=0)
            accumulators[0].add(
                reconstruct_and_score(model, part, raw, keep_maps=True, keep_recon=False, **kwargs)["map"],
                sources,
            )
            continue
        # the reconstructions once (device, precision, compile), then each raw map from them
        recon = torch.from_numpy(
            reconstruct_and_score(model, part, MapSettings(), keep_maps=False, **kwargs)["recon"]
        )
        step = max(int(kwargs.get("batch_size", 32)), 1)
        for accumulator, memory, one in zip(accumulators, memory_accumulators, settings, strict=True):
            mapped = dataclasses.replace(one, memory_pool=0) if memory else one
            # a batch at a time: the float64 intermediates of the SSIM of a whole chunk (with
            # its moved copies, in colour) would hold several GB
            maps = torch.cat(
                [
                    raw_map(
                        unit_float(part[i : i + step]),
                        recon[i : i + step],
                        mapped,
                        vectors.get(mapped.memory_pool),
                        sources[i : i + step],  # each image matched against the others
                    ).float()
                    for i in range(0, len(part), step)
                ]
            )
            # (N, H, W) as inference's map
            accumulator.add(maps[:, 0] if mapped.channels == 1 else maps, sources)
            if memory:  # the unmoved images come first, a batch at a time as above
                x = unit_float(part[: len(images)])
                bank = vectors[one.memory_pool].to(map_dtype(x.device))  # as raw_map's
                channel = [
                    memory_channel(x[i : i + step], one, bank, images[i : i + step])
                    for i in range(0, len(images), step)
                ]
                memory.add(torch.cat(channel)[:, 0].float(), images)
    return [
        dataclasses.replace(
            _with_channel(accumulator.result(), memory.result()) if memory else accumulator.result(),
            memory_bank=banks.get(one.memory_pool),
        )
        for accumulator, memory, one in zip(accumulators, memory_accumulators, settings, strict=True)
    ]


def _with_channel(reference: NormalReference, last: NormalReference) -> NormalReference:
    """``reference`` with the single-channel ``last`` as its last channel: the memory channel's
    reference, fitted apart on the unmoved images (:func:`_fit_references`; ``n_images`` stays
    ``reference``'s, the maps the map's own channels were fitted on)."""

    def stacked(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
        if first is None or second is None:
            return None
        return np.concatenate([first.reshape(-1, *first.shape[-2:]), second[None]])

    return dataclasses.replace(
        reference,
        mean=stacked(reference.mean, last.mean),
        std=stacked(reference.std, last.std),
        upper=stacked(reference.upper, last.upper),
    )


def memory_bank(images: np.ndarray | torch.Tensor, pool: int, chunk: int = 256) -> np.ndarray:
    """The memory channel's bank: the NORMAL ``images``' ``pool`` x ``pool``-px averages
    (:func:`~anomaly_ae.scoring.memory.pooled_images`), float32, ``chunk`` images at a time."""
    parts = [
        pooled_images(unit_float(torch.as_tensor(np.asarray(images[i : i + chunk]))), pool).float().numpy()
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(parts)
