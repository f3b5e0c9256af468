"""Development studies of map and score levers for #14, measured before building them (or not).

Not part of any pipeline and chooses nothing: it reads a category's cached arrays and a
checkpoint through the Kedro catalog, builds maps with the project's scoring core, z-scores
them against the normal training images, and prints per variant the label-free selection
score (calibration's synthetic defects on the validation images, as the calibrate pipeline
scores them), the held-out synthetic image AUROC per kind (the stress test's defects on the
good test images) and the real test image / pixel AUROC.

    python scripts/map_study.py <study> bottle --params data.root=../shared/mvtec_ad --checkpoint <version>

Studies (``zscore`` below is the pipeline's: mean and spread of the training images' maps,
the spread floored by its mean):
  smoothing  1 - SSIM(11) smoothed at sigma 0, 1, 2, 4, 8: several scales, combined
             (``pmax`` the per-pixel max of the z-scored maps; ``smax`` the max of their
             image scores, each standardised by the normal validation images');
  lowpass    a low-pass difference channel |blur(image - reconstruction, sigma)| (faint,
             wide changes that 1 - SSIM barely sees) beside 1 - SSIM(11) smoothed at 4;
  reference  the z-score's normal images: the training images (the pipeline's), the
             validation images (unseen by training), the training maps rescaled to the
             validation maps' level, or per image its 16 nearest training images (32x32
             thumbnails; also with the low-pass channel at sigma 8, per-pixel max): is the
             reference fitted on images the model was trained on the limit?
  peak       local-peak maps: the z-scored 1 - SSIM(11) at sigma 0 / 2 minus its own blur
             at sigma 8 / 16 (a difference of Gaussians: small peaks over their surroundings);
  flips      test-time flips: the maps of the image and its horizontally / vertically
             flipped copies (flipped back), combined by mean or min;
  denoise    fine-tunes the model --epochs more epochs twice, on clean inputs and on inputs
             carrying a synthetic defect (every kind, probability 0.5; the target stays the
             clean image), and scores the z-scored 1 - SSIM(11) sigma 4 map and its per-pixel
             max with the low-pass channel at sigma 8 for both;
  selfnorm   the pipeline's map (z-scored 1 - SSIM(11) sigma 4, per-pixel max with the
             z-scored low-pass channel at sigma 8) normalised per image by its own level:
             minus its median, (map - median) / MAD, minus its 90 % quantile - does an unseen
             image's overall higher error hide a small defect?
  segment    DRAEM's discriminative route on the frozen autoencoder: a small U-Net
             (:class:`SegmentationHead`, --width channels) trained --epochs epochs on random
             128-px crops of the training images, clean and with --copies synthetic defects
             of --train-kinds each (the other kinds stay unseen), to segment the defect from
             the image and its reconstruction; its probability map, and that map mean-pooled
             over 5 / 9 / 21 px (DRAEM scores an image by the pooled map's maximum);
  inflate    the same map divided by where unseen normal images exceed the training spread:
             the validation images' RMS (or 90 % quantile) of their positive z-scores, blurred
             at sigma 4 / 8 / 16, floored at 1 (the validation images are then in-sample for
             the selection score);
  latent     test-time latent optimisation: each image's code refined by --steps Adam steps
             (--lr) on the hybrid loss between the image and the decoded code, from the
             encoder's code; the pipeline's map of the refined reconstruction (does a better
             code for an unseen normal image close its gap to the training images?);
  ensemble   the pipeline's map of each checkpoint in --checkpoint a+b+..., and the mean of
             every combination of them (each z-scored against its own training maps);
  fcn        a spatial bottleneck (Table I's convolutions, the dense 128-d code replaced by
             --cb feature maps at 1/16 of the side; :class:`SpatialBottleneck`), started
             from the checkpoint's convolutions and trained --epochs epochs as a denoiser
             (Adam 1e-3; a --train-kinds defect on half the inputs, DRAEM's Perlin regions
             and cut-and-paste by default, so thin lines, spots and smudges stay unseen);
             z-scored 1 - SSIM(11) at sigma 2 / 4, and the pipeline's pair with low-pass 8;
  shifted    the z-score's normal maps from the training images moved by --shift px (up,
             down, left, right; reflected at the border), which the model has not seen
             there: with or without the unmoved training images, the maps kept where the
             moved object lies or moved back onto the unmoved one - does a reference that
             holds unseen-looking normal maps close the gap of unseen normal images?
  localise   the calibration grid itself (calibration.grid): every distinct map scored on the
             real test images for pixel AUROC and AUPRO beside its synthetic pixel AUROC -
             would a localisation map chosen apart from the detection map, by the synthetic
             pixel AUROC alone (ties as the rule's), localise the real defects better than the
             map the rule chooses for both?
  tail       the pipeline's pair of channels normalised per pixel by the normal maps' upper
             tail, (map - median) / (q - median) for q = 0.95, 0.99, 1 (the maximum), the
             width blurred at sigma 0 or 4 and floored by its mean, against the pipeline's
             z-score; the normal maps from the training images, and with their copies
             moved by 1 px - does a glint pixel's heavy tail, which a spread understates,
             hold the good images' maxima up? Also centred on the mean, as the pipeline's
             `tail` reference, with the maximum or the 2nd largest value (robust to one
             unclean training image); and the z-score with each pixel's highest image left
             out (robust to one unclean training image the same way)
  unclean    each held-out spot and smudge also copied into one training image at the same
             place (an unlabelled defect among the normal training images, the worst case),
             one such image per defect: the z-score (also with each pixel's highest image
             left out), the tail by the maximum and by the 2nd largest value, fitted on
             the clean and on the unclean training images - how much does one unclean
             image damp a later defect at its place?
  tolerant   shift-tolerant maps (the scoring core's MapSettings.shift_tolerance): each error
             term at the reconstruction's best alignment within r px (--tolerance, radii
             a+b+...; 0 is the pipeline's map), z-scored against the training images' maps made the same way,
             alone and with their copies moved by 1 px - is the good images' residual at
             edges (bottle's rim) a reconstruction a pixel or two off, which a spot is not?
  gms        a gradient-magnitude-similarity channel (RIAD's MSGMS, Zavrtanik et al. 2021):
             per scale 1, 1/2, 1/4, 1/8 of the gray image and its reconstruction, 1 - GMS
             with GMS = (2 g g' + c) / (g^2 + g'^2 + c) of their Prewitt gradient magnitudes
             (c = 0.0026), upsampled and averaged over the scales, smoothed at sigma 0 / 2 / 4,
             z-scored; alone and in the per-pixel max with the pipeline's pair - does a map
             of lost edges find spots and smudges that 1 - SSIM ranks with normal edges?
  polarity   the signed low-pass difference blur(x - reconstruction, sigma) at sigma 2 / 4 / 8
             centred per pixel before its absolute value is taken: z-scored against the
             training images' signed maps, then |z| (the pipeline's low-pass channel takes
             |blur| first, then z-scores); less their per-pixel mean, then |.|, then the
             z-score (what the pipeline's references could hold), and |z| weighted as that
             z-score of a normal signed map would weigh it (1.66 |z|, less 1.32 s/(s + mean s));
             and against their per-pixel median, each excursion divided by the RMS of the
             training maps' excursions on its own side (one-sided spreads) or by one RMS of
             both (one spread); alone and in the per-pixel max with the z-scored 1 - SSIM(11)
             sigma 4, beside the pipeline's |blur| at sigma 2 / 8 - does a change against the
             network's own bias (a part brighter where it draws too bright) stand out once the
             difference is centred, which |blur| taken first ranks with the normal images?
  subspace   the pipeline's z-scored channels less their projection on the 1 / 4 / 16 / 64
             leading principal components of the training images' maps - is the normal
             residual that holds the good images' maxima up a pattern that recurs across
             images (a glint of varying strength, an edge moved), which a per-pixel
             spread cannot model?
  blob       a Hessian blob response (sigma^2 max(0, -l), l the larger eigenvalue of the
             Hessian of the map blurred at sigma 2 / 4 / 8 / 16; a compact peak counts, a ridge
             along an edge does not) of the pipeline's z-map and of the unsmoothed 1 - SSIM
             z-map, as a channel: z-scored against the training images', per scale and as the
             per-pixel max over scales, alone and ``umax`` with the pipeline's pair - is the
             good images' residual along bottle's rim a ridge that a spot is not?
  blob_score the pipeline's map unchanged, only the image score: the largest blob response
             over one or more sigma (also the scoring core's ``score_reduction: blob``), and the
             larger of the maximum and that score, each standardised by the normal training or
             validation images' scores;
  peaks      no variants: with the pipeline's map, the good test images' maxima, and per
             held-out spot and smudge the maximum inside its mask against them - how many
             pasted defects rise above every good image?
  features   the network's own encoder as a feature extractor: per block 1, 2, 3 (1/2, 1/4,
             1/8 of the side), the cosine distance over the channels between the image's
             and its reconstruction's activations, upsampled, smoothed at sigma 2 / 4, and
             the three blocks' mean; z-scored, alone, in the per-pixel max with the
             pipeline's pair, and (image score only) the max of the two maps' maxima, each
             standardised by the normal validation images' maxima (``smax``) - does a
             distance in features the autoencoder learnt on normal images separate a
             defect from the normal residual better than pixels?
  warp       a kind the synthesiser lacks, a local warp (a bent or displaced part: a smooth
             displacement field, no new intensity), pasted on the validation and the good
             test images: its image AUROC with the pair and with the encoder-feature channel
             (blocks 1, 3 at sigma 4; per-pixel max and smax) - would it predict the feature
             channel's gain on bottle's real defects, and its loss on BSData's?
  intensity  no reconstruction: the image itself against the training images, per pixel - the
             image blurred at sigma 2 / 4 minus the training images' mean image, and its local
             contrast (blur sigma 1 minus blur sigma 8, a spot's change against its
             surroundings) minus the training images' mean local contrast, the absolute
             value blurred at sigma 2 / 4; largest over the colour channels; z-scored, alone,
             in the per-pixel max with the pipeline's pair, as ``smax`` and as ``umax`` (smax
             as a map: each map standardised by the validation maxima, then the per-pixel
             max) - does a spot or a smudge stand out against where the normal images vary,
             where the reconstruction's residual ranks it with the normal edges?
  constants  SSIM's contrast constant: z-scored 1 - SSIM(11) sigma 4 with k2 0.03 (the paper's),
             0.02, 0.01, 0.005 (and k1 0.003 beside k2 0.01), alone and in the per-pixel max
             with the z-scored low-pass channel at sigma 8 - does C2 = k2^2 hide faint
             structure in flat regions, where the normal images' local spread is below k2?
  spread     no maps: quantiles of the training images' local spread (SSIM's window), and the
             share of pixels below k2 0.03 / 0.02 / 0.01;
  contrasts  no maps: how strong are the real test defects, and calibration's synthetic ones?
             Per defect region (a connected part of a mask, at least 4 px): its area, its
             contrast (|mean inside - mean of a ring 3-6 px outside it|, in luma) and that
             contrast over the ring's standard deviation; quartiles per group (the real test
             defects, each synthetic kind as calibration.synthetic_defects makes it);
  mahal      image scores from several z-scored channels' maxima at once (1 - SSIM(11) at
             sigma 0, 1, 2, 4, 8; low-pass sigma 4, 8; subsets with the pipeline's pair): the
             Mahalanobis distance of an image's log maxima from the normal validation images'
             (Ledoit-Wolf covariance, or whitened by the training images' correlation), no
             image scored in its own fit - does a spot raise the fine scales' maximum above
             what the coarse one predicts, where a glint raises them all?
  tta        test-time moves: each image moved --shift px (up, down, left, right; reflected
             at the border), reconstructed and moved back (the strip the move lost taken from
             the unmoved reconstruction); the pipeline's pair from the mean of the five
             reconstructions, or the mean / min of the five maps, z-scored against the
             training images' maps made the same way - is part of the normal residual the
             strided network's grid phase, which averaging over phases removes and a defect
             survives?
  iterate    the reconstruction fed back through the network (2 and 3 passes): the pipeline's
             pair between the image and that reconstruction - does a defect the first pass
             partly reproduces fade on the next, more than the normal detail does?
  memory     a memory bank per position (PatchCore's nearest neighbour, kept local): per
             position at 1/4 of the side, the distance from the image's features to the
             nearest of every training image's features within r positions (every r up to
             the largest of --tolerance, in grid positions; the training images leave
             themselves out), upsampled, smoothed at sigma 2 / 4; raw, z-scored, in the
             per-pixel max with the pipeline's pair and as smax. The features
             (--memory-features): ``pix``, the image averaged over --memory-pool px (4) with
             its 3x3 neighbourhood (no network); ``ext``, each block's mean with its darkest
             and brightest pixel, and ``std``, its mean with its spread (a spot smaller than a
             block is diluted in the mean, not in its extremes); and ``enc``, the
             network's encoder after blocks 2 and 3, each averaged over 3x3 - does a normal
             model with several modes per place (a reflection here in some training images,
             there in others), which a per-pixel mean and spread cannot hold, keep a spot
             where the normal images vary?
             With several --memory-centre, also every centring's z-scored channel in one
             max with the pair (e.g. none+local: the level and the level-free pattern).
             --memory-bank 1+0.5+0.25: the same with a random half or quarter of the
             training images in the bank - how much do more normal images help?
             --memory-copies none+phase2+flip: the bank also holds copies of every
             training image: phase2, moved by multiples of 2 px within a block (left, up,
             both; the far border replicated), so a query is compared with blocks on a grid
             2 px apart, not --memory-pool px; flip, mirrored left-right, top-bottom and
             both - a denser bank from the images at hand (pix, ext, std only)?
  misses     no new map: which held-out copies does the pipeline's pair miss, and why? Per
             kind, the image AUROC against the good test images (the stress test's), against
             the validation images instead (are the good test images' own maxima what the
             copies lose to?) and calibration's copies against the validation images; then
             split by where each copy lies (the stress table's place bands): the percentile
             over the frame of the training maps' spread (1 - SSIM sigma 4) and of the good
             images' own spread (the stress table's), averaged inside the copy's mask.

Every row with maps also has the real test AUPRO (FPR 0.3) and the image AUROC at the defect
and off it (the label-leak check's: each defective map kept only within, or only beyond,
evaluation.defect_margin of its mask), and the map's mean level outside the defective images'
masks and over the good images.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from scipy import ndimage
from sklearn.covariance import LedoitWolf

from anomaly_ae.data.defects import DEFECT_KINDS, LUMA, paste_synthetic_defects, synthesis_options
from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation import calibration as grid_calibration
from anomaly_ae.evaluation.metrics import aupro, calibrate_threshold, rank_auroc, threshold_options
from anomaly_ae.evaluation.stress import copies_per_image
from anomaly_ae.evaluation.summary import defect_region_metrics
from anomaly_ae.model.autoencoder import to_tiles, untile
from anomaly_ae.model.checkpoint import model_from_checkpoint
from anomaly_ae.scoring.anomaly_map import MapSettings, compose, error_terms, image_score
from anomaly_ae.scoring.anomaly_map import lowpass as lowpass_difference
from anomaly_ae.scoring.inference import reconstruct
from anomaly_ae.scoring.memory import nearest_distance, neighbourhood, pooled_images, pooled_patches
from anomaly_ae.scoring.reference import NormalReference, move
from anomaly_ae.scoring.ssim import gaussian_blur, gaussian_filter, gaussian_taps, ssim_map
from anomaly_ae.training.trainer import TrainingConfig, build_loss

Maps = dict[str, torch.Tensor]  # set name -> (N, H, W) maps
PAPER_K1 = 0.01  # SSIM's luminance constant (ssim_map's default), not a lever of the core
SETS = ("train", "val", "cal", "held", "test")
KINDS = ("thin_line", "spot", "smudge", "blob", "perlin", "cutpaste")


PREWITT = torch.tensor([[1.0, 0.0, -1.0]] * 3) / 3.0


def gradient_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude of (N, 1, H, W) images (replicated border)."""
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, PREWITT[None, None].to(gray))
    gy = F.conv2d(padded, PREWITT.T[None, None].to(gray))
    return (gx.square() + gy.square() + 1e-12).sqrt()


