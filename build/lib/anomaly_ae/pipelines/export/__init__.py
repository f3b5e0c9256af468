"""``export``: the latest (or ``--load-versions``) model and its calibration as an
inspection bundle (ONNX + ``bundle.json``) for the torch-free runtime, also logged to the
category's MLflow run as a pyfunc model for ``mlflow models serve`` (``served_model.json``
says where; :mod:`anomaly_ae.runtime.pyfunc`)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
