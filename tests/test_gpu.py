"""The CUDA path, on a GPU: training, its speed levers, scoring and the checkpoint's way back to a CPU.

Skipped where CUDA is not available (CI and this project's 2-core development machine);
run on a GPU machine with ``python -m pytest -m gpu``. Each test compares the CUDA path
with a path whose correctness the CPU tests already establish (tests/test_fast_path.py):
the same seed, the same synthetic images, the same few Adam steps.

Tolerances. On CUDA, float32 convolutions may run in TF32 (cuDNN's default in PyTorch:
``torch.backends.cudnn.allow_tf32``), a 10-bit mantissa, so "fp32" on a GPU is not bit-for-bit
the CPU's fp32; cuDNN also picks other algorithms (other summation orders). After 4 Adam
steps the loss is therefore compared to the CPU's with the bf16 tolerance of
tests/test_fast_path.py (1e-2 relative), still ~5x smaller than the loss change over those
steps; scores with 2e-2 absolute (scores live in [0, 1]).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_fast_path import BF16_REL_TOL, MODEL, PLAIN, _assert_close, _images

from anomaly_ae.inspect import Inspector
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint_atomic
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.inference import fit_normal_reference, reconstruct_and_score
from anomaly_ae.training.trainer import TrainingConfig, train_autoencoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on one)"),
]

BASE = dict(epochs=2, batch_size=8, seed=0, progress=False, early_stopping_patience=0)
SCORE_ATOL = 2e-2


def _train(device: str, **levers) -> tuple[list[float], object]:
    config = TrainingConfig(**{**BASE, **PLAIN, "device": device, **levers})
    result = train_autoencoder(_images(16), _images(8, seed=9), MODEL, config)
    return [row["train_loss"] for row in result.history], result


@pytest.fixture(scope="module")
def cpu_losses() -> list[float]:
    losses, _ = _train("cpu")
    assert losses[-1] < losses[0]  # it does train
    return losses


@pytest.fixture(scope="module")
def cuda_eager_losses() -> list[float]:
    losses, result = _train("cuda")
    assert result.device.startswith("cuda")
    return losses


def test_cuda_fp32_training_matches_cpu(cpu_losses, cuda_eager_losses):
    _assert_close(cuda_eager_losses, cpu_losses, BF16_REL_TOL)


def test_cuda_defaults_bf16_fused_channels_last_match_cpu(cpu_losses):
    """What ``device: auto`` and ``precision: auto`` choose on a GPU: bf16 autocast, fused
    Adam, channels_last (eager here; compiled below)."""
    losses, result = _train("auto", precision="auto", channels_last=True, optimizer_impl="auto")
    assert result.device.startswith("cuda")
    _assert_close(losses, cpu_losses, 2 * BF16_REL_TOL)  # bf16 rounding on top of TF32/cuDNN order


def test_cuda_configured_defaults_train_like_cpu(cpu_losses):
    """TrainingConfig's own levers (those conf/base sets) on a GPU: bf16 autocast,
    channels_last, fused Adam, separable SSIM and torch.compile in mode ``auto``, which is
    reduce-overhead (CUDA graphs) on CUDA."""
    config = TrainingConfig(**BASE)
    result = train_autoencoder(_images(16), _images(8, seed=9), MODEL, config)
    assert result.device.startswith("cuda")
    _assert_close([row["train_loss"] for row in result.history], cpu_losses, 2 * BF16_REL_TOL)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_step_matches_eager(cuda_eager_losses, mode):
    """torch.compile of forward + loss (separable SSIM); reduce-overhead replays CUDA graphs,
    whose outputs are overwritten on replay (the step clones the loss)."""
    losses, _ = _train("cuda", compile=True, compile_mode=mode, channels_last=True, optimizer_impl="fused")
    _assert_close(losses, cuda_eager_losses, BF16_REL_TOL)


def test_cuda_scoring_matches_cpu():
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig()).eval()
    images = _images(8, seed=3)
    settings = MapSettings(smoothing_sigma=4.0, normal_reference="zscore")
    kwargs = dict(batch_size=4, precision="fp32")
    ref_cpu = fit_normal_reference(model, _images(6, seed=4), settings, device="cpu", **kwargs)
    ref_gpu = fit_normal_reference(model, _images(6, seed=4), settings, device="cuda", **kwargs)
    cpu = reconstruct_and_score(model, images, settings, device="cpu", reference=ref_cpu, **kwargs)
    gpu = reconstruct_and_score(model, images, settings, device="cuda", reference=ref_gpu, **kwargs)
    np.testing.assert_allclose(gpu["recon"], cpu["recon"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(gpu["ssim"], cpu["ssim"], atol=SCORE_ATOL, rtol=0)
    # z-scores divide by the normal spread, so their absolute error scales with 1/std
    np.testing.assert_allclose(gpu["score"], cpu["score"], rtol=5e-2, atol=5e-2)
    # a reference fitted on the GPU scores the same on the CPU (its arrays are host arrays)
    cross = reconstruct_and_score(model, images, settings, device="cpu", reference=ref_gpu, **kwargs)
    np.testing.assert_allclose(cross["score"], cpu["score"], rtol=5e-2, atol=5e-2)


def test_checkpoint_trained_on_cuda_deploys_on_cpu(tmp_path):
    """Train on the GPU, save, load with the project's loader (map_location cpu) and score
    with the Inspector on the CPU and on the GPU: the same verdicts."""
    _, result = _train("cuda", epochs=1)
    path = save_checkpoint_atomic(result.checkpoint, tmp_path / "model.pt")
    checkpoint = load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in checkpoint["model_state"].values() if torch.is_tensor(t))
    model = model_from_checkpoint(checkpoint)
    assert next(model.parameters()).device.type == "cpu"
    images = (_images(6, seed=7)[:, 0].numpy() * 255).astype(np.uint8)
    from PIL import Image

    sources = [(f"img{i}.png", Image.fromarray(a)) for i, a in enumerate(images)]
    verdicts = {}
    for device in ("cpu", "cuda"):
        inspector = Inspector(checkpoint, threshold=0.5, device=device, precision="fp32", batch_size=4)
        verdicts[device] = list(inspector.inspect(sources))
    for a, b in zip(verdicts["cpu"], verdicts["cuda"], strict=True):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert math.isfinite(a.score) and abs(a.score - b.score) <= SCORE_ATOL, (a.score, b.score)


def test_resume_on_cuda_from_a_checkpoint_saved_there(cuda_eager_losses, tmp_path):
    """A crash-safe checkpoint written during CUDA training (Adam's moments on the GPU), read
    back through the loader (everything mapped to the CPU), goes on on the GPU: 1 + 1 epochs
    equal 2 straight (cuDNN's summation order may differ run to run: within tolerance)."""
    path = tmp_path / "state.pt"
    _train("cuda", epochs=1, checkpoint_path=str(path))
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 1
    config = TrainingConfig(**{**BASE, **PLAIN, "device": "cuda"})
    resumed = train_autoencoder(_images(16), _images(8, seed=9), MODEL, config, resume_checkpoint=checkpoint)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    _assert_close([row["train_loss"] for row in resumed.history], cuda_eager_losses, 1e-3)
