"""Train the autoencoder with the hybrid loss (GPU when available)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
