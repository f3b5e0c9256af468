"""``calibrate``: choose the anomaly map for this model and category without test labels."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
