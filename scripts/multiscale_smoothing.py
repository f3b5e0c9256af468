"""Development study (#14): would several smoothing scales, each z-scored against the normal
training images and combined, keep small defects that one smoothing scale loses?

Not part of any pipeline and chooses nothing: it reads a category's cached arrays and a
checkpoint through the Kedro catalog, builds the maps with the project's scoring core, and
prints, per combination, the label-free selection score (calibration's synthetic defects on
the validation images), the held-out synthetic image AUROC per kind (the stress test's
defects on the good test images) and the real test image / pixel AUROC.

    python scripts/multiscale_smoothing.py bottle --params data.root=../shared/mvtec_ad \
        --checkpoint <model_checkpoint version>

Combinations: one sigma (z-scored 1 - SSIM(11), smoothed by sigma); ``pmax``: the per-pixel
maximum of the z-scored maps of several sigmas; ``smax``: the image scores (max) of several
sigmas, each standardised by the normal validation images' scores, then their maximum.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from anomaly_ae.data.defects import paste_synthetic_defects
from anomaly_ae.data.transforms import as_unit_float
from anomaly_ae.evaluation.metrics import rank_auroc
from anomaly_ae.model.checkpoint import model_from_checkpoint
from anomaly_ae.scoring.anomaly_map import error_terms
from anomaly_ae.scoring.inference import reconstruct
from anomaly_ae.scoring.reference import ReferenceAccumulator
from anomaly_ae.scoring.ssim import gaussian_blur

SIGMAS = (0, 1, 2, 4, 8)
PIXEL_MAX = ((0, 4), (1, 4), (2, 8), (2, 4, 8), (0, 2, 4, 8))
SCORE_MAX = ((0, 4), (1, 4), (2, 4, 8), (0, 2, 4, 8))
KINDS = ("thin_line", "spot", "smudge", "blob", "perlin", "cutpaste")


def _error(network, images: np.ndarray, batch: int):
    """1 - SSIM(11) of each batch of images and its reconstruction (the scoring core)."""
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        recon = torch.from_numpy(reconstruct(network, x, batch, "cpu"))
        yield error_terms(torch.from_numpy(as_unit_float(x)), recon)["ssim_err"][11]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category")
    parser.add_argument("--params", default="", help="as for kedro run, e.g. data.root=../shared/mvtec_ad")
    parser.add_argument("--checkpoint", default=None, help="model_checkpoint version (default: latest)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(__file__).resolve().parents[1]
    bootstrap_project(root)
    params = dict(item.split("=", 1) for item in args.params.split(",") if item)
    with KedroSession.create(root, runtime_params=params) as session:
        catalog = session.load_context().catalog
        load = lambda name, version=None: catalog.load(f"{args.category}.{name}", version)  # noqa: E731
        train, validation, test = (load(f"{s}_images") for s in ("train", "validation", "test"))
        network = model_from_checkpoint(load("model_checkpoint", args.checkpoint))
        calibration = catalog.load("params:calibration")["synthetic_defects"]
        stress = catalog.load("params:evaluation")["stress_test"]

    accumulators = {s: ReferenceAccumulator() for s in SIGMAS}
    for error in _error(network, train["images"], args.batch):
        for s in SIGMAS:
            accumulators[s].add(gaussian_blur(error, s)[:, 0])
    references = {}
    for s, accumulator in accumulators.items():
        ref = accumulator.result()
        std = torch.from_numpy(ref.std)
        references[s] = (torch.from_numpy(ref.mean), std + std.mean())

    def zmaps(images: np.ndarray) -> dict:
        out = {s: [] for s in SIGMAS}
        for error in _error(network, images, args.batch):
            for s in SIGMAS:
                mean, scale = references[s]
                out[s].append((gaussian_blur(error, s)[:, 0] - mean) / scale)
        return {s: torch.cat(v) for s, v in out.items()}

    normal = as_unit_float(validation["images"])
    options = {"min_contrast": calibration["min_contrast"], "max_tries": calibration["max_tries"]}
    options["contrast"] = tuple(calibration["contrast"])
    cal, cal_masks, _ = paste_synthetic_defects(
        normal, calibration["per_image"], calibration["seed"], kinds=calibration["kinds"], **options
    )
    labels = np.asarray(test["labels"]) != 0
    good = as_unit_float(test["images"][~labels])
    # the stress test's held-out defects: every kind, another seed (evaluate -> stress_test)
    held, _, held_kinds = paste_synthetic_defects(good, stress["per_image"], stress["seed"], **options)
    sets = {name: zmaps(images) for name, images in [("val", normal), ("cal", cal), ("held", held), ("test", test["images"])]}

    combos = {f"sigma {s}": (s,) for s in SIGMAS} | {f"pmax {'/'.join(map(str, c))}": c for c in PIXEL_MAX}
    maps = {name: {c: torch.stack([z[s] for s in sig]).amax(0) for c, sig in combos.items()} for name, z in sets.items()}
    scores = {name: {c: m.flatten(1).amax(1).numpy() for c, m in per.items()} for name, per in maps.items()}
    for sig in SCORE_MAX:
        combo = f"smax {'/'.join(map(str, sig))}"
        ref = {s: scores["val"][f"sigma {s}"] for s in sig}
        for name in scores:
            scores[name][combo] = np.max(
                [(scores[name][f"sigma {s}"] - ref[s].mean()) / ref[s].std() for s in sig], axis=0
            )

    known = np.asarray(test.get("has_mask", np.ones(len(labels), bool)), bool) | ~labels
    kinds = np.asarray(held_kinds)
    rows = []
    for combo in scores["val"]:
        val, test_scores = scores["val"][combo], scores["test"][combo]
        row = {"combination": combo}
        row["syn_image_auroc"] = rank_auroc(np.r_[np.zeros(len(val)), np.ones(len(cal))], np.r_[val, scores["cal"][combo]])
        if combo in combos:
            y = np.r_[np.zeros(maps["val"][combo].numel()), cal_masks.ravel()]
            row["syn_pixel_auroc"] = rank_auroc(y, np.r_[maps["val"][combo].numpy().ravel(), maps["cal"][combo].numpy().ravel()])
            row["selection_score"] = 0.5 * (row["syn_image_auroc"] + row["syn_pixel_auroc"])
        good_scores = test_scores[~labels]
        row["held_image_auroc"] = rank_auroc(np.r_[np.zeros(len(good_scores)), np.ones(len(kinds))], np.r_[good_scores, scores["held"][combo]])
        for kind in KINDS:
            own = scores["held"][combo][kinds == kind]
            row[f"held_{kind}"] = rank_auroc(np.r_[np.zeros(len(good_scores)), np.ones(len(own))], np.r_[good_scores, own])
        row["real_image_auroc"] = rank_auroc(labels, test_scores)
        if combo in combos:
            row["real_pixel_auroc"] = rank_auroc(test["masks"][known].ravel() > 0, maps["test"][combo].numpy()[known].ravel())
        rows.append(row)
    pd.set_option("display.width", 250)
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
