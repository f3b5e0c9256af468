"""Which normal images does the memory channel lift above the decision threshold, and where?

The memory channel (``MapSettings.memory_pool``) compares each place of an image with the
nearest training image's same place. A good image with a look at some place that no training
image has (a speck, a reflection that falls differently) is far there. This prints, for the
held-out validation images and the good test images of a category, with the calibrated map
(``calibrated_map.json``, its detection map) and the fitted ``normal_reference.npz``:

* the image score with the map as chosen, with the same map without its memory channel
  (the same reference's other channels), and with the same reference's other scaling
  (``tail`` for ``zscore`` and back), and, for a tail-scaled map, with the memory channel's
  tail floor added to its width instead of taken as a lower bound (``AdditiveTail``), each
  against its own threshold (the validation scores' quantile of ``evaluation.threshold``, as
  the pipeline sets it);
* the memory channel's peak after the reference's correction, its place in the model's
  pixels, the raw distance there and the normal images' mean distance there;
* the memory channel's scale under each scaling (``tail``, ``zscore``) as a multiple of its
  floor: over the frame, and at each peak;
* with ``--selection``, each arm's selection score by the label-free rule (synthetic image
  AUROC + pixel AUROC, halved) on the calibration's own synthetic copies of the validation
  images: the figure by which the rule would choose between the arms.

    python scripts/memory_alarms.py bottle --params data.root=../shared/mvtec_ad
        [--version V] [--held-out] [--selection]

The good test images are read only to report on them; nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from anomaly_ae.data.defects import DEFECT_KINDS, synthesis_options
from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation.calibration import selection_score
from anomaly_ae.evaluation.metrics import calibrate_threshold, rank_auroc, threshold_options
from anomaly_ae.evaluation.stress import copies_per_image, per_kind_rows, stress_table
from anomaly_ae.model.checkpoint import model_from_checkpoint
from anomaly_ae.pipelines.calibrate.nodes import synthesise_defects
from anomaly_ae.scoring.anomaly_map import MapSettings, memory_channel
from anomaly_ae.scoring.inference import reconstruct_and_score, unit_float
from anomaly_ae.scoring.reference import NormalReference, correct
from anomaly_ae.scoring.ssim import map_dtype


def _channels(reference: NormalReference, keep: slice | int) -> NormalReference:
    """The reference's channels ``keep`` (a slice, or one index for a single-channel
    reference), without the memory bank and the localisation map's reference."""
    return dataclasses.replace(
        reference,
        mean=reference.mean[keep],
        std=reference.std[keep],
        upper=None if reference.upper is None else reference.upper[keep],
        memory_bank=None,
        localisation=None,
    )


def without_memory(reference: NormalReference) -> NormalReference:
    """The reference of the same map without its memory channel (its last channel)."""
    return _channels(reference, slice(0, reference.mean.shape[0] - 1))


def memory_peaks(images: np.ndarray, settings: MapSettings, reference: NormalReference, batch: int) -> list:
    """Per image ``(corrected peak, (row, col), raw distance there, normal mean there)``."""
    bank = reference.memory_tensor(settings.memory_pool).to(map_dtype(torch.device("cpu")))
    mean, scale = _channels(reference, -1).as_tensors(settings.normal_reference)
    peaks = []
    for start in range(0, len(images), batch):
        x = unit_float(torch.as_tensor(images[start : start + batch]))
        raw = memory_channel(x, settings, bank)[:, 0].float()
        corrected = correct(raw, mean, scale)
        for r, c in zip(raw.numpy(), corrected.numpy(), strict=True):
            place = np.unravel_index(int(c.argmax()), c.shape)
            peaks.append((float(c.max()), place, float(r[place]), float(mean[place])))
    return peaks


@dataclasses.dataclass(frozen=True)
class AdditiveTail(NormalReference):
    """The same reference, but the memory channel (the last) tail-scaled with an additive
    floor, its width plus the mean width (as the z-score adds its floor), instead of the
    larger of the two: a check of why the tail flags more good images, not a lever."""

    def as_tensors(self, mode: str, device: torch.device | str = "cpu"):
        mean, scale = super().as_tensors(mode, device)
        if mode == "tail":
            width = (torch.as_tensor(self.upper[-1], dtype=torch.float32).to(device) - mean[-1]).clamp_min(0)
            scale = scale.clone()
            scale[-1] = width + width.mean()
        return mean, scale


