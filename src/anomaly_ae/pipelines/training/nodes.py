"""Nodes of the ``training`` pipeline."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from anomaly_ae.data.preprocess import framing_of
from anomaly_ae.model import config_for_images
from anomaly_ae.model.checkpoint import load_checkpoint
from anomaly_ae.reporting.figures import figure_to_image, loss_curve_figure
from anomaly_ae.training import state as training_state
from anomaly_ae.training.trainer import TrainingConfig, train_autoencoder

log = logging.getLogger(__name__)


EPOCH_METRICS = ("train_loss", "val_loss", "epoch_seconds", "images_per_second")


def _track_epoch(row: dict[str, float]) -> None:
    """Log one epoch's metrics to the active MLflow run as it ends (step = epoch), so a long
    run can be watched in the MLflow UI."""
    import mlflow

    from anomaly_ae.parallel import retry_locked

    if mlflow.active_run() is not None:  # parallel workers share one SQLite store: retry a lock
        retry_locked(
            mlflow.log_metrics, {k: float(row[k]) for k in EPOCH_METRICS if k in row}, step=int(row["epoch"])
        )


def _log_epoch(row: dict[str, float], every: int = 10) -> None:
    _track_epoch(row)
    if row["epoch"] == 1 or row["epoch"] % every == 0:
        log.info(
            "epoch %d: train %.5f, val %s, %.1f img/s",
            row["epoch"],
            row["train_loss"],
            f"{row['val_loss']:.5f}" if "val_loss" in row else "n/a",
            row["images_per_second"],
        )


def train_model(
    train_images: dict[str, np.ndarray],
    validation_images: dict[str, np.ndarray],
    model: dict[str, Any],
    training: dict[str, Any],
    loss: dict[str, float],
    dataset_info: dict[str, Any],
) -> tuple[dict, pd.DataFrame, dict, Image.Image, dict]:
    """Train on the normal training images; validation images drive early stopping."""
    images = train_images["images"]
    model_config = config_for_images(model, images.shape[-2:], images.shape[1])
    train_config = TrainingConfig.from_dict({**training, **loss})
    if tuple(images.shape[-2:]) != model_config.shape:
        raise ValueError(
            f"model.image_size={model_config.size_text()} but the cached images are "
            f"{images.shape[-2]}x{images.shape[-1]} px (height x width); set "
            "preprocessing.image_size to the same value."
        )
    framing = framing_of(train_images)  # how images became the frame: predict and the bundle repeat it
    if dataset_info["source"] == "synthetic":
        log.warning("Training on SYNTHETIC data: results are not comparable to the paper.")
    state_file, resume = None, None
    if train_config.resume_from:  # an explicit checkpoint to continue from
        resume = load_checkpoint(train_config.resume_from)
    if train_config.state_dir:  # the crash-safe state of exactly this training (see training/state.py)
        key = training_state.state_key(
            model_config.to_dict(),
            train_config,
            training_state.data_digest(images, validation_images["images"]),
        )
        state_file = training_state.state_path(
            train_config.state_dir, dataset_info["category"], train_config, key
        )
        train_config.checkpoint_path = str(state_file)
    with training_state.exclusive(state_file) if state_file else nullcontext():
        if state_file and resume is None:
            resume = training_state.resume_state(state_file, train_config.resume, train_config.epochs)
        elif state_file:
            training_state.refuse_going_back(state_file, int(resume["epoch"]))
        if state_file:
            log.info("Crash-safe training state: %s (rerun the same command to resume)", state_file)
        for row in (resume or {}).get("history", []):  # epochs of the interrupted run
            _track_epoch(row)
        result = train_autoencoder(
            torch.from_numpy(images),
            torch.from_numpy(validation_images["images"]) if len(validation_images["images"]) else None,
            model_config,
            train_config,
            resume_checkpoint=resume,
            on_epoch_end=_log_epoch,
            metadata={
                "data_source": dataset_info["source"],
                "category": dataset_info["category"],
                "framing": framing.to_dict(),
            },
        )
    history = pd.DataFrame(result.history)
    log.info(
        "Trained %d epochs on %s (best epoch %d): train loss %.5f, val loss %s",
        len(history),
        result.device,
        result.best_epoch,
        history["train_loss"].iloc[-1],
        f"{history['val_loss'].iloc[-1]:.5f}" if "val_loss" in history else "n/a",
    )
    metrics = {  # per-epoch metrics were logged as each epoch ended; these summarise the run
        "best_epoch": [{"step": 0, "value": float(result.best_epoch)}],
        "best_val_loss": [{"step": 0, "value": float(result.checkpoint["best_val_loss"])}],
    }
    tags = {
        "model": model_config.describe(),  # the concrete network (the params may say auto)
        "framing": framing.describe(),  # preprocessing.fit made concrete
        "device": result.device,
        "data_source": dataset_info["source"],
        "category": dataset_info["category"],
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
    }
    figure = figure_to_image(
        loss_curve_figure(history, f"Training loss ({dataset_info['source']} {dataset_info['category']})")
    )
    return result.checkpoint, history, metrics, figure, tags
