"""``evaluate``: evaluation + reporting on the latest (or a chosen) checkpoint, no retraining."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