def memory_scales(reference: NormalReference) -> dict[str, tuple[np.ndarray, float]]:
    """The memory channel's scale per pixel and its floor under each scaling the reference
    can give: ``tail``, the larger of the width (how far a second normal image reached above
    the mean) and the mean width; ``zscore``, the spread plus the mean spread (as
    :meth:`~anomaly_ae.scoring.reference.NormalReference.as_tensors`)."""
    memory = _channels(reference, -1)
    out = {}
    for mode in ("tail", "zscore") if memory.upper is not None else ("zscore",):
        _, scale = memory.as_tensors(mode)
        if mode == "tail":
            floor = float(np.clip(memory.upper - memory.mean, 0, None).mean())
        else:
            floor = float(memory.std.mean())
        out[mode] = (scale.numpy(), floor)
    return out


def held_out(
    network,
    test: dict,
    arms: dict,
    evaluation: dict,
    synthetic: dict,
    batch: int,
    good_scores: dict | None = None,
) -> None:
    """Per arm: the real test image AUROC, and the image AUROC per held-out synthetic kind on
    the good test images (:func:`~anomaly_ae.evaluation.stress.stress_table` with the
    evaluation's own options: the same copies as its stress test). ``good_scores[arm]``: the
    good test images' scores already taken (then only the defective images are scored)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(test["labels"])
    normal = as_unit_float(test["images"][labels == 0])
    options = evaluation["stress_test"]
    defects = {
        "per_image": copies_per_image(options, len(normal), DEFECT_KINDS, normal.shape[1]),
        "seed": options["seed"],
        "kinds": DEFECT_KINDS,
        **synthesis_options(synthetic),
    }
    table = per_kind_rows(stress_table(network, normal, arms, defects, batch))
    kinds = table.pivot(index="map", columns="kind", values="image_auroc")
    print("\nimage AUROC: real test set; held-out synthetic kinds on the good test images")
    for arm, (s, ref) in arms.items():
        chosen = labels > 0 if good_scores else np.ones(len(labels), bool)
        score = reconstruct_and_score(
            network, test["images"][chosen], s, batch, keep_maps=False, keep_recon=False, reference=ref
        )["score"]
        if good_scores:  # the good images' scores as main took them, then the defective ones
            real = roc_auc_score(
                np.r_[np.zeros(len(good_scores[arm])), np.ones(len(score))], np.r_[good_scores[arm], score]
            )
        else:
            real = roc_auc_score(labels > 0, score)
        held = ", ".join(f"{k} {kinds.loc[arm, k]:.3f}" for k in kinds.columns)
        print(f"  {arm}: real {real:.4f}; {held}")


def selection(network, validation: dict, calibration: dict, arms: dict, batch: int) -> dict[str, dict]:
    """Per arm: the rule's selection score and its two halves on the calibration's synthetic
    copies of the normal validation images (the calibrate pipeline's own
    ``synthesise_defects``: the same copies, the same seed), as ``score_grid`` scores a
    setting: image AUROC of the copies against the normal images, pixel AUROC of every
    defect pixel against every other pixel of both sets."""
    synthetic = synthesise_defects(validation, calibration)
    normal, copies = synthetic["normal"], synthetic["images"]
    images = np.concatenate([normal, copies])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(copies))]
    masks = np.concatenate(
        [np.zeros((len(normal), *normal.shape[-2:]), bool), np.asarray(synthetic["masks"]) != 0]
    )
    out = {}
    for arm, (s, ref) in arms.items():
        scored = reconstruct_and_score(
            network, images, s, batch, keep_maps=True, keep_recon=False, reference=ref
        )
        maps = scored.get("detection_map", scored["map"])
        image, pixel = rank_auroc(labels, scored["score"]), rank_auroc(masks.ravel(), maps.ravel())
        out[arm] = {
            "selection_score": selection_score(image, pixel),
            "image_auroc": image,
            "pixel_auroc": pixel,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category")
    parser.add_argument("--params", default="", help="as for kedro run, e.g. data.root=../shared/mvtec_ad")
    parser.add_argument("--env", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--version",
        default=None,
        help="the evaluation run's version of calibrated_map.json and normal_reference.npz (default: latest)",
    )
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="also each arm's real test image AUROC and its image AUROC per held-out synthetic kind "
        "(the evaluation's stress test: the same copies on the good test images)",
    )
    parser.add_argument(
        "--selection",
        action="store_true",
        help="also each arm's selection score by the label-free rule on the calibration's synthetic copies",
    )
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    bootstrap_project(root)
    runtime = dict(item.split("=", 1) for item in args.params.split(",") if item)
    with KedroSession.create(root, env=args.env, runtime_params=runtime) as session:
        catalog = session.load_context().catalog
        network = model_from_checkpoint(catalog.load(f"{args.category}.model_checkpoint"))
        reference = NormalReference.from_arrays(
            catalog.load(f"{args.category}.normal_reference", args.version)
        )
        chosen = catalog.load(f"{args.category}.calibrated_map", args.version)
        validation = catalog.load(f"{args.category}.validation_images")["images"]
        test = catalog.load(f"{args.category}.test_images")
        evaluation = catalog.load("params:evaluation")
        calibration = catalog.load("params:calibration")
        synthetic = calibration["synthetic_defects"]
        rule = evaluation["threshold"]
    settings = dataclasses.replace(MapSettings.from_dict(chosen["map_settings"]), localisation=None)
    if not settings.memory_pool:
        raise SystemExit(f"the calibrated map of {args.category} has no memory channel: {chosen['setting']}")
    good = test["images"][np.asarray(test["labels"]) == 0]
    print(f"{args.category}: detection map {chosen.get('detection_setting', chosen['setting'])}")
    arms = {
        "as chosen": (settings, reference),
        "without memory": (dataclasses.replace(settings, memory_pool=0), without_memory(reference)),
    }
    other = {"tail": "zscore", "zscore": "tail"}[settings.normal_reference]
    if other == "zscore" or reference.upper is not None:  # the same reference, the other scaling
        arms[f"as chosen, {other}"] = (dataclasses.replace(settings, normal_reference=other), reference)
    if settings.normal_reference == "tail":  # the tail with the z-score's kind of floor
        additive = AdditiveTail(**{f.name: getattr(reference, f.name) for f in dataclasses.fields(reference)})
        arms["as chosen, the memory channel's tail floor added"] = (settings, additive)
    scores = {}
    for arm, (s, ref) in arms.items():
        score = {
            k: reconstruct_and_score(
                network, v, s, args.batch, keep_maps=False, keep_recon=False, reference=ref
            )["score"]
            for k, v in (("validation", validation), ("good test", good))
        }
        threshold = calibrate_threshold(score["validation"], **threshold_options(rule))
        flagged = int((score["good test"] > threshold).sum())
        print(f"{arm}: threshold {threshold:.3f}; good test images above it: {flagged} of {len(good)}")
        scores[arm] = score
    if args.selection:
        print("\nselection score (image AUROC, pixel AUROC) on the calibration's synthetic copies:")
        print(
            f"  the calibration's own figure for the chosen map: {chosen['selection_score']:.4f} "
            f"({chosen['syn_image_auroc']:.4f}, {chosen['syn_pixel_auroc']:.4f})"
        )
        for arm, got in selection(network, {"images": validation}, calibration, arms, args.batch).items():
            print(
                f"  {arm}: {got['selection_score']:.4f} ({got['image_auroc']:.4f}, {got['pixel_auroc']:.4f})"
            )
    if args.held_out:
        good_scores = {arm: score["good test"] for arm, score in scores.items()}
        held_out(network, test, arms, evaluation, synthetic, args.batch, good_scores)
    scales = memory_scales(reference)
    print("\nthe memory channel's scale, as a multiple of its floor (the share of pixels at the floor):")
    for mode, (scale, floor) in scales.items():
        ratio = scale / floor
        print(
            f"  {mode}: floor {floor:.4f}; median {np.median(ratio):.2f}, "
            f"90 % {np.quantile(ratio, 0.9):.2f}, largest {ratio.max():.2f} "
            f"({(ratio <= 1 + 1e-6).mean():.0%} at the floor)"
        )
    print("\nper image: score as chosen / without memory; the memory channel's corrected peak at (row, col):")
    print("the raw distance there / the normal images' mean distance there; the scale there over its floor")
    print("(" + ", ".join(scales) + ")")
    for what, images in (("validation", validation), ("good test", good)):
        peaks = memory_peaks(images, settings, reference, args.batch)
        for i, (peak, place, raw, normal) in enumerate(peaks):
            chosen_score, plain = scores["as chosen"][what][i], scores["without memory"][what][i]
            where = tuple(int(p) for p in place)
            there = " / ".join(f"{scale[place] / floor:.2f}" for scale, floor in scales.values())
            print(
                f"  {what} {i}: {chosen_score:.2f} / {plain:.2f}; "
                f"{peak:.2f} at {where}: {raw:.4f} / {normal:.4f}; {there}"
            )


if __name__ == "__main__":
    main()
