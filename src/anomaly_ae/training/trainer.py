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

from anomaly_ae.config import from_settings
from anomaly_ae.device import COMPILE_MODES, autocast, resolve_compile_mode, resolve_device, resolve_precision
from anomaly_ae.model import AutoencoderConfig, HybridLoss, SeparableHybridLoss, build_model
from anomaly_ae.model.checkpoint import CHECKPOINT_FORMAT, save_checkpoint_atomic, validate_checkpoint
from anomaly_ae.scoring.inference import unit_float
from anomaly_ae.training.augment import AugmentationConfig, augment_batch

log = logging.getLogger(__name__)


OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")
SSIM_IMPLS = ("auto", "pytorch_msssim", "separable")


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
    channels_last: bool = True  # NHWC for the convolutions: same math, faster oneDNN kernels
    compile: bool = True  # torch.compile of forward + loss (as conf/base; tests pass False)
    # Speed levers (see benchmarks/README.md and ``python -m anomaly_ae.benchmark``).
    # compile_mode: torch.compile mode when compile is true: "auto" (reduce-overhead, i.e.
    # CUDA graphs, on CUDA; default elsewhere), "default", "max-autotune-no-cudagraphs", or
    # "reduce-overhead" (see anomaly_ae.device.resolve_compile_mode).
    compile_mode: str = "auto"
    # optimizer_impl: "auto" (fused Adam on CUDA and CPU when available, else foreach),
    # "fused", "foreach" or "loop" (the reference per-tensor implementation).
    optimizer_impl: str = "auto"
    # num_threads / num_interop_threads: torch intra/inter-op CPU threads; 0 leaves torch's
    # default (one per physical core). Process-wide settings.
    num_threads: int = 0
    num_interop_threads: int = 0
    # deterministic: torch.use_deterministic_algorithms(True, warn_only=True) on CPU.
    deterministic: bool = True
    # ssim_impl: how the loss's SSIM filters. "pytorch_msssim" (its depthwise conv2d) or
    # "separable" (the same 11-tap Gaussian as shifted multiply-adds; same math, equal to
    # ~1e-7). "auto": separable when compile is on (inductor fuses it into a few loops;
    # oneDNN's single-channel depthwise conv and its backward are very slow on CPU),
    # pytorch_msssim otherwise (eager shift-and-add is no faster).
    ssim_impl: str = "auto"
    # augmentation: off by default (the paper has none); see training/augment.py, e.g.
    # {hflip: true, vflip: true, rot90: true, rotation_degrees: 10, shift_fraction: 0.03}
    augmentation: dict = field(default_factory=dict)
    eval_batch_size: int = 32
    checkpoint_every: int = 1
    # and only when at least checkpoint_seconds passed since the last save (0: every time)
    checkpoint_seconds: float = 60.0
    # state_dir: where the training node keeps the crash-safe state (training/state.py);
    # checkpoint_path: the exact file this loop writes (None: none). resume: auto | never.
    state_dir: str | None = None
    checkpoint_path: str | None = None
    resume: str = "auto"
    resume_from: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.batch_size) < 2:
            raise ValueError(
                f"training.batch_size must be >= 2 (got {self.batch_size}): BatchNorm cannot "
                "normalise a single image in training mode."
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"training.{name} must be >= 1 (got {getattr(self, name)})")
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be > 0 (got {self.learning_rate})")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"training.compile_mode must be one of {COMPILE_MODES} (got {self.compile_mode!r})"
            )
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise ValueError(
                f"training.optimizer_impl must be one of {OPTIMIZER_IMPLS} (got {self.optimizer_impl!r})"
            )
        if self.ssim_impl not in SSIM_IMPLS:
            raise ValueError(f"training.ssim_impl must be one of {SSIM_IMPLS} (got {self.ssim_impl!r})")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"training.checkpoint_seconds must be >= 0 (got {self.checkpoint_seconds})")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"training.resume must be 'auto' or 'never' (got {self.resume!r})")
        for name in ("num_threads", "num_interop_threads"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"training.{name} must be >= 0 (got {getattr(self, name)})")

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        return from_settings(cls, data, "training")


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
            x = unit_float(data[sl])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                recon = model(x)
            total += loss_fn(x, recon) * x.shape[0]
    return float(total) / len(data)


def _compact(images: torch.Tensor) -> torch.Tensor:
    """uint8 as is; any float dtype as float32."""
    return images if images.dtype == torch.uint8 else images.float()


def build_loss(config: TrainingConfig) -> HybridLoss:
    impl = config.ssim_impl
    if impl == "auto":
        impl = "separable" if config.compile else "pytorch_msssim"
    cls = SeparableHybridLoss if impl == "separable" else HybridLoss
    return cls(config.mse_weight, config.ssim_weight)


