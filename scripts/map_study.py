"""Development studies of map levers for #14, measured before building them into the grid.

Not part of any pipeline and chooses nothing: it reads a category's cached arrays and a
checkpoint through the Kedro catalog, builds each map channel with the project's scoring
core, z-scores it against the normal training images, and prints per combination the
label-free selection score (calibration's synthetic defects on the validation images), the
held-out synthetic image AUROC per kind (the stress test's defects on the good test images)
and the real test image / pixel AUROC.

    python scripts/map_study.py smoothing bottle --params data.root=../shared/mvtec_ad --checkpoint <version>
    python scripts/map_study.py lowpass bottle --params data.root=../shared/mvtec_ad --checkpoint <version>

Studies:
  smoothing  1 - SSIM(11) smoothed at sigma 0, 1, 2, 4, 8: several scales, combined;
  lowpass    a low-pass difference channel |blur(image - reconstruction, sigma)| (faint,
             wide changes that 1 - SSIM barely sees) beside 1 - SSIM(11) smoothed at 4.
Combinations: ``pmax`` the per-pixel maximum of the z-scored channels; ``smax`` the maximum
of the channels' image scores (max), each standardised by the normal validation images'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from anomaly_ae.data.defects import DEFECT_KINDS, paste_synthetic_defects
from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation.metrics import rank_auroc
from anomaly_ae.model.checkpoint import model_from_checkpoint
from anomaly_ae.scoring.anomaly_map import error_terms
from anomaly_ae.scoring.inference import reconstruct
from anomaly_ae.scoring.reference import ReferenceAccumulator
from anomaly_ae.scoring.ssim import gaussian_blur

STUDIES = {
    "smoothing": {
        "channels": {f"ssim s{s}": ("ssim", s) for s in (0, 1, 2, 4, 8)},
        "pmax": [
            ("ssim s0", "ssim s4"),
            ("ssim s1", "ssim s4"),
            ("ssim s2", "ssim s8"),
            ("ssim s2", "ssim s4", "ssim s8"),
            ("ssim s0", "ssim s2", "ssim s4", "ssim s8"),
        ],
        "smax": [
            ("ssim s0", "ssim s4"),
            ("ssim s1", "ssim s4"),
            ("ssim s2", "ssim s4", "ssim s8"),
            ("ssim s0", "ssim s2", "ssim s4", "ssim s8"),
        ],
    },
    "lowpass": {
        "channels": {"ssim s4": ("ssim", 4), "lowpass s4": ("lowpass", 4), "lowpass s8": ("lowpass", 8)},
        "pmax": [("ssim s4", "lowpass s4"), ("ssim s4", "lowpass s8")],
        "smax": [("ssim s4", "lowpass s4"), ("ssim s4", "lowpass s8")],
    },
}
KINDS = ("thin_line", "spot", "smudge", "blob", "perlin", "cutpaste")


def channel_maps(network, images: np.ndarray, channels: dict, batch: int):
    """Per batch, each channel's (N, H, W) map: 1 - SSIM(11) (the scoring core) smoothed by
    sigma, or the low-pass difference |blur(x - reconstruction, sigma)|."""
    for start in range(0, len(images), batch):
        x = torch.from_numpy(as_unit_float(images[start : start + batch]))
        recon = torch.from_numpy(reconstruct(network, images[start : start + batch], batch, "cpu"))
        error = error_terms(x, recon)["ssim_err"][11]
        yield {
            name: (gaussian_blur(error, s) if kind == "ssim" else gaussian_blur(x - recon, s).abs())[:, 0]
            for name, (kind, s) in channels.items()
        }


def load(category: str, params: str, checkpoint: str | None) -> dict:
    root = Path(__file__).resolve().parents[1]
    bootstrap_project(root)
    runtime = dict(item.split("=", 1) for item in params.split(",") if item)
    with KedroSession.create(root, runtime_params=runtime) as session:
        catalog = session.load_context().catalog
        data = {s: catalog.load(f"{category}.{s}_images") for s in ("train", "validation", "test")}
        data["network"] = model_from_checkpoint(catalog.load(f"{category}.model_checkpoint", checkpoint))
        data["calibration"] = catalog.load("params:calibration")["synthetic_defects"]
        data["stress"] = catalog.load("params:evaluation")["stress_test"]
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("category")
    parser.add_argument("--params", default="", help="as for kedro run, e.g. data.root=../shared/mvtec_ad")
    parser.add_argument("--checkpoint", default=None, help="model_checkpoint version (default: latest)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    study, data = STUDIES[args.study], load(args.category, args.params, args.checkpoint)
    network, channels = data["network"], study["channels"]

    accumulators = {name: ReferenceAccumulator() for name in channels}
    for maps in channel_maps(network, data["train"]["images"], channels, args.batch):
        for name, m in maps.items():
            accumulators[name].add(m)
    references = {}
    for name, accumulator in accumulators.items():
        ref = accumulator.result()
        std = torch.from_numpy(ref.std)
        references[name] = (torch.from_numpy(ref.mean), std + std.mean())

    def zmaps(images: np.ndarray) -> dict[str, torch.Tensor]:
        parts = list(channel_maps(network, images, channels, args.batch))
        return {n: (torch.cat([p[n] for p in parts]) - references[n][0]) / references[n][1] for n in channels}

    calibration, stress = data["calibration"], data["stress"]
    options = {"min_contrast": calibration["min_contrast"], "max_tries": calibration["max_tries"]}
    options["contrast"] = tuple(calibration["contrast"])
    normal = as_unit_float(data["validation"]["images"])
    cal, cal_masks, _ = paste_synthetic_defects(
        normal, calibration["per_image"], calibration["seed"], kinds=calibration["kinds"], **options
    )
    test = data["test"]
    labels = np.asarray(test["labels"]) != 0
    good = as_unit_float(test["images"][~labels])
    # the stress test's held-out defects: every kind, its seed (evaluate -> stress_test)
    held, _, held_kinds = paste_synthetic_defects(
        good, stress["per_image"], stress["seed"], kinds=DEFECT_KINDS, **options
    )
    sets = {"val": zmaps(normal), "cal": zmaps(cal), "held": zmaps(held), "test": zmaps(test["images"])}

    combos = {name: (name,) for name in channels}
    combos |= {"pmax " + " + ".join(c): c for c in study["pmax"]}
    maps = {
        s: {c: torch.stack([z[n] for n in ch]).amax(0) for c, ch in combos.items()} for s, z in sets.items()
    }
    scores = {s: {c: m.flatten(1).amax(1).numpy() for c, m in per.items()} for s, per in maps.items()}
    for chans in study["smax"]:
        combo = "smax " + " + ".join(chans)
        for name in scores:
            scores[name][combo] = np.max(
                [(scores[name][c] - scores["val"][c].mean()) / scores["val"][c].std() for c in chans], axis=0
            )

    known = np.asarray(test.get("has_mask", np.ones(len(labels), bool)), bool) | ~labels
    kinds = np.asarray(held_kinds)
    auroc = lambda negatives, positives: rank_auroc(  # noqa: E731
        np.r_[np.zeros(len(negatives)), np.ones(len(positives))], np.r_[negatives, positives]
    )
    rows = []
    for combo in scores["val"]:
        row = {"combination": combo, "syn_image_auroc": auroc(scores["val"][combo], scores["cal"][combo])}
        if combo in combos:
            normal_pixels, defect_pixels = maps["val"][combo].numpy(), maps["cal"][combo].numpy()
            row["syn_pixel_auroc"] = rank_auroc(  # as calibration: every pixel, the masks as truth
                np.r_[np.zeros(normal_pixels.size), cal_masks.ravel() > 0],
                np.r_[normal_pixels.ravel(), defect_pixels.ravel()],
            )
            row["selection_score"] = 0.5 * (row["syn_image_auroc"] + row["syn_pixel_auroc"])
        good_scores = scores["test"][combo][~labels]
        row["held_image_auroc"] = auroc(good_scores, scores["held"][combo])
        for kind in KINDS:
            row[f"held_{kind}"] = auroc(good_scores, scores["held"][combo][kinds == kind])
        row["real_image_auroc"] = rank_auroc(labels, scores["test"][combo])
        if combo in combos:
            row["real_pixel_auroc"] = rank_auroc(
                test["masks"][known].ravel() > 0, maps["test"][combo].numpy()[known].ravel()
            )
        rows.append(row)
    pd.set_option("display.width", 250)
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
