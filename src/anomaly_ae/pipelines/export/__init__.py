"""``export``: the latest (or ``--load-versions``) model and its calibration as an
inspection bundle (ONNX + ``bundle.json``) for the torch-free runtime."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
