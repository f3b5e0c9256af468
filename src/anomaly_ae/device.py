"""Device and numeric-precision selection."""

from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, else Apple MPS, else CPU; an explicit name must be available."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"training.device={name!r} is not one of {DEVICES} (or 'cuda:N')")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("training.device='mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the convolutions, or None for plain float32.

    ``auto``: bf16 on CUDA when supported (else fp16); bf16 on a CPU with native bf16
    instructions (AVX512-BF16 / AMX, where oneDNN runs bf16 convolutions fast); float32
    elsewhere. SSIM and the loss are always computed in float32 (see HybridLoss); the
    accuracy guard (tests/test_fast_path.py) bounds the difference to fp32.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {PRECISIONS}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_compile_mode(name: str, device: torch.device) -> str:
    """The ``torch.compile`` mode to use on ``device``.

    ``auto``: ``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` elsewhere. On an H200
    (torch 2.11, bf16, NCHW) reduce-overhead trained at 3757 images/s against 1146 for default
    mode (README "GPU"). Modes that capture CUDA graphs fall back to their no-graph twin off CUDA.
    """
    if name not in COMPILE_MODES:
        raise ValueError(f"compile_mode {name!r} is not one of {COMPILE_MODES}")
    if name == "auto":
        return "reduce-overhead" if device.type == "cuda" else "default"
    if device.type != "cuda" and name == "reduce-overhead":
        return "default"
    if device.type != "cuda" and name == "max-autotune":
        return "max-autotune-no-cudagraphs"
    return name


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` on ``device`` (a no-op for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN reports native bf16 support on this CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