@dataclass
class TrainingSetup:
    """Everything one optimisation step needs; built by :func:`prepare_training`.

    ``train_step(x)`` runs forward (under the configured autocast), the hybrid loss
    (float32), backward and the Adam step, and returns the detached loss without a
    host synchronisation. It is THE step of :func:`train_autoencoder`, and the one
    ``python -m anomaly_ae.benchmark`` times.
    """

    model: nn.Module
    loss_fn: HybridLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    train_step: Callable[[torch.Tensor], torch.Tensor]
    optimizer_flags: dict[str, Any]


def apply_thread_settings(num_threads: int = 0, num_interop_threads: int = 0) -> None:
    """Set torch's CPU thread pools (0 keeps the current setting). Process-wide."""
    if num_threads and torch.get_num_threads() != num_threads:
        torch.set_num_threads(int(num_threads))
    if num_interop_threads and torch.get_num_interop_threads() != num_interop_threads:
        try:
            torch.set_num_interop_threads(int(num_interop_threads))
        except RuntimeError:  # only settable before the first inter-op parallel work
            log.warning(
                "num_interop_threads=%d ignored: torch's inter-op pool already started", num_interop_threads
            )


def _fused_adam_available(device: torch.device) -> bool:
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.Adam([probe], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def optimizer_flags(impl: str, device: torch.device) -> dict[str, Any]:
    """Adam implementation flags for ``impl`` (see ``TrainingConfig.optimizer_impl``).

    All three compute the same Adam update; fused runs one kernel over all parameters
    (CUDA and, since torch 2.4, CPU), foreach batches per-op, loop is per tensor.
    """
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") and _fused_adam_available(device) else "foreach"
    if impl == "fused":
        return {"fused": True, "foreach": False}
    if impl == "foreach":
        return {"fused": False, "foreach": True}
    return {"fused": False, "foreach": False}


def _set_optimizer_impl_flags(optimizer: torch.optim.Optimizer, flags: dict[str, Any]) -> None:
    for group in optimizer.param_groups:
        group.update(flags)


def make_train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    compile: bool = False,
    compile_mode: str = "auto",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training step: forward under autocast, loss in float32, backward, optimizer step.

    With ``compile`` the forward *and* the loss (the SSIM filtering included) are one
    ``torch.compile`` graph (AOTAutograd compiles the matching backward); the optimizer
    step stays eager (fused Adam is already a single kernel). Shapes are specialised
    (``dynamic=False``): a differently sized final batch compiles once more.
    Returns the detached loss; nothing here forces a host synchronisation (except the
    fp16 GradScaler's inf check).
    """
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)

    def forward_loss(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            recon = model(x)
        return loss_fn(x, recon)

    mode = resolve_compile_mode(compile_mode, device)
    cudagraphs = compile and mode in ("reduce-overhead", "max-autotune")  # resolved: CUDA only
    if compile:
        forward_loss = torch.compile(forward_loss, mode=mode, dynamic=False)

    def train_step(x: torch.Tensor) -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = forward_loss(x)
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss = loss.detach()
        return loss.clone() if cudagraphs else loss  # a CUDA-graph output is overwritten on replay

    return train_step


def prepare_training(
    model_config: AutoencoderConfig, config: TrainingConfig, device: torch.device | None = None
) -> TrainingSetup:
    """Seed, build the model (on ``device``, in the configured memory format), the loss,
    Adam, the GradScaler and the training step, exactly as :func:`train_autoencoder` does."""
    device = device or resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    apply_thread_settings(config.num_threads, config.num_interop_threads)
    if device.type == "cpu" and config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if config.compile and device.type == "cuda" and not config.channels_last:
        log.warning(
            "training.channels_last=false with training.compile on CUDA: on an H200 (torch 2.11) the "
            "compiled fp32 step in compile_mode 'default' failed in inductor's convolution backward "
            "(a stride assertion). If it fails here, set training.channels_last: true (the default) "
            "or training.compile: false."
        )
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(config)
    flags = optimizer_flags(config.optimizer_impl, device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, **flags
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    step = make_train_step(
        model,
        loss_fn,
        optimizer,
        device=device,
        dtype=dtype,
        scaler=scaler,
        compile=config.compile,
        compile_mode=config.compile_mode,
    )
    return TrainingSetup(model, loss_fn, optimizer, scaler, device, dtype, step, flags)


def train_one_epoch(
    setup: TrainingSetup,
    train_data: torch.Tensor,
    slices: list[slice],
    *,
    epoch: int,
    config: TrainingConfig,
) -> torch.Tensor:
    """One epoch over ``train_data`` (already on the device; uint8 0..255 or float in
    [0, 1]): reshuffle with a generator seeded by ``seed + epoch``, then
    :attr:`TrainingSetup.train_step` per batch. Only the current batch is made float32 (and
    augmented), so a uint8 cache is never expanded whole. Returns the per-step losses as a
    device tensor (read it once per epoch: one sync)."""
    device = setup.device
    torch.manual_seed(config.seed + epoch)  # dropout masks: same per epoch on resume
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(config.seed + epoch))
    order = order.to(device)
    augmentation = AugmentationConfig.from_dict(config.augmentation)
    # a fresh random view of every image each epoch (seeded per epoch: same on resume)
    views = torch.Generator().manual_seed(config.seed * 7919 + epoch) if augmentation.enabled else None
    step_losses = torch.empty(len(slices), device=device)
    setup.model.train()
    for step, sl in enumerate(slices):
        x = unit_float(train_data[order[sl]])
        if views is not None:
            x = augment_batch(x, augmentation, views)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step_losses[step] = setup.train_step(x)  # no host sync per step
    return step_losses


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
    stopped_early: bool = False,
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
        "stopped_early": stopped_early,
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
    setup = prepare_training(model_config, config)
    device, dtype, model, loss_fn, optimizer = (
        setup.device,
        setup.dtype,
        setup.model,
        setup.loss_fn,
        setup.optimizer,
    )

    history: list[dict[str, float]] = []
    start_epoch = 1
    best_val, best_epoch, best_state = math.inf, 0, None
    if resume_checkpoint is not None:
        validate_checkpoint(resume_checkpoint, "training.resume_from")
        saved_cfg = resume_checkpoint["model_config"]
        if AutoencoderConfig.from_dict(saved_cfg) != model.config:
            raise ValueError(
                f"training.resume_from holds a model {saved_cfg}, which differs from the "
                f"configured {model.config.to_dict()}; resume with the same model settings."
            )
        # a finished run's checkpoint holds the best epoch's weights (restore_best) and, when
        # they are not the last epoch's, the last ones apart: training goes on from where it
        # stopped, as if it had never stopped
        last_state = resume_checkpoint.get("last_model_state")
        model.load_state_dict(last_state if last_state is not None else resume_checkpoint["model_state"])
        if resume_checkpoint.get("optimizer_state"):
            optimizer.load_state_dict(resume_checkpoint["optimizer_state"])
            # load_state_dict also restores the saved implementation flags; keep the configured one.
            _set_optimizer_impl_flags(optimizer, setup.optimizer_flags)
        history = list(resume_checkpoint.get("history", []))
        start_epoch = int(resume_checkpoint["epoch"]) + 1
        best_val = float(resume_checkpoint.get("best_val_loss", math.inf))
        best_epoch = int(resume_checkpoint.get("best_epoch", 0))
        best_state = resume_checkpoint.get("best_model_state")
        if best_state is None and (last_state is not None or best_epoch == start_epoch - 1):
            best_state = resume_checkpoint["model_state"]  # these weights are the best epoch's
        if resume_checkpoint.get("stopped_early"):  # finished: nothing left to train
            start_epoch = config.epochs + 1
        log.info("Resuming from epoch %d", start_epoch)

    # uint8 caches stay uint8 on the device (a quarter of float32); batches become float
    train_data = _compact(train_images).to(device=device)
    val_data = _compact(val_images).to(device=device) if val_images is not None and len(val_images) else None
    n_train = len(train_data)
    if n_train < 2:
        raise ValueError(f"Need at least 2 training images, got {n_train}.")
    patience = int(config.early_stopping_patience or 0)
    use_early_stopping = val_data is not None and patience > 0
    epochs_without_improvement = (start_epoch - 1 - best_epoch) if best_epoch else 0
    stopped_early = bool(resume_checkpoint.get("stopped_early")) if resume_checkpoint else False
    slices = batch_slices(n_train, config.batch_size)
    last_saved = time.monotonic()

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
        step_losses = train_one_epoch(setup, train_data, slices, epoch=epoch, config=config)
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
        stopped_early = stop
        due = (
            epoch % max(config.checkpoint_every, 1) == 0
            and time.monotonic() - last_saved >= config.checkpoint_seconds
        )
        if config.checkpoint_path and (due or last_epoch or stop):
            save_checkpoint_atomic(
                build_checkpoint(
                    model,
                    optimizer,
                    epoch=epoch,
                    history=history,
                    config=config,
                    best_state=best_state,
                    best_epoch=best_epoch,
                    best_val_loss=best_val,
                    stopped_early=stop,
                    metadata=metadata,
                ),
                config.checkpoint_path,
            )
            last_saved = time.monotonic()
        if stop:
            log.info("Early stopping at epoch %d (best epoch %d, loss %.5f)", epoch, best_epoch, best_val)
            break
    bar.close()

    final_epoch = history[-1]["epoch"] if history else start_epoch - 1
    last_state = None
    if config.restore_best and best_state is not None and best_epoch != final_epoch:
        last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        log.info("Restored the weights of the best epoch %d", best_epoch)
    model.eval()
    checkpoint = build_checkpoint(
        model,
        optimizer,
        epoch=int(final_epoch),
        history=history,
        config=config,
        best_state=None,
        best_epoch=best_epoch,
        best_val_loss=best_val,
        stopped_early=stopped_early,
        metadata=metadata,
    )
    checkpoint["last_model_state"] = last_state  # what training.resume_from goes on from
    return TrainingResult(
        model=model.cpu().to(memory_format=torch.contiguous_format),  # the layout build_model gives
        history=history,
        checkpoint=checkpoint,
        device=str(device),
        best_epoch=best_epoch,
        stopped_early=stopped_early,
    )
