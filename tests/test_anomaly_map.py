"""Tests for the scoring core: SSIM (anomaly_ae.scoring.ssim) and anomaly maps / image scores
(anomaly_ae.scoring.anomaly_map)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import numpy as np
import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter as scipy_gaussian
from skimage.metrics import structural_similarity

from anomaly_ae.scoring import NormalReference
from anomaly_ae.scoring.anomaly_map import (
    MapSettings,
    anomaly_map,
    blend,
    compose,
    error_terms,
    image_score,
    lowpass,
    reference_tensors,
    score_maps,
    shift_offsets,
    smooth_terms,
)
from anomaly_ae.scoring.reference import move
from anomaly_ae.scoring.ssim import (
    blur_taps,
    gaussian_blur,
    gaussian_filter,
    gaussian_taps,
    local_ssim_map,
    mean_ssim,
    per_image_ssim,
    ssim_map,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ``import pytorch_msssim.ssim`` gives the function of that name, not the module
_msssim_module = importlib.import_module("pytorch_msssim.ssim")
P = 11 // 2  # border of the paper's window


def _smooth_pair(n: int = 2, size: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random smooth images in [0, 1] and a noisy, slightly dimmed 'reconstruction'."""
    rng = np.random.default_rng(seed)
    x = np.stack([scipy_gaussian(rng.random((size, size)), 3) for _ in range(n)])
    x = (x - x.min()) / (x.max() - x.min())
    y = np.clip(0.8 * x + 0.1 + 0.05 * rng.standard_normal(x.shape), 0.0, 1.0)
    return torch.from_numpy(x[:, None]).float(), torch.from_numpy(y[:, None]).float()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    return _smooth_pair()


@pytest.fixture(scope="module")
def patched() -> tuple[torch.Tensor, torch.Tensor]:
    """An image and a 'reconstruction' that inverts one 10x10 patch (rows/cols 20..29)."""
    x, _ = _smooth_pair(n=1, size=64)
    recon = x.clone()
    recon[:, :, 20:30, 20:30] = 1.0 - recon[:, :, 20:30, 20:30]
    return x, recon


def _skimage(a: torch.Tensor, b: torch.Tensor) -> tuple[float, np.ndarray]:
    """scikit-image's SSIM with the paper's (tf.image.ssim) conventions: mean and full map."""
    return structural_similarity(
        a.double().numpy(),
        b.double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        full=True,
    )


# ------------------------------------------------------------------ Gaussian filtering


def test_gaussian_taps_are_pytorch_msssims_window() -> None:
    taps = gaussian_taps(11, 1.5)
    assert isinstance(taps, tuple) and len(taps) == 11
    assert all(type(t) is float for t in taps)  # constants for torch.compile, not a tensor
    assert math.fsum(taps) == pytest.approx(1.0, abs=1e-12)
    assert taps == taps[::-1] and max(range(11), key=taps.__getitem__) == 5
    reference = _msssim_module._fspecial_gauss_1d(11, 1.5).flatten()
    torch.testing.assert_close(torch.tensor(taps, dtype=torch.float32), reference, atol=1e-7, rtol=0)
    # blur window: 2 * ceil(2 sigma) + 1 taps
    assert len(blur_taps(2.0)) == 9 and len(blur_taps(1.3)) == 7 and len(blur_taps(0.4)) == 3
    for bad in (10, 0, -3, 2.5, "11"):
        with pytest.raises(ValueError, match="window size"):
            gaussian_taps(bad, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_taps(11, 0.0)


def test_gaussian_filter_valid_mode_equals_a_2d_convolution(pair) -> None:
    x, _ = pair
    taps = gaussian_taps(7, 1.0)
    kernel = torch.outer(torch.tensor(taps), torch.tensor(taps))[None, None].float()
    expected = F.conv2d(x, kernel)
    out = gaussian_filter(x, taps, same_size=False)
    assert out.shape == (2, 1, 96 - 6, 96 - 6)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="smaller than the 11-tap window"):
        gaussian_filter(torch.zeros(1, 1, 8, 8), gaussian_taps(), same_size=False)


