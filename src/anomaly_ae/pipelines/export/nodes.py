"""Nodes of the ``export`` pipeline: a thin adapter over :mod:`anomaly_ae.export`."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_ae.config import from_settings
from anomaly_ae.data.preprocess import framing_of
from anomaly_ae.export.onnx_export import EXPORTERS, MANIFEST_FILE, MODEL_FILE, build_bundle
from anomaly_ae.model import config_for_images
from anomaly_ae.model.checkpoint import model_from_checkpoint

log = logging.getLogger(__name__)


@dataclass
class ExportSettings:
    """``export`` (no defaults here: ``conf/base/parameters_export.yml`` holds them)."""

    opset: int
    exporter: str
    false_alarm_quantiles: list
    batch_size: int
    parity_tolerance: float
    map_parity_tolerance: float
    max_image_pixels: int
    min_image_side: int
    served_model: str | None  # MLflow pyfunc model name, or None: not logged

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"export.exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if not isinstance(self.opset, int) or self.opset < 17:
            raise ValueError(f"export.opset must be an integer >= 17, got {self.opset!r}")
        for name in ("batch_size", "max_image_pixels", "min_image_side"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"export.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("parity_tolerance", "map_parity_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"export.{name} must be > 0, got {getattr(self, name)!r}")
        name = self.served_model
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
            raise ValueError(
                f"export.served_model must be a model name without '/' or null, got {self.served_model!r}"
            )
        if not self.false_alarm_quantiles or any(not 0 <= float(q) <= 1 for q in self.false_alarm_quantiles):
            raise ValueError(
                "export.false_alarm_quantiles must be a non-empty list in [0, 1], "
                f"got {self.false_alarm_quantiles!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportSettings:
        return from_settings(cls, data, "export")


def export_bundle(
    model_checkpoint: dict,
    decision_threshold: dict[str, Any],
    normal_reference: dict[str, np.ndarray],
    validation_images: dict[str, np.ndarray],
    dataset_info: dict[str, Any],
    model: dict[str, Any],
    preprocessing: dict[str, Any],
    export: dict[str, Any],
) -> dict[str, bytes]:
    """The inspection bundle of this checkpoint, its calibrated threshold and normal
    reference (fingerprints checked), with the false-alarm quantiles of the normal
    validation images scored by the exported graph itself."""
    from anomaly_ae.hooks import git_commit

    settings = ExportSettings.from_dict(dict(export))
    images = validation_images["images"]
    shape = images.shape[-2:]
    # refuses another architecture, tiling or image size, saying what to do
    config = config_for_images(model, shape, images.shape[1])
    model_from_checkpoint(model_checkpoint, config, image_size=shape, framing=framing_of(validation_images))
    with tempfile.TemporaryDirectory(prefix="anomaly_ae_export_") as staging:
        manifest = build_bundle(
            model_checkpoint,
            decision_threshold,
            normal_reference,
            staging,
            validation_images=images,
            category=dataset_info.get("category"),
            resample=preprocessing["resample"],
            opset=settings.opset,
            exporter=settings.exporter,
            false_alarm_quantiles=[float(q) for q in settings.false_alarm_quantiles],
            batch_size=settings.batch_size,
            parity_tolerance=settings.parity_tolerance,
            map_parity_tolerance=settings.map_parity_tolerance,
            max_image_pixels=settings.max_image_pixels,
            min_image_side=settings.min_image_side,
            provenance={"git_commit": git_commit(), "data_source": dataset_info.get("source")},
        )
        files = {name: (Path(staging) / name).read_bytes() for name in (MODEL_FILE, MANIFEST_FILE)}
    check = manifest["export_check"]
    log.info(
        "Inspection bundle: model %s (epoch %d), score %s, threshold %.5f; ONNX vs torch on %d "
        "validation images: max |score diff| %.2e, max |map diff| %.2e; %.1f MB",
        manifest["checkpoint"]["fingerprint"],
        manifest["checkpoint"]["epoch"],
        manifest["score"]["description"],
        manifest["threshold"]["value"],
        check["n_images"],
        check["max_abs_score_diff"],
        check["max_abs_map_diff"],
        len(files[MODEL_FILE]) / 1e6,
    )
    return files


def log_served_model(inspection_bundle: dict[str, bytes], export: dict[str, Any]) -> dict[str, Any]:
    """Log the bundle just saved to the active (the category's) MLflow run as a pyfunc model
    (:func:`anomaly_ae.runtime.pyfunc.log_bundle_model`) and say where it is: the record
    saved as ``served_model.json``. Without an active run, or with
    ``export.served_model: null``, nothing is logged and the record says why."""
    import mlflow

    settings = ExportSettings.from_dict(dict(export))
    manifest = json.loads(inspection_bundle[MANIFEST_FILE])
    record: dict[str, Any] = {
        "logged": False,
        "model_name": settings.served_model,
        "bundle_fingerprint": manifest["checkpoint"]["fingerprint"],
        "category": manifest.get("category"),
    }
    if not settings.served_model:
        log.info("export.served_model is null: the bundle is not logged as an MLflow model.")
        return {**record, "reason": "export.served_model is null"}
    if mlflow.active_run() is None:
        log.info(
            "No active MLflow run: the bundle is not logged as an MLflow model (serve the bundle "
            "folder with anomaly_ae.runtime.pyfunc.log_bundle_model by hand if needed)."
        )
        return {**record, "reason": "no active MLflow run"}
    from anomaly_ae.runtime.pyfunc import log_bundle_model

    with tempfile.TemporaryDirectory(prefix="anomaly_ae_served_") as staging:
        folder = Path(staging) / "inspection_bundle"
        folder.mkdir()
        for name, data in inspection_bundle.items():
            (folder / name).write_bytes(data)
        info = log_bundle_model(folder, name=settings.served_model)
    model_uri = f"runs:/{info.run_id}/{settings.served_model}"
    tracking_uri = mlflow.get_tracking_uri()
    record.update(
        logged=True,
        run_id=info.run_id,
        model_uri=model_uri,
        logged_model_uri=info.model_uri,
        tracking_uri=tracking_uri,
        serve=f"MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve -m {model_uri} --env-manager local "
        "-h 127.0.0.1 -p 5001",
    )
    log.info("Inspection bundle logged as MLflow model %s; serve it with: %s", model_uri, record["serve"])
    return record
