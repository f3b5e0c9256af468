"""Export a trained model and its calibrated scoring as an inspection bundle (ONNX graph +
``bundle.json``) for the torch-free runtime :mod:`anomaly_ae.runtime`."""

from anomaly_ae.export.folder import write_bundle, write_files
from anomaly_ae.export.onnx_export import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    ScoringGraph,
    build_bundle,
    export_onnx,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ScoringGraph",
    "build_bundle",
    "export_onnx",
    "write_bundle",
    "write_files",
]
