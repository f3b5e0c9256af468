"""The crash-safe training state: one file per (model, training settings, data), resumed by
rerunning the same command.

During training the model, the optimizer and the history are written atomically at the end
of an epoch, every ``checkpoint_every`` epochs once ``checkpoint_seconds`` have passed since
the last write (and always at the last epoch): a kill loses at most that much training. The
file's name carries a key of everything that decides the
training trajectory (model settings, the training settings that change the numbers, the loss
weights and a hash of the training and validation arrays), so

* two runs with different settings or data never share a state file (they may run at once);
* rerunning the command that was killed finds its own state and continues from the last
  complete epoch (``resume: auto``), with the same result as an uninterrupted run;
* a state never gets overwritten by an earlier one: ``resume: never`` refuses to start over
  while a state of the same key exists;
* two runs of the very same key at once are refused by a lock instead of racing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from anomaly_ae.model.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")

#: Training settings that do not change the numbers of an epoch (speed levers and
#: bookkeeping): a state is resumed whatever their value. ``epochs`` is among them so that
#: a finished run can be extended by raising it.
NOT_IN_KEY = frozenset(
    {
        "epochs",
        "progress",
        "resume",
        "resume_from",
        "state_dir",
        "checkpoint_path",
        "checkpoint_every",
        "checkpoint_seconds",
        "eval_batch_size",
        "num_threads",
        "num_interop_threads",
        "compile",
        "compile_mode",
        "device",
        "optimizer_impl",
        "extra",
    }
)


class TrainingStateError(RuntimeError):
    """A training state cannot be used or would be overwritten."""


def data_digest(*arrays: np.ndarray) -> str:
    """SHA-256 of the arrays' shapes, types and bytes (the training and validation images)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def state_key(model_config: dict[str, Any], training_config: Any, data: str) -> str:
    """A short key of everything that decides the training trajectory."""
    settings = {k: v for k, v in asdict(training_config).items() if k not in NOT_IN_KEY}
    text = json.dumps(
        {"model": model_config, "training": settings, "data": data}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def state_path(state_dir: str | Path, category: str, training_config: Any, key: str) -> Path:
    """``<state_dir>/<category>/mse<w>_ssim<w>-<key>.pt`` (one per loss variant and key)."""
    tag = f"mse{training_config.mse_weight:g}_ssim{training_config.ssim_weight:g}"
    return Path(state_dir) / category / f"{tag}-{key}.pt"


def describe(state: dict[str, Any]) -> str:
    return f"epoch {int(state['epoch'])}" + (" (stopped early)" if state.get("stopped_early") else "")


def is_complete(state: dict[str, Any], epochs: int) -> bool:
    return bool(state.get("stopped_early")) or int(state["epoch"]) >= epochs


def resume_state(path: Path, resume: str, epochs: int) -> dict[str, Any] | None:
    """The state to continue from, or None to start at epoch 1; refuses to go backwards.

    ``resume="auto"``: an existing state is continued from its last complete epoch (a
    finished one is reused as is: no epoch is left to train). ``resume="never"``: starting
    over would overwrite the existing state with an earlier one, so it is refused.
    """
    if resume not in RESUME_MODES:
        raise ValueError(f"training.resume must be one of {RESUME_MODES} (got {resume!r})")
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingStateError(
            f"The training state {path} cannot be read ({exc}). It is left as it is: delete it "
            f"to train this configuration from epoch 1."
        ) from exc
    saved = int(state["epoch"])
    if resume == "never":
        raise TrainingStateError(
            f"{path} holds this exact training (same model, settings and data) up to "
            f"{describe(state)}; training.resume=never would overwrite it with an earlier state. "
            f"Use training.resume=auto to continue it, or delete the file (or `anomaly-ae-prune "
            f"--states`) to start over."
        )
    if saved > epochs and not state.get("stopped_early"):
        raise TrainingStateError(
            f"{path} holds this training up to epoch {saved}, beyond training.epochs={epochs}; "
            f"it is not overwritten with an earlier state. Set training.epochs>={saved} to use "
            f"it, or delete the file to start over."
        )
    if is_complete(state, epochs):
        log.info(
            "This training (same model, settings and data) already finished at %s: reusing %s "
            "(delete it to retrain from epoch 1).",
            describe(state),
            path,
        )
    else:
        log.info(
            "Resuming interrupted training from %s: %s (epoch %d of %d next)",
            path,
            describe(state),
            saved + 1,
            epochs,
        )
    return state


def refuse_going_back(path: Path, start_epoch: int) -> None:
    """Refuse to train from ``start_epoch`` (an explicit ``resume_from``) over a state of the
    same training that is further along."""
    if not path.exists():
        return
    saved = int(load_checkpoint(path)["epoch"])
    if saved > start_epoch:
        raise TrainingStateError(
            f"{path} holds this training up to epoch {saved}, but training.resume_from starts at "
            f"epoch {start_epoch}; it is not overwritten with an earlier state. Drop "
            f"training.resume_from (the state is resumed by itself) or delete the file."
        )


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` while training, so one state file has one writer at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise TrainingStateError(
            f"Another run is training the same model, settings and data right now (it holds "
            f"{lock.lock_file}). Wait for it to finish, or change a setting such as training.seed."
        ) from exc
    try:
        yield
    finally:
        lock.release()
