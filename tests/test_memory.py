"""The memory bank per place (anomaly_ae.scoring.memory): the nearest normal image's vector
within r positions, checked against a plain loop."""

import dataclasses

import numpy as np
import pytest
import torch

from anomaly_ae.scoring.memory import (
    memory_map,
    nearest_distance,
    pooled_images,
    pooled_patches,
    upsample_matrix,
)


def _brute_force(queries, bank, r, own):
    """The same distance by explicit loops (the bank's border replicated)."""
    b, _, h, w = queries.shape
    best = torch.full((b, h, w), float("inf"))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                for n in range(len(bank)):
                    if n == own[i]:
                        continue
                    for dy in range(-r, r + 1):
                        for dx in range(-r, r + 1):
                            yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                            gap = (queries[i, :, y, x] - bank[n, :, yy, xx]).norm()
                            best[i, y, x] = min(best[i, y, x], gap)
    return best


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearest_distance_matches_a_plain_loop(dtype):
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(5, 3, 7, 6, generator=gen)
    queries = torch.randn(4, 3, 7, 6, generator=gen)
    queries[0] = bank[1]  # a training image against the others: its own copy must not count
    own = np.array([1, -1, -1, 3])
    out = {r: nearest_distance(queries.to(dtype), bank, r, own) for r in (0, 1, 2)}
    for r in (0, 1, 2):
        assert out[r].dtype == dtype and out[r].shape == (4, 7, 6)
        expected = _brute_force(queries, bank, r, own).to(dtype)
        torch.testing.assert_close(out[r], expected, atol=1e-4, rtol=1e-4)
    assert (out[0][0] > 0).all()  # not matched to itself
    # a wider window is never farther
    assert (out[2] <= out[1] + 1e-6).all() and (out[1] <= out[0] + 1e-6).all()


def test_a_moved_look_is_found_within_its_move_and_a_new_one_is_not():
    gen = torch.Generator().manual_seed(1)
    bank = torch.rand(3, 9, 10, 10, generator=gen)
    moved = torch.roll(bank[2:3], shifts=(0, 1), dims=(2, 3))  # every look one position right
    moved = moved.double()
    inner = (slice(None), slice(None), slice(1, None))  # the rolled-in column has no match
    assert nearest_distance(moved, bank, 1)[inner].max() < 1e-6  # float64: the expansion rounds to ~0
    assert (nearest_distance(moved, bank, 0)[inner] > 1e-3).all()
    spot = moved.clone()
    spot[0, :, 5, 5] += 5.0  # a look no bank image has, anywhere
    assert nearest_distance(spot, bank, 1)[0, 5, 5] > 4.0


