"""Export a trained model and its calibrated scoring to a self-contained inspection bundle.

The bundle is a folder with two files:

* ``model.onnx`` -- one ONNX graph from a ``(N, 1, H, W)`` float32 batch in [0, 1] to the
  anomaly maps ``(N, 1, H, W)`` and the image scores ``(N,)``: the network, then the scoring
  core of :mod:`anomaly_ae.scoring` (SSIM, map, normal-reference correction, reduction)
  traced as it is, not re-implemented;
* ``bundle.json`` -- what a line controller needs to use it: the calibrated threshold and how
  it was calibrated, quantiles of the normal validation scores (to pick another false-alarm
  rate), the map settings, the input specification (how an image file becomes the input),
  the weight fingerprint, category, versions and the git commit.

:mod:`anomaly_ae.runtime` reads it with numpy, Pillow and onnxruntime only (no torch).
Plain functions, no Kedro: the ``export`` pipeline is a thin adapter.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import anomaly_ae
from anomaly_ae.data.transforms import _LUMA, RESAMPLE_METHODS, as_unit_float, image_shape
from anomaly_ae.evaluation.false_alarms import expected_false_alarm_rate
from anomaly_ae.evaluation.metrics import THRESHOLD_SETTINGS, calibrate_threshold, threshold_options
from anomaly_ae.export.folder import write_bundle
from anomaly_ae.model.checkpoint import checkpoint_fingerprint, checkpoint_framing, model_from_checkpoint
from anomaly_ae.runtime.bundle import run_in_chunks
from anomaly_ae.scoring import MapSettings, NormalReference, image_score, score_maps
from anomaly_ae.scoring.anomaly_map import memory_pair, reference_pair
from anomaly_ae.scoring.inference import reconstruct_and_score

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MODEL_FILE",
    "MANIFEST_FILE",
    "EXPORTERS",
    "ScoringGraph",
    "check_same_model",
    "score_quantiles",
    "build_bundle",
    "write_bundle",
    "export_onnx",
]

BUNDLE_FORMAT = "anomaly-ae-inspection-bundle"
BUNDLE_FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "bundle.json"
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)


class ScoringGraph(nn.Module):
    """The network and the scoring core as one module: ``images (N, 1, H, W)`` float32 in
    [0, 1] -> ``(anomaly_map (N, 1, H, W), score (N,))``, exactly what
    :func:`~anomaly_ae.scoring.inference.reconstruct_and_score` computes in fp32.

    The normal reference (when ``settings.normal_reference`` is not ``none``) becomes two
    buffers, so it is stored in the exported graph as constants; so does the localisation
    map's (``settings.localisation``: the map output is then that map, the score still the
    detection map's).
    """

    def __init__(self, model: nn.Module, settings: MapSettings, reference: NormalReference | None = None):
        super().__init__()
        self.model = model.eval()
        self.settings = settings
        if reference is None and (
            settings.normal_reference != "none" or settings.heatmap.normal_reference != "none"
        ):
            raise ValueError(
                f"The score uses a normal reference ({settings.describe()}); pass the normal "
                "reference (normal_reference.npz written by `kedro run --pipeline=evaluate`)."
            )
        # reference_pair checks the localisation map's reference; as buffers they are constants
        for prefix, tensors in zip(
            ("reference", "localisation"), reference_pair(reference, settings, "cpu"), strict=True
        ):
            if tensors is not None:
                self.register_buffer(f"{prefix}_mean", tensors[0])
                if tensors[1] is not None:
                    self.register_buffer(f"{prefix}_scale", tensors[1])
        # the memory channels' banks (the training images' block averages)
        for prefix, bank in zip(
            ("reference", "localisation"), memory_pair(reference, settings, "cpu"), strict=True
        ):
            if bank is not None:
                self.register_buffer(f"{prefix}_memory", bank)

    def _tensors(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        buffers = dict(self.named_buffers())
        if f"{prefix}_mean" not in buffers:
            return None
        return buffers[f"{prefix}_mean"], buffers.get(f"{prefix}_scale")

    def _bank(self, prefix: str) -> torch.Tensor | None:
        return dict(self.named_buffers()).get(f"{prefix}_memory")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = self.model(images).float()
        detection, heat, _ = score_maps(
            images,
            recon,
            self.settings,
            self._tensors("reference"),
            self._tensors("localisation"),
            paper_ssim=False,
            banks=(self._bank("reference"), self._bank("localisation")),
        )  # float64 (map_dtype)
        return heat.float(), image_score(
            detection, self.settings.score_reduction, self.settings.topk_fraction
        )


def check_same_model(fingerprint: str, decision_threshold: Mapping, normal_reference: Mapping | None) -> None:
    """Refuse a threshold or normal reference calibrated for another checkpoint."""
    for what, data in (("decision threshold", decision_threshold), ("normal reference", normal_reference)):
        found = data.get("checkpoint_fingerprint") if isinstance(data, Mapping) else None
        if found is None:
            continue
        found = str(np.asarray(found).item()) if isinstance(found, np.ndarray) else str(found)
        if found != fingerprint:
            raise ValueError(
                f"The {what} was calibrated for another model (fingerprint {found}, this checkpoint "
                f"{fingerprint}). Run `kedro run --pipeline=evaluate` for this checkpoint (or pass "
                "--load-versions to pick the matching versions) before exporting."
            )


def score_quantiles(scores: np.ndarray, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """``{"0.99": np.quantile(scores, 0.99), ...}`` (linear interpolation, like the
    ``quantile`` threshold rule): the threshold that lets about ``1 - q`` of normal images
    through as false alarms."""
    scores = np.asarray(scores, np.float64).ravel()
    out = {}
    for q in quantiles:
        if not 0 <= float(q) <= 1:
            raise ValueError(f"export.false_alarm_quantiles must lie in [0, 1], got {q!r}")
        out[f"{float(q):g}"] = float(np.quantile(scores, float(q)))
    return out


def _export_graph(
    graph: ScoringGraph, image_size: int | tuple[int, int], opset: int, exporter: str, path: Path
) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"export.exporter must be one of {EXPORTERS}, got {exporter!r}")
    channels = graph.model.config.in_channels
    example = torch.rand(2, channels, *image_shape(image_size), generator=torch.Generator().manual_seed(0))
    common = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES), "opset_version": int(opset)}
    with torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,  # weights inside model.onnx: the bundle is two files
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1 << 16)}},
                verbose=False,
                **common,
            )
        else:
            import warnings

            with warnings.catch_warnings():  # the legacy exporter is deprecated, and chatty
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph,
                    (example,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                    **common,
                )
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx comes with the exporter
        return
    onnx.checker.check_model(str(path), full_check=True)


def _ort_scores(model_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if torch.get_num_threads() == 1 else 0
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return run_in_chunks(session, INPUT_NAME, images)  # as the runtime scores them


def _magnification_hint(settings: MapSettings, reference: NormalReference | None) -> str:
    """Why a score can miss an absolute parity bound with a sound graph: a ``zscore`` or
    ``tail`` reference divides the error map by the normal maps' spread, so a narrow spread
    magnifies the engines' float32 rounding (~1e-7 on the reconstruction)."""
    mode = settings.normal_reference
    if reference is None or mode not in ("zscore", "tail"):
        return ""
    smallest = float(reference.as_tensors(mode)[1].min())
    return (
        f" The {mode} normal reference divides the error map by as little as {smallest:.3g}, "
        f"magnifying float32 rounding up to {1 / smallest:.0f}-fold; where the verdicts agree and "
        "that is acceptable, raise export.parity_tolerance and export.map_parity_tolerance."
    )


