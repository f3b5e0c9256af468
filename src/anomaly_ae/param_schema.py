"""Every parameter group checked once, at the start of a run, naming the key that is wrong.

The settings dataclasses (:class:`~anomaly_ae.training.trainer.TrainingConfig`,
:class:`~anomaly_ae.model.AutoencoderConfig`, :class:`~anomaly_ae.scoring.MapSettings`) are the
schema: pydantic validates the values against their type hints (``training.epochs=abc`` or
``1.5`` is refused, ``"5"`` becomes 5), then their own checks run. Groups without a dataclass
of their own are described here. :class:`anomaly_ae.hooks.RunParamsHook` calls
:func:`validate_parameters` as soon as the run's parameters are known, before any node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anomaly_ae.config import unknown_keys

__all__ = ["ParameterError", "PredictSettings", "CalibrationSettings", "validate_parameters"]


class ParameterError(ValueError):
    """One or more parameters are invalid; the message lists each key and the fix."""


@dataclass
class PredictSettings:
    """``predict`` (no defaults here: ``conf/base/parameters_predict.yml`` holds them)."""

    input_dir: str | None
    batch_size: int
    device: str
    precision: str
    resample: str
    max_image_pixels: int
    min_image_side: int
    save_overlays: bool

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_image_pixels", "min_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"predict.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class CalibrationSettings:
    """``calibration`` (see ``conf/base/parameters_calibrate.yml``)."""

    grid: dict
    synthetic_defects: dict
    tie_tolerance: float
    batch_size: int
    device: str
    separate_localisation: bool

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"calibration.batch_size must be >= 1, got {self.batch_size}")
        if self.tie_tolerance < 0:
            raise ValueError(f"calibration.tie_tolerance must be >= 0, got {self.tie_tolerance}")
        for key in ("per_image", "max_tries"):
            value = self.synthetic_defects.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"calibration.synthetic_defects.{key} must be an integer >= 1, got {value!r}"
                )
        from anomaly_ae.data.defects import DEFECT_KINDS, defect_kinds

        kinds = self.synthetic_defects.get("kinds")
        if not defect_kinds(kinds) or set(defect_kinds(kinds)) - set(DEFECT_KINDS):
            raise ValueError(
                f"calibration.synthetic_defects.kinds must name kinds among {DEFECT_KINDS}, got {kinds!r}"
            )
        for key in ("contrast", "opacity"):
            value = self.synthetic_defects.get(key)
            if not (isinstance(value, list | tuple) and len(value) == 2 and 0 < value[0] <= value[1] <= 1):
                raise ValueError(
                    f"calibration.synthetic_defects.{key} must be [low, high] with "
                    f"0 < low <= high <= 1, got {value!r}"
                )


@dataclass
class RetentionSettings:
    """``retention`` (see ``conf/base/parameters_retention.yml``)."""

    keep_last: int
    prune_after_run: bool

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(
                f"retention.keep_last must be >= 1 (the newest version always stays), got {self.keep_last}"
            )


def _concrete_model(params: dict[str, Any]) -> dict[str, Any] | None:
    """``model`` with ``auto`` sizes replaced by stand-ins (the real ones depend on the
    data, known only to the nodes: :func:`~anomaly_ae.model.config_for_images`), so every
    other key is still checked."""
    from anomaly_ae.model.autoencoder import AUTO

    model = params.get("model")
    if model is None:
        return None
    model = dict(model)
    if model.get("tile_size") == AUTO:
        model["tile_size"] = None
    if model.get("image_size") == AUTO:
        tile = model.get("tile_size")
        model["image_size"] = tile if isinstance(tile, int) and not isinstance(tile, bool) else 1024
    return model


def _schemas() -> list[tuple[str, type, Any]]:
    from anomaly_ae.model import AutoencoderConfig
    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.training.trainer import TrainingConfig

    return [
        ("training", TrainingConfig, lambda p: {**p.get("training", {}), **p.get("loss", {})}),
        ("model", AutoencoderConfig, _concrete_model),
        ("evaluation.anomaly_map", MapSettings, lambda p: p.get("evaluation", {}).get("anomaly_map")),
        ("predict", PredictSettings, lambda p: p.get("predict")),
        ("calibration", CalibrationSettings, lambda p: p.get("calibration")),
        ("retention", RetentionSettings, lambda p: p.get("retention")),
        ("export", _export_settings(), lambda p: p.get("export")),
    ]


def _export_settings() -> type:
    from anomaly_ae.pipelines.export.nodes import ExportSettings

    return ExportSettings


def validate_parameters(params: dict[str, Any]) -> None:
    """Raise :class:`ParameterError` listing every invalid key of the groups present."""
    import pydantic

    problems: list[str] = []
    for section, cls, pick in _schemas():
        data = pick(params)
        if data is None:
            continue
        unknown, known = unknown_keys(cls, data)
        if unknown:
            problems.append(f"{section}: unknown key(s) {unknown}; known: {known}")
            continue
        try:
            pydantic.TypeAdapter(cls).validate_python(dict(data))
        except pydantic.ValidationError as exc:
            for error in exc.errors():
                if error["loc"]:  # a value of the wrong type
                    where = ".".join(str(part) for part in error["loc"])
                    problems.append(f"{section}.{where}={error.get('input')!r}: {error['msg']}")
                else:  # the settings' own check, which names the key
                    problems.append(str(error["msg"]).removeprefix("Value error, "))
        except (ValueError, TypeError) as exc:
            problems.append(f"{section}: {exc}")
    if problems:
        raise ParameterError(
            "Invalid parameters:\n  "
            + "\n  ".join(problems)
            + "\nFix them in conf/base/parameters_<pipeline>.yml (or conf/<env>/) or on the command line"
            " (--params key=value)."
        )