@pytest.mark.parametrize("sigma", [2.0, 1.3])
def test_gaussian_blur_is_scipys_mirror_filter(pair, sigma) -> None:
    """Same size, reflect padding (scipy's "mirror"), radius ceil(2 sigma)."""
    x, _ = pair
    out = gaussian_blur(x, sigma)
    assert out.shape == x.shape
    expected = scipy_gaussian(x[0, 0].double().numpy(), sigma, mode="mirror", radius=math.ceil(2 * sigma))
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6, rtol=0)
    assert gaussian_blur(x, 0.0) is x


# ------------------------------------------------------------------ SSIM


def test_local_ssim_identical_is_one_and_same_shape(pair) -> None:
    x, _ = pair
    smap = local_ssim_map(x, x)
    assert smap.shape == x.shape and smap.dtype == torch.float32
    torch.testing.assert_close(smap, torch.ones_like(smap), atol=1e-5, rtol=0)
    assert local_ssim_map(x.double(), x.double()).dtype == torch.float32  # float64 inside, float32 out
    with pytest.raises(ValueError, match="same shape"):
        local_ssim_map(x, x[:, :, :-1])


def test_local_ssim_interior_is_the_valid_map(pair) -> None:
    x, y = pair
    interior = local_ssim_map(x, y)[..., P:-P, P:-P]
    valid = ssim_map(x, y, gaussian_taps(), same_size=False, precise=True).float()
    assert valid.shape == interior.shape
    torch.testing.assert_close(interior, valid, atol=1e-6, rtol=0)


def test_local_ssim_map_matches_scikit_image_and_pytorch_msssim(pair) -> None:
    x, y = pair
    smap = local_ssim_map(x, y, win_size=11, sigma=1.5, data_range=1.0)
    reference = pytorch_msssim.ssim(x, y, data_range=1.0, win_size=11, win_sigma=1.5, size_average=False)
    torch.testing.assert_close(smap[..., P:-P, P:-P].mean(dim=(1, 2, 3)), reference, atol=1e-5, rtol=0)
    for i in range(len(x)):
        sk_mean, sk_map = _skimage(x[i, 0], y[i, 0])
        ours = smap[i, 0, P:-P, P:-P].double().numpy()
        # per pixel: the map's statistics are float64 (scikit-image's too), so only the
        # float32 result rounds; float32 statistics cancel in flat regions (6e-5 here)
        np.testing.assert_allclose(ours, sk_map[P:-P, P:-P], atol=1e-6, rtol=0)
        assert ours.mean() == pytest.approx(sk_mean, abs=1e-5)  # skimage's mean crops the border
    # the map is not constant: the images differ
    assert float(smap.min()) < 0.9 < float(smap.max())


def test_per_image_ssim_matches_pytorch_msssim_and_scikit_image(pair) -> None:
    x, y = pair
    ours = per_image_ssim(x, y)
    assert ours.shape == (2,) and ours.dtype == torch.float32
    reference = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    for i in range(2):
        assert float(ours[i]) == pytest.approx(_skimage(x[i, 0], y[i, 0])[0], abs=1e-5)
    assert float(ours.max()) < 0.95  # a real difference, not SSIM(x, x) = 1


@pytest.mark.parametrize(("win_size", "win_sigma"), [(11, 1.5), (7, 1.0)])
def test_mean_ssim_matches_pytorch_msssim(pair, win_size, win_sigma) -> None:
    x, y = pair
    ours = mean_ssim(x, y, 1.0, win_size, win_sigma)
    reference = pytorch_msssim.ssim(
        x, y, data_range=1.0, win_size=win_size, win_sigma=win_sigma, size_average=True
    )
    assert ours.shape == () and float(ours) == pytest.approx(float(reference), abs=1e-5)


