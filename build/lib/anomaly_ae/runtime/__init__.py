"""The torch-free inspection runtime: numpy, Pillow and onnxruntime only.

    from anomaly_ae.runtime import load_bundle
    bundle = load_bundle("data/06_models/bottle/inspection_bundle/<version>/inspection_bundle")
    for v in bundle.inspect(["part_001.png", "part_002.png"]):
        print(v.file, v.score, v.is_anomalous, v.error)

The bundle comes from ``kedro run --pipeline=export`` (:mod:`anomaly_ae.export`); images are
preprocessed exactly as :class:`anomaly_ae.Inspector` does. The console command is
``anomaly-ae-inspect BUNDLE PATH...`` (:mod:`anomaly_ae.runtime.cli`). Nothing here imports
torch, Kedro or MLflow (a test blocks them).
"""

from anomaly_ae.runtime.bundle import Bundle, BundleError, Verdict, load_bundle
from anomaly_ae.runtime.preprocess import IMAGE_SUFFIXES, find_files, prepare

__all__ = ["IMAGE_SUFFIXES", "Bundle", "BundleError", "Verdict", "find_files", "load_bundle", "prepare"]