def msgms_error(x: torch.Tensor, recon: torch.Tensor, scales: int = 4, c: float = 0.0026) -> torch.Tensor:
    """RIAD's multi-scale 1 - GMS map (N, 1, H, W) of images in [0, 1], gray by the channel mean."""
    a, b = x.float().mean(1, keepdim=True), recon.float().mean(1, keepdim=True)
    out = torch.zeros_like(a)
    for s in range(scales):
        pa, pb = (F.avg_pool2d(a, 2**s), F.avg_pool2d(b, 2**s)) if s else (a, b)
        ga, gb = gradient_magnitude(pa), gradient_magnitude(pb)
        err = 1.0 - (2 * ga * gb + c) / (ga.square() + gb.square() + c)
        out += F.interpolate(err, size=a.shape[-2:], mode="bilinear", align_corners=False) if s else err
    return out / scales


def _maps_of_terms(terms: dict, channels: dict) -> dict:
    maps = {}
    for name, (kind, sigma) in channels.items():
        if kind == "gms":
            maps[name] = gaussian_blur(terms["gms"], sigma)[:, 0]
        elif kind == "ssim":
            maps[name] = compose(terms, MapSettings(smoothing_sigma=sigma))[:, 0]
        elif kind == "ssimk":  # 1 - SSIM(11) with SSIM's own constants: sigma = (smoothing, k1, k2)
            smooth, k1, k2 = sigma
            if k1 == PAPER_K1:  # the scoring core's map (MapSettings.ssim_k2)
                settings = MapSettings(smoothing_sigma=smooth, ssim_k2=k2)
                maps[name] = compose(error_terms(*terms["pair"], k2=k2), settings)[:, 0]
            else:  # k1 is no lever of the core: SSIM's map with both constants
                x, recon = terms["pair"]
                ssim = ssim_map(x, recon, gaussian_taps(), k1=k1, k2=k2, same_size=True, precise=True)
                err = (1.0 - ssim.mean(1, keepdim=True)).clamp(0.0, 1.0).float()
                maps[name] = gaussian_blur(err, smooth)[:, 0]
        elif kind == "signed":
            maps[name] = gaussian_blur(terms["diff"], sigma).mean(1)
        else:
            maps[name] = lowpass_difference(terms, sigma)[:, 0]
    return maps


def channel_maps(
    network,
    images: np.ndarray,
    channels: dict,
    batch: int,
    flip: int | None = None,
    rebuild=None,
    tolerance: int = 0,
) -> Iterator[dict]:
    """Per batch, each channel's (N, H, W) map from the scoring core: 1 - SSIM(11) smoothed by
    sigma (:func:`compose`), or the low-pass difference |blur(x - reconstruction, sigma)|
    (:func:`lowpass_difference`); with ``flip`` (a dimension) the reconstruction of the
    flipped image, flipped back; ``rebuild`` (images -> reconstructions) replaces the
    network's forward pass; ``tolerance`` r > 0: the scoring core's shift tolerance
    (``MapSettings.shift_tolerance``: each error term, per pixel, the smallest over the
    reconstruction moved by every (dy, dx) with |dy|, |dx| <= r, before smoothing; the
    stop-37 rows of docs/STUDIES.md took the minimum of each smoothed channel instead)."""
    for start in range(0, len(images), batch):
        x = torch.from_numpy(as_unit_float(images[start : start + batch]))
        seen = x.flip(flip).numpy() if flip is not None else x.numpy()
        recon = torch.from_numpy(
            reconstruct(network, seen, batch, "cpu") if rebuild is None else rebuild(seen)
        )
        recon = recon.flip(flip) if flip is not None else recon
        yield pair_maps(x, recon, channels, tolerance)


def pair_maps(x: torch.Tensor, recon: torch.Tensor, channels: dict, tolerance: int = 0) -> dict:
    """Each channel's (N, H, W) map of images ``x`` against their reconstructions ``recon``."""
    terms = error_terms(x, recon, keep_diff=True, tolerance=tolerance)
    if any(kind == "gms" for kind, _ in channels.values()):
        terms["gms"] = msgms_error(x, recon)
    if any(kind == "ssimk" for kind, _ in channels.values()):
        terms["pair"] = (x, recon)
    return _maps_of_terms(terms, channels)


def maps_of(
    network, sets: dict, channels: dict, batch: int, flip: int | None = None, rebuild=None, tolerance: int = 0
) -> dict[str, Maps]:
    """channel -> set -> maps, for every image set."""
    out: dict[str, Maps] = {name: {} for name in channels}
    for set_name, images in sets["images"].items():
        parts = list(channel_maps(network, images, channels, batch, flip, rebuild, tolerance))
        for name in channels:
            out[name][set_name] = torch.cat([part[name] for part in parts])
    return out


def zscored(maps: Maps, normal: torch.Tensor | None = None) -> Maps:
    """The pipeline's ``zscore`` reference: mean and spread (floored by its mean) of the
    ``normal`` maps (default: the training images')."""
    reference = NormalReference.fit(maps["train"] if normal is None else normal)
    return {k: reference.apply(m, "zscore") for k, m in maps.items()}


def pmax(*maps: Maps) -> Maps:
    return {k: torch.stack([m[k] for m in maps]).amax(0) for k in maps[0]}


def maxima(maps: Maps) -> dict[str, np.ndarray]:
    """Each image's score: its map's maximum."""
    return {k: m.flatten(1).amax(1).numpy() for k, m in maps.items()}


def smax(*maps: Maps) -> dict[str, np.ndarray]:
    """Per image, the largest of the maps' maxima, each standardised by the normal validation
    images' maxima (mean and standard deviation): a union of detectors at one false-alarm scale."""
    per = [maxima(z) for z in maps]
    return {k: np.max([(p[k] - p["val"].mean()) / p["val"].std() for p in per], axis=0) for k in per[0]}


def umax(*maps: Maps) -> Maps:
    """:func:`smax` as a map: the per-pixel max of the maps, each first standardised by the
    normal validation images' maxima (mean and standard deviation), so its maximum is smax's
    score. (The normal level is then below 0: the at-defect figure, which sets the rest of a
    map to 0, is not comparable for it.)"""
    scaled = []
    for z in maps:
        top = z["val"].flatten(1).amax(1)
        scaled.append({k: (m - top.mean()) / top.std() for k, m in z.items()})
    return pmax(*scaled)


def load(
    category: str, params: str, checkpoint: str | None, images: bool = True, env: str | None = None
) -> dict:
    """The category's cached images, the ``checkpoint`` version's network and the synthetic
    defects' parameters, through the Kedro catalog of ``env`` (``images=False``: the network only)."""
    root = Path(__file__).resolve().parents[1]
    bootstrap_project(root)
    runtime = dict(item.split("=", 1) for item in params.split(",") if item)
    with KedroSession.create(root, env=env, runtime_params=runtime) as session:
        catalog = session.load_context().catalog
        data = {"network": model_from_checkpoint(catalog.load(f"{category}.model_checkpoint", checkpoint))}
        if images:
            data |= {s: catalog.load(f"{category}.{s}_images") for s in ("train", "validation", "test")}
            calibration, evaluation = catalog.load("params:calibration"), catalog.load("params:evaluation")
            data["calibration_params"] = calibration
            data["calibration"] = calibration["synthetic_defects"]
            data["paper"] = MapSettings.from_dict(evaluation["anomaly_map"])
            data["stress"] = evaluation["stress_test"]
            data["defect_margin"] = evaluation["defect_margin"]
            data["threshold"] = evaluation["threshold"]
    return data


def study_sets(data: dict) -> dict:
    """The images every study scores: training, validation (normal), calibration's defects
    on the validation images, the stress test's held-out defects on the good test images,
    and the test set; with the masks and labels the metrics need."""
    calibration, stress = data["calibration"], data["stress"]
    options = synthesis_options(calibration)
    normal = as_unit_float(data["validation"]["images"])
    cal, cal_masks, cal_kinds = paste_synthetic_defects(
        normal, calibration["per_image"], calibration["seed"], kinds=calibration["kinds"], **options
    )
    test = data["test"]
    labels = np.asarray(test["labels"]) != 0
    good = as_unit_float(test["images"][~labels])
    held, held_masks, held_kinds = paste_synthetic_defects(
        good,
        copies_per_image(stress, len(good), DEFECT_KINDS, good.shape[1]),
        stress["seed"],
        kinds=DEFECT_KINDS,
        **options,
    )
    return {
        "images": {
            "train": data["train"]["images"],
            "val": normal,
            "cal": cal,
            "held": held,
            "test": test["images"],
        },
        "cal_masks": cal_masks,
        "cal_kinds": cal_kinds,
        "calibration": data["calibration_params"],
        "paper": data["paper"],
        "held_kinds": np.asarray(held_kinds),
        "held_masks": held_masks,
        "labels": labels,
        "known": np.asarray(test.get("has_mask", np.ones(len(labels), bool)), bool) | ~labels,
        "test_masks": test["masks"],
        "options": options,
        "defect_margin": data["defect_margin"],
        "threshold": data["threshold"],
    }


def _auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    return rank_auroc(np.r_[np.zeros(len(negatives)), np.ones(len(positives))], np.r_[negatives, positives])


def evaluate(name: str, sets: dict, maps: Maps | None = None, scores: dict | None = None) -> dict:
    """One row: selection score (as calibration: image AUROC of the max score, pixel AUROC
    over every pixel), held-out synthetic image AUROC per kind, real image / pixel AUROC.
    Score-only variants (``scores``) have no pixel figures."""
    scores = scores or maxima(maps)
    row = {"variant": name, "syn_image_auroc": _auroc(scores["val"], scores["cal"])}
    if maps is not None:
        normal_pixels, defect_pixels = maps["val"].numpy(), maps["cal"].numpy()
        row["syn_pixel_auroc"] = rank_auroc(
            np.r_[np.zeros(normal_pixels.size), sets["cal_masks"].ravel() > 0],
            np.r_[normal_pixels.ravel(), defect_pixels.ravel()],
        )
        row["selection_score"] = grid_calibration.selection_score(
            row["syn_image_auroc"], row["syn_pixel_auroc"]
        )
    labels, kinds = sets["labels"], sets["held_kinds"]
    good = scores["test"][~labels]
    row["held_image_auroc"] = _auroc(good, scores["held"])
    for kind in KINDS:
        row[f"held_{kind}"] = _auroc(good, scores["held"][kinds == kind])
    row["real_image_auroc"] = rank_auroc(labels, scores["test"])
    if maps is not None:
        known = sets["known"]
        row["real_pixel_auroc"] = rank_auroc(
            sets["test_masks"][known].ravel() > 0, maps["test"].numpy()[known].ravel()
        )
        row["real_aupro"] = aupro(sets["test_masks"][known], maps["test"].numpy()[known])
        # the label-leak check's at-defect figure (the rest of each defective map set to 0,
        # the z-score's normal level; the other normalisations' normal level is near it)
        regions = defect_region_metrics(
            labels, maps["test"].numpy(), sets["test_masks"], sets["defect_margin"], has_mask=known
        )
        row["real_image_auroc_at_defect"] = regions["image_auroc_at_defect"]
        row["real_image_auroc_off_defect"] = regions["image_auroc_off_defect"]
        # the map's mean level outside the masks of the defective images, and over the good images
        bad = labels & known
        test = maps["test"].numpy()
        row["real_level_off_defect"] = float(test[bad][sets["test_masks"][bad] == 0].mean())
        row["real_level_good"] = float(test[~labels].mean())
    # good test images above the threshold the pipeline's rule sets on the validation scores
    threshold = calibrate_threshold(scores["val"], **threshold_options(sets["threshold"]))
    row["good_flagged"] = float((good > threshold).mean())
    return row


