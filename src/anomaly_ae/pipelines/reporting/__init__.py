"""Figures (Figure 1, ROC curves, histograms, loss curves) and the HTML report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
