"""Judge new images with a trained model: the public API for scripts and line controllers.

    from anomaly_ae import Inspector
    inspector = Inspector.from_files(
        "data/06_models/bottle/model_checkpoint.pt/<version>/model_checkpoint.pt",
        "data/07_model_output/bottle/decision_threshold.json/<version>/decision_threshold.json",
        "data/07_model_output/bottle/normal_reference.npz/<version>/normal_reference.npz",  # if the
    )                                                   # threshold's map uses a normal reference
    for result in inspector.inspect_paths(["part_001.png", "part_002.png"]):
        print(result.file, result.is_anomalous, result.score, result.error)

Bad input never stops a batch: every file gets a result, with ``error`` set when it could
not be judged (corrupt, truncated, empty, not an image, too small, too large).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_ae.data.transforms import IMAGE_SUFFIXES, to_model_array
from anomaly_ae.model.checkpoint import (
    checkpoint_fingerprint,
    checkpoint_framing,
    load_checkpoint,
    model_from_checkpoint,
)
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.inference import reconstruct_and_score
from anomaly_ae.scoring.reference import NormalReference


@dataclass
class InspectionResult:
    """The verdict on one file. ``score``/``ssim``/``is_anomalous`` are None when ``error``."""

    file: str
    score: float | None = None
    ssim: float | None = None
    is_anomalous: bool | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    image: np.ndarray | None = field(default=None, repr=False)  # model input (H, W) in [0, 1]
    anomaly_map: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "score": self.score,
            "ssim": self.ssim,
            "is_anomalous": self.is_anomalous,
            "error": self.error,
            "width": self.width,
            "height": self.height,
        }


ImageSource = str | os.PathLike | Image.Image | Callable[[], Image.Image]


class Inspector:
    """A trained model plus its calibrated threshold, scoring images in bounded batches."""

    def __init__(
        self,
        checkpoint: dict,
        threshold: float | dict,
        map_settings: MapSettings | dict | None = None,
        reference: NormalReference | dict | None = None,
        *,
        resample: str = "area",
        batch_size: int = 16,
        device: str = "auto",
        precision: str = "fp32",
        max_image_pixels: int = 40_000_000,
        min_image_side: int = 16,
        keep_maps: bool = True,
    ) -> None:
        self.model = model_from_checkpoint(checkpoint)
        self.image_size = self.model.config.image_size
        #: how an image becomes the model's frame, as in training (:class:`Framing`)
        self.framing = checkpoint_framing(checkpoint)
        _check_same_model(checkpoint, threshold, reference)
        if isinstance(threshold, dict):
            map_settings = map_settings if map_settings is not None else threshold.get("score")
            threshold = threshold["value"]
        self.threshold = float(threshold)
        if isinstance(map_settings, dict):
            map_settings = MapSettings.from_dict(map_settings)
        self.map_settings = map_settings or MapSettings()
        if isinstance(reference, dict):
            reference = NormalReference.from_arrays(reference)
        modes = {self.map_settings.normal_reference, self.map_settings.heatmap.normal_reference}
        if modes != {"none"} and reference is None:
            raise ValueError(
                f"The calibrated score uses a normal reference ({self.map_settings.describe()}); "
                "pass the normal_reference.npz written by `kedro run --pipeline=evaluate`."
            )
        self.reference = reference
        self.resample = resample
        self.batch_size = int(batch_size)
        self.device = device
        self.precision = precision
        self.max_image_pixels = int(max_image_pixels)
        self.min_image_side = int(min_image_side)
        self.keep_maps = keep_maps

    @classmethod
    def from_files(
        cls,
        checkpoint_path: str | os.PathLike,
        threshold_path: str | os.PathLike,
        reference_path: str | os.PathLike | None = None,
        **kwargs,
    ) -> Inspector:
        """Load a checkpoint file, the threshold JSON and (when its score needs one) the
        normal reference ``.npz`` written by the evaluate pipeline."""
        paths = [("decision threshold", threshold_path)]
        if reference_path is not None:
            paths.append(("normal reference", reference_path))
        for what, path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"No {what} at {path}. Run `kedro run --pipeline=evaluate` to calibrate one."
                )
        reference = None
        if reference_path is not None:
            with np.load(reference_path, allow_pickle=False) as data:
                reference = dict(data)
        threshold = json.loads(Path(threshold_path).read_text())
        return cls(load_checkpoint(checkpoint_path), threshold, reference=reference, **kwargs)

    def _prepare(self, name: str, source: ImageSource) -> tuple[InspectionResult, np.ndarray | None]:
        result = InspectionResult(file=name)
        try:
            if isinstance(source, Image.Image):
                image = source
            elif callable(source):
                image = source()
            else:
                path = Path(source)
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    raise ValueError(
                        f"not an image file (suffix {path.suffix or 'none'}; "
                        f"expected {', '.join(IMAGE_SUFFIXES)})"
                    )
                if path.stat().st_size == 0:
                    raise ValueError("empty file (0 bytes)")
                image = Image.open(path)
            result.width, result.height = image.size
            if image.width * image.height > self.max_image_pixels:
                raise ValueError(
                    f"image too large ({image.width}x{image.height} > {self.max_image_pixels} pixels); "
                    f"refused as a possible decompression bomb (raise predict.max_image_pixels to allow)"
                )
            if min(image.size) < self.min_image_side:
                raise ValueError(
                    f"image too small ({image.width}x{image.height}; the shorter side must be at least "
                    f"{self.min_image_side} px, predict.min_image_side)"
                )
            image.load()
            array = to_model_array(
                image,
                size=self.image_size,
                resample=self.resample,
                channels=self.model.config.in_channels,
                framing=self.framing,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes a verdict row
            result.error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            return result, None
        return result, array

    def inspect(self, items: Iterable[tuple[str, ImageSource]]) -> Iterator[InspectionResult]:
        """Score ``(name, source)`` pairs lazily, ``batch_size`` images at a time, so memory
        stays bounded however many images stream through."""
        pending: list[tuple[InspectionResult, np.ndarray | None]] = []
        for name, source in items:
            pending.append(self._prepare(name, source))
            if sum(array is not None for _, array in pending) >= self.batch_size:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    def inspect_paths(self, paths: Iterable[str | os.PathLike]) -> list[InspectionResult]:
        return list(self.inspect((str(p), p) for p in paths))

    def _flush(self, pending: list[tuple[InspectionResult, np.ndarray | None]]) -> Iterator[InspectionResult]:
        ready = [(result, array) for result, array in pending if array is not None]
        if ready:
            batch = np.stack([array for _, array in ready])
            if batch.ndim == 3:  # grayscale (N, H, W); colour arrays are already (N, 3, H, W)
                batch = batch[:, None]
            scored = reconstruct_and_score(
                self.model,
                batch,
                self.map_settings,
                batch_size=self.batch_size,
                device=self.device,
                precision=self.precision,
                keep_maps=self.keep_maps,
                reference=self.reference,
            )
            for i, (result, array) in enumerate(ready):
                result.score = float(scored["score"][i])
                result.ssim = float(scored["ssim"][i])
                result.is_anomalous = bool(result.score > self.threshold)
                if self.keep_maps:
                    result.image = array
                    result.anomaly_map = scored["map"][i]
        yield from (result for result, _ in pending)


def _check_same_model(checkpoint: dict, threshold: float | dict, reference: Any) -> None:
    """Refuse a threshold or normal reference calibrated for another model version: its
    scores would be judged against the wrong scale."""
    expected = checkpoint_fingerprint(checkpoint)
    for what, data in (("decision threshold", threshold), ("normal reference", reference)):
        found = data.get("checkpoint_fingerprint") if isinstance(data, dict) else None
        if found is not None and str(found) != expected:
            raise ValueError(
                f"The {what} was calibrated for another model (fingerprint {found}, this checkpoint "
                f"{expected}). Run `kedro run --pipeline=evaluate` for this checkpoint (or pass "
                "--load-versions to pick the matching versions)."
            )


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Every non-hidden file below ``folder`` (sorted); non-images get an error row later."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"predict.input_dir={str(folder)!r} is not a folder. Pass one with "
            f"`kedro run --pipeline=predict --params predict.input_dir=<folder>`."
        )
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(f"predict.input_dir={str(folder)!r} holds no files to inspect.")
    return files
