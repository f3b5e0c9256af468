"""Checkpoint files: atomic writes and safe (weights-only) loads."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from anomaly_ae.data.transforms import Framing, image_shape

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path``. A crash mid-write leaves the previous file untouched (``os.replace`` is
    atomic) and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_folder(path: str | os.PathLike, build: Callable[[Path], object]) -> Path:
    """Call ``build(staging_folder)`` in a temporary folder beside ``path``, fsync its files,
    then rename it into place (an existing folder at ``path`` is replaced as a whole): a
    reader never sees a half-written folder, and a failure leaves nothing behind."""
    import shutil

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        staging.chmod(0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_checkpoint_atomic(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` with ``torch.save`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Train first: `kedro run --pipeline=training`.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}") from exc
    validate_checkpoint(data, str(path))
    return data


def validate_checkpoint(data: Any, name: str = "checkpoint") -> None:
    """Check that ``data`` is a checkpoint dict this version of the project can use."""
    required = ("format_version", "model_config", "model_state")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise CheckpointError(f"{name} is not an anomaly-ae checkpoint (needs keys {required}).")
    if data["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{name} has format {data['format_version']}, this version reads {CHECKPOINT_FORMAT}."
        )


#: What only resuming the training needs: Adam's moments, the best epoch's copy of the
#: weights and, in a finished run's checkpoint whose weights are the restored best epoch's, the
#: last epoch's weights (each up to the model's size). Dropped from the copy logged to MLflow.
TRAINING_STATE_KEYS = ("optimizer_state", "best_model_state", "last_model_state")


def weights_only(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without :data:`TRAINING_STATE_KEYS`: the model, its settings and its
    history (loads, scores and exports as the full one; same fingerprint)."""
    return {key: value for key, value in checkpoint.items() if key not in TRAINING_STATE_KEYS}


def checkpoint_fingerprint(checkpoint: dict[str, Any]) -> str:
    """A short SHA-256 of the model weights: tells which model a calibrated threshold or
    normal reference belongs to."""
    validate_checkpoint(checkpoint)
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint["model_state"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_framing(checkpoint: dict[str, Any]) -> Framing:
    """How the checkpoint's training images were framed (:class:`Framing`; checkpoints made
    before framing existed were stretched)."""
    return Framing.from_dict((checkpoint.get("metadata") or {}).get("framing"))


def _px(shape: tuple[int, int]) -> str:
    return f"{shape[0]}px" if shape[0] == shape[1] else f"{shape[0]}x{shape[1]}px (height x width)"


def model_from_checkpoint(
    checkpoint: dict[str, Any],
    expected=None,
    image_size: int | tuple[int, ...] | None = None,
    framing: Framing | None = None,
):
    """Rebuild the trained model in eval mode (the one place a checkpoint becomes a network).

    Refuses, with a message saying what to do, a checkpoint of another architecture or
    tiling than ``expected`` (an :class:`~anomaly_ae.model.AutoencoderConfig`) or of another
    image size than ``image_size`` (a side, or the data's ``(height, width)``).
    """
    from anomaly_ae.model.autoencoder import AutoencoderConfig, build_model

    validate_checkpoint(checkpoint)
    saved = AutoencoderConfig.from_dict(checkpoint["model_config"])
    if expected is not None and saved.architecture != expected.architecture:
        raise CheckpointError(
            f"The checkpoint holds architecture {saved.architecture!r} but model.architecture is "
            f"{expected.architecture!r}; retrain or pick a matching checkpoint version."
        )
    data_shape = None if image_size is None else image_shape(image_size)
    if data_shape is not None and saved.shape != data_shape:
        fix = f"preprocessing.image_size={saved.size_text()}"
        if saved.shape[0] == saved.shape[1] and data_shape[0] != data_shape[1]:
            fix += " and preprocessing.keep_aspect=false (this model stretches images to a square)"
        raise CheckpointError(
            f"The checkpoint was trained on {_px(saved.shape)} images but the data is "
            f"{_px(data_shape)}; set {fix}, or retrain."
        )
    saved_framing = checkpoint_framing(checkpoint)
    if framing is not None and (
        saved_framing.fit != framing.fit
        or (framing.fit == "pad" and abs(saved_framing.scale - framing.scale) > 1e-6 * framing.scale)
    ):
        raise CheckpointError(
            f"The checkpoint was trained on images {saved_framing.describe()} but the data's are "
            f"{framing.describe()}; set preprocessing.fit={saved_framing.fit} and rebuild the inputs "
            "(kedro run --pipeline=data_processing), or retrain."
        )
    if expected is not None and saved.in_channels != expected.in_channels:
        names = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
        colour = {1: "gray", 3: "rgb"}.get(saved.in_channels, saved.in_channels)
        raise CheckpointError(
            f"The checkpoint was trained on {names.get(saved.in_channels, saved.in_channels)} images but "
            f"the data is {names.get(expected.in_channels, expected.in_channels)}; set "
            f"preprocessing.color={colour} and rebuild the inputs (kedro run --pipeline=data_processing), "
            "or retrain."
        )
    if expected is not None and saved.tile_size != expected.tile_size:
        raise CheckpointError(
            f"The checkpoint's network sees {saved.tiling()} but model.tile_size={expected.tile_size} "
            f"({expected.tiling()}); set model.tile_size={saved.tile_size or 'null'} or retrain."
        )
    model = build_model(saved)
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()
