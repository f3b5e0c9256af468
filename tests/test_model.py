"""Tests for the paper's convolutional autoencoder (Table I) in anomaly_ae.model.autoencoder."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from anomaly_ae.model import AutoencoderConfig, ConvAutoencoder, build_model, count_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PAPER_PARAMETERS = 9_026_241


def _expected_parameters(
    image_size: int = 256,
    in_channels: int = 1,
    filters: tuple[int, ...] = (16, 32, 64, 128),
    latent: int = 128,
    k: int = 5,
    final_k: int = 3,
) -> int:
    """Parameter count of Table I, from the layer shapes alone (no model involved)."""
    total = 0
    # Encoder: Conv2D k x k (weights in*out*k*k + bias out), each followed by BatchNorm
    # (gamma + beta: 2 * features; the running statistics are buffers, not parameters).
    channels = in_channels
    for f in filters:
        total += channels * f * k * k + f
        total += 2 * f
        channels = f
    side = image_size // 2 ** len(filters)
    flat = channels * side * side
    total += flat * latent + latent  # Dense -> latent
    total += latent * flat + flat  # Dense latent -> flat
    total += 2 * flat  # BatchNorm1d on the flat vector
    # Decoder: Conv2DTranspose k x k mirrored (weights in*out*k*k + bias out) + BN.
    for f in reversed(filters[:-1]):
        total += channels * f * k * k + f
        total += 2 * f
        channels = f
    total += channels * in_channels * final_k * final_k + in_channels  # final transposed conv
    return total


def test_independent_count_formula_gives_the_paper_number():
    # Hand arithmetic for 256 px, so the formula above is itself checked against a constant.
    encoder = (1 * 16 * 25 + 16) + (16 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (64 * 128 * 25 + 128)
    bn2d = 2 * (16 + 32 + 64 + 128 + 64 + 32 + 16)
    dense = (32768 * 128 + 128) + (128 * 32768 + 32768) + 2 * 32768
    decoder = (128 * 64 * 25 + 64) + (64 * 32 * 25 + 32) + (32 * 16 * 25 + 16) + (16 * 1 * 9 + 1)
    assert encoder + bn2d + dense + decoder == PAPER_PARAMETERS
    assert _expected_parameters() == PAPER_PARAMETERS


def test_paper_config_parameter_count():
    model = build_model(AutoencoderConfig())
    assert count_parameters(model) == _expected_parameters() == PAPER_PARAMETERS
    assert count_parameters(model, trainable_only=False) == PAPER_PARAMETERS
    # Also a direct sum, in case count_parameters itself were wrong.
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMETERS


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(image_size=64),
        dict(image_size=128, encoder_filters=(8, 16, 32, 64), latent_dim=32),
        dict(image_size=32, kernel_size=3),
    ],
)
def test_parameter_count_other_configs(kwargs):
    cfg = AutoencoderConfig(**kwargs)
    expected = _expected_parameters(
        image_size=cfg.image_size,
        filters=cfg.encoder_filters,
        latent=cfg.latent_dim,
        k=cfg.kernel_size,
        final_k=cfg.final_kernel_size,
    )
    assert count_parameters(build_model(cfg)) == expected


def test_count_parameters_trainable_only():
    model = build_model(AutoencoderConfig(image_size=64))
    total = count_parameters(model)
    frozen = model.encoder[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    n_frozen = sum(p.numel() for p in frozen.parameters())
    assert n_frozen > 0
    assert count_parameters(model) == total - n_frozen
    assert count_parameters(model, trainable_only=False) == total


def test_output_shape_and_sigmoid_range_paper_size():
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig()).eval()
    x = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, 256, 256)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert (y > 0).all() and (y < 1).all()
    assert isinstance(model.decoder[-1], nn.Sigmoid)


def test_output_shape_train_mode_small():
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=64)).train()
    y = model(torch.rand(3, 1, 64, 64))
    assert y.shape == (3, 1, 64, 64)
    assert (y > 0).all() and (y < 1).all()


def test_encoder_spatial_sizes_halve():
    model = build_model(AutoencoderConfig())
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    h = torch.zeros(1, 1, 256, 256)
    sides = []
    with torch.no_grad():
        for conv in convs:
            h = conv(h)
            sides.append(h.shape[-1])
    assert sides == [128, 64, 32, 16]
    tconvs = [m for m in model.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [t.out_channels for t in tconvs] == [64, 32, 16, 1]
    assert [t.kernel_size for t in tconvs] == [(5, 5)] * 3 + [(3, 3)]


def _assert_act_norm_drop(seq: list[nn.Module], start: int, features: int, norm_cls) -> None:
    act, norm, drop = seq[start : start + 3]
    assert isinstance(act, nn.LeakyReLU), f"expected LeakyReLU at {start}, got {act}"
    assert act.negative_slope == pytest.approx(0.3)
    assert type(norm) is norm_cls, f"expected {norm_cls.__name__} at {start + 1}, got {norm}"
    assert norm.num_features == features
    assert norm.eps == pytest.approx(1e-3)
    assert norm.momentum == pytest.approx(0.01)
    assert isinstance(drop, nn.Dropout), f"expected Dropout at {start + 2}, got {drop}"
    assert drop.p == pytest.approx(0.2)


def test_layer_order_after_each_conv():
    model = build_model(AutoencoderConfig())
    enc = list(model.encoder)
    conv_idx = [i for i, m in enumerate(enc) if isinstance(m, nn.Conv2d)]
    assert len(conv_idx) == 4
    for i in conv_idx:
        _assert_act_norm_drop(enc, i + 1, enc[i].out_channels, nn.BatchNorm2d)
    assert isinstance(enc[-2], nn.Flatten) and isinstance(enc[-1], nn.Linear)
    assert enc[-1].in_features == 128 * 16 * 16

    dense = list(model.decoder_dense)
    assert isinstance(dense[0], nn.Linear) and dense[0].out_features == 128 * 16 * 16
    _assert_act_norm_drop(dense, 1, 128 * 16 * 16, nn.BatchNorm1d)

    dec = list(model.decoder)
    tconv_idx = [i for i, m in enumerate(dec) if isinstance(m, nn.ConvTranspose2d)]
    assert len(tconv_idx) == 4
    for i in tconv_idx[:-1]:
        _assert_act_norm_drop(dec, i + 1, dec[i].out_channels, nn.BatchNorm2d)
    # The last transposed conv goes straight into the sigmoid: no activation/BN/dropout.
    assert tconv_idx[-1] == len(dec) - 2
    assert isinstance(dec[-1], nn.Sigmoid)
    # Exactly 8 BatchNorms/Dropouts in total (4 encoder, 1 dense, 3 decoder).
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 8


def test_latent_dimension():
    model = build_model(AutoencoderConfig()).eval()
    with torch.no_grad():
        z = model.encode(torch.rand(3, 1, 256, 256))
        assert z.shape == (3, 128)
        assert model.decode(z).shape == (3, 1, 256, 256)


def test_latent_dimension_small_custom():
    model = build_model(AutoencoderConfig(image_size=64, latent_dim=20)).eval()
    with torch.no_grad():
        assert model.encode(torch.rand(2, 1, 64, 64)).shape == (2, 20)


@pytest.mark.parametrize("size", [100, 250, 8, 264 + 1])
def test_invalid_image_size(size):
    with pytest.raises(ValueError, match=r"model\.image_size"):
        AutoencoderConfig(image_size=size)
    with pytest.raises(ValueError, match=r"model\.image_size"):
        build_model({"image_size": size})


def test_valid_image_sizes_divisible_by_16():
    for size in (16, 48, 64, 272):
        assert AutoencoderConfig(image_size=size).bottleneck_shape == (size // 16, size // 16)


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="architecture"):
        build_model(AutoencoderConfig(architecture="resnet50"))
    with pytest.raises(ValueError, match="paper_table1"):
        build_model({"architecture": "unet"})


def test_unknown_setting_raises():
    with pytest.raises(ValueError, match="nonsense"):
        AutoencoderConfig.from_dict({"image_size": 64, "nonsense": 1})


def test_config_round_trip():
    cfg = AutoencoderConfig(
        image_size=64, encoder_filters=[8, 16, 32, 64], latent_dim=32, dropout=0.1, extra={"note": "x"}
    )
    assert cfg.encoder_filters == (8, 16, 32, 64)
    data = cfg.to_dict()
    assert data["encoder_filters"] == [8, 16, 32, 64]
    assert data["image_size"] == 64 and data["latent_dim"] == 32
    # through JSON, as it would be stored in a checkpoint or parameters file
    back = AutoencoderConfig.from_dict(json.loads(json.dumps(data)))
    assert back == cfg
    assert back.to_dict() == data
    assert AutoencoderConfig.from_dict(AutoencoderConfig().to_dict()) == AutoencoderConfig()
    assert back != AutoencoderConfig(image_size=64)


def test_build_model_defaults_and_dict():
    assert isinstance(build_model(), ConvAutoencoder)
    assert build_model().config == AutoencoderConfig()
    model = build_model({"image_size": 64, "latent_dim": 16})
    assert model.config == AutoencoderConfig(image_size=64, latent_dim=16)


# --- tiles: the same Table I network per tile of a larger image --------------------------


def test_tiles_round_trip_and_order():
    from anomaly_ae.model.autoencoder import to_tiles, untile

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tiles = to_tiles(images, 2)
    assert tiles.shape == (8, 3, 4, 4)
    # row by row within each image: tile 1 of image 0 is its top-right quarter
    assert torch.equal(tiles[1], images[0, :, :4, 4:])
    assert torch.equal(tiles[6], images[1, :, 4:, :4])
    assert torch.equal(untile(tiles, 2), images)


def _tiles_match_the_plain_network(image_size, batch: int, seed: int):
    """A model of ``image_size`` on 64 px tiles has the 64 px network's parameters, and each
    tile of its output is that network's reconstruction of the tile; ``(tiled, x, out)``."""
    tiled = build_model({"image_size": image_size, "tile_size": 64, "latent_dim": 16}).eval()
    plain = build_model({"image_size": 64, "latent_dim": 16}).eval()
    assert count_parameters(tiled) == count_parameters(plain) == _expected_parameters(64, latent=16)
    plain.load_state_dict(tiled.state_dict())
    rows, cols = tiled.config.tile_grid
    x = torch.rand(batch, 1, 64 * rows, 64 * cols, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = tiled(x)
        assert out.shape == x.shape
        for row in range(rows):
            for col in range(cols):
                sl = (
                    slice(None),
                    slice(None),
                    slice(64 * row, 64 * row + 64),
                    slice(64 * col, 64 * col + 64),
                )
                torch.testing.assert_close(out[sl], plain(x[sl]), rtol=0, atol=1e-6)
    return tiled, x, out


def test_tiled_model_reconstructs_each_tile_with_the_one_network():
    """A tiled model has exactly the paper network's parameters at tile size, and its
    output is that network's reconstruction of each tile, put back in place."""
    tiled, x, out = _tiles_match_the_plain_network(128, batch=2, seed=0)
    # a tile that changes changes only its own part of the reconstruction
    y = x.clone()
    y[:, :, :64, :64] = 0.5
    with torch.no_grad():
        moved = (tiled(y) - out).abs().amax(dim=(0, 1))
    assert moved[:64, :64].max() > 0
    assert moved[64:, :].max() == 0 and moved[:, 64:].max() == 0


def test_non_square_images_run_on_a_grid_of_tiles_of_the_paper_network():
    """image_size [height, width]: a 64x128 image is a 1x2 grid of 64 px tiles, each the
    paper network's reconstruction of that tile (same parameters as a 64 px model)."""
    tiled, _, _ = _tiles_match_the_plain_network([64, 128], batch=3, seed=1)
    assert tiled.config.tile_grid == (1, 2) and tiled.config.shape == (64, 128)
    cfg = tiled.config
    assert cfg.describe() == "paper_table1, 64x128 px (height x width) as 1x2 tiles of 64 px"
    assert cfg.to_dict()["image_size"] == [64, 128]
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert AutoencoderConfig.from_dict({**cfg.to_dict(), "image_size": "64+128"}) == cfg
    # a square given as [s, s] is stored as its side: configs of square models are unchanged
    assert AutoencoderConfig(image_size=[256, 256]) == AutoencoderConfig()
    assert AutoencoderConfig(image_size=[256, 256]).to_dict() == AutoencoderConfig().to_dict()
    # without tiles the network takes the whole non-square image (a wider dense layer)
    whole = build_model({"image_size": [32, 64], "latent_dim": 8}).eval()
    with torch.no_grad():
        assert whole(torch.rand(2, 1, 32, 64)).shape == (2, 1, 32, 64)
    with pytest.raises(ValueError, match=r"model\.tile_size=48 must divide model\.image_size=\[64, 128\]"):
        AutoencoderConfig(image_size=[64, 128], tile_size=48)
    with pytest.raises(ValueError, match=r"model\.image_size=\[64, 120\] must be divisible by 16"):
        AutoencoderConfig(image_size=[64, 120])
    with pytest.raises(ValueError, match=r"model\.image_size: .*\[height, width\]"):
        AutoencoderConfig(image_size=[64])


def test_tile_size_validation_and_checkpoint_round_trip():
    with pytest.raises(ValueError, match=r"model\.tile_size=96 must divide model\.image_size=256"):
        AutoencoderConfig(image_size=256, tile_size=96)
    with pytest.raises(ValueError, match=r"model\.tile_size=40 must be divisible by 16"):
        AutoencoderConfig(image_size=80, tile_size=40)
    # one tile the size of the image is the paper's network
    assert AutoencoderConfig(image_size=256, tile_size=256) == AutoencoderConfig()
    cfg = AutoencoderConfig(image_size=512, tile_size=256)
    assert (cfg.tile_grid, cfg.bottleneck_shape) == ((2, 2), (16, 16))
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # an untiled model's stored config is the one written before tiles existed (same
    # checkpoints, same training-state keys), and such configs load as before
    old = AutoencoderConfig().to_dict()
    assert "tile_size" not in old and cfg.to_dict()["tile_size"] == 256
    assert AutoencoderConfig.from_dict(old) == AutoencoderConfig()
    assert AutoencoderConfig.from_dict({**old, "tile_size": None}) == AutoencoderConfig()
