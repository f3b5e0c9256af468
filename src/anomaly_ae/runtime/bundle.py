"""An inspection bundle loaded for scoring: ``model.onnx`` in onnxruntime plus ``bundle.json``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_ae.data.transforms import Framing
from anomaly_ae.evaluation.false_alarms import expected_false_alarm_rate
from anomaly_ae.runtime.preprocess import ImageSource, prepare

__all__ = ["BundleError", "Verdict", "Bundle", "load_bundle"]

# the same strings as anomaly_ae.export.onnx_export (which imports torch)
BUNDLE_FORMAT = "anomaly-ae-inspection-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "bundle.json"


#: Pixels per ONNX Runtime call. The graph's float64 filters are memory-bound: a call on two
#: 256-px images keeps its intermediates in the CPU caches. Measured on the real bottle bundle
#: (2 threads): 65 img/s in calls of 1-2 images against 44 img/s in calls of 16.
CHUNK_PIXELS = 2 * 256 * 256


def run_in_chunks(session, input_name: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a bundle's graph on ``images (N, 1, H, W)`` float32, :data:`CHUNK_PIXELS` at a time
    (at least one image per call): ``(maps (N, H, W), scores (N,))``. The graph scores each
    image on its own, so the chunks change the speed, not the results (beyond the rounding
    of convolution kernels chosen per batch size, within the parity bounds)."""
    per_call = max(1, CHUNK_PIXELS // (images.shape[-2] * images.shape[-1]))
    maps, scores = [], []
    for start in range(0, len(images), per_call):
        chunk = np.ascontiguousarray(images[start : start + per_call])
        amap, score = session.run(None, {input_name: chunk})
        maps.append(amap[:, 0])
        scores.append(score)
    return np.concatenate(maps), np.concatenate(scores)


class BundleError(ValueError):
    """A bundle folder is missing, incomplete, altered or of another format."""


@dataclass
class Verdict:
    """The verdict on one input. ``score``/``is_anomalous`` are None when ``error`` is set."""

    file: str
    score: float | None = None
    is_anomalous: bool | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32

    COLUMNS = ("file", "score", "is_anomalous", "error", "width", "height")

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.COLUMNS}


