"""The scoring core (plain PyTorch, no Kedro): SSIM, anomaly maps, image scores and the
normal reference. Training, evaluation, calibration, predict and the benchmark call it."""

from anomaly_ae.scoring.anomaly_map import (
    REDUCTIONS,
    MapSettings,
    anomaly_map,
    compose,
    error_terms,
    image_score,
    reference_tensors,
    score_maps,
)
from anomaly_ae.scoring.reference import REFERENCE_MODES, NormalReference, correct
from anomaly_ae.scoring.ssim import (
    gaussian_blur,
    gaussian_filter,
    gaussian_taps,
    local_ssim_map,
    per_image_ssim,
)

__all__ = [
    "REDUCTIONS",
    "REFERENCE_MODES",
    "MapSettings",
    "NormalReference",
    "anomaly_map",
    "compose",
    "correct",
    "error_terms",
    "gaussian_blur",
    "gaussian_filter",
    "gaussian_taps",
    "image_score",
    "local_ssim_map",
    "per_image_ssim",
    "reference_tensors",
    "score_maps",
]