def _scales(network, sets, batch, pairs: dict, score_pairs: dict) -> list[dict]:
    """Single channels, their per-pixel max (``pmax``) and the max of their image scores
    standardised by the validation images' (``smax``)."""
    channels = {name: spec for pair in pairs.values() for name, spec in pair.items()}
    z = {name: zscored(m) for name, m in maps_of(network, sets, channels, batch).items()}
    rows = [evaluate(name, sets, z[name]) for name in channels]
    rows += [
        evaluate("pmax " + " + ".join(names), sets, pmax(*(z[n] for n in names)))
        for names in pairs.values()
        if len(names) > 1
    ]
    for names in score_pairs:
        rows.append(evaluate("smax " + " + ".join(names), sets, scores=smax(*(z[n] for n in names))))
    return rows


def smoothing(network, sets, args) -> list[dict]:
    ssim = {s: {f"ssim s{s}": ("ssim", s)} for s in (0, 1, 2, 4, 8)}
    both = lambda *sigmas: {k: v for s in sigmas for k, v in ssim[s].items()}  # noqa: E731
    pairs = {s: ssim[s] for s in ssim} | {
        c: both(*c) for c in ((0, 4), (1, 4), (2, 8), (2, 4, 8), (0, 2, 4, 8))
    }
    score_pairs = [tuple(f"ssim s{s}" for s in c) for c in ((0, 4), (1, 4), (2, 4, 8), (0, 2, 4, 8))]
    return _scales(network, sets, args.batch, pairs, score_pairs)