# ------------------------------------------------------------------ settings


def test_map_settings_defaults_are_the_papers_map() -> None:
    s = MapSettings()
    assert (s.ssim_weight, s.l2_weight, s.smoothing_sigma, s.win_size, s.win_sigma) == (1, 0, 0, 11, 1.5)
    assert (s.score_reduction, s.normal_reference, s.windows) == ("max", "none", (11,))
    assert s.describe() == "1-SSIM(11) max"


def test_map_settings_windows_round_trip_and_describe() -> None:
    multi = MapSettings(win_size=[7, 11], l2_weight=2, smoothing_sigma=4, normal_reference="zscore")
    assert multi.win_size == (7, 11) and multi.windows == (7, 11)
    assert MapSettings(win_size=[11]).win_size == 11  # one window: a plain int
    assert isinstance(multi.l2_weight, float)
    data = multi.to_dict()
    assert data["win_size"] == [7, 11]
    assert MapSettings.from_dict(json.loads(json.dumps(data))) == multi
    assert multi.describe() == "1-SSIM(7/11) + sq.err x2 smooth 4 ref-zscore max"
    assert MapSettings(ssim_weight=0, l2_weight=1).describe() == "sq.err max"
    assert MapSettings(score_reduction="topk_mean", topk_fraction=0.05).describe() == "1-SSIM(11) top5%"
    with pytest.raises(dataclasses.FrozenInstanceError):
        multi.l2_weight = 0.0
    with pytest.raises(ValueError, match="bogus"):
        MapSettings.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"win_size": 10}, "positive odd"),
        ({"win_size": ()}, "at least one window"),
        ({"win_size": [7, 8]}, "positive odd"),
        ({"win_sigma": 0.0}, "sigma"),
        ({"ssim_weight": -1.0}, "ssim_weight"),
        ({"smoothing_sigma": -0.5}, "smoothing_sigma"),
        ({"ssim_weight": 0.0, "l2_weight": 0.0}, "cannot both be 0"),
        ({"score_reduction": "median"}, "score_reduction"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"normal_reference": "median"}, "normal_reference"),
        ({"shift_tolerance": -1}, "shift_tolerance"),
        ({"shift_tolerance": 0.5}, "shift_tolerance"),
        ({"ssim_k2": 0.0}, "ssim_k2"),
        ({"ssim_k2": 1.0}, "ssim_k2"),
        ({"ssim_k2": "small"}, "ssim_k2"),
    ],
)
def test_map_settings_refuse_bad_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MapSettings(**kwargs)


# ------------------------------------------------------------------ anomaly maps


def _map32(*args):
    return anomaly_map(*args).float()


def test_anomaly_map_zero_for_identical_and_high_on_the_changed_patch(patched) -> None:
    x, recon = patched
    assert anomaly_map(x, x).dtype == torch.float64  # maps are computed in float64 (map_dtype)
    amap0 = _map32(x, x)
    assert amap0.shape == x.shape
    torch.testing.assert_close(amap0, torch.zeros_like(amap0), atol=1e-5, rtol=0)

    amap = _map32(x, recon)
    assert float(amap[:, :, 20:30, 20:30].mean()) > 0.3
    far = amap[:, :, 45:, 45:]  # more than a window away from the patch
    torch.testing.assert_close(far, torch.zeros_like(far), atol=1e-5, rtol=0)
    # the default (the paper's) map is 1 - local SSIM, clipped to [0, 1]
    torch.testing.assert_close(amap, (1 - local_ssim_map(x, recon)).clamp(0, 1), atol=1e-7, rtol=0)