def test_upsample_matrix_is_pytorchs_bilinear_upsampling():
    small = torch.rand(2, 1, 5, 7, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(small, size=(19, 23), mode="bilinear", align_corners=False)
    got = upsample_matrix(19, 5) @ small[:, 0] @ upsample_matrix(23, 7).T
    torch.testing.assert_close(got, expected[:, 0])


def test_memory_map_is_far_at_a_spot_no_training_image_has():
    gen = torch.Generator().manual_seed(2)
    train = torch.rand(6, 1, 32, 32, generator=gen) * 0.2 + 0.4
    bank = pooled_images(train, 4).double()
    image = train[2:3].clone()
    image[..., 12:16, 12:16] = 1.0  # one bright 4x4 block
    own = np.array([2])  # scored as training image 2 against the others
    amap = memory_map(image, bank, 4, 1, own)[0, 0]
    assert amap.shape == (32, 32) and amap.dtype == torch.float64
    assert amap[12:16, 12:16].mean() > 2 * amap[:8].mean()
    # as one of the bank's own images without leaving itself out, it matches itself but at the spot
    assert memory_map(train[2:3], bank, 4, 1).abs().max() < 1e-6


def test_pooled_patches_are_each_average_with_its_neighbourhood():
    images = torch.arange(2 * 1 * 8 * 12, dtype=torch.float32).view(2, 1, 8, 12)
    patches = pooled_patches(images, 4)
    assert patches.shape == (2, 9, 2, 3)
    small = torch.nn.functional.avg_pool2d(images, 4)
    torch.testing.assert_close(patches[:, 4], small[:, 0])  # the centre of the 3x3 neighbourhood
    torch.testing.assert_close(patches[:, 5, :, :2], small[:, 0, :, 1:])  # its right neighbour
    torch.testing.assert_close(patches[:, 5, :, 2], small[:, 0, :, 2])  # replicated at the border
    assert pooled_patches(torch.rand(1, 3, 8, 8), 2).shape == (1, 27, 4, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nearest_distance(torch.rand(2, 3, 4, 4), torch.rand(2, 2, 4, 4), 1), "must share C, h, w"),
        (lambda: nearest_distance(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), -1), "radius"),
        (lambda: nearest_distance(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), 1, [0]), "own must"),
        (lambda: nearest_distance(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), 1, [0]), "besides"),
        (lambda: pooled_patches(torch.rand(1, 1, 4, 4), 8), "memory_pool must"),
        (lambda: memory_map(torch.rand(1, 1, 16, 16), torch.rand(3, 1, 3, 3), 4, 1), "refit"),
        (lambda: pooled_patches(torch.rand(4, 4), 2), r"\(N, C, H, W\)"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("channels", [1, 3])
def test_the_memory_channel_through_the_normal_reference_and_inference(channels):
    """Fitted as `kedro run --pipeline=evaluate` fits it (the bank: every training image's
    block averages, in the reference; each training image matched against the others), then
    scored by inference: a spot no training image has raises the score, in gray and colour."""
    from torch import nn

    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.scoring.inference import fit_normal_reference, reconstruct_and_score
    from anomaly_ae.scoring.reference import NormalReference

    class Blurry(nn.Module):  # a 'model' that reconstructs a blurred image, as an autoencoder
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40] / 48
    base = 0.5 + 0.2 * np.sin(5 * yy) * np.cos(3 * xx)
    train = np.clip(base + rng.normal(0, 0.02, (10, channels, 48, 40)), 0, 1).astype(np.float32)
    settings = MapSettings(normal_reference="zscore", smoothing_sigma=2, memory_pool=4)
    reference = fit_normal_reference(Blurry(), train, settings, batch_size=4)
    assert reference.memory_bank.shape == (10, channels, 12, 10)
    assert reference.mean.shape == (2, 48, 40)  # the map and the memory channel, each referenced
    reference = NormalReference.from_arrays(reference.to_arrays())  # as normal_reference.npz
    test = np.clip(base + rng.normal(0, 0.02, (4, channels, 48, 40)), 0, 1).astype(np.float32)
    test[2:, :, 20:24, 16:20] = 0.95  # a bright 4x4 spot
    out = reconstruct_and_score(Blurry(), test, settings, 4, reference=reference)
    assert out["score"][2:].min() > out["score"][:2].max()
    with pytest.raises(ValueError, match="memory bank"):
        without = NormalReference(reference.mean, reference.std, reference.n_images)
        reconstruct_and_score(Blurry(), test, settings, 4, reference=without)


def test_the_memory_channels_reference_holds_the_unmoved_images_only():
    """With moved copies (reference_shift), the map's own channels are fitted on the training
    images and their copies, the memory channel on the unmoved images alone (its search leaves
    each image out of the bank already; the copies would quadruple it): channel by channel, the
    reference equals the one without the memory channel and the one without moved copies."""
    from torch import nn

    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.scoring.inference import fit_normal_reference

    class Blurry(nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:32] / 40
    base = 0.5 + 0.2 * np.sin(5 * yy) * np.cos(3 * xx)
    train = np.clip(base + rng.normal(0, 0.03, (9, 1, 40, 32)), 0, 1).astype(np.float32)
    settings = MapSettings(
        normal_reference="tail", smoothing_sigma=2, lowpass_sigma=4, reference_shift=1, memory_pool=4
    )
    fit = fit_normal_reference(Blurry(), train, settings, batch_size=2, device="cpu")
    without_memory = fit_normal_reference(
        Blurry(), train, dataclasses.replace(settings, memory_pool=0), batch_size=2, device="cpu"
    )
    unmoved = fit_normal_reference(
        Blurry(), train, dataclasses.replace(settings, reference_shift=0), batch_size=2, device="cpu"
    )
    assert fit.mean.shape == (3, 40, 32) and fit.n_images == without_memory.n_images == 45
    for field in ("mean", "std", "upper"):
        np.testing.assert_array_equal(getattr(fit, field)[:2], getattr(without_memory, field))
        np.testing.assert_array_equal(getattr(fit, field)[2], getattr(unmoved, field)[2])
    # the moved copies do change the map's own channels (else the test would show nothing)
    assert not np.array_equal(fit.std[0], unmoved.std[0])
    np.testing.assert_array_equal(fit.memory_bank, unmoved.memory_bank)
