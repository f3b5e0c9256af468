"""``predict``: verdicts and heat maps for a folder of new images."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