def test_anomaly_map_levers(patched) -> None:
    x, recon = patched
    ssim_err = {w: (1 - local_ssim_map(x, recon, win_size=w)).clamp(0, 1) for w in (7, 11)}
    sq = (x - recon) ** 2
    close = dict(atol=1e-6, rtol=0)

    torch.testing.assert_close(_map32(x, recon, MapSettings(ssim_weight=0, l2_weight=1)), sq, **close)
    torch.testing.assert_close(
        _map32(x, recon, MapSettings(ssim_weight=0.5, l2_weight=2)), 0.5 * ssim_err[11] + 2 * sq, **close
    )
    torch.testing.assert_close(  # multi-scale: the mean of the windows' maps
        _map32(x, recon, MapSettings(win_size=(7, 11))), (ssim_err[7] + ssim_err[11]) / 2, **close
    )
    torch.testing.assert_close(  # ... or their max (scale_combine)
        _map32(x, recon, MapSettings(win_size=(7, 11), scale_combine="max")),
        torch.maximum(ssim_err[7], ssim_err[11]),
        **close,
    )
    with pytest.raises(ValueError, match="scale_combine"):
        MapSettings(scale_combine="median")
    smoothed = _map32(x, recon, MapSettings(smoothing_sigma=2.0))
    torch.testing.assert_close(smoothed, gaussian_blur(ssim_err[11], 2.0), **close)
    assert int((smoothed > 0.01).sum()) > int((ssim_err[11] > 0.01).sum())  # the error spreads out ...
    assert smoothed.sum().item() == pytest.approx(ssim_err[11].sum().item(), rel=0.05)  # ... mass stays


