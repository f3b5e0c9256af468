"""The ``summary`` pipeline: one row per category of the run."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