class Bundle:
    """A loaded bundle. ``manifest`` is ``bundle.json``; :meth:`inspect` judges images."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers=None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise BundleError(f"{self.path} is not an inspection bundle (no {MANIFEST_FILE}).")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"Cannot read {manifest_path}: {exc}") from exc
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path} is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
                f"this runtime reads {BUNDLE_FORMAT!r} v{BUNDLE_FORMAT_VERSION}."
            )
        self.manifest = manifest
        model_path = self.path / manifest["model"]["file"]
        if not model_path.is_file():
            raise BundleError(f"{self.path}: the model file {model_path.name} is missing.")
        data = model_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["model"]["sha256"]:
            raise BundleError(
                f"{model_path} does not match the checksum in {MANIFEST_FILE}: the bundle was altered "
                "or copied incompletely. Copy the whole bundle folder again."
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])
        self.input_name = manifest["model"]["input"]
        spec = manifest["input"]
        #: ``(height, width)`` the model takes (bundles of square models store ``[s, s]``).
        self.image_size = tuple(int(v) for v in spec["resize"]["size"])
        #: 1 (grayscale) or 3 (RGB): ``input.shape[1]`` (bundles before colour: 1).
        self.channels = int(spec["shape"][1])
        self.resample = spec["resize"]["resample"]
        #: how an image becomes the model's frame (bundles before framing: stretched)
        self.framing = Framing.from_dict(spec["resize"].get("framing"))
        self.max_image_pixels = int(spec["max_image_pixels"])
        self.min_image_side = int(spec["min_image_side"])
        self.threshold = float(manifest["threshold"]["value"])
        self._validation = np.asarray(manifest["validation_scores"]["values"], np.float64)

    # ---- thresholds ----
    @property
    def fingerprint(self) -> str:
        return self.manifest["checkpoint"]["fingerprint"]

    def threshold_for(self, false_alarm_rate: float) -> float:
        """The threshold that about ``false_alarm_rate`` of the NORMAL validation images
        exceed: their ``1 - false_alarm_rate`` quantile (linear interpolation, as the
        ``quantile`` calibration rule). Rates below ``1 / n_validation`` cannot be told
        apart: they all give the highest validation score."""
        rate = float(false_alarm_rate)
        if not 0 <= rate <= 1:
            raise ValueError(f"false_alarm_rate must be in [0, 1], got {false_alarm_rate!r}")
        return float(np.quantile(self._validation, 1.0 - rate))

    def expected_false_alarm_rate(self, threshold: float | None = None) -> tuple[float, float]:
        """The range of the probability that a new normal image like the bundle's ``n``
        validation images is flagged at ``threshold`` (default: the calibrated one):
        ``(m / (n + 1), (m + 1) / (n + 1))`` with ``m`` of them above it. A rate below
        ``1 / (n + 1)`` cannot be promised with ``n`` images."""
        limit = self.threshold if threshold is None else float(threshold)
        return expected_false_alarm_rate(self._validation, limit)

    def resolve_threshold(
        self, threshold: float | None = None, false_alarm_rate: float | None = None
    ) -> float:
        if threshold is not None and false_alarm_rate is not None:
            raise ValueError("give a threshold or a false-alarm rate, not both")
        if threshold is not None:
            return float(threshold)
        if false_alarm_rate is not None:
            return self.threshold_for(false_alarm_rate)
        return self.threshold

    # ---- scoring ----
    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images (N, C, H, W)`` (or ``(N, H, W)`` for a grayscale bundle) float32 in [0, 1]
        -> ``(maps (N, H, W), scores (N,))``; ``C`` is :attr:`channels`."""
        x = np.asarray(images, np.float32)
        if x.ndim == 3 and self.channels == 1:
            x = x[:, None]
        expected = (self.channels, *self.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"expected images shaped (N, {', '.join(map(str, expected))}), got {x.shape}")
        return run_in_chunks(self.session, self.input_name, x)

    def preprocess(self, source: ImageSource) -> tuple[tuple[int, int] | None, np.ndarray | None, str | None]:
        """One input as the model sees it (see :func:`anomaly_ae.runtime.preprocess.prepare`)."""
        return prepare(
            source,
            self.image_size,
            self.resample,
            self.max_image_pixels,
            self.min_image_side,
            self.channels,
            self.framing,
        )

    def iter_inspect(
        self,
        items: Iterable[tuple[str, ImageSource]],
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        *,
        keep_maps: bool = False,
        batch_size: int = 16,
    ) -> Iterator[Verdict]:
        """Judge ``(name, source)`` pairs lazily, ``batch_size`` images at a time."""
        limit = self.resolve_threshold(threshold, false_alarm_rate)
        pending: list[tuple[Verdict, np.ndarray | None]] = []
        for name, source in items:
            dims, array, error = self.preprocess(source)
            verdict = Verdict(file=name, error=error)
            if dims is not None:
                verdict.width, verdict.height = int(dims[0]), int(dims[1])
            pending.append((verdict, array))
            if sum(a is not None for _, a in pending) >= batch_size:
                yield from self._flush(pending, limit, keep_maps)
                pending = []
        yield from self._flush(pending, limit, keep_maps)

    def _flush(self, pending, limit: float, keep_maps: bool) -> Iterator[Verdict]:
        ready = [(v, a) for v, a in pending if a is not None]
        if ready:
            maps, scores = self.score_batch(np.stack([a for _, a in ready]))
            for i, (verdict, _) in enumerate(ready):
                verdict.score = float(scores[i])
                verdict.is_anomalous = bool(scores[i] > limit)
                if keep_maps:
                    verdict.anomaly_map = maps[i]
        yield from (v for v, _ in pending)

    def inspect(
        self,
        paths_or_images: Iterable[ImageSource] | ImageSource,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        *,
        keep_maps: bool = False,
        batch_size: int = 16,
    ) -> list[Verdict]:
        """Judge files (paths), PIL images or image arrays; a verdict per input, in order,
        ``score > threshold`` being anomalous. The threshold is the calibrated one, or
        ``threshold``, or the one for ``false_alarm_rate`` (:meth:`threshold_for`).
        Unreadable inputs get a verdict with ``error`` set instead of raising."""
        if isinstance(paths_or_images, str | os.PathLike | np.ndarray) or hasattr(
            paths_or_images, "getpixel"
        ):
            paths_or_images = [paths_or_images]
        items = (
            (str(s) if isinstance(s, str | os.PathLike) else f"<image {i}>", s)
            for i, s in enumerate(paths_or_images)
        )
        return list(
            self.iter_inspect(items, threshold, false_alarm_rate, keep_maps=keep_maps, batch_size=batch_size)
        )


def load_bundle(path: str | os.PathLike, *, threads: int | None = None, providers=None) -> Bundle:
    """Load the bundle folder ``path`` (written by ``kedro run --pipeline=export``)."""
    return Bundle(path, threads=threads, providers=providers)