def build_bundle(
    checkpoint: dict,
    decision_threshold: Mapping[str, Any],
    normal_reference: Mapping[str, Any] | NormalReference | None,
    staging: str | os.PathLike,
    *,
    validation_images: np.ndarray | None = None,
    validation_scores: np.ndarray | None = None,
    category: str | None = None,
    resample: str = "area",
    opset: int = 18,
    exporter: str = "dynamo",
    false_alarm_quantiles: Sequence[float] = DEFAULT_QUANTILES,
    batch_size: int = 16,
    parity_tolerance: float = 1e-5,
    map_parity_tolerance: float = 1e-4,
    max_image_pixels: int = 40_000_000,
    min_image_side: int = 16,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model.onnx`` and ``bundle.json`` into the existing folder ``staging``; returns
    the manifest (the content of ``bundle.json``).

    Exactly one of ``validation_images`` (``(N, C, H, W)`` normal validation images: they
    are scored by the exported graph with onnxruntime, and by the torch scorer as an export
    check that refuses a graph whose scores disagree by more than ``parity_tolerance``, maps
    by more than ``map_parity_tolerance`` or verdicts at all) or
    ``validation_scores`` (the normal validation scores, taken as they are) must be given.
    """
    if (validation_images is None) == (validation_scores is None):
        raise ValueError("pass exactly one of validation_images and validation_scores")
    if resample not in RESAMPLE_METHODS:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_METHODS)}, got {resample!r}")
    staging = Path(staging)
    fingerprint = checkpoint_fingerprint(checkpoint)
    reference_arrays = (
        normal_reference.to_arrays() if isinstance(normal_reference, NormalReference) else normal_reference
    )
    check_same_model(fingerprint, decision_threshold, reference_arrays)
    settings = MapSettings.from_dict(dict(decision_threshold["score"]))
    reference = None
    if settings.normal_reference != "none" or settings.heatmap.normal_reference != "none":
        if not reference_arrays:
            raise ValueError(
                f"The calibrated score uses normal_reference={settings.normal_reference!r}; pass the "
                "normal_reference.npz written by `kedro run --pipeline=evaluate`."
            )
        reference = NormalReference.from_arrays(dict(reference_arrays))
    model = model_from_checkpoint(checkpoint)
    size = model.config.shape  # (height, width)
    framing = checkpoint_framing(checkpoint)
    if reference is not None:
        reference.check_shape(size, settings.channels)
    graph = ScoringGraph(model, settings, reference).eval()
    model_path = staging / MODEL_FILE
    _export_graph(graph, size, opset, exporter, model_path)

    export_check = None
    if validation_images is not None:
        images = as_unit_float(validation_images)  # uint8 caches -> [0, 1]
        channels = model.config.in_channels
        if images.ndim != 4 or images.shape[1:] != (channels, *size) or len(images) == 0:
            raise ValueError(
                f"validation images must be (N >= 1, {channels}, {size[0]}, {size[1]}), "
                f"got {tuple(images.shape)}; "
                "rerun `kedro run --pipeline=data_processing` for this model's image size and "
                "preprocessing.color."
            )
        maps, scores = _ort_scores(model_path, images)
        expected = reconstruct_and_score(
            model, images, settings, batch_size, device="cpu", precision="fp32", reference=reference
        )
        threshold_value = float(decision_threshold["value"])
        export_check = {
            "n_images": len(images),
            "max_abs_score_diff": float(np.abs(scores - expected["score"]).max()),
            "max_abs_map_diff": float(np.abs(maps - expected["map"]).max()),
            "verdicts_equal": bool(
                np.array_equal(scores > threshold_value, expected["score"] > threshold_value)
            ),
            "tolerance": float(parity_tolerance),
            "map_tolerance": float(map_parity_tolerance),
        }
        if (
            export_check["max_abs_score_diff"] > parity_tolerance
            or export_check["max_abs_map_diff"] > map_parity_tolerance
            or not export_check["verdicts_equal"]
        ):
            raise RuntimeError(
                f"The exported graph disagrees with the torch scorer on the validation images "
                f"({export_check}); not shipping it. Try export.exporter=torchscript or another opset."
                + _magnification_hint(settings, reference)
            )
    else:
        scores = np.asarray(validation_scores, np.float32).ravel()
        if scores.size == 0:
            raise ValueError("no validation scores: the false-alarm quantiles need normal validation images")
    if not np.all(np.isfinite(scores)):
        raise ValueError("validation scores must be finite")

    recomputed = None
    if decision_threshold.get("rule") in THRESHOLD_SETTINGS:
        recomputed = calibrate_threshold(
            scores.astype(np.float64), **threshold_options(dict(decision_threshold))
        )

    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "category": category,
        "anomaly_ae_version": anomaly_ae.__version__,
        "git_commit": None,
        "torch_version": torch.__version__,
        **dict(provenance or {}),
        "model": {
            "file": MODEL_FILE,
            "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
            "exporter": exporter,
            "opset": int(opset),
            "input": INPUT_NAME,
            "outputs": list(OUTPUT_NAMES),
        },
        "checkpoint": {
            "fingerprint": fingerprint,
            "epoch": int(checkpoint.get("epoch", 0)),
            "architecture": model.config.architecture,
            "loss": checkpoint.get("loss"),
        },
        "input": {
            "layout": "NCHW",
            "shape": ["batch", model.config.in_channels, *size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            # grayscale: one channel, ITU-R 601-2 luma of R, G, B applied in float;
            # rgb: three channels in R, G, B order
            "color": "grayscale" if model.config.in_channels == 1 else "rgb",
            "channel_order": "RGB",
            "luma_weights": [float(w) for w in _LUMA] if model.config.in_channels == 1 else None,
            "alpha": "composited on black",
            "bit_depth": "8-bit / 255, 16-bit / 65535",
            # [height, width]; stretched: every image resized to it (the paper); padded: every
            # image resized by "scale" (smaller when it would not fit), centred, the rest of
            # the frame mirrored (numpy.pad "symmetric"), as in training
            "resize": {
                "size": list(size),
                "resample": resample,
                "non_square": "stretched" if framing.fit == "stretch" else "padded",
                "framing": framing.to_dict(),
            },
            "max_image_pixels": int(max_image_pixels),
            "min_image_side": int(min_image_side),
        },
        "score": {**settings.to_dict(), "description": settings.describe()},
        "normal_reference": None
        if reference is None
        else {
            "mode": settings.normal_reference,
            "n_images": reference.n_images,
            "heat_map_mode": settings.heatmap.normal_reference,
        },
        "threshold": {
            "value": float(decision_threshold["value"]),
            **{k: decision_threshold[k] for k in ("rule", "quantile", "k_sigma") if k in decision_threshold},
            "n_validation_images": decision_threshold.get("n_validation_images"),
            "checkpoint_epoch": decision_threshold.get("checkpoint_epoch"),
            "recomputed_on_export": recomputed,
            "comparison": "score > value is anomalous",
            # a new normal image like the validation images is flagged with a probability in this
            # range (rank argument, any scores' distribution; anomaly_ae.evaluation.false_alarms)
            "expected_false_alarm_rate": list(
                expected_false_alarm_rate(scores, float(decision_threshold["value"]))
            ),
        },
        "validation_scores": {
            "n": int(scores.size),
            "source": "exported graph (onnxruntime)" if validation_images is not None else "given",
            "quantiles": score_quantiles(scores, false_alarm_quantiles),
            "values": sorted(float(s) for s in scores),
            "mean": float(scores.mean(dtype=np.float64)),
            "std": float(scores.std(dtype=np.float64)),
        },
        "export_check": export_check,
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def export_onnx(
    checkpoint: dict,
    decision_threshold: Mapping[str, Any],
    normal_reference: Mapping[str, Any] | NormalReference | None,
    validation: np.ndarray | None,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    validation_scores: np.ndarray | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Export the bundle folder ``path`` (``model.onnx`` + ``bundle.json``, atomically).

    ``validation`` are the normal validation images ``(N, 1, H, W)`` (scored by the exported
    graph for the false-alarm quantiles, and checked against the torch scorer); pass None
    and ``validation_scores`` to use given scores instead. ``options`` go to
    :func:`build_bundle` (``category``, ``resample``, ``exporter``, ``false_alarm_quantiles``,
    ``provenance`` ...). Returns the manifest.
    """
    manifest: dict[str, Any] = {}

    def build(staging: Path) -> None:
        manifest.update(
            build_bundle(
                checkpoint,
                decision_threshold,
                normal_reference,
                staging,
                validation_images=validation,
                validation_scores=validation_scores,
                opset=opset,
                **options,
            )
        )

    write_bundle(path, build)
    return manifest
