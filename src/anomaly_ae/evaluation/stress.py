"""A held-out check per defect kind: synthetic defects on the NORMAL test images.

The calibration chooses the map on the validation images; this measures, on other images
(the good test images) and another seed, how the chosen map and the paper's map find each
kind of synthetic defect - the small, thin and faint ones included. It reads no test label
but "good", and nothing here feeds back into any choice: it is a report.
"""

from __future__ import annotations

from math import ceil

import numpy as np
import pandas as pd
from torch import nn

from anomaly_ae.data.defects import paste_synthetic_defects, shown_kinds
from anomaly_ae.evaluation.metrics import auroc_interval, rank_auroc
from anomaly_ae.scoring import MapSettings, NormalReference
from anomaly_ae.scoring.inference import reconstruct_and_score

__all__ = [
    "CONTRAST_BANDS",
    "CONTRAST_KINDS",
    "PLACE_BANDS",
    "PLACE_KINDS",
    "SIZE_BANDS",
    "SIZE_KINDS",
    "STRESS_COLUMNS",
    "copies_per_image",
    "measured_contrast",
    "normal_spread_percentile",
    "spread_percentile",
    "per_kind_rows",
    "stress_table",
]

#: The columns of :func:`stress_table`, in order (also those of an empty table).
STRESS_COLUMNS = [
    "map",
    "kind",
    "contrast",
    "size",
    "place",
    "n_defective",
    "n_normal",
    "median_contrast",
    "median_area",
    "median_place",
    "image_auroc",
    "image_auroc_ci_low",
    "image_auroc_ci_high",
    "pixel_auroc",
]


#: The columns that split a kind's copies into bands (a row splits by one of them at most).
SPLIT_COLUMNS = ("contrast", "size", "place")


def per_kind_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a stress table over every contrast, size and place: one per map and kind
    (a table written before a split existed lacks its column: all its rows are over it)."""
    whole = np.ones(len(table), bool)
    for column in SPLIT_COLUMNS:
        if column in table:
            whole &= (table[column] == "all").to_numpy()
    return table[whole]


#: The kinds whose contrast is their parameter (``calibration.synthetic_defects.contrast``):
#: their rows are also split by the contrast each copy really has, a detection limit.
CONTRAST_KINDS = ("thin_line", "smudge", "spot", "tint")
#: ``(label, low, high)``: mean |change| inside the mask in ``[low, high)``.
CONTRAST_BANDS = (("< 0.10", 0.0, 0.10), ("0.10-0.20", 0.10, 0.20), (">= 0.20", 0.20, np.inf))
#: The kinds that can be small: their rows are also split by the size each copy really has
#: (its mask's area in pixels at model resolution), a detection limit in size.
SIZE_KINDS = ("thin_line", "smudge", "spot", "cutpaste", "tint")
#: ``(label, low, high)``: mask area in px (model resolution) in ``[low, high)``; 25 px is a
#: 5 x 5 square, 100 px a 10 x 10 one.
SIZE_BANDS = (("< 25 px", 0, 25), ("25-100 px", 25, 100), (">= 100 px", 100, np.inf))
#: The same kinds are also split by *where* each copy lies: how much the normal images vary
#: there. A map compared with the normal images per pixel is least sensitive where they vary
#: most (an edge drawn a little off, a glint), so a kind can be found well in the steady part
#: of the frame and missed in the rest; the overall figure mixes the two.
PLACE_KINDS = SIZE_KINDS
#: ``(label, low, high)``: the copy's place as a percentile over the frame of the normal
#: images' per-pixel spread (:func:`normal_spread_percentile`), in ``[low, high)``.
PLACE_BANDS = (
    ("steadiest half", 0.0, 0.5),
    ("50-90th percentile", 0.5, 0.9),
    ("most varying 10 %", 0.9, np.inf),
)


def copies_per_image(options: dict, n_good: int, kinds, channels: int = 1) -> int:
    """Defective copies per good image: ``evaluation.stress_test.per_image``, or with
    ``per_image: auto`` enough that every kind the images can show (``kinds`` less the colour
    kinds on grayscale images) gets at least ``copies_per_kind`` copies across the ``n_good``
    good images - the same precision per kind whatever the size of a category's test set."""

    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    per_image = options["per_image"]
    if per_image != "auto":
        if not positive(per_image):
            raise ValueError(
                f"evaluation.stress_test.per_image must be auto or an integer >= 1, got {per_image!r}"
            )
        return per_image
    wanted = options.get("copies_per_kind")
    if not positive(wanted):
        raise ValueError(f"evaluation.stress_test.copies_per_kind must be an integer >= 1, got {wanted!r}")
    return max(1, ceil(wanted * len(shown_kinds(kinds, channels)) / max(n_good, 1)))