def lowpass(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s4": ("lowpass", 4), "lowpass s8": ("lowpass", 8)}
    pairs = {n: {n: spec[n]} for n in spec}
    pairs |= {f"p{s}": {"ssim s4": spec["ssim s4"], f"lowpass s{s}": spec[f"lowpass s{s}"]} for s in (4, 8)}
    return _scales(network, sets, args.batch, pairs, [("ssim s4", "lowpass s4"), ("ssim s4", "lowpass s8")])


def reference(network, sets, args) -> list[dict]:
    maps = maps_of(network, sets, {"ssim s4": ("ssim", 4)}, args.batch)["ssim s4"]
    train, val = maps["train"], maps["val"]
    good_rows = torch.from_numpy(~sets["labels"])
    good = maps["test"][good_rows]
    z = zscored(maps)
    print(
        f"unseen / training images: mean map x{float(val.mean() / train.mean()):.2f} (validation), "
        f"x{float(good.mean() / train.mean()):.2f} (good test); per-pixel spread "
        f"x{float(val.std(0).mean() / train.std(0).mean()):.2f} (validation)"
    )
    medians = {k: float(z[k].flatten(1).amax(1).median()) for k in ("train", "val")}
    medians["good test"] = float(z["test"][good_rows].flatten(1).amax(1).median())
    print("median of the z-scored map's maximum: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    rows = [
        evaluate("training images (pipeline)", sets, z),
        evaluate("validation images", sets, zscored(maps, val)),
    ]
    # the training maps' pattern at the validation maps' level: mean scaled by the ratio of
    # the mean maps, spread so that the validation z-scores have unit RMS
    mean, std = train.mean(0) * (val.mean() / train.mean()), train.std(0)
    std = std + std.mean()
    std = std * (((val - mean) / std) ** 2).mean().sqrt()
    rows.append(
        evaluate("training, rescaled to validation", sets, {k: (m - mean) / std for k, m in maps.items()})
    )
    thumbs = {
        k: F.adaptive_avg_pool2d(torch.from_numpy(as_unit_float(v)), 32).flatten(1)
        for k, v in sets["images"].items()
    }
    rows.append(evaluate("16 nearest training images", sets, nearest_z(maps, thumbs)))
    lowpass8 = maps_of(network, sets, {"lowpass s8": ("lowpass", 8)}, args.batch)["lowpass s8"]
    rows.append(
        evaluate(
            "16 nearest, pmax with lowpass s8",
            sets,
            pmax(nearest_z(maps, thumbs), nearest_z(lowpass8, thumbs)),
        )
    )
    return rows


def nearest_z(maps: Maps, thumbs: dict, k: int = 16) -> Maps:
    """Each image's map z-scored against the maps of its ``k`` nearest training images
    (by 32x32 thumbnail); the spread floored by the training maps' mean spread."""
    train = maps["train"]
    floor = train.std(0).mean()
    out = {}
    for name, m in maps.items():
        idx = torch.cdist(thumbs[name], thumbs["train"]).topk(k, largest=False).indices
        neighbours = train[idx]  # (N, k, H, W); a training image is among its own neighbours
        out[name] = (m - neighbours.mean(1)) / (neighbours.std(1) + floor)
    return out


def peak(network, sets, args) -> list[dict]:
    maps = maps_of(network, sets, {"s0": ("ssim", 0), "s2": ("ssim", 2), "s4": ("ssim", 4)}, args.batch)
    z = {name: zscored(m) for name, m in maps.items()}
    rows = [evaluate(f"ssim {name} (z)", sets, z[name]) for name in z]
    for name in ("s0", "s2"):
        for big in (8, 16):
            dog = {k: (m[:, None] - gaussian_blur(m[:, None], big))[:, 0] for k, m in z[name].items()}
            rows.append(evaluate(f"ssim {name} (z) - blur {big}", sets, dog))
    return rows


def flips(network, sets, args) -> list[dict]:
    spec = {"s4": ("ssim", 4)}
    views = {"none": None, "h": -1, "v": -2}
    maps = {v: maps_of(network, sets, spec, args.batch, flip)["s4"] for v, flip in views.items()}
    rows = [evaluate("no flip", sets, zscored(maps["none"]))]
    for combo in (("none", "h"), ("none", "v"), ("none", "h", "v")):
        for how, reduce in (("mean", torch.mean), ("min", torch.amin)):
            joined = {k: reduce(torch.stack([maps[v][k] for v in combo]), 0) for k in SETS}
            rows.append(evaluate(f"{how} of {'+'.join(combo)}", sets, zscored(joined)))
    return rows


def fine_tune(
    network,
    images: np.ndarray,
    epochs: int,
    defects: float,
    options: dict,
    seed: int = 0,
    kinds: tuple[str, ...] = DEFECT_KINDS,
    lr: float = 5e-4,
):
    """A copy of ``network`` trained ``epochs`` more epochs (Adam ``lr``, batch 8, the hybrid
    loss), each input carrying a synthetic defect of ``kinds`` with probability ``defects``;
    the target is always the clean image."""
    network = copy.deepcopy(network)
    train = as_unit_float(images)
    loss_fn = build_loss(TrainingConfig.from_dict({"compile": False}))
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        network.train()
        order = rng.permutation(len(train))
        for start in range(0, len(order) - 1, 8):
            clean = train[order[start : start + 8]]
            noisy = clean.copy()
            pick = np.nonzero(rng.random(len(clean)) < defects)[0]
            if len(pick):
                noisy[pick] = paste_synthetic_defects(
                    clean[pick], 1, int(rng.integers(1 << 30)), kinds=kinds, **options
                )[0]
            loss = loss_fn(torch.from_numpy(clean), network(torch.from_numpy(noisy)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"  {'denoising' if defects else 'clean'} fine-tune: epoch {epoch + 1}/{epochs}",
            f"loss {float(loss.detach()):.4f}",
            flush=True,
        )
    return network.eval()


def denoise(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    rows = []
    for label, defects in (("clean", 0.0), ("denoising", 0.5)):
        tuned = fine_tune(network, sets["images"]["train"], args.epochs, defects, sets["options"])
        z = {name: zscored(m) for name, m in maps_of(tuned, sets, spec, args.batch).items()}
        rows.append(evaluate(f"{label} +{args.epochs}: ssim s4", sets, z["ssim s4"]))
        rows.append(
            evaluate(
                f"{label} +{args.epochs}: pmax ssim s4 + lowpass s8",
                sets,
                pmax(z["ssim s4"], z["lowpass s8"]),
            )
        )
    return rows


class SpatialBottleneck(torch.nn.Module):
    """Table I with its dense 128-d code replaced by a spatial one: the trained encoder's
    convolutions, a 1x1 convolution down to ``channels`` feature maps at 1/16 of the image
    side (16x16 at 256 px: 16 channels = 4,096 numbers), a 1x1 convolution back up (LeakyReLU,
    BatchNorm), the trained decoder's transposed convolutions. Encoder and decoder start from
    ``base``'s weights; the 1x1 layers are new. Being convolutional throughout, it takes the
    whole image whether or not ``base`` was tiled (a 256x512 image: a 16x32 code)."""

    def __init__(self, base, channels: int) -> None:
        super().__init__()
        cfg = self.config = base.config
        wide = cfg.encoder_filters[-1]
        convs = list(base.encoder.children())[:-2]  # without Flatten and the dense layer
        self.encoder = torch.nn.Sequential(*copy.deepcopy(convs), torch.nn.Conv2d(wide, channels, 1))
        self.mid = torch.nn.Sequential(
            torch.nn.Conv2d(channels, wide, 1),
            torch.nn.LeakyReLU(cfg.leaky_slope),
            torch.nn.BatchNorm2d(wide, eps=cfg.batchnorm_eps, momentum=cfg.batchnorm_momentum),
        )
        self.decoder = copy.deepcopy(base.decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.mid(self.encoder(x)))


def fcn(network, sets, args) -> list[dict]:
    kinds = tuple(args.train_kinds.split("+"))
    rows = [evaluate("Table I (pipeline map)", sets, _pipeline_map(network, sets, args))]
    spatial = SpatialBottleneck(network, args.cb)
    print(f"spatial bottleneck: {sum(p.numel() for p in spatial.parameters()):,} parameters", flush=True)
    tuned = fine_tune(
        spatial, sets["images"]["train"], args.epochs, 0.5, sets["options"], kinds=kinds, lr=1e-3
    )
    spec = {"ssim s2": ("ssim", 2), "ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    z = {name: zscored(m) for name, m in maps_of(tuned, sets, spec, args.batch).items()}
    label = f"{args.cb} ch, denoising on {args.train_kinds} +{args.epochs}"
    rows.append(evaluate(f"{label}: ssim s2", sets, z["ssim s2"]))
    rows.append(evaluate(f"{label}: ssim s4", sets, z["ssim s4"]))
    rows.append(evaluate(f"{label}: pmax ssim s4 + lowpass s8", sets, pmax(z["ssim s4"], z["lowpass s8"])))
    return rows


class SegmentationHead(torch.nn.Module):
    """DRAEM's discriminative sub-network, narrowed for a CPU: a small U-Net (``depth``
    poolings, ``width`` channels at full resolution, doubling per level) that takes the image
    and the autoencoder's reconstruction (2 x C channels) and gives per-pixel defect logits."""

    def __init__(self, channels: int, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]

        def block(i: int, o: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(i, o, 3, padding=1),
                torch.nn.BatchNorm2d(o),
                torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(o, o, 3, padding=1),
                torch.nn.BatchNorm2d(o),
                torch.nn.ReLU(inplace=True),
            )

        self.down = torch.nn.ModuleList(
            block(2 * channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth + 1)
        )
        self.up = torch.nn.ModuleList(
            block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.out = torch.nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        h, skips = torch.cat([x, recon], 1), []
        for i, down in enumerate(self.down):
            h = down(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        h = skips.pop()
        for up in self.up:
            skip = skips.pop()
            h = up(
                torch.cat(
                    [F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1
                )
            )
        return self.out(h)[:, 0]


def train_segmentation(network, images: np.ndarray, options: dict, args, kinds: tuple[str, ...]):
    """A :class:`SegmentationHead` trained ``args.epochs`` epochs (Adam 1e-3, batch 16, BCE +
    soft Dice) on random 128-px crops of a fixed pool: every training image clean and with
    ``args.copies`` synthetic defects of ``kinds`` each (seeded), each with the frozen
    autoencoder's reconstruction of what it was given."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clean = as_unit_float(images)
    defective, masks, _ = paste_synthetic_defects(clean, args.copies, 0, kinds=kinds, **options)
    pool_x = np.concatenate([clean, defective])
    pool_m = np.concatenate([np.zeros((len(clean), *clean.shape[-2:]), np.uint8), masks]).astype(np.float32)
    pool_r = reconstruct(network, pool_x, args.batch, "cpu")
    pool_x, pool_r = torch.from_numpy(pool_x).half(), torch.from_numpy(pool_r).half()
    pool_m = torch.from_numpy(pool_m)
    head = SegmentationHead(clean.shape[1], args.width)
    print(
        f"segmentation head: {sum(p.numel() for p in head.parameters()):,} parameters, pool {len(pool_x)} "
        f"({len(clean)} clean, {len(defective)} with {'+'.join(kinds)})",
        flush=True,
    )
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    size, (h, w) = 128, clean.shape[-2:]
    began = time.perf_counter()
    for epoch in range(args.epochs):
        head.train()
        order, total = rng.permutation(len(pool_x)), 0.0
        for start in range(0, len(order), 16):
            pick = order[start : start + 16]
            ys, xs = rng.integers(0, h - size + 1, len(pick)), rng.integers(0, w - size + 1, len(pick))
            crop = [
                (slice(int(y), int(y) + size), slice(int(x), int(x) + size))
                for y, x in zip(ys, xs, strict=True)
            ]
            xb = torch.stack([pool_x[i][:, cy, cx] for i, (cy, cx) in zip(pick, crop, strict=True)]).float()
            rb = torch.stack([pool_r[i][:, cy, cx] for i, (cy, cx) in zip(pick, crop, strict=True)]).float()
            mb = torch.stack([pool_m[i][cy, cx] for i, (cy, cx) in zip(pick, crop, strict=True)])
            logits = head(xb, rb)
            prob = torch.sigmoid(logits)
            dice = 1 - (2 * (prob * mb).sum() + 1) / (prob.sum() + mb.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, mb) + dice
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(pick)
        print(
            f"  segmentation: epoch {epoch + 1}/{args.epochs} loss {total / len(pool_x):.4f}",
            f"({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    return head.eval()


def segment(network, sets, args) -> list[dict]:
    """DRAEM's discriminative route on the frozen autoencoder: does a head that learns to tell
    a defect's residual from the normal residual (trained on the training images with
    ``--train-kinds`` synthetic defects; the other kinds stay unseen) find the held-out spots
    and smudges, and the real defects?"""
    kinds = tuple(args.train_kinds.split("+"))
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, _pipeline_map(network, sets, args))]
    head = train_segmentation(network, sets["images"]["train"], sets["options"], args, kinds)
    prob: Maps = {}
    with torch.no_grad():
        for name, images in sets["images"].items():
            parts = []
            for start in range(0, len(images), args.batch):
                x = torch.from_numpy(as_unit_float(images[start : start + args.batch]))
                recon = torch.from_numpy(reconstruct(network, x.numpy(), args.batch, "cpu"))
                parts.append(torch.sigmoid(head(x, recon)))
            prob[name] = torch.cat(parts)
    label = f"segmentation head ({args.train_kinds}, {args.epochs} epochs)"
    rows.append(evaluate(f"{label}: probability", sets, prob))
    for k in (5, 9, 21):  # DRAEM scores the image by the max of the mean-pooled mask (21)
        pooled = {
            n: F.avg_pool2d(m[:, None], k, 1, k // 2, count_include_pad=False)[:, 0] for n, m in prob.items()
        }
        rows.append(evaluate(f"{label}: mean-pooled {k}", sets, pooled))
    return rows


def _pipeline_map(network, sets, args, rebuild=None) -> Maps:
    """The rule's choice on bottle: z-scored 1 - SSIM(11) sigma 4, per-pixel max with the
    z-scored low-pass channel at sigma 8."""
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    z = {name: zscored(m) for name, m in maps_of(network, sets, spec, args.batch, rebuild=rebuild).items()}
    return pmax(z["ssim s4"], z["lowpass s8"])


def selfnorm(network, sets, args) -> list[dict]:
    z = _pipeline_map(network, sets, args)

    def per_image(how: str) -> Maps:
        out = {}
        for k, m in z.items():
            flat = m.flatten(1)
            median = flat.median(1).values[:, None, None]
            if how == "minus median":
                out[k] = m - median
            elif how == "(- median) / MAD":
                mad = (flat - flat.median(1, keepdim=True).values).abs().median(1).values[:, None, None]
                out[k] = (m - median) / (mad + mad.mean())
            else:
                out[k] = m - flat.quantile(0.9, dim=1)[:, None, None]
        return out

    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, z)]
    rows += [evaluate(how, sets, per_image(how)) for how in ("minus median", "(- median) / MAD", "minus q90")]
    return rows


def gms(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    spec |= {f"gms s{sigma}": ("gms", sigma) for sigma in (0, 2, 4)}
    z = {name: zscored(m) for name, m in maps_of(network, sets, spec, args.batch).items()}
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pmax(z["ssim s4"], z["lowpass s8"]))]
    for g in ("gms s0", "gms s2", "gms s4"):
        rows.append(evaluate(g, sets, z[g]))
        rows.append(evaluate(f"pmax pipeline + {g}", sets, pmax(z["ssim s4"], z["lowpass s8"], z[g])))
    return rows


def inflate(network, sets, args) -> list[dict]:
    z = _pipeline_map(network, sets, args)
    val = z["val"].clamp(min=0)
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, z)]
    for stat, level in (("rms", (val**2).mean(0).sqrt()), ("q90", z["val"].quantile(0.9, dim=0))):
        for sigma in (4, 8, 16):
            factor = gaussian_blur(level[None, None], sigma)[0, 0].clamp(min=1.0)
            scaled = {k: m / factor for k, m in z.items()}
            rows.append(evaluate(f"/ validation {stat}, blur {sigma}", sets, scaled))
    return rows


def _one_sided(maps: Maps, polar: bool) -> Maps:
    """Signed maps (``signed`` channels) against the training images' per-pixel median: an
    excursion above it divided by the RMS of the training maps' excursions above it, one below
    by theirs below (``polar``; each spread floored by its own spatial mean, as the z-score's),
    or both by one RMS of the two (``polar=False``: the same, blind to the sign)."""
    train = maps["train"]
    median = train.median(0).values
    above, below = (train - median).clamp(min=0), (median - train).clamp(min=0)
    up, down = above.pow(2).mean(0).sqrt(), below.pow(2).mean(0).sqrt()
    if not polar:
        up = down = (above.pow(2) + below.pow(2)).mean(0).sqrt()
    up, down = up + up.mean(), down + down.mean()
    return {k: torch.maximum((m - median) / up, (median - m) / down) for k, m in maps.items()}


def polarity(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8), "lowpass s2": ("lowpass", 2)}
    spec |= {f"signed s{s}": ("signed", s) for s in (2, 4, 8)}
    maps = maps_of(network, sets, spec, args.batch)
    z = {name: zscored(maps[name]) for name in ("ssim s4", "lowpass s8", "lowpass s2")}
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pmax(z["ssim s4"], z["lowpass s8"]))]
    for s in (2, 8):
        rows.append(evaluate(f"lowpass s{s} (|blur|, z)", sets, z[f"lowpass s{s}"]))
    rows.append(evaluate("pmax ssim s4 + lowpass s2 (|blur|, z)", sets, pmax(z["ssim s4"], z["lowpass s2"])))
    centred = {s: {k: m.abs() for k, m in zscored(maps[f"signed s{s}"]).items()} for s in (2, 4, 8)}
    for s in (2, 4, 8):
        label = f"signed s{s}, |z|"
        rows.append(evaluate(label, sets, centred[s]))
        rows.append(evaluate(f"pmax ssim s4 + {label}", sets, pmax(z["ssim s4"], centred[s])))
    rows.append(
        evaluate(
            "pmax ssim s4 + signed s2 + signed s8, |z|", sets, pmax(z["ssim s4"], centred[2], centred[8])
        )
    )
    # is it the channel's weight in the per-pixel max? If the signed map is normal, |m - mean| has
    # mean 0.798 s and spread 0.603 s, so its z-score is about 1.66 |z| - 1.32 s / (s + mean s)
    spread = maps["signed s2"]["train"].std(0)
    offset = 1.323 * spread / (spread + spread.mean())
    for label, scaled in (
        ("1.66 |z|", {k: 1.658 * m for k, m in centred[2].items()}),
        ("1.66 |z| - 1.32 s / (s + mean s)", {k: 1.658 * m - offset for k, m in centred[2].items()}),
    ):
        rows.append(evaluate(f"pmax ssim s4 + signed s2, {label}", sets, pmax(z["ssim s4"], scaled)))
    rows.append(
        evaluate(
            "pmax ssim s4 + 1.66 x lowpass s2 (|blur|, z)",
            sets,
            pmax(z["ssim s4"], {k: 1.658 * m for k, m in z["lowpass s2"].items()}),
        )
    )
    del centred
    # as the pipeline could hold it: the signed map less the training images' per-pixel mean,
    # its absolute value, then the usual z-score of that channel
    folded = {}
    for s in (2, 8):
        mean = maps[f"signed s{s}"]["train"].mean(0)
        folded[s] = zscored({k: (m - mean).abs() for k, m in maps[f"signed s{s}"].items()})
        rows.append(evaluate(f"signed s{s} less mean, |.|, z", sets, folded[s]))
        rows.append(
            evaluate(f"pmax ssim s4 + signed s{s} less mean, |.|, z", sets, pmax(z["ssim s4"], folded[s]))
        )
    rows.append(
        evaluate(
            "pmax ssim s4 + signed s2 + s8 less mean, |.|, z", sets, pmax(z["ssim s4"], folded[2], folded[8])
        )
    )
    del folded
    for s in (2, 8):
        for polar in (False, True):
            one = _one_sided(maps[f"signed s{s}"], polar)
            label = f"signed s{s}, median, {'one-sided spreads' if polar else 'one spread'}"
            rows.append(evaluate(label, sets, one))
            rows.append(evaluate(f"pmax ssim s4 + {label}", sets, pmax(z["ssim s4"], one)))
    return rows


def _without_subspace(maps: Maps, ranks: tuple[int, ...]) -> dict[int, Maps]:
    """Per rank, each map less its projection on that many leading principal components of
    the training images' maps (centred by their mean, which is kept): the normal variation
    that recurs across images as one pattern (a glint of varying strength, an edge moved).
    One SVD serves every rank."""
    train = maps["train"].flatten(1).double()
    mean = train.mean(0)
    components = torch.linalg.svd(train - mean, full_matrices=False).Vh  # (N, D)
    out: dict[int, Maps] = {}
    for rank in ranks:
        basis = components[:rank].T  # (D, rank)
        out[rank] = {}
        for k, m in maps.items():
            flat = m.flatten(1).double() - mean
            out[rank][k] = (flat - (flat @ basis) @ basis.T + mean).float().view_as(m)
    return out


def subspace(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    z = {name: zscored(m) for name, m in maps_of(network, sets, spec, args.batch).items()}
    pipeline = pmax(z["ssim s4"], z["lowpass s8"])
    rows = [
        evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pipeline),
        evaluate("ssim s4 (z)", sets, z["ssim s4"]),
    ]
    ranks = (1, 4, 16, 64)
    removed = {name: _without_subspace(z[name], ranks) for name in ("ssim s4", "lowpass s8")}
    for rank in ranks:
        rows.append(evaluate(f"ssim s4 (z) less {rank} components", sets, removed["ssim s4"][rank]))
        channels = [removed[name][rank] for name in ("ssim s4", "lowpass s8")]
        rows.append(evaluate(f"pipeline, each channel less {rank}", sets, pmax(*channels)))
    return rows


def blobness(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Scale-normalised Hessian blob response of (N, H, W) maps at ``sigma``: sigma^2 times the
    smaller of the two downward curvatures, max(0, -lambda_max) with lambda_max the larger
    eigenvalue of the Hessian of the map blurred at ``sigma``. A compact peak curves down both
    ways; a ridge (a residual along an edge) only across itself, so it gives about 0. The
    full-resolution form of the scoring core's ``anomaly_map.blob_response`` (which works on a
    grid sigma // 2 times coarser, for speed): the channel rows need a response per pixel."""
    m = F.pad(gaussian_blur(maps[:, None], sigma), (1, 1, 1, 1), mode="replicate")
    c = m[..., 1:-1, 1:-1]
    dxx = m[..., 1:-1, 2:] - 2 * c + m[..., 1:-1, :-2]
    dyy = m[..., 2:, 1:-1] - 2 * c + m[..., :-2, 1:-1]
    dxy = (m[..., 2:, 2:] - m[..., 2:, :-2] - m[..., :-2, 2:] + m[..., :-2, :-2]) / 4
    half_trace, half_gap = (dxx + dyy) / 2, ((dxx - dyy) / 2).square() + dxy.square()
    largest = half_trace + half_gap.sqrt()
    return (sigma**2 * (-largest).clamp(min=0))[:, 0]


def blob_score(network, sets, args) -> list[dict]:
    """The pipeline's map unchanged; only the image score: the largest scale-normalised blob
    response of the map (:func:`blobness`, no reference of its own) over one or more sigma."""
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    z = {name: zscored(m) for name, m in maps_of(network, sets, spec, args.batch).items()}
    pipeline = pmax(z["ssim s4"], z["lowpass s8"])
    del z
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pipeline)]
    tops = {s: maxima({k: blobness(m, s) for k, m in pipeline.items()}) for s in (2, 4, 8, 16)}
    for sigmas in ((2,), (4,), (8,), (16,), (4, 8), (4, 8, 16), (2, 4, 8, 16)):
        scores = {k: np.max([tops[s][k] for s in sigmas], axis=0) for k in pipeline}
        row = evaluate(f"score: blob s{'/'.join(map(str, sigmas))} of the map", sets, pipeline)
        row |= {key: value for key, value in evaluate("", sets, scores=scores).items() if key != "variant"}
        row["selection_score"] = grid_calibration.selection_score(
            row["syn_image_auroc"], row["syn_pixel_auroc"]
        )
        row["real_image_auroc_at_defect"] = float("nan")  # the max's; not this score's
        rows.append(row)
    # the scoring core's own blob score (score_reduction: blob; each scale on a coarser grid)
    scores = {k: image_score(m, "blob").numpy() for k, m in pipeline.items()}
    row = evaluate("score: image_score blob (the scoring core's)", sets, pipeline)
    row |= {key: value for key, value in evaluate("", sets, scores=scores).items() if key != "variant"}
    row["selection_score"] = grid_calibration.selection_score(row["syn_image_auroc"], row["syn_pixel_auroc"])
    row["real_image_auroc_at_defect"] = float("nan")
    rows.append(row)
    # the union of the two detectors: the larger of the map's maximum and the blob score,
    # each standardised by the normal training (or validation) images' scores
    top = maxima(pipeline)
    blob_top = {k: np.max([tops[s][k] for s in (4, 8, 16)], axis=0) for k in pipeline}
    for fit in ("train", "val"):
        scores = {
            k: np.maximum(
                (top[k] - top[fit].mean()) / top[fit].std(),
                (blob_top[k] - blob_top[fit].mean()) / blob_top[fit].std(),
            )
            for k in pipeline
        }
        row = evaluate(f"score: max | blob s4/8/16, standardised on {fit}", sets, pipeline)
        row |= {key: value for key, value in evaluate("", sets, scores=scores).items() if key != "variant"}
        row["selection_score"] = grid_calibration.selection_score(
            row["syn_image_auroc"], row["syn_pixel_auroc"]
        )
        row["real_image_auroc_at_defect"] = float("nan")
        rows.append(row)
    return rows


def blob(network, sets, args) -> list[dict]:
    spec = {"ssim s0": ("ssim", 0), "ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    z = {name: zscored(m) for name, m in maps_of(network, sets, spec, args.batch).items()}
    pipeline = pmax(z["ssim s4"], z["lowpass s8"])
    del z["ssim s4"], z["lowpass s8"]
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pipeline)]
    for source, maps in (("pipeline z-map", pipeline), ("ssim s0 z-map", z.pop("ssim s0"))):
        per_sigma = {}
        for sigma in (2, 4, 8, 16):
            per_sigma[sigma] = zscored({k: blobness(m, sigma) for k, m in maps.items()})
            label = f"blob s{sigma} of {source}, z"
            rows.append(evaluate(label, sets, per_sigma[sigma]))
            rows.append(evaluate(f"umax pipeline + {label}", sets, umax(pipeline, per_sigma[sigma])))
        for sigmas in ((2, 4, 8), (4, 8, 16), (2, 4, 8, 16)):
            label = f"blob s{'/'.join(map(str, sigmas))} of {source}, z, pmax"
            multi = pmax(*(per_sigma[s] for s in sigmas))
            rows.append(evaluate(label, sets, multi))
            rows.append(evaluate(f"umax pipeline + {label}", sets, umax(pipeline, multi)))
            del multi
        del per_sigma
    return rows


def refined(network, steps: int, lr: float) -> Callable[[np.ndarray], np.ndarray]:
    """Images -> reconstructions from codes refined by ``steps`` Adam steps (``lr``) on each
    image's own hybrid loss (0.5 MSE + 0.5 (1 - SSIM)), starting from the encoder's code."""
    loss_fn = build_loss(TrainingConfig.from_dict({"compile": False}))
    network.eval().requires_grad_(False)

    def rebuild(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images))
        with torch.no_grad():
            code = network.encode(x)
        code.requires_grad_(True)
        optimizer = torch.optim.Adam([code], lr=lr)
        for _ in range(steps):
            recon = network.decode(code)
            loss = sum(loss_fn(x[i : i + 1], recon[i : i + 1]) for i in range(len(x)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return network.decode(code).numpy()

    return rebuild


def latent(network, sets, args) -> list[dict]:
    if network.config.tile_grid != (1, 1):
        raise SystemExit("latent: a tiled model is not supported")
    rows = []
    for steps in (0, args.steps):
        z = _pipeline_map(network, sets, args, rebuild=refined(network, steps, args.lr))
        rows.append(evaluate(f"{steps} steps, lr {args.lr}", sets, z))
    return rows


def ensemble(network, sets, args) -> list[dict]:
    versions = args.checkpoint.split("+")
    z = {versions[0]: _pipeline_map(network, sets, args)}
    for version in versions[1:]:
        z[version] = _pipeline_map(args.load_network(version), sets, args)
    rows = [evaluate(version, sets, z[version]) for version in versions]
    for n in range(2, len(versions) + 1):
        for combo in itertools.combinations(versions, n):
            mean = {k: torch.stack([z[v][k] for v in combo]).mean(0) for k in SETS}
            rows.append(evaluate("mean of " + " + ".join(combo), sets, mean))
    return rows


def peaks(network, sets, args) -> list[dict]:
    z = _pipeline_map(network, sets, args)
    good = z["test"][torch.from_numpy(~sets["labels"])].flatten(1).amax(1)
    print(
        "good test images' maxima, highest first:",
        " ".join(f"{v:.1f}" for v in good.sort(descending=True).values),
    )
    masks = torch.from_numpy(np.asarray(sets["held_masks"]) > 0)
    for kind in ("spot", "smudge"):
        rows = np.flatnonzero(sets["held_kinds"] == kind)
        inside = torch.stack(
            [z["held"][i][masks[i]].max() if masks[i].any() else torch.tensor(float("nan")) for i in rows]
        )
        above = int((inside > good.max()).sum())
        print(
            f"{kind}: {above} of {len(rows)} pasted copies peak inside their mask above every good image; "
            f"in-mask maxima, sorted: {' '.join(f'{v:.1f}' for v in inside.sort().values)}"
        )
    return [evaluate("pipeline map", sets, z)]


def moved_maps(
    network, train: np.ndarray, channels: dict, batch: int, d: int, tolerance: int = 0
) -> dict[tuple, Maps]:
    """Per move ``(dy, dx)`` (``d`` px down, up, right, left; :func:`move`), each channel's
    maps of the training images moved so."""
    out = {}
    for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
        parts = list(channel_maps(network, move(train, dy, dx), channels, batch, tolerance=tolerance))
        out[(dy, dx)] = {n: torch.cat([p[n] for p in parts]) for n in channels}
    return out


def shifted(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    plain = maps_of(network, sets, spec, args.batch)
    rows = [evaluate("training images (pipeline)", sets, pmax(*(zscored(plain[n]) for n in spec)))]
    train = np.asarray(sets["images"]["train"])
    for d in (int(v) for v in str(args.shift).split("+")):
        kept: dict[str, list] = {n: [] for n in spec}
        back: dict[str, list] = {n: [] for n in spec}
        for (dy, dx), maps in moved_maps(network, train, spec, args.batch, d).items():
            for n in spec:
                kept[n].append(maps[n])
                back[n].append(torch.from_numpy(move(maps[n][:, None].numpy(), -dy, -dx)[:, 0].copy()))
        for how, pool in (("kept", kept), ("moved back", back)):
            for with_train in (True, False):
                z = []
                for n in spec:
                    normal = torch.cat(([plain[n]["train"]] if with_train else []) + pool[n])
                    z.append(zscored(plain[n], normal))
                name = f"shift {d} px, {how}" + (", with the unmoved" if with_train else "")
                rows.append(evaluate(name, sets, pmax(*z)))
        level = torch.cat(back["ssim s4"]).mean() / plain["ssim s4"]["train"].mean()
        print(f"shift {d} px: mean 1 - SSIM map x{float(level):.2f} of the unmoved training images'")
    val_level = plain["ssim s4"]["val"].mean() / plain["ssim s4"]["train"].mean()
    print(f"validation images: mean 1 - SSIM map x{float(val_level):.2f} of the training images'")
    return rows


def tolerant(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    train = np.asarray(sets["images"]["train"])
    rows = []
    for r in (int(v) for v in str(args.tolerance).split("+")):
        maps = maps_of(network, sets, spec, args.batch, tolerance=r)
        alone = pmax(*(zscored(maps[n]) for n in spec))
        rows.append(evaluate(f"tolerance {r} px, training images", sets, alone))
        moved = moved_maps(network, train, spec, args.batch, 1, tolerance=r)
        z = [zscored(maps[n], torch.cat([maps[n]["train"], *(m[n] for m in moved.values())])) for n in spec]
        rows.append(evaluate(f"tolerance {r} px, + moved 1 px", sets, pmax(*z)))
        print(pd.DataFrame(rows[-2:]).round(4).to_string(index=False), flush=True)
    return rows


def localise(network, sets, args) -> list[dict]:
    params, paper = sets["calibration"], sets["paper"]
    grid, batch = params["grid"], args.batch
    images = sets["images"]
    val, cal = images["val"], images["cal"]
    rebuild = lambda x: reconstruct(network, x, batch, "cpu")  # noqa: E731
    normal = (val, rebuild(val))
    scale = grid_calibration.normal_l2_scale(normal, paper, batch)
    references = grid_calibration.fit_grid_references(grid, paper, scale, (images["train"], rebuild), batch)
    table, _ = grid_calibration.score_grid(
        grid, paper, references, normal, (cal, rebuild(cal), sets["cal_masks"], sets["cal_kinds"]), batch
    )
    known = sets["known"]
    test = np.asarray(images["test"])[known]
    masks = np.asarray(sets["test_masks"])[known]
    real = {}
    for group, maps in grid_calibration.grid_maps(
        grid, paper, references, (as_unit_float(test), rebuild(test)), batch
    ):
        m = maps.numpy()
        real[group[0].map_key] = {
            "real_pixel_auroc": rank_auroc(masks.ravel() > 0, m.ravel()),
            "real_aupro": aupro(masks, m),
        }
    points = grid_calibration.build_grid(grid, paper, scale)
    table["map_key"] = [p.map_key for p in points]
    per_map = table.drop_duplicates("map_key").reset_index(drop=True)
    per_map = per_map.join(pd.DataFrame([real[k] for k in per_map["map_key"]]))
    chosen = table.loc[grid_calibration.select(table, params["tie_tolerance"]), "map_key"]
    detection = int(per_map.index[per_map["map_key"] == chosen][0])
    # the calibration's own choice of the heat map (synthetic pixel AUROC, ties nearest the detection map)
    localisation = grid_calibration.select_localisation(per_map, params["tie_tolerance"], detection)
    rows = []
    for name, index in (
        ("the rule's map (detection and localisation)", detection),
        ("localisation map by synthetic pixel AUROC", localisation),
        ("best real AUPRO in the grid (not label-free)", int(per_map["real_aupro"].idxmax())),
        ("best real pixel AUROC in the grid (not label-free)", int(per_map["real_pixel_auroc"].idxmax())),
    ):
        row = per_map.loc[index]
        rows.append(
            {
                "variant": name,
                "map": row["setting"].rsplit(" ", 1)[0],
                "syn_pixel_auroc": row["syn_pixel_auroc"],
                "real_pixel_auroc": row["real_pixel_auroc"],
                "real_aupro": row["real_aupro"],
            }
        )
    spearman = lambda a, b: per_map[a].rank().corr(per_map[b].rank())  # noqa: E731
    to_pixel = spearman("syn_pixel_auroc", "real_pixel_auroc")
    to_aupro = spearman("syn_pixel_auroc", "real_aupro")
    print(
        f"{len(per_map)} distinct maps; Spearman over them: synthetic pixel AUROC vs real pixel AUROC "
        f"{to_pixel:.3f}, vs real AUPRO {to_aupro:.3f}; "
        f"maps with real AUPRO >= 0.92: {int((per_map['real_aupro'] >= 0.92).sum())}"
    )
    # each synthetic kind's pixel AUROC alone (and the kinds' mean), against the real figures
    kinds = [c for c in per_map.columns if c.startswith("syn_pixel_auroc_")]
    per_map["syn_pixel_auroc_kind_mean"] = per_map[kinds].mean(axis=1)
    for column in [*kinds, "syn_pixel_auroc_kind_mean"]:
        best = per_map.loc[per_map[column].idxmax()]
        print(
            f"  {column}: Spearman vs real pixel AUROC {spearman(column, 'real_pixel_auroc'):.3f}, "
            f"vs real AUPRO {spearman(column, 'real_aupro'):.3f}; its best map "
            f"{best['setting'].rsplit(' ', 1)[0]!r}: "
            f"real {best['real_pixel_auroc']:.4f} / {best['real_aupro']:.4f}"
        )
    return rows


def _quantile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    """Per pixel, the ``q`` quantile of normal maps sorted along their first dimension
    (torch.quantile refuses inputs this large)."""
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def tail(network, sets, args) -> list[dict]:
    """Per-pixel normalisation by the normal maps' upper tail instead of their spread: a
    glint pixel (heavy tail) is damped more than its standard deviation says, a calm pixel
    less, so that the image's maximum compares like with like."""
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    plain = maps_of(network, sets, spec, args.batch)
    moved = moved_maps(network, np.asarray(sets["images"]["train"]), spec, args.batch, 1).values()
    rows = []
    for pool_name, with_moved in (("training", False), ("training + moved 1", True)):
        pools = {
            n: torch.cat([plain[n]["train"]] + ([m[n] for m in moved] if with_moved else [])) for n in spec
        }
        z = [zscored(plain[n], pools[n]) for n in spec]
        rows.append(evaluate(f"{pool_name}: z-score (pipeline)", sets, pmax(*z)))
        images = len(plain[next(iter(spec))]["train"])
        z = [_robust_z(pools[n], images, plain[n]) for n in spec]
        rows.append(evaluate(f"{pool_name}: z-score, each pixel's highest image left out", sets, pmax(*z)))
        ordered = {n: pools[n].sort(0).values for n in spec}  # once per pool, not per variant
        del pools, z
        for q in (0.95, 0.99, 1.0):
            for blur in (0, 4):
                normed = []
                for n in spec:
                    median, upper = _quantile(ordered[n], 0.5), _quantile(ordered[n], q)
                    width = upper - median
                    if blur:
                        width = gaussian_blur(width[None, None], blur)[0, 0]
                    width = width.clamp(min=float(width.mean()))
                    normed.append({k: (m - median) / width for k, m in plain[n].items()})
                rows.append(
                    evaluate(
                        f"{pool_name}: (m - median) / (q{q:g} - median), blur {blur}", sets, pmax(*normed)
                    )
                )
        # centred on the mean, as the pipeline's `tail` reference; the k-th largest normal map
        # value in place of the maximum (k 2: one unclean training image cannot set the width)
        for k in (1, 2):
            normed = []
            for n in spec:
                normed.append(_by_upper(ordered[n].mean(0), ordered[n][-k], plain[n]))
            rows.append(evaluate(f"{pool_name}: (m - mean) / ({k}. largest - mean)", sets, pmax(*normed)))
    return rows


def _by_upper(mean: torch.Tensor, upper: torch.Tensor, maps: Maps) -> Maps:
    """``(m - mean) / width``, the width ``upper - mean`` floored by its mean (the pipeline's
    ``tail`` formula, here for any ``upper``)."""
    width = (upper - mean).clamp(min=0)
    width = width.clamp(min=float(width.mean()))
    return {k: (m - mean) / width for k, m in maps.items()}


def _robust_z(pool: torch.Tensor, images: int, maps: Maps) -> Maps:
    """The pipeline's ``zscore`` formula with each pixel's highest IMAGE left out: per pixel,
    the mean and spread of the normal ``pool`` (``images`` images, then their moved copies in
    the same order, as :func:`moved_maps`) over every image but the one whose map (or moved
    copy) is largest there - one unclean training image cannot widen the spread at its
    defect's place."""
    sources = torch.arange(images).repeat(len(pool) // images)
    top = sources[pool.argmax(0)]  # (H, W): the image of each pixel's largest value
    total = torch.zeros(pool.shape[1:], dtype=torch.float64)
    squares, count = torch.zeros_like(total), torch.zeros_like(total)
    for start in range(0, len(pool), 64):  # a few maps at a time: the pool can be GBs
        part = pool[start : start + 64].double()
        keep = (sources[start : start + 64, None, None] != top).double()
        total += (part * keep).sum(0)
        squares += (part.square() * keep).sum(0)
        count += keep.sum(0)
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt()
    scale = (std + std.mean()).float()
    return {k: (m - mean.float()) / scale for k, m in maps.items()}


def _tail_by(pool: torch.Tensor, maps: Maps, how: str, images: int | None = None) -> Maps:
    """``maps`` normalised by the normal ``pool``: the pipeline's ``zscore``, the z-score with
    each pixel's highest image left out (``robust``, :func:`_robust_z`; ``images``: how many
    images the pool holds, before their moved copies), or the tail with ``upper`` the
    per-pixel ``maximum`` (as first built) or the ``second`` largest map."""
    if how == "zscore":
        reference = NormalReference.fit(pool)
        return {k: reference.apply(m, how) for k, m in maps.items()}
    if how == "robust":
        return _robust_z(pool, images or len(pool), maps)
    upper = pool.amax(0) if how == "maximum" else pool.topk(2, dim=0).values[1]
    return _by_upper(pool.mean(0), upper, maps)


def _apart(a: tuple, b: tuple) -> bool:
    """Two (top, bottom, left, right) boxes do not overlap."""
    return a[1] < b[0] or b[1] < a[0] or a[3] < b[2] or b[3] < a[2]


def unclean(network, sets, args) -> list[dict]:
    """An unlabelled defect among the normal training images, at the place of a later one:
    each held-out spot and smudge is copied (its change to the good image it was pasted on)
    into one training image at the same place, the worst case for a per-pixel reference.
    The copies are grouped so that no two in a group come within 3 sigma of the widest blur
    of each other; per group the references are refitted with those training images unclean,
    and the group's held-out defects and the good test images scored with them. So each held-
    out defect sees exactly one unclean training image at its place. Per reference (z-score,
    tail by the maximum as first built, tail by the 2nd largest value), the held-out spot and
    smudge image AUROC against the good test images, with clean and with unclean references;
    from the training images alone and with their copies moved by 1 px (the unclean image's
    moved copies unclean too)."""
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    plain = maps_of(network, sets, spec, args.batch)
    images, labels, kinds = sets["images"], sets["labels"], sets["held_kinds"]
    train = as_unit_float(np.asarray(images["train"]))
    good = as_unit_float(np.asarray(images["test"])[~labels])
    held = np.asarray(images["held"])
    per = len(held) // len(good)
    masks = np.asarray(sets["held_masks"]) > 0
    reach = 3 * max(sigma for _, sigma in spec.values())
    groups: list[tuple[list[int], list[tuple[int, int, int, int]]]] = []
    for j in np.flatnonzero(np.isin(kinds, ("spot", "smudge"))):
        ys, xs = np.nonzero(masks[j])
        box = (ys.min() - reach, ys.max() + reach, xs.min() - reach, xs.max() + reach)
        for members, boxes in groups:
            if len(members) < len(train) and all(_apart(box, b) for b in boxes):
                members.append(int(j))
                boxes.append(box)
                break
        else:
            groups.append(([int(j)], [box]))
    copies = sum(len(g[0]) for g in groups)
    print(f"{copies} held-out spots and smudges in {len(groups)} groups of copies apart")
    good_maps = {n: plain[n]["test"][torch.from_numpy(~labels)] for n in spec}
    modes = {
        "zscore": "z-score",
        "robust": "z-score, each pixel's highest image left out",
        "maximum": "tail: maximum (as first built)",
        "second": "tail: 2nd largest",
    }
    pools_of = ("training", "training + moved 1")
    # pool -> state -> mode -> held-out index -> (its score, the good images' scores, same reference)
    scored: dict = {p: {s: {m: {} for m in modes} for s in ("clean", "unclean")} for p in pools_of}

    def normal_maps(x: np.ndarray, with_moved: bool) -> dict[str, torch.Tensor]:
        """The maps of ``x`` and, ``with_moved``, of its four copies moved by 1 px, in that order."""
        parts = [{n: torch.cat([p[n] for p in channel_maps(network, x, spec, args.batch)]) for n in spec}]
        if with_moved:
            parts += list(moved_maps(network, x, spec, args.batch, 1).values())
        return {n: torch.cat([p[n] for p in parts]) for n in spec}

    def score(pools: dict, members: list[int], into: dict) -> None:
        for how in modes:
            normed = pmax(
                *(
                    _tail_by(
                        pools[n], {"held": plain[n]["held"][members], "good": good_maps[n]}, how, len(train)
                    )
                    for n in spec
                )
            )
            held_scores = normed["held"].flatten(1).amax(1).numpy()
            good_scores = normed["good"].flatten(1).amax(1).numpy()
            for j, v in zip(members, held_scores, strict=True):
                into[how][j] = (v, good_scores)

    for pool_name in pools_of:
        with_moved = pool_name != "training"
        clean = normal_maps(train, with_moved)
        for members, _ in groups:
            score(clean, members, scored[pool_name]["clean"])
            dirty = train[: len(members)].copy()
            for k, j in enumerate(members):
                dirty[k] += held[j] - good[j // per]
            np.clip(dirty, 0.0, 1.0, out=dirty)
            replaced = normal_maps(dirty, with_moved)
            rows_of = np.concatenate(
                [np.arange(len(members)) + c * len(train) for c in range(5 if with_moved else 1)]
            )
            pools = {}
            for n in spec:
                pools[n] = clean[n].clone()
                pools[n][rows_of] = replaced[n]
            score(pools, members, scored[pool_name]["unclean"])
        del clean
    rows = []
    for pool_name, state, (how, label) in itertools.product(pools_of, ("clean", "unclean"), modes.items()):
        row = {"variant": f"{pool_name}, {state}: {label}"}
        for kind in ("spot", "smudge"):
            pairs = [scored[pool_name][state][how][j] for j in np.flatnonzero(kinds == kind)]
            row[f"held_{kind}"] = float(np.mean([(g < v).mean() + 0.5 * (g == v).mean() for v, g in pairs]))
        rows.append(row)
    return rows


MAHAL_CHANNELS = {
    "ssim s0": ("ssim", 0),
    "ssim s1": ("ssim", 1),
    "ssim s2": ("ssim", 2),
    "ssim s4": ("ssim", 4),
    "ssim s8": ("ssim", 8),
    "lowpass s4": ("lowpass", 4),
    "lowpass s8": ("lowpass", 8),
}


def _log_max(maps: Maps) -> dict[str, np.ndarray]:
    """Per set, each image's log maximum of a z-scored map (floored at 0.1: a maximum below
    the mean of the normal maps is rare and carries no sign of a defect)."""
    return {k: np.log(np.maximum(m, 0.1)) for k, m in maxima(maps).items()}


def _mahalanobis(fit: np.ndarray, points: np.ndarray, correlation: np.ndarray | None = None) -> np.ndarray:
    """Distance of ``points`` from the normal feature rows ``fit``: with ``correlation`` None,
    their mean and Ledoit-Wolf covariance; else standardised by their mean and spread and
    whitened by that (fixed) correlation matrix."""
    mean = fit.mean(0)
    if correlation is None:
        precision = LedoitWolf().fit(fit).precision_
        d = points - mean
    else:
        d = (points - mean) / fit.std(0, ddof=1)
        precision = np.linalg.inv(correlation)
    return np.sqrt(np.einsum("ni,ij,nj->n", d, precision, d))


def _mahal_scores(features: dict, names: tuple, per_image: int, correlation: str | None) -> dict:
    """Image scores of every set from the feature columns ``names``, fitted on the normal
    validation images only: a validation image left out of its own fit, each calibration
    defect scored without the validation image it was pasted on, the held-out and test
    images against all of them. ``correlation`` "train": the whitening's correlation from
    the training images (many more, but reconstructed better than unseen ones)."""
    cols = {k: np.stack([features[n][k] for n in names], 1) for k in SETS}
    val, cal = cols["val"], cols["cal"]
    corr = None
    if correlation == "train":
        cov = LedoitWolf().fit(cols["train"]).covariance_
        sd = np.sqrt(np.diag(cov))
        corr = cov / np.outer(sd, sd)
    out = {k: _mahalanobis(val, cols[k], corr) for k in ("held", "test")}
    out["val"], out["cal"] = np.empty(len(val)), np.empty(len(cal))
    for i in range(len(val)):  # one fit without validation image i, for it and its defects
        rest, own = np.delete(val, i, axis=0), slice(i * per_image, (i + 1) * per_image)
        out["val"][i] = _mahalanobis(rest, val[i : i + 1], corr)[0]
        out["cal"][own] = _mahalanobis(rest, cal[own], corr)
    return out


def mahal(network, sets, args) -> list[dict]:
    """Image scores from several z-scored channels' maxima at once: the Mahalanobis distance
    of an image's log maxima from the normal validation images'. Normal images' maxima rise
    together (a glint is high at every scale); a spot raises the fine scales' maximum above
    what the coarse one predicts, a smudge the low-pass channel's."""
    z = {name: zscored(m) for name, m in maps_of(network, sets, MAHAL_CHANNELS, args.batch).items()}
    pipeline = pmax(z["ssim s4"], z["lowpass s8"])
    rows = [evaluate("pipeline pair (ssim s4 + lowpass s8 max)", sets, pipeline)]
    features = {name: _log_max(m) for name, m in z.items()} | {"pair": _log_max(pipeline)}
    per_image = sets["calibration"]["synthetic_defects"]["per_image"]
    combos = {
        "all 7": tuple(MAHAL_CHANNELS),
        "ssim s0/s4 + lowpass s8": ("ssim s0", "ssim s4", "lowpass s8"),
        "ssim s0/s1/s2/s4/s8": ("ssim s0", "ssim s1", "ssim s2", "ssim s4", "ssim s8"),
        "pair + ssim s0": ("pair", "ssim s0"),
        "pair + ssim s0/s1/s2": ("pair", "ssim s0", "ssim s1", "ssim s2"),
        "pair + ssim s1 + lowpass s4": ("pair", "ssim s1", "lowpass s4"),
    }
    for label, names in combos.items():
        for corr in (None, "train"):
            scores = _mahal_scores(features, names, per_image, corr)
            rows.append(evaluate(f"mahal {label}" + (" corr train" if corr else ""), sets, scores=scores))
    return rows


def encoder_features(network, x: torch.Tensor, depth: int) -> torch.Tensor:
    """The network's own encoder activations after its ``depth``-th block (convolution,
    LeakyReLU, BatchNorm; eval mode), for a tiled model put back in place: (N, C, h, w)."""
    grid = network.config.tile_grid
    blocks = network.encoder[: 4 * depth - 1]
    with torch.no_grad():
        out = blocks(to_tiles(x, grid) if grid != (1, 1) else x)
    return untile(out, grid) if grid != (1, 1) else out


def feature_maps(network, images: np.ndarray, batch: int) -> dict[str, torch.Tensor]:
    """Per encoder block 1-3, the cosine distance 1 - cos(f(x), f(reconstruction)) over the
    channels, upsampled (bilinear) to the image, (N, 1, H, W); and the three blocks' mean."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch):
        x = torch.from_numpy(as_unit_float(images[start : start + batch]))
        recon = torch.from_numpy(reconstruct(network, x.numpy(), batch, "cpu"))
        layers = []
        for depth in (1, 2, 3):
            fx, fr = encoder_features(network, x, depth), encoder_features(network, recon, depth)
            distance = 1.0 - F.cosine_similarity(fx, fr, dim=1, eps=1e-6)[:, None]
            layers.append(F.interpolate(distance, size=x.shape[-2:], mode="bilinear", align_corners=False))
            parts.setdefault(f"block {depth}", []).append(layers[-1])
        parts.setdefault("blocks 1-3 mean", []).append(torch.stack(layers).mean(0))
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def smoothed_features(
    network, sets: dict, batch: int, sigmas: tuple[float, ...], names: tuple[str, ...] | None = None
) -> Iterator[tuple[tuple[str, float], Maps]]:
    """((feature channel, sigma), its z-scored maps of every image set), one at a time: the
    features computed once, each sigma a blur of them; ``names``: only those channels."""
    per_set = {k: feature_maps(network, x, batch) for k, x in sets["images"].items()}
    for sigma in sigmas:
        for name in names or tuple(per_set["train"]):
            yield (
                (name, sigma),
                zscored({k: gaussian_blur(maps[name], sigma)[:, 0] for k, maps in per_set.items()}),
            )


def features(network, sets, args) -> list[dict]:
    pair = _pipeline_map(network, sets, args)
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pair)]
    for (name, sigma), z in smoothed_features(network, sets, args.batch, (2, 4)):
        rows.append(evaluate(f"{name} cos, sigma {sigma}", sets, z))
        rows.append(evaluate(f"pmax pipeline + {name} cos, sigma {sigma}", sets, pmax(pair, z)))
        rows.append(evaluate(f"smax pipeline + {name} cos, sigma {sigma}", sets, scores=smax(pair, z)))
    return rows


def local_warps(images: np.ndarray, per_image: int, seed: int, min_contrast: float, max_tries: int):
    """Each normal image moved locally: a Gaussian displacement field (radius 10-32 px at 256,
    amplitude 0.3-0.8 of the radius, one direction) resampled bilinearly - a bent, dented or
    displaced part, a change of shape with no new intensity; mask where the move exceeds 1 px;
    redrawn while the mean |change| inside it is below ``min_contrast``. (N*per_image, C, H, W)."""
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    scale = min(h, w) / 256
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    out = []
    for i in range(n):
        base = torch.from_numpy(np.ascontiguousarray(images[i : i + 1], dtype=np.float32))
        for _ in range(per_image):
            for _ in range(max_tries):
                radius = rng.uniform(10, 32) * scale
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8) * radius
                bump = amplitude * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (radius / 2) ** 2))
                sy, sx = ys - bump * float(np.sin(angle)), xs - bump * float(np.cos(angle))
                grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], -1)[None]
                moved = F.grid_sample(base, grid, mode="bilinear", padding_mode="border", align_corners=True)
                mask = (bump > 1.0).numpy()
                if mask.any() and (moved - base).abs()[0].mean(0).numpy()[mask].mean() >= min_contrast:
                    break
            out.append(moved[0].numpy())
    return np.stack(out)


def warp(network, sets, args) -> list[dict]:
    """A kind the synthesiser lacks, a local warp (:func:`local_warps`), on the validation
    images (as calibration) and on the good test images (held out), about 100 of each: its
    image AUROC with the pipeline's pair and with the encoder-feature channel beside it -
    would such a kind predict the feature channel's gain on a product's real structural defects?"""
    options = sets["options"]
    good = as_unit_float(sets["images"]["test"][~sets["labels"]])
    for name, normal, seed in (("warp_cal", sets["images"]["val"], 11), ("warp_held", good, 12)):
        per_image = -(-100 // len(normal))
        sets["images"][name] = local_warps(
            normal, per_image, seed, options["min_contrast"], options["max_tries"]
        )
    pair = _pipeline_map(network, sets, args)
    scores = {"pair (pipeline)": maxima(pair)}
    for (name, _), feature in smoothed_features(network, sets, args.batch, (4,), ("block 1", "block 3")):
        scores[f"pmax pair + {name} cos, sigma 4"] = maxima(pmax(pair, feature))
        scores[f"smax pair + {name} cos, sigma 4"] = smax(pair, feature)
    good_scores = lambda s: s["test"][~sets["labels"]]  # noqa: E731
    return [
        {
            "variant": name,
            "syn_image_auroc": _auroc(s["val"], s["cal"]),
            "warp_cal_auroc": _auroc(s["val"], s["warp_cal"]),
            "warp_held_auroc": _auroc(good_scores(s), s["warp_held"]),
            "held_image_auroc": _auroc(good_scores(s), s["held"]),
            "real_image_auroc": rank_auroc(sets["labels"], s["test"]),
        }
        for name, s in scores.items()
    ]


def intensity_maps(sets: dict, how: str, sigma: float, batch: int = 64) -> Maps:
    """Per image set, |f(x) - mean of f over the training images|, blurred at ``sigma`` (the
    ``image`` kind: f = the image blurred at ``sigma`` and no blur after), largest over the colour
    channels, (N, H, W): ``image`` f(x) = x; ``contrast`` f(x) = blur(x, 1) - blur(x, 8)."""

    def f(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(as_unit_float(x))
        return gaussian_blur(t, sigma) if how == "image" else gaussian_blur(t, 1) - gaussian_blur(t, 8)

    def batches(x: np.ndarray) -> Iterator[torch.Tensor]:
        for start in range(0, len(x), batch):
            yield f(x[start : start + batch])

    train = sets["images"]["train"]
    mean = sum(part.sum(0) for part in batches(train)) / len(train)
    out = {}
    for name, images in sets["images"].items():
        parts = []
        for part in batches(images):
            deviation = (part - mean).abs()
            if how != "image":
                deviation = gaussian_blur(deviation, sigma)
            parts.append(deviation.amax(1))
        out[name] = torch.cat(parts)
    return out


def intensity(network, sets, args) -> list[dict]:
    pair = _pipeline_map(network, sets, args)
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pair)]
    for how, sigma in itertools.product(("image", "contrast"), (2, 4)):
        z = zscored(intensity_maps(sets, how, sigma))
        name = f"{how} - mean, sigma {sigma}"
        rows.append(evaluate(name, sets, z))
        rows.append(evaluate(f"pmax pipeline + {name}", sets, pmax(pair, z)))
        rows.append(evaluate(f"smax pipeline + {name}", sets, scores=smax(pair, z)))
        rows.append(evaluate(f"umax pipeline + {name}", sets, umax(pair, z)))
    return rows


def spread(network, sets, args) -> list[dict]:
    """No maps: the local spread of the normal training images (the standard deviation in
    SSIM's 11x11 Gaussian window, sigma 1.5, largest over the colour channels), as quantiles
    over their pixels - how much of a product is flatter than SSIM's constant k2 sees?"""
    taps, parts = gaussian_taps(), []
    train = sets["images"]["train"]
    for start in range(0, len(train), args.batch):
        x = torch.from_numpy(as_unit_float(train[start : start + args.batch])).double()
        mean = gaussian_filter(x, taps, same_size=True)
        variance = (gaussian_filter(x * x, taps, same_size=True) - mean * mean).clamp(min=0)
        parts.append(variance.sqrt().amax(1).flatten())
    values = torch.cat(parts).numpy()  # numpy: torch's quantile stops at 2**24 values
    row = {"images": len(train), "pixels": values.size}
    row |= {f"q{int(q * 100)}": float(np.quantile(values, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    row |= {f"below k2 {k}": float((values < k).mean()) for k in (0.03, 0.02, 0.01)}
    return [row]


def region_contrasts(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(area, contrast, ring spread)`` of every connected defect region of at least 4 px
    in ``images`` ``(N, C, H, W)`` (unit or uint8) under ``masks`` ``(N, H, W)``: the contrast
    is |mean inside - mean of the ring 3-6 px outside the region (other defects left out)|
    in luma, the spread the ring's standard deviation."""
    rows = []
    for image, mask in zip(as_unit_float(images), np.asarray(masks) > 0, strict=True):
        plane = image[0] if len(image) == 1 else np.tensordot(LUMA, image, axes=1)
        labelled, count = ndimage.label(mask)
        for k in range(1, count + 1):
            region = labelled == k
            ring = ndimage.binary_dilation(region, iterations=6) & ~mask
            ring &= ~ndimage.binary_dilation(region, iterations=2)
            if region.sum() >= 4 and ring.sum() >= 4:
                inside, outside = plane[region], plane[ring]
                rows.append((region.sum(), abs(inside.mean() - outside.mean()), outside.std()))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def contrasts(network, sets, args) -> list[dict]:
    """No maps: the real test defects' area and contrast with their surroundings against
    each synthetic kind's as calibration makes it - are the synthetic defects as faint as
    the real ones?"""
    real = sets["labels"] & sets["known"]
    groups = {"real test defects": region_contrasts(sets["images"]["test"][real], sets["test_masks"][real])}
    kinds = np.asarray(sets["cal_kinds"])
    for kind in dict.fromkeys(kinds):
        chosen = kinds == kind
        found = region_contrasts(sets["images"]["cal"][chosen], sets["cal_masks"][chosen])
        groups[f"synthetic {kind}"] = found
    rows = []
    for name, values in groups.items():
        area, contrast, ring = values.T
        row = {"group": name, "regions": len(values)}
        row |= {f"area q{q}": np.percentile(area, q) for q in (25, 50, 75)}
        row |= {f"contrast q{q}": np.percentile(contrast, q) for q in (25, 50, 75)}
        row["contrast / ring spread q50"] = float(np.median(contrast / np.maximum(ring, 1e-3)))
        rows.append(row)
    return rows


def constants(network, sets, args) -> list[dict]:
    """SSIM's stabilising constants C1 = (k1)^2, C2 = (k2)^2 (the paper's k1 0.01, k2 0.03):
    a faint change in a flat region has a local spread below k2, so C2 hides it from the
    contrast-structure term; smaller constants let 1 - SSIM see it (and the normal noise
    there, which the z-score then divides by)."""
    ks = ((0.01, 0.03), (0.01, 0.02), (0.01, 0.01), (0.01, 0.005), (0.003, 0.01))
    spec = {f"ssim s4 k{k1}/{k2}": ("ssimk", (4, k1, k2)) for k1, k2 in ks}
    spec["lowpass s8"] = ("lowpass", 8)
    raw = maps_of(network, sets, spec, args.batch)
    z = {name: zscored(raw.pop(name)) for name in list(raw)}  # one channel's raw maps freed at a time
    rows = []
    for name in spec:
        if name != "lowpass s8":
            rows.append(evaluate(name, sets, z[name]))
            rows.append(evaluate(f"pmax {name} + lowpass s8", sets, pmax(z[name], z["lowpass s8"])))
    return rows


def moved_back(network, images: np.ndarray, dy: int, dx: int, batch: int, base: np.ndarray) -> np.ndarray:
    """The reconstruction of ``images`` moved by (dy, dx) (:func:`move`), moved back; the
    strip the two moves lost (reflected, not the image's own) taken from ``base``, the
    unmoved reconstruction."""
    back = move(reconstruct(network, move(images, dy, dx), batch, "cpu"), -dy, -dx)
    height, width = back.shape[-2:]
    rows, cols = np.arange(height), np.arange(width)
    lost = (rows >= height - dy)[:, None] if dy > 0 else (rows < -dy)[:, None]
    lost = lost | ((cols >= width - dx)[None] if dx > 0 else (cols < -dx)[None])
    return np.where(lost, base, back)


def moved_maps_of(network, sets: dict, channels: dict, batch: int, d: int) -> dict[str, dict[str, Maps]]:
    """Per variant (``mean reconstruction``, ``mean of maps``, ``min of maps``), channel and
    set, the maps of the image and its four copies moved ``d`` px (:func:`moved_back`): five
    reconstructions per image, each made once."""
    moves = ((d, 0), (-d, 0), (0, d), (0, -d))
    out: dict[str, dict[str, Maps]] = {v: {n: {} for n in channels} for v in TTA_VARIANTS}
    for set_name, images in sets["images"].items():
        parts: dict[str, list[dict]] = {v: [] for v in TTA_VARIANTS}
        for start in range(0, len(images), batch):
            x = torch.from_numpy(as_unit_float(images[start : start + batch]))
            base = reconstruct(network, x.numpy(), batch, "cpu")
            recons = [base] + [moved_back(network, x.numpy(), dy, dx, batch, base) for dy, dx in moves]
            each = [pair_maps(x, torch.from_numpy(r), channels) for r in recons]
            total = {n: each[0][n].clone() for n in channels}
            low = {n: each[0][n].clone() for n in channels}
            for maps in each[1:]:
                for n in channels:
                    total[n] += maps[n]
                    low[n] = torch.minimum(low[n], maps[n])
            parts["mean reconstruction"].append(pair_maps(x, torch.from_numpy(np.mean(recons, 0)), channels))
            parts["mean of maps"].append({n: total[n] / len(recons) for n in channels})
            parts["min of maps"].append(low)
        for v in TTA_VARIANTS:
            for n in channels:
                out[v][n][set_name] = torch.cat([part[n] for part in parts[v]])
    return out


TTA_VARIANTS = ("mean reconstruction", "mean of maps", "min of maps")


def tta(network, sets, args) -> list[dict]:
    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    rows = [evaluate("unmoved (pipeline)", sets, _pipeline_map(network, sets, args))]
    for d in (int(v) for v in str(args.shift).split("+")):
        for variant, maps in moved_maps_of(network, sets, spec, args.batch, d).items():
            rows.append(evaluate(f"moves {d} px: {variant}", sets, pmax(*(zscored(maps[n]) for n in spec))))
        print(pd.DataFrame(rows).round(4).to_string(index=False), flush=True)
    return rows


def iterate(network, sets, args) -> list[dict]:
    batch = args.batch
    rows = [evaluate("1 pass (pipeline)", sets, _pipeline_map(network, sets, args))]
    for passes in (2, 3):

        def again(images: np.ndarray, passes=passes) -> np.ndarray:
            out = images
            for _ in range(passes):
                out = reconstruct(network, out, batch, "cpu")
            return out

        rows.append(evaluate(f"{passes} passes", sets, _pipeline_map(network, sets, args, rebuild=again)))
    return rows


def misses(network, sets, args) -> list[dict]:
    from anomaly_ae.evaluation.stress import PLACE_BANDS, normal_spread_percentile

    spec = {"ssim s4": ("ssim", 4), "lowpass s8": ("lowpass", 8)}
    raw = maps_of(network, sets, spec, args.batch)
    scores = maxima(pmax(*(zscored(raw[name]) for name in spec)))
    labels, kinds = sets["labels"], sets["held_kinds"]
    good, val = scores["test"][~labels], scores["val"]
    cal_kinds = np.asarray(sets["cal_kinds"])
    masks = sets["held_masks"]
    place = {  # the stress table's place, of the training maps (as one-channel images) and of the good images
        "training maps' spread": normal_spread_percentile(raw["ssim s4"]["train"].numpy()[:, None], masks),
        "good images' spread": normal_spread_percentile(
            as_unit_float(sets["images"]["test"][~labels]), masks
        ),
    }
    rows = []
    for kind in ("thin_line", "spot", "smudge", "cutpaste"):
        chosen = kinds == kind
        row = {
            "kind": kind,
            "held vs good": _auroc(good, scores["held"][chosen]),
            "held vs validation": _auroc(val, scores["held"][chosen]),
            "calibration vs validation": _auroc(val, scores["cal"][cal_kinds == kind]),
        }
        for name, where in place.items():
            for label, low, high in PLACE_BANDS:
                band = chosen & (where >= low) & (where < high)
                figure = _auroc(good, scores["held"][band]) if band.any() else float("nan")
                row[f"{name}: {label}"] = f"{figure:.3f} ({band.sum()})"
        rows.append(row)
    print(
        "maxima, median / 90 % / max: training "
        + " / ".join(f"{q:.2f}" for q in np.quantile(scores["train"], [0.5, 0.9, 1]))
        + ", validation "
        + " / ".join(f"{q:.2f}" for q in np.quantile(val, [0.5, 0.9, 1]))
        + ", good test "
        + " / ".join(f"{q:.2f}" for q in np.quantile(good, [0.5, 0.9, 1]))
    )
    return rows


def memory_features(network, images: np.ndarray, batch: int, how: str, pool: int = 4) -> torch.Tensor:
    """Per image a feature vector at every position of a grid, (N, C, h, w): ``enc`` the
    network's encoder after blocks 2 and 3 (block 3 upsampled; 1/4 of the side), each averaged
    over its 3x3 neighbourhood (PatchCore's local aggregation); ``pix`` the image averaged over
    ``pool`` x ``pool`` px with its 3x3 neighbourhood (no network; 1/``pool`` of the side);
    ``ext`` each block's mean, maximum and minimum, ``std`` its mean and standard deviation, with
    their 3x3 neighbourhood as ``pix``."""
    parts = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(as_unit_float(images[start : start + batch]))
        if how == "pix":
            f = pooled_patches(x, pool)
        elif how in ("ext", "std"):  # the block's mean with its extremes, or with its spread
            mean = pooled_images(x, pool)
            if how == "ext":
                extra = [F.max_pool2d(x, pool), -F.max_pool2d(-x, pool)]
            else:
                extra = [(pooled_images(x.square(), pool) - mean.square()).clamp_min(0).sqrt()]
            f = neighbourhood(torch.cat([mean, *extra], 1))
        else:
            window = dict(kernel_size=3, stride=1, padding=1, count_include_pad=False)
            f2 = F.avg_pool2d(encoder_features(network, x, 2), **window)
            f3 = F.avg_pool2d(encoder_features(network, x, 3), **window)
            f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
            f = torch.cat([f2, f3], 1)
        parts.append(f.float())
    return torch.cat(parts)


def moved_copies(images: np.ndarray, step: int, pool: int) -> Iterator[np.ndarray]:
    """Each of ``images`` (N, C, H, W) moved left by ``dx`` and up by ``dy`` px for every
    ``dx, dy`` in 0, ``step``, ... below ``pool`` but the unmoved (0, 0); the rows and columns
    that move in replicate the far border. Its blocks then start ``dx, dy`` px into the
    original's: a bank grid phase the unmoved blocks do not have."""
    if not 0 < step < pool:
        raise ValueError(
            f"--memory-copies' phase step must lie in 1 to --memory-pool - 1 ({pool - 1}), got {step}"
        )
    height, width = images.shape[-2:]
    for dy in range(0, pool, step):
        for dx in range(0, pool, step):
            if dy or dx:
                rows = np.minimum(np.arange(height) + dy, height - 1)
                cols = np.minimum(np.arange(width) + dx, width - 1)
                yield images[..., rows, :][..., cols]


def flipped_copies(images: np.ndarray) -> Iterator[np.ndarray]:
    """Each of ``images`` (N, C, H, W) mirrored left-right, top-bottom and both (a half turn):
    normal looks the training images do not have at those places, if the product's normal
    appearance is symmetric (the selection score tells whether it is)."""
    for axes in ((-1,), (-2,), (-2, -1)):
        yield np.flip(images, axes).copy()


def bank_copies(images: np.ndarray, how: str, pool: int) -> Iterator[np.ndarray]:
    """The training images' copies a ``--memory-copies`` kind adds to the bank: ``none`` no
    copies, ``phase<s>`` :func:`moved_copies` by ``s`` px, ``flip`` :func:`flipped_copies`."""
    if how == "flip":
        return flipped_copies(images)
    if how.startswith("phase"):
        return moved_copies(images, int(how[5:]), pool)
    return iter(())


def centred(features: torch.Tensor, how: str, channels: int) -> torch.Tensor:
    """``none``: as they are; ``image``: each image's mean per feature taken away (a global
    brightness change leaves them); ``local``: each position's 3x3 neighbourhood mean per
    colour channel taken away (``pix`` only: what is left is the local pattern, not its level)."""
    if how == "none":
        return features
    if how == "image":
        return features - features.mean(dim=(2, 3), keepdim=True)
    n, c, h, w = features.shape
    grouped = features.view(n, 9, channels, h, w)
    return (grouped - grouped.mean(1, keepdim=True)).view(n, c, h, w)


def memory(network, sets, args) -> list[dict]:
    """A per-position memory bank of the training images' features, nearest neighbour."""
    pair = _pipeline_map(network, sets, args)
    rows = [evaluate("pmax ssim s4 + lowpass s8 (pipeline)", sets, pair)]
    radius = max(int(r) for r in args.tolerance.split("+"))
    names = list(sets["images"])
    for how in args.memory_features.split("+"):
        pool = args.memory_pool if how in ("pix", "ext", "std") else 4
        raw = {k: memory_features(network, sets["images"][k], args.batch, how, pool) for k in names}
        copies = {  # the training images' copies' features, per --memory-copies kind
            kind: []
            if how == "enc"
            else [
                memory_features(network, m, args.batch, how, pool)
                for m in bank_copies(sets["images"]["train"], kind, pool)
            ]
            for kind in args.memory_copies.split("+")
        }
        label = f"{how}{pool if how != 'enc' and pool != 4 else ''}"
        kept = {}
        n = len(raw["train"])
        banks = {  # the training images each bank holds: None for all, else a random part (seed 0)
            share: None
            if share == 1
            else np.sort(np.random.default_rng(0).choice(n, max(2, round(share * n)), replace=False))
            for share in args.memory_shares
        }
        for centre in args.memory_centre.split("+"):
            per_set = {k: centred(v, centre, v.shape[1] // 9) for k, v in raw.items()}
            for (share, held), (kind, moved) in itertools.product(banks.items(), copies.items()):
                if kind != "none" and not moved:
                    continue  # enc: no copies
                tag = label if held is None else f"{label} bank{share:g}"
                tag += f" {kind}" if kind != "none" else ""
                plain = held is None and kind == "none"
                keep = kept if plain else None  # the combined rows: the plain bank's
                moved = [centred(m, centre, m.shape[1] // 9) for m in moved]
                rows += _memory_rows(sets, pair, tag, radius, per_set, centre, keep, held, moved)
        if len(kept) > 1:  # every centring's z-scored channel beside the others, in one max
            by_setting: dict[tuple[int, int], dict[str, Maps]] = {}
            for (centre, r, sigma), z in kept.items():
                by_setting.setdefault((r, sigma), {})[centre] = z
            for (r, sigma), maps in sorted(by_setting.items()):
                name = f"pmax pipeline + knn {label} r{r} s{sigma} z " + "+".join(maps)
                rows.append(evaluate(name, sets, pmax(pair, *maps.values())))
    return rows


def _memory_rows(
    sets,
    pair,
    label: str,
    radius: int,
    per_set: dict,
    centre: str,
    kept: dict | None = None,
    held: np.ndarray | None = None,
    moved: list | None = None,
) -> list[dict]:
    """The memory study's rows for one feature kind and centring: every radius up to
    ``radius``, smoothed at sigma 2 and 4; raw, z-scored, and with the pipeline's pair.
    ``kept`` collects the z-scored maps by (centre, radius, sigma) for combined rows. ``held``:
    the training images the bank holds (default all); the others are scored as unseen.
    ``moved``: the training images' copies' features (:func:`bank_copies`), each a bank
    beside the unmoved one (the same images held; an image never matches its own copies)."""
    rows, names = [], list(per_set)
    start = time.perf_counter()
    n_train = len(per_set["train"])
    held = np.arange(n_train) if held is None else held
    banks = [b[torch.from_numpy(held)] for b in [per_set["train"], *(moved or [])]]
    bank = banks[0]
    position = np.full(n_train, -1)
    position[held] = np.arange(len(held))  # each training image's place in the bank, or -1
    queries = torch.cat([per_set[k] for k in names])
    own = np.concatenate([position if k == "train" else np.full(len(per_set[k]), -1) for k in names])
    distances = {  # float64, as the pipeline's maps; 32 queries at a time bound the memory
        r: torch.cat(
            [
                torch.stack(
                    [nearest_distance(queries[i : i + 32].double(), b, r, own[i : i + 32]) for b in banks]
                )
                .amin(0)
                .float()
                for i in range(0, len(queries), 32)
            ]
        )
        for r in range(radius + 1)
    }
    took = time.perf_counter() - start
    shape = (len(banks) * len(bank), *bank.shape[1:])
    print(f"{label} {centre}: {shape} bank, {len(queries)} queries, {took:.0f} s", flush=True)
    bounds = np.cumsum([0] + [len(per_set[k]) for k in names])
    size = sets["images"]["train"].shape[-2:]
    for r, dist in distances.items():
        full = F.interpolate(dist[:, None], size=tuple(size), mode="bilinear", align_corners=False)
        for sigma in (2, 4):
            smooth = gaussian_blur(full, sigma)[:, 0]
            maps = {k: smooth[bounds[i] : bounds[i + 1]] for i, k in enumerate(names)}
            name = f"knn {label} r{r} s{sigma}"
            name += "" if centre == "none" else f" c-{centre}"
            rows.append(evaluate(name, sets, maps))
            z = zscored(maps)
            if kept is not None:
                kept[(centre, r, sigma)] = z
            rows.append(evaluate(f"{name} z", sets, z))
            rows.append(evaluate(f"pmax pipeline + {name} z", sets, pmax(pair, z)))
            rows.append(evaluate(f"smax pipeline + {name} z", sets, scores=smax(pair, z)))
    return rows


STUDIES: dict[str, Callable] = {
    f.__name__: f
    for f in (
        smoothing,
        lowpass,
        reference,
        peak,
        flips,
        denoise,
        segment,
        selfnorm,
        inflate,
        gms,
        polarity,
        subspace,
        blob,
        blob_score,
        constants,
        spread,
        contrasts,
        features,
        warp,
        intensity,
        latent,
        ensemble,
        peaks,
        fcn,
        shifted,
        localise,
        tail,
        unclean,
        tolerant,
        mahal,
        tta,
        iterate,
        misses,
        memory,
    )
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("category")
    parser.add_argument("--params", default="", help="as for kedro run, e.g. data.root=../shared/mvtec_ad")
    parser.add_argument(
        "--checkpoint", default=None, help="model_checkpoint version (default: latest); ensemble: a+b+..."
    )
    parser.add_argument("--env", default=None, help="as for kedro run, e.g. faint (default: conf/base)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30, help="denoise / fcn: fine-tuning epochs (per arm)")
    parser.add_argument("--cb", type=int, default=16, help="fcn: channels of the spatial bottleneck")
    parser.add_argument(
        "--train-kinds", default="perlin+cutpaste", help="fcn / segment: the synthetic kinds it learns"
    )
    parser.add_argument("--copies", type=int, default=2, help="segment: synthetic copies per training image")
    parser.add_argument(
        "--width", type=int, default=16, help="segment: the head's channels at full resolution"
    )
    parser.add_argument("--shift", default="2+4", help="shifted / tta: the moves in px, a+b+...")
    parser.add_argument(
        "--tolerance",
        default="0+1+2",
        help="tolerant: the radii in px, a+b+...; memory: every r up to the largest, in grid positions",
    )
    parser.add_argument("--steps", type=int, default=60, help="latent: refinement steps")
    parser.add_argument("--lr", type=float, default=1.0, help="latent: Adam step size on the code")
    parser.add_argument(
        "--memory-features", default="enc+pix", help="memory: the feature kinds, a+b (enc, pix, ext, std)"
    )
    parser.add_argument(
        "--memory-pool", type=int, default=4, help="memory: pix's, ext's and std's pooling in px"
    )
    parser.add_argument(
        "--memory-bank",
        default="1",
        help="memory: the share of the training images the bank holds, a+b (1, 0.5, ...); "
        "a random part (seed 0), the rest scored as unseen",
    )
    parser.add_argument(
        "--memory-copies",
        default="none",
        help="memory: the training images' copies the bank also holds, a+b: none; phase<s>, moved by "
        "multiples of s px within a block; flip, mirrored (pix, ext, std)",
    )
    parser.add_argument(
        "--memory-centre", default="none", help="memory: the features' centring, a+b (none, image, local)"
    )
    args = parser.parse_args()
    try:
        args.memory_shares = [float(f) for f in args.memory_bank.split("+")]
    except ValueError:
        parser.error(f"--memory-bank takes shares a+b such as 1+0.5, got {args.memory_bank!r}")
    if not all(0 < share <= 1 for share in args.memory_shares):
        parser.error(f"--memory-bank's shares must lie in (0, 1], got {args.memory_bank!r}")
    for kind in args.memory_copies.split("+"):
        step = kind[5:] if kind.startswith("phase") else ""
        if kind not in ("none", "flip") and not (step.isdigit() and 0 < int(step) < args.memory_pool):
            parser.error(
                f"--memory-copies takes none, flip or phase<s> with s from 1 to --memory-pool - 1 "
                f"({args.memory_pool - 1}), a+b; got {kind!r}"
            )
    first = args.checkpoint.split("+")[0] if args.checkpoint else None
    data = load(args.category, args.params, first, env=args.env)
    args.load_network = lambda version: load(args.category, args.params, version, False, args.env)["network"]
    rows = STUDIES[args.study](data["network"], study_sets(data), args)
    pd.set_option("display.width", 250)
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
