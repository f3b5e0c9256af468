"""``loss_study``: the paper's Table II as one namespaced training + evaluation per loss variant."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