def measured_contrast(
    normal: np.ndarray, defective: np.ndarray, masks: np.ndarray, per_image: int
) -> np.ndarray:
    """Per defect copy, the mean |intensity change| inside its mask against the normal image it
    was pasted on (copy ``i`` comes from normal image ``i // per_image``)."""
    inside = masks.astype(bool)
    out = np.zeros(len(defective), np.float32)  # the maps' dtype, as the copies are
    for i in range(len(defective)):  # one copy at a time: no array of every copy's change
        if inside[i].any():
            change = np.abs(defective[i] - normal[i // per_image]).mean(axis=0)  # over colour channels
            out[i] = change[inside[i]].mean()
    return out


def spread_percentile(normal: np.ndarray) -> np.ndarray:
    """``(H, W)``: each pixel's spread over the ``normal`` images ``(N, C, H, W)`` (the standard
    deviation of their channel mean), ranked over the frame as a percentile in [0, 1): 0.95
    where the normal images vary more than at 95 % of the frame's pixels (ties by position)."""
    normal = np.asarray(normal, np.float64)
    spread = normal.mean(axis=1).std(axis=0).ravel()
    percentile = np.empty(spread.size)
    percentile[np.argsort(spread, kind="stable")] = np.arange(spread.size) / spread.size
    return percentile.reshape(normal.shape[-2:])


def normal_spread_percentile(normal: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per defect copy, where it lies as the normal images see it: :func:`spread_percentile`
    of the ``normal`` images averaged inside the copy's mask (NaN for an empty mask)."""
    percentile = spread_percentile(normal)
    inside = masks.astype(bool)
    return np.array([percentile[m].mean() if m.any() else np.nan for m in inside])


def stress_table(
    model: nn.Module,
    normal: np.ndarray,
    maps: dict[str, tuple[MapSettings, NormalReference | None]],
    defects: dict,
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
    confidence_level: float = 0.95,
) -> pd.DataFrame:
    """Image AUROC (with its ``confidence_level`` interval,
    :func:`~anomaly_ae.evaluation.metrics.auroc_interval`: with a few dozen good images a
    kind's figure is far from exact) and pixel AUROC per defect kind (and ``all``) for each
    named map; for the contrast-driven kinds (:data:`CONTRAST_KINDS`) also per band of measured contrast
    (column ``contrast``: ``all`` or a :data:`CONTRAST_BANDS` label), so a user sees how faint
    a defect of each kind can be and still be found, and for the kinds that can be small
    (:data:`SIZE_KINDS`) per band of mask area (column ``size``: ``all`` or a
    :data:`SIZE_BANDS` label): how small; and, the same kinds, per band of where each copy
    lies (column ``place``: ``all`` or a :data:`PLACE_BANDS` label,
    :func:`normal_spread_percentile` over the ``normal`` images): where in the frame. A row
    splits by one of the three at most.

    Args:
        model: The trained autoencoder (eval mode).
        normal: NORMAL images ``(N, 1, H, W)`` in [0, 1] (e.g. the good test images).
        maps: ``name -> (settings, normal reference or None)``.
        defects: Keyword arguments of :func:`~anomaly_ae.data.defects.paste_synthetic_defects`
            (``per_image``, ``seed``, ``min_contrast``, ``max_tries``, ``kinds``, ``contrast``).
    """
    defective, masks, kinds = paste_synthetic_defects(normal, **defects)
    kinds = np.asarray(kinds)
    contrast = measured_contrast(normal, defective, masks, len(defective) // len(normal))
    area = masks.reshape(len(masks), -1).astype(bool).sum(axis=1)
    place = normal_spread_percentile(normal, masks)
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(defective), int)]
    images = np.concatenate([normal, defective])
    del defective  # scored from ``images`` only: not held twice
    truth = np.concatenate([np.zeros((len(normal), *masks.shape[1:]), np.uint8), masks])
    everything = {column: "all" for column in SPLIT_COLUMNS}
    groups = [
        (kind, everything, np.ones(len(kinds), bool) if kind == "all" else kinds == kind)
        for kind in ["all", *sorted(set(kinds))]
    ]
    splits = (
        ("contrast", CONTRAST_KINDS, CONTRAST_BANDS, contrast),
        ("size", SIZE_KINDS, SIZE_BANDS, area),
        ("place", PLACE_KINDS, PLACE_BANDS, place),
    )
    for column, split_kinds, bands, value in splits:
        for kind in sorted(set(kinds) & set(split_kinds)):
            for label, low, high in bands:
                chosen = (kinds == kind) & (value >= low) & (value < high)
                if chosen.any():
                    groups.append((kind, everything | {column: label}, chosen))
    rows = []
    for name, (settings, reference) in maps.items():
        scored = reconstruct_and_score(
            model,
            images,
            settings,
            batch_size,
            device,
            precision,
            keep_maps=True,
            keep_recon=False,  # only the maps and scores are compared: no reconstructions held
            reference=reference,
        )
        for kind, bands, chosen in groups:
            keep = np.r_[np.ones(len(normal), bool), chosen]
            # every image (the "all" row): the maps as they are, not a copy of them
            pixels = (truth, scored["map"]) if keep.all() else (truth[keep], scored["map"][keep])
            low, high = auroc_interval(labels[keep], scored["score"][keep], confidence_level)
            rows.append(
                {
                    "map": name,
                    "kind": kind,
                    **bands,
                    "n_defective": int(chosen.sum()),
                    "n_normal": len(normal),
                    "median_contrast": float(np.median(contrast[chosen])),
                    "median_area": float(np.median(area[chosen])),
                    "median_place": float(np.median(place[chosen])),
                    "image_auroc": rank_auroc(labels[keep], scored["score"][keep]),
                    "image_auroc_ci_low": low,
                    "image_auroc_ci_high": high,
                    "pixel_auroc": rank_auroc(pixels[0].ravel() > 0, pixels[1].ravel()),
                }
            )
    return pd.DataFrame(rows, columns=STRESS_COLUMNS)
