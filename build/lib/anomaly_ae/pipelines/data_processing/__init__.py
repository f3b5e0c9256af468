"""Grayscale, resize, split and cache the images as arrays."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
