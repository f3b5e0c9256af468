import pytest
import torch

from anomaly_ae.training.augment import AugmentationConfig, augment_batch


def _batch():
    torch.manual_seed(0)
    return torch.rand(6, 1, 32, 32)


def test_off_by_default_returns_the_input():
    x = _batch()
    assert augment_batch(x, AugmentationConfig(), torch.Generator().manual_seed(0)) is x


def test_seeded_and_shape_preserving():
    x = _batch()
    cfg = AugmentationConfig(hflip=True, vflip=True, rot90=True, rotation_degrees=10, shift_fraction=0.05)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1


def test_rot90_is_an_exact_permutation_of_pixels():
    x = _batch()
    out = augment_batch(x, AugmentationConfig(rot90=True), torch.Generator().manual_seed(3))
    for i in range(len(x)):
        candidates = [torch.rot90(x[i], k, dims=(-2, -1)) for k in range(4)]
        assert min(float((out[i] - c).abs().max()) for c in candidates) < 1e-5


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="rotate"):
        AugmentationConfig.from_dict({"rotate": 3})


def test_training_with_augmentation_is_seeded_and_differs_from_plain():
    from anomaly_ae.model import AutoencoderConfig
    from anomaly_ae.training.trainer import TrainingConfig, train_autoencoder

    torch.manual_seed(0)
    images = torch.rand(10, 1, 64, 64)
    aug = {"hflip": True, "rot90": True, "rotation_degrees": 5}

    def losses(augmentation):
        cfg = TrainingConfig(
            epochs=2, batch_size=4, progress=False, device="cpu", precision="fp32", augmentation=augmentation
        )
        return [
            r["train_loss"]
            for r in train_autoencoder(images, None, AutoencoderConfig(image_size=64), cfg).history
        ]

    assert losses(aug) == losses(aug)
    assert losses(aug) != losses({})
