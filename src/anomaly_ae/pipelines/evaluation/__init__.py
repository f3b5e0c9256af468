"""Score the test set with the trained model: SSIM table, Table II, metrics, threshold."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
