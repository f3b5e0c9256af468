"""The training loop: the paper's recipe (Adam, batch 8) with early stopping, on any device."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from anomaly_ae.model import AutoencoderConfig, HybridLoss, build_model
from anomaly_ae.training.checkpoint import CHECKPOINT_FORMAT, save_checkpoint_atomic, validate_checkpoint
from anomaly_ae.training.device import autocast, resolve_device, resolve_precision

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainingConfig:
    """Training settings; defaults are the paper's (Adam 0.002, batch 8, 500 epochs, seed 42)
    plus the author's notebook early stopping (patience 50 on validation loss, best restored).
    """

    epochs: int = 500
    batch_size: int = 8
    learning_rate: float = 0.002
    weight_decay: float = 0.0
    seed: int = 42
    mse_weight: float = 0.5
    ssim_weight: float = 0.5
    early_stopping_patience: int = 50
    early_stopping_min_delta: float = 0.0
    restore_best: bool = True
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    eval_batch_size: int = 32
    checkpoint_every: int = 1
    checkpoint_path: str | None = None
    resume_from: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"training.{name} must be >= 1 (got {getattr(self, name)})")
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be > 0 (got {self.learning_rate})")

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown training settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass
class TrainingResult:
    model: nn.Module
    history: list[dict[str, float]]
    checkpoint: dict[str, Any]
    device: str
    best_epoch: int
    stopped_early: bool


def batch_slices(n_items: int, batch_size: int) -> list[slice]:
    """Contiguous batch slices. A final batch of ONE image is merged into the previous
    batch: BatchNorm over the dense layer cannot normalise a single sample in training
    mode (Keras silently can), and merging keeps every image in every epoch."""
    bounds = list(range(0, n_items, batch_size)) + [n_items]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=False)]


def _evaluate_loss(model, loss_fn, data, batch_size, device, dtype, channels_last) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for sl in batch_slices(len(data), batch_size):
            x = data[sl]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                recon = model(x)
            total += loss_fn(x, recon) * x.shape[0]
    return float(total) / len(data)


def build_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    epoch: int,
    history: list[dict[str, float]],
    config: TrainingConfig,
    best_state: dict | None = None,
    best_epoch: int = 0,
    best_val_loss: float = math.inf,
    metadata: dict | None = None,
) -> dict[str, Any]:
    """A self-describing checkpoint: weights, optimizer, and what rebuilds the model."""
    return {
        "format_version": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer_state": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
        "best_model_state": best_state,
        "epoch": epoch,
        "best_epoch": best_epoch,
        "best_val_loss": best_val_loss,
        "history": list(history),
        "loss": {"mse_weight": config.mse_weight, "ssim_weight": config.ssim_weight},
        "training": {k: v for k, v in asdict(config).items() if k != "extra"},
        "metadata": dict(metadata or {}),
    }


def train_autoencoder(
    train_images: torch.Tensor,
    val_images: torch.Tensor | None,
    model_config: AutoencoderConfig,
    config: TrainingConfig,
    *,
    resume_checkpoint: dict | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    metadata: dict | None = None,
) -> TrainingResult:
    """Train the autoencoder on normal images ``(N, 1, H, W)`` in [0, 1].

    The whole training set is moved to the device once and reshuffled each epoch with a
    generator seeded by ``seed + epoch``, so a run and a resumed run draw the same batches.
    A non-finite loss raises :class:`TrainingDivergedError` naming the epoch and step; the
    periodic checkpoint (``checkpoint_path``) then still holds the last good epoch.
    """
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = HybridLoss(config.mse_weight, config.ssim_weight)
    adam_kwargs: dict[str, Any] = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    if device.type == "cuda":
        adam_kwargs["fused"] = True
    optimizer = torch.optim.Adam(model.parameters(), **adam_kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    history: list[dict[str, float]] = []
    start_epoch = 1
    best_val, best_epoch, best_state = math.inf, 0, None
    if resume_checkpoint is not None:
        validate_checkpoint(resume_checkpoint, "training.resume_from")
        saved_cfg = resume_checkpoint["model_config"]
        if saved_cfg != model.config.to_dict():
            raise ValueError(
                f"training.resume_from holds a model {saved_cfg}, which differs from the "
                f"configured {model.config.to_dict()}; resume with the same model settings."
            )
        model.load_state_dict(resume_checkpoint["model_state"])
        if resume_checkpoint.get("optimizer_state"):
            optimizer.load_state_dict(resume_checkpoint["optimizer_state"])
        history = list(resume_checkpoint.get("history", []))
        start_epoch = int(resume_checkpoint["epoch"]) + 1
        best_val = float(resume_checkpoint.get("best_val_loss", math.inf))
        best_epoch = int(resume_checkpoint.get("best_epoch", 0))
        best_state = resume_checkpoint.get("best_model_state")
        log.info("Resuming from epoch %d", start_epoch)

    train_data = train_images.to(device=device, dtype=torch.float32)
    val_data = val_images.to(device=device, dtype=torch.float32) if val_images is not None and len(val_images) else None
    n_train = len(train_data)
    if n_train < 2:
        raise ValueError(f"Need at least 2 training images, got {n_train}.")
    step_model = torch.compile(model) if config.compile else model
    patience = int(config.early_stopping_patience or 0)
    use_early_stopping = val_data is not None and patience > 0
    epochs_without_improvement = (start_epoch - 1 - best_epoch) if best_epoch else 0
    stopped_early = False
    slices = batch_slices(n_train, config.batch_size)

    bar = tqdm(
        range(start_epoch, config.epochs + 1),
        initial=start_epoch - 1,
        total=config.epochs,
        desc="training",
        unit="epoch",
        disable=not config.progress,
    )
    for epoch in bar:
        started = time.perf_counter()
        torch.manual_seed(config.seed + epoch)  # dropout masks: same per epoch on resume
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed + epoch))
        shuffled = train_data[order.to(device)]
        if config.channels_last:
            shuffled = shuffled.contiguous(memory_format=torch.channels_last)
        step_losses = torch.empty(len(slices), device=device)
        model.train()
        for step, sl in enumerate(slices):
            x = shuffled[sl]
            with autocast(device, dtype):
                recon = step_model(x)
            loss = loss_fn(x, recon)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step_losses[step] = loss.detach()
        finite = torch.isfinite(step_losses)
        if not bool(finite.all()):
            bad_step = int((~finite).nonzero()[0]) + 1
            raise TrainingDivergedError(
                f"Loss became {float(step_losses[bad_step - 1])} at epoch {epoch}, step {bad_step}/"
                f"{len(slices)}; training stopped. The last good checkpoint "
                f"({config.checkpoint_path or 'none written'}) is unchanged. Lower "
                f"training.learning_rate or check the input data for NaNs."
            )
        sizes = torch.tensor([s.stop - s.start for s in slices], device=device, dtype=torch.float32)
        train_loss = float((step_losses * sizes).sum() / n_train)
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
        if val_data is not None:
            row["val_loss"] = _evaluate_loss(
                model, loss_fn, val_data, config.eval_batch_size, device, dtype, config.channels_last
            )
            if not math.isfinite(row["val_loss"]):
                raise TrainingDivergedError(f"Validation loss is {row['val_loss']} at epoch {epoch}.")
        row["epoch_seconds"] = time.perf_counter() - started
        row["images_per_second"] = n_train / row["epoch_seconds"]
        history.append(row)

        monitored = row.get("val_loss", train_loss)
        if monitored < best_val - config.early_stopping_min_delta:
            best_val, best_epoch, epochs_without_improvement = monitored, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            epochs_without_improvement += 1
        bar.set_postfix(
            train=f"{train_loss:.4f}", val=f"{row.get('val_loss', float('nan')):.4f}", best=best_epoch
        )
        if on_epoch_end is not None:
            on_epoch_end(row)
        last_epoch = epoch == config.epochs
        stop = use_early_stopping and epochs_without_improvement >= patience
        if config.checkpoint_path and (epoch % max(config.checkpoint_every, 1) == 0 or last_epoch or stop):
            save_checkpoint_atomic(
                build_checkpoint(
                    model, optimizer, epoch=epoch, history=history, config=config,
                    best_state=best_state, best_epoch=best_epoch, best_val_loss=best_val,
                    metadata=metadata,
                ),
                config.checkpoint_path,
            )
        if stop:
            stopped_early = True
            log.info("Early stopping at epoch %d (best epoch %d, loss %.5f)", epoch, best_epoch, best_val)
            break
    bar.close()

    final_epoch = history[-1]["epoch"] if history else start_epoch - 1
    if config.restore_best and best_state is not None and best_epoch != final_epoch:
        model.load_state_dict(best_state)
        log.info("Restored the weights of the best epoch %d", best_epoch)
    model.eval()
    checkpoint = build_checkpoint(
        model, optimizer, epoch=int(final_epoch), history=history, config=config,
        best_state=None, best_epoch=best_epoch, best_val_loss=best_val, metadata=metadata,
    )
    return TrainingResult(
        model=model.cpu(),
        history=history,
        checkpoint=checkpoint,
        device=str(device),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
    )
