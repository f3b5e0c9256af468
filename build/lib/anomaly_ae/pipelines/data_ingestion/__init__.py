"""Find, download or generate the MVTec AD category and validate it."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
