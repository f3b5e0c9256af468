import pytest
import torch

from anomaly_ae.training.augment import AugmentationConfig, augment_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert torch.equal(x, _batch()), "the input was modified"


def test_resampling_stays_within_the_input_range():
    """Bilinear sampling with border padding only averages input pixels: no overshoot (as
    bicubic would give) and no black corners (as zero padding would give)."""
    torch.manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(6, 1, 32, 32)  # values in [0.2, 0.8]
    cfg = AugmentationConfig(rotation_degrees=30, shift_fraction=0.1)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(4))
    assert not torch.equal(out, x)
    for i in range(len(x)):
        assert x[i].min() - 1e-6 <= out[i].min() and out[i].max() <= x[i].max() + 1e-6, i


def test_flips_are_exact_and_random_per_image():
    x = _batch()
    out = augment_batch(x, AugmentationConfig(hflip=True), torch.Generator().manual_seed(5))
    flipped = [not torch.equal(out[i], x[i]) for i in range(len(x))]
    for i in range(len(x)):
        assert torch.equal(out[i], x[i].flip(-1) if flipped[i] else x[i]), i
    assert 0 < sum(flipped) < len(x)  # some images flipped, some not (seed 5)


def test_rot90_is_an_exact_permutation_of_pixels():
    x = _batch()
    out = augment_batch(x, AugmentationConfig(rot90=True), torch.Generator().manual_seed(3))
    for i in range(len(x)):
        candidates = [torch.rot90(x[i], k, dims=(-2, -1)) for k in range(4)]
        assert min(float((out[i] - c).abs().max()) for c in candidates) < 1e-5


def test_rotations_of_non_square_images_are_refused_and_flips_and_shifts_kept():
    x = torch.rand(2, 1, 16, 32)
    g = torch.Generator().manual_seed(0)
    for config in (AugmentationConfig(rot90=True), AugmentationConfig(rotation_degrees=5)):
        with pytest.raises(ValueError, match=r"rot90 / rotation_degrees need square images.*16x32"):
            augment_batch(x, config, g)
    out = augment_batch(x, AugmentationConfig(hflip=True, vflip=True, shift_fraction=0.1), g)
    assert out.shape == x.shape


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
            epochs=2,
            batch_size=4,
            progress=False,
            device="cpu",
            precision="fp32",
            compile=False,
            augmentation=augmentation,
        )
        return [
            r["train_loss"]
            for r in train_autoencoder(images, None, AutoencoderConfig(image_size=64), cfg).history
        ]

    augmented = losses(aug)
    assert losses(aug) == augmented
    assert losses({}) != augmented