def test_anomaly_map_with_a_normal_reference(patched) -> None:
    x, recon = patched
    raw = anomaly_map(x, recon)
    ref = NormalReference.fit(torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(0)))
    mean_map = anomaly_map(x, recon, MapSettings(normal_reference="mean"), ref.as_tensors("mean", "cpu"))
    torch.testing.assert_close(mean_map, raw - torch.from_numpy(ref.mean), atol=1e-6, rtol=0)
    z = anomaly_map(x, recon, MapSettings(normal_reference="zscore"), ref.as_tensors("zscore", "cpu"))
    expected = (raw.numpy() - ref.mean) / (ref.std + ref.std.mean())
    np.testing.assert_allclose(z.numpy(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="normal_reference.npz"):
        anomaly_map(x, recon, MapSettings(normal_reference="mean"))
    # reference_tensors: None for "none", the tensors otherwise, a clear error without a reference
    assert reference_tensors(None, "none", "cpu") is None
    mean, scale = reference_tensors(ref, "mean", "cpu")
    assert scale is None and torch.equal(mean, torch.from_numpy(ref.mean))
    with pytest.raises(ValueError, match="normal_reference.npz"):
        reference_tensors(None, "zscore", "cpu")


def test_error_terms_hold_one_ssim_error_per_window(patched) -> None:
    x, recon = patched
    terms = error_terms(x, recon, (7, 11), keep_ssim=True)
    assert set(terms) == {"ssim_err", "sq", "ssim"} and set(terms["ssim_err"]) == {7, 11}
    seven = local_ssim_map(x, recon, win_size=7)
    torch.testing.assert_close(terms["ssim"][7].float(), seven, atol=1e-7, rtol=0)
    torch.testing.assert_close(terms["ssim_err"][7], (1 - terms["ssim"][7]).clamp(0, 1).float())
    assert terms["sq"].dtype == torch.float32  # the grid's default; the maps ask for float64
    assert error_terms(x, recon, dtype=torch.float64)["sq"].dtype == torch.float64
    assert "ssim" not in error_terms(x, recon)


@pytest.mark.parametrize(
    "settings",
    [
        MapSettings(smoothing_sigma=4.0),
        MapSettings(smoothing_sigma=2.0, l2_weight=3.0, win_size=(7, 11)),
        MapSettings(smoothing_sigma=1.0, ssim_weight=0.0, l2_weight=1.0),
        MapSettings(smoothing_sigma=0.0, l2_weight=0.5),
    ],
    ids=lambda s: s.describe(),
)
def test_smoothing_the_terms_first_gives_the_same_map(patched, settings) -> None:
    """Linearity the calibration grid relies on: smooth each term once, blend many times."""
    x, recon = patched
    terms = error_terms(x, recon, (7, 11))
    fast = blend(smooth_terms(terms, settings.smoothing_sigma), settings)
    composed = compose(terms, settings)
    torch.testing.assert_close(fast, composed, atol=1e-5, rtol=0)
    torch.testing.assert_close(composed, anomaly_map(x, recon, settings).float(), atol=1e-6, rtol=0)
    assert float(composed.max()) > 0.01  # not a map of zeros


@pytest.mark.parametrize(
    ("settings", "mode"),
    [
        (MapSettings(), None),  # paper window: SSIM filtered once, shared with the map
        (MapSettings(win_size=(7, 11), smoothing_sigma=2.0, l2_weight=1.0), None),
        (MapSettings(win_size=7), None),  # no 11x11 map to share: SSIM computed separately
        (MapSettings(win_sigma=1.0), None),
        (MapSettings(smoothing_sigma=2.0, normal_reference="zscore"), "zscore"),
    ],
    ids=["paper", "multi-scale", "win7", "sigma1", "zscore"],
)
def test_score_maps_equals_anomaly_map_and_per_image_ssim(pair, settings, mode) -> None:
    x, y = pair
    reference = None
    if mode:
        ref = NormalReference.fit(torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1)))
        reference = ref.as_tensors(mode, "cpu")
    amap, heat, ssim_values = score_maps(x, y, settings, reference)
    assert heat is amap  # no localisation map: the heat map is the detection map
    torch.testing.assert_close(amap, anomaly_map(x, y, settings, reference), atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim_values, per_image_ssim(x, y), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ a separate localisation map


def test_localisation_settings_round_trip_describe_and_collapse() -> None:
    loc = {"smoothing_sigma": 8, "normal_reference": "zscore", "lowpass_sigma": 4, "score_reduction": "mean"}
    settings = MapSettings.from_dict(
        {
            "smoothing_sigma": 4,
            "normal_reference": "zscore",
            "score_reduction": "topk_mean",
            "localisation": loc,
        }
    )
    assert isinstance(settings.localisation, MapSettings)
    assert settings.localisation.score_reduction == "max"  # never used: kept at the default
    assert settings.heatmap is settings.localisation
    assert MapSettings.from_dict(settings.to_dict()) == settings
    assert settings.describe() == (
        "1-SSIM(11) smooth 4 ref-zscore top1%; heat map 1-SSIM(11) smooth 8 ref-zscore + lowpass 4"
    )
    assert settings.describe_detection() == "1-SSIM(11) smooth 4 ref-zscore top1%"
    assert settings.map_part().localisation is None and settings.map_part().score_reduction == "max"
    # the same map (only the reduction differs) is no second map
    same = MapSettings(
        smoothing_sigma=4.0, score_reduction="mean", localisation=MapSettings(smoothing_sigma=4.0)
    )
    assert same.localisation is None and same.heatmap is same
    assert same.describe() == MapSettings(smoothing_sigma=4.0, score_reduction="mean").describe()
    with pytest.raises(ValueError, match="localisation cannot have a localisation map"):
        MapSettings(
            localisation=MapSettings(smoothing_sigma=2.0, localisation=MapSettings(smoothing_sigma=4.0))
        )
    with pytest.raises(ValueError, match="Unknown evaluation.anomaly_map.localisation settings"):
        MapSettings.from_dict({"localisation": {"smoothing": 2}})
    with pytest.raises(ValueError, match="localisation must be a map's settings"):
        MapSettings(localisation=3)


def test_score_maps_localisation_map_is_its_own_map_and_score_is_detections(pair) -> None:
    """The heat map equals anomaly_map() of the localisation settings with their own
    reference; the detection map (and so the score) is unchanged by adding one."""
    x, y = pair
    generator = torch.Generator().manual_seed(2)
    detection = MapSettings(
        win_size=7, smoothing_sigma=2.0, normal_reference="zscore", score_reduction="topk_mean"
    )
    loc = MapSettings(smoothing_sigma=4.0, normal_reference="zscore", lowpass_sigma=3.0)
    both = MapSettings(**{**vars(detection), "localisation": loc})
    ref = NormalReference.fit(torch.rand(3, 96, 96, generator=generator)).as_tensors("zscore", "cpu")
    loc_ref = NormalReference.fit(torch.rand(3, 2, 96, 96, generator=generator)).as_tensors("zscore", "cpu")
    det_map, heat, ssim_values = score_maps(x, y, both, ref, loc_ref)
    torch.testing.assert_close(det_map, anomaly_map(x, y, detection, ref), atol=1e-9, rtol=0)
    torch.testing.assert_close(heat, anomaly_map(x, y, loc, loc_ref), atol=1e-9, rtol=0)
    assert not torch.allclose(heat, det_map)
    torch.testing.assert_close(ssim_values, per_image_ssim(x, y), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs the normal reference"):
        score_maps(x, y, both, ref, None)


# ------------------------------------------------------------------ shift tolerance


def _edged_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharp vertical stripes and a 'reconstruction' drawn one pixel to the right, with a
    dark spot (rows 30..35, cols 25..28, inside a bright stripe) it does not reproduce at any
    alignment."""
    x = torch.zeros(1, 1, size, size)
    x[..., :, (torch.arange(size) // 6) % 2 == 0] = 0.8
    x = x + 0.1
    recon = torch.roll(x, 1, dims=-1)
    x = x.clone()
    x[..., 30:36, 25:29] = 0.0
    return x, recon


def test_shift_tolerance_forgives_a_reconstruction_one_pixel_off_but_not_a_defect() -> None:
    x, recon = _edged_pair()
    plain = anomaly_map(x, recon, MapSettings()).float()[0, 0]
    aligned = anomaly_map(x, recon, MapSettings(shift_tolerance=1)).float()[0, 0]
    inner = (slice(8, 24), slice(8, -8))  # stripes' edges, a window away from spot and border
    assert float(plain[inner].max()) > 0.5  # every edge the network drew a pixel off lights up
    assert float(aligned[inner].max()) < 1e-6  # at the best alignment, nothing
    spot = (slice(30, 36), slice(25, 29))
    assert float(aligned[spot].mean()) > 0.3  # the spot is missing at every alignment
    assert float(aligned[spot].max()) == pytest.approx(float(plain[spot].max()), abs=0.1)
    # every term is the per-pixel minimum over the 9 moved reconstructions: never above plain
    assert bool((aligned <= plain + 1e-12).all())
    # the squared error and the low-pass difference are forgiven alike
    sq = anomaly_map(x, recon, MapSettings(ssim_weight=0.0, l2_weight=1.0, shift_tolerance=1)).float()[0, 0]
    assert float(sq[inner].max()) < 1e-12 and float(sq[spot].mean()) > 0.01
    terms = error_terms(x, recon, keep_diff=True, tolerance=1)
    low = lowpass(terms, 2.0)[0, 0]
    plain_low = lowpass(error_terms(x, recon, keep_diff=True), 2.0)[0, 0]
    assert float(low[inner].max()) < 1e-6 < float(plain_low[inner].max())
    assert float(low[spot].mean()) > 0.1


def test_shift_tolerance_is_the_minimum_over_every_move_within_r(pair) -> None:
    """Tolerance r: per pixel the smallest map over the reconstruction moved by every
    (dy, dx) with |dy|, |dx| <= r (reflected border), term by term, then the rest of the map."""
    x, y = pair
    assert shift_offsets(0) == [(0, 0)] and len(shift_offsets(2)) == 25 and shift_offsets(1)[0] == (0, 0)
    raw = MapSettings(win_size=(7, 11), scale_combine="max")
    for r in (1, 2):
        terms = error_terms(x, y, (7, 11), tolerance=r)
        for w in (7, 11):
            each = torch.stack(
                [error_terms(x, move(y, dy, dx), (w,))["ssim_err"][w] for dy, dx in shift_offsets(r)]
            )
            torch.testing.assert_close(terms["ssim_err"][w], each.amin(0), atol=0, rtol=0)
        each = torch.stack([error_terms(x, move(y, dy, dx))["sq"] for dy, dx in shift_offsets(r)])
        torch.testing.assert_close(terms["sq"], each.amin(0), atol=0, rtol=0)
        settings = dataclasses.replace(raw, smoothing_sigma=2.0, shift_tolerance=r)
        torch.testing.assert_close(
            anomaly_map(x, y, settings),
            gaussian_blur(blend(error_terms(x, y, (7, 11), dtype=torch.float64, tolerance=r), settings), 2.0),
        )
    # tolerance 0 is the map as before; the paper's per-image SSIM stays the unmoved one
    torch.testing.assert_close(anomaly_map(x, y, MapSettings(shift_tolerance=0)), anomaly_map(x, y))
    _, _, ssim_values = score_maps(x, y, MapSettings(shift_tolerance=1))
    torch.testing.assert_close(ssim_values, per_image_ssim(x, y), atol=1e-6, rtol=0)
    assert MapSettings(shift_tolerance=1, smoothing_sigma=4).describe() == "1-SSIM(11) smooth 4 align 1 max"
    assert MapSettings.from_dict(MapSettings(shift_tolerance=2).to_dict()).shift_tolerance == 2


def test_score_maps_serves_two_maps_with_different_tolerances(pair) -> None:
    x, y = pair
    loc = MapSettings(smoothing_sigma=4.0, lowpass_sigma=3.0, normal_reference="zscore", shift_tolerance=1)
    detection = MapSettings(smoothing_sigma=2.0)
    generator = torch.Generator().manual_seed(3)
    loc_ref = NormalReference.fit(torch.rand(3, 2, 96, 96, generator=generator)).as_tensors("zscore", "cpu")
    det_map, heat, _ = score_maps(x, y, dataclasses.replace(detection, localisation=loc), None, loc_ref)
    torch.testing.assert_close(det_map, anomaly_map(x, y, detection), atol=0, rtol=0)
    torch.testing.assert_close(heat, anomaly_map(x, y, loc, loc_ref), atol=0, rtol=0)


def test_a_smaller_ssim_k2_sees_faint_structure_in_a_flat_region() -> None:
    """C2 = ssim_k2**2 keeps SSIM's structure term near 1 where the local spread is below about
    ssim_k2: a faint texture (spread ~0.007) on a flat grey region barely lights up the
    paper's map (k2 0.03) and clearly lights up k2 0.01's; identical images stay at 0."""
    flat = torch.full((1, 1, 64, 64), 0.5)
    generator = torch.Generator().manual_seed(0)
    faint = flat.clone()
    faint[..., 24:40, 24:40] += 0.01 * torch.randn(1, 1, 16, 16, generator=generator)
    paper, small = MapSettings(), MapSettings(ssim_k2=0.01)
    at_paper = float(anomaly_map(faint, flat, paper)[..., 28:36, 28:36].mean())
    at_small = float(anomaly_map(faint, flat, small)[..., 28:36, 28:36].mean())
    assert at_paper < 0.1 and at_small > 3 * at_paper
    assert float(anomaly_map(faint, faint, small).abs().max()) < 1e-9
    # the map's constant only: the paper's per-image SSIM (Table II) is the same for both
    for settings in (small, dataclasses.replace(small, localisation=MapSettings(smoothing_sigma=2.0))):
        _, _, ssim_values = score_maps(faint, flat, settings)
        torch.testing.assert_close(ssim_values, per_image_ssim(faint, flat), atol=1e-6, rtol=0)
    assert small.describe() == "1-SSIM(11, k2 0.01) max"
    assert MapSettings(win_size=(7, 11), ssim_k2=0.01).describe_map() == "1-SSIM(7/11, k2 0.01)"
    assert MapSettings.from_dict(small.to_dict()) == small
    assert small.terms_key == (0, 0.01) and paper.terms_key == (0, 0.03)


# ------------------------------------------------------------------ image scores


def test_image_score_reductions() -> None:
    amap = torch.zeros(2, 1, 10, 10)
    amap[0, 0, 0, :] = torch.arange(10, dtype=torch.float32)  # 0..9 in one row
    amap[1] = 0.5
    assert torch.allclose(image_score(amap, "max"), torch.tensor([9.0, 0.5]))
    assert torch.allclose(image_score(amap, "mean"), torch.tensor([0.45, 0.5]))
    # top 5 % of 100 pixels = 5 pixels: 9, 8, 7, 6, 5 -> 7
    assert torch.allclose(image_score(amap, "topk_mean", topk_fraction=0.05), torch.tensor([7.0, 0.5]))
    # tiny fraction still uses at least one pixel
    assert torch.allclose(image_score(amap, "topk_mean", topk_fraction=1e-6), torch.tensor([9.0, 0.5]))
    # (N, H, W) input works as well
    assert torch.allclose(image_score(amap[:, 0], "max"), torch.tensor([9.0, 0.5]))
    with pytest.raises(ValueError, match="reduction"):
        image_score(amap, "median")
    with pytest.raises(ValueError, match="topk_fraction"):
        image_score(amap, "topk_mean", topk_fraction=0.0)
    with pytest.raises(ValueError, match="batch dimension"):
        image_score(torch.zeros(5), "max")


def test_blob_score_counts_a_compact_peak_and_not_a_ridge() -> None:
    """The ``blob`` reduction: a Gaussian spot scores about a quarter of its height at the
    scale of its width, a ridge of the same height (a residual along an edge) about 0, and
    a spot on the ridge as much as the spot alone (the ridge adds no curvature along itself);
    the score is float32, as every reduction's."""
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    spot = torch.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / (2 * 8.0**2))
    ridge = torch.exp(-((xx - 48) ** 2) / (2 * 2.0**2))
    maps = torch.stack([spot, ridge, spot + ridge, torch.zeros_like(spot)])[:, None].double()
    scores = image_score(maps, "blob")
    assert scores.dtype == torch.float32
    # about a / 4 at sigma = its width (8 px, one of BLOB_SIGMAS; the blur's taps end at 2 sigma)
    assert 0.2 < float(scores[0]) < 0.3
    assert float(scores[1]) < 1e-6
    assert float(scores[2]) == pytest.approx(float(scores[0]), rel=0.02)
    assert float(scores[3]) == 0.0
    # the max ranks the ridge with the spot; the blob score does not
    assert float(image_score(maps, "max")[1]) >= float(image_score(maps, "max")[0])
    # (N, H, W) maps score the same; a map per image must be 2-D
    assert torch.equal(image_score(maps[:, 0], "blob"), scores)
    with pytest.raises(ValueError, match="2-D map"):
        image_score(torch.zeros(2, 3, 16, 16), "blob")
    assert MapSettings(score_reduction="blob").describe() == "1-SSIM(11) blob"


def test_defect_scores_higher_than_a_good_reconstruction(patched) -> None:
    x, recon = patched
    good = (0.98 * x + 0.01).clamp(0, 1)  # a near-perfect reconstruction
    for settings in (MapSettings(), MapSettings(score_reduction="topk_mean"), MapSettings(l2_weight=1)):
        amap = anomaly_map(torch.cat([x, x]), torch.cat([good, recon]), settings)
        scores = image_score(amap, settings.score_reduction, settings.topk_fraction)
        assert float(scores[1]) > float(scores[0]) + 0.1, settings.describe()
