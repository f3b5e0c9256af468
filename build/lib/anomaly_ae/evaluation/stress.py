"""A held-out check per defect kind: synthetic defects on the NORMAL test images.

The calibration chooses the map on the validation images; this measures, on other images
(the good test images) and another seed, how the chosen map and the paper's map find each
kind of synthetic defect - the small, thin and faint ones included. It reads no test label
but "good", and nothing here feeds back into any choice: it is a report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from anomaly_ae.data.defects import paste_synthetic_defects
from anomaly_ae.evaluation.metrics import rank_auroc
from anomaly_ae.scoring import MapSettings, NormalReference
from anomaly_ae.scoring.inference import reconstruct_and_score

__all__ = ["stress_table"]


def stress_table(
    model: nn.Module,
    normal: np.ndarray,
    maps: dict[str, tuple[MapSettings, NormalReference | None]],
    defects: dict,
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> pd.DataFrame:
    """Image and pixel AUROC per defect kind (and ``all``) for each named map.

    Args:
        model: The trained autoencoder (eval mode).
        normal: NORMAL images ``(N, 1, H, W)`` in [0, 1] (e.g. the good test images).
        maps: ``name -> (settings, normal reference or None)``.
        defects: Keyword arguments of :func:`~anomaly_ae.data.defects.paste_synthetic_defects`
            (``per_image``, ``seed``, ``min_contrast``, ``max_tries``, ``kinds``, ``contrast``).
    """
    defective, masks, kinds = paste_synthetic_defects(normal, **defects)
    kinds = np.asarray(kinds)
    images = np.concatenate([normal, defective])
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(defective), int)]
    truth = np.concatenate([np.zeros((len(normal), *masks.shape[1:]), np.uint8), masks])
    rows = []
    for name, (settings, reference) in maps.items():
        scored = reconstruct_and_score(
            model, images, settings, batch_size, device, precision, keep_maps=True, reference=reference
        )
        for kind in ["all", *sorted(set(kinds))]:
            keep = np.r_[np.ones(len(normal), bool), np.ones(len(defective), bool) if kind == "all" else kinds == kind]
            rows.append(
                {
                    "map": name,
                    "kind": kind,
                    "n_defective": int(keep[len(normal) :].sum()),
                    "n_normal": len(normal),
                    "image_auroc": rank_auroc(labels[keep], scored["score"][keep]),
                    "pixel_auroc": rank_auroc(truth[keep].ravel() > 0, scored["map"][keep].ravel()),
                }
            )
    return pd.DataFrame(rows)
