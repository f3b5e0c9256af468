import numpy as np
import pytest
import torch

from anomaly_ae.evaluation.inference import MapSettings, model_from_checkpoint, reconstruct_and_score
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.training.checkpoint import CheckpointError
from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    return build_checkpoint(
        build_model(AutoencoderConfig(image_size=64)).eval(),
        None,
        epoch=1,
        history=[],
        config=TrainingConfig(),
    )


def test_checkpoint_of_another_image_size_is_refused(checkpoint):
    with pytest.raises(CheckpointError, match="64px.*256px|preprocessing.image_size"):
        model_from_checkpoint(checkpoint, image_size=256)


def test_checkpoint_of_another_architecture_is_refused(checkpoint):
    other = dict(checkpoint, model_config={**checkpoint["model_config"], "architecture": "something_else"})
    with pytest.raises((CheckpointError, ValueError), match="architecture"):
        model_from_checkpoint(other, AutoencoderConfig(image_size=64))
    with pytest.raises(CheckpointError, match="architecture"):
        model_from_checkpoint(checkpoint, AutoencoderConfig(image_size=64, architecture="paper_table1_v2"))


def test_reconstruct_and_score_outputs(checkpoint):
    model = model_from_checkpoint(checkpoint, image_size=64)
    images = np.random.default_rng(0).random((5, 1, 64, 64), dtype=np.float32)
    out = reconstruct_and_score(model, images, MapSettings(), batch_size=2, device="cpu", precision="fp32")
    assert out["recon"].shape == (5, 1, 64, 64) and out["map"].shape == (5, 64, 64)
    for key in ("ssim", "mse", "score"):
        assert out[key].shape == (5,) and np.isfinite(out[key]).all()
    assert np.allclose(
        out["score"], out["map"].reshape(5, -1).max(axis=1), atol=1e-6
    )  # default: max of the map
    assert np.allclose(out["mse"], ((images - out["recon"]) ** 2).mean(axis=(1, 2, 3)), atol=1e-6)
