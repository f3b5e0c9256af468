"""Normal-reference correction of anomaly maps (anomaly_ae.scoring.reference, set by
evaluation.anomaly_map.normal_reference)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from anomaly_ae.datasets import NpzDataset
from anomaly_ae.inspect import Inspector
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.model.checkpoint import checkpoint_fingerprint
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.anomaly_map import raw_map
from anomaly_ae.scoring.inference import fit_normal_reference, reconstruct_and_score
from anomaly_ae.scoring.reference import (
    REFERENCE_MODES,
    NormalReference,
    ReferenceAccumulator,
    correct,
    with_moved_copies,
)
from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32


def _maps_with_bright_rim(rng, n, defect=False):
    """Normal maps light up on a fixed rim (value ~0.8); a defect is a weaker blob (0.5)."""
    maps = rng.uniform(0.0, 0.05, size=(n, SIZE, SIZE)).astype(np.float32)
    maps[:, :, :3] += 0.8
    if defect:
        maps[:, 14:18, 14:18] += 0.5
    return maps


def _without_the_highest(maps: np.ndarray) -> np.ndarray:
    """Per pixel, the maps sorted and the largest dropped: ``(N - 1, ...)``."""
    return np.sort(maps, axis=0)[:-1]


def test_fit_and_apply_formulas():
    rng = np.random.default_rng(0)
    maps = rng.random((6, SIZE, SIZE), dtype=np.float32)
    ref = NormalReference.fit(maps)
    others = _without_the_highest(maps)  # every statistic leaves each pixel's highest image out
    np.testing.assert_allclose(ref.mean, others.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref.std, others.std(0), rtol=1e-5)
    assert ref.n_images == 6
    new = torch.from_numpy(rng.random((2, 1, SIZE, SIZE), dtype=np.float32))
    assert ref.apply(new, "none") is new
    np.testing.assert_allclose(ref.apply(new, "mean").numpy(), new.numpy() - ref.mean, rtol=1e-6)
    z = (new.numpy() - ref.mean) / (ref.std + ref.std.mean())
    np.testing.assert_allclose(ref.apply(new, "zscore").numpy(), z, rtol=1e-5, atol=1e-6)
    second = np.sort(maps, axis=0)[-2]  # the largest value of a second image
    np.testing.assert_allclose(ref.upper, second, rtol=1e-6)
    width = np.clip(second - others.mean(0), 0, None)
    tail = (new.numpy() - ref.mean) / np.maximum(width, width.mean())
    np.testing.assert_allclose(ref.apply(new, "tail").numpy(), tail, rtol=1e-5, atol=1e-6)
    # a torch stack (the maps of reconstruct_and_score on the device) fits the same reference
    from_torch = NormalReference.fit(torch.from_numpy(maps))
    np.testing.assert_array_equal(from_torch.mean, ref.mean)
    np.testing.assert_array_equal(from_torch.std, ref.std)
    np.testing.assert_array_equal(from_torch.upper, ref.upper)
    assert from_torch.mean.dtype == np.float32 and from_torch.n_images == 6


def test_as_tensors_and_correct():
    rng = np.random.default_rng(6)
    ref = NormalReference.fit(rng.random((4, SIZE, SIZE), dtype=np.float32))
    assert REFERENCE_MODES == ("none", "mean", "zscore", "tail")
    mean, scale = ref.as_tensors("mean")
    assert scale is None and mean.dtype == torch.float32 and torch.equal(mean, torch.from_numpy(ref.mean))
    mean, scale = ref.as_tensors("zscore", "cpu")
    np.testing.assert_allclose(scale.numpy(), ref.std + ref.std.mean(), rtol=1e-6)
    maps = torch.from_numpy(rng.random((3, 1, SIZE, SIZE), dtype=np.float32))
    torch.testing.assert_close(correct(maps, mean, None), maps - mean)
    torch.testing.assert_close(correct(maps, mean, scale), (maps - mean) / scale)
    torch.testing.assert_close(ref.apply(maps, "zscore"), correct(maps, *ref.as_tensors("zscore")))
    with pytest.raises(ValueError, match="needs no reference tensors"):
        ref.as_tensors("none")
    with pytest.raises(ValueError, match="normal_reference must be one of"):
        ref.as_tensors("median")


def test_reference_removes_a_rim_every_normal_image_has():
    rng = np.random.default_rng(1)
    ref = NormalReference.fit(_maps_with_bright_rim(rng, 20))
    normal = torch.from_numpy(_maps_with_bright_rim(rng, 4))
    defective = torch.from_numpy(_maps_with_bright_rim(rng, 4, defect=True))
    # raw: the rim is the maximum of every map, so max-scores cannot tell the two apart
    assert (normal.amax((1, 2)) > 0.8).all() and (defective.amax((1, 2)) < 0.9).all()
    for mode in ("mean", "zscore", "tail"):
        n_scores = ref.apply(normal, mode).amax((1, 2))
        d_scores = ref.apply(defective, mode).amax((1, 2))
        assert d_scores.min() > n_scores.max(), mode
        peak = ref.apply(defective, mode)[0].argmax()
        assert 14 <= peak // SIZE < 18 and 14 <= peak % SIZE < 18, mode  # peak on the defect


def test_constant_maps_do_not_divide_by_zero():
    ref = NormalReference.fit(np.zeros((3, SIZE, SIZE), np.float32))
    for mode in ("zscore", "tail"):
        assert torch.isfinite(ref.apply(torch.ones(1, 1, SIZE, SIZE), mode)).all(), mode


def test_tail_damps_a_pixel_that_glints_now_and_then():
    """A glint pixel is calm on most normal images and bright on a few: its spread
    understates how high it reaches, so a z-scored new glint outscores a real, weaker defect
    elsewhere; in units of how high the normal maps reach there it does not."""
    rng = np.random.default_rng(7)
    normal = rng.uniform(0.0, 0.05, size=(100, SIZE, SIZE)).astype(np.float32)
    normal[:2, 5, 5] = 1.0  # 2 of 100 normal images glint at (5, 5)
    ref = NormalReference.fit(normal)
    glint = rng.uniform(0.0, 0.05, size=(1, SIZE, SIZE)).astype(np.float32)
    glint[0, 5, 5] = 1.0  # a normal image with the glint
    defect = rng.uniform(0.0, 0.05, size=(1, SIZE, SIZE)).astype(np.float32)
    defect[0, 20, 20] = 0.2  # a faint defect where normal images never light up
    score = lambda maps, mode: float(ref.apply(torch.from_numpy(maps), mode).amax())  # noqa: E731
    assert score(glint, "zscore") > score(defect, "zscore")  # the spread's blind spot
    assert score(defect, "tail") > score(glint, "tail")


def test_one_unclean_training_image_blinds_neither_the_tail_nor_the_zscore():
    """An unlabelled defect in one normal training image at the place of a later defect: by
    the normal maps' maximum the width there would be that defect's own level, and by their
    plain spread the spread would be widened by it, so a later one would score like a normal
    image; with that pixel's highest image left out it stands out by either."""
    rng = np.random.default_rng(8)
    normal = rng.uniform(0.0, 0.05, size=(100, SIZE, SIZE)).astype(np.float32)
    normal[0, 20:23, 20:23] = 0.5  # one unclean training image
    ref = NormalReference.fit(normal)
    later = rng.uniform(0.0, 0.05, size=(1, SIZE, SIZE)).astype(np.float32)
    later[0, 20:23, 20:23] = 0.5
    clean = rng.uniform(0.0, 0.05, size=(1, SIZE, SIZE)).astype(np.float32)

    def score(maps: np.ndarray, mode: str) -> float:
        return float(ref.apply(torch.from_numpy(maps), mode).amax())

    for mode in ("tail", "zscore"):
        assert score(later, mode) > 5 * score(clean, mode), mode
    maximum = normal.max(0) - normal.mean(0)  # what the maximum would have made of it
    blinded = (later[0] - normal.mean(0)) / np.maximum(maximum, maximum.mean())
    assert blinded.max() < 1.5 * score(clean, "tail")
    spread = normal.std(0)  # what the plain spread would have made of it
    z = lambda maps: ((maps[0] - normal.mean(0)) / (spread + spread.mean())).max()  # noqa: E731
    assert 2 * z(later) < score(later, "zscore")  # the plain spread had damped it to less than half


def test_moved_copies_count_as_their_image():
    """An image's moved copies are that image: per pixel the highest *image*, all its copies,
    is left out of the mean and spread, and the tail's `upper` is the largest value of a
    second image; batch by batch (each image's maps in one batch) as in one pass."""
    rng = np.random.default_rng(9)
    maps = rng.uniform(0.0, 0.05, size=(12, 2, SIZE, SIZE)).astype(np.float32)  # two channels
    sources = np.arange(12) % 4  # images 0-3, three copies each
    maps[sources == 1, 0, 7, 7] = [0.9, 0.8, 0.7]  # image 1's copies, high
    maps[2, 0, 7, 7] = 0.3  # image 2
    per_image = np.stack([maps[sources == i].max(0) for i in range(4)])
    top = per_image.argmax(0)  # per pixel and channel, the highest image
    others = np.where(sources[:, None, None, None] != top, 1.0, np.nan) * maps
    whole = ReferenceAccumulator().add(maps, sources).result()
    parts = ReferenceAccumulator()
    for images in ([0, 3], [1], [2]):  # each image's copies together, the images in batches
        chosen = np.isin(sources, images)
        parts.add(maps[chosen], sources[chosen])
    for ref in (whole, parts.result()):
        np.testing.assert_allclose(ref.upper, np.sort(per_image, axis=0)[-2], rtol=1e-6)
        np.testing.assert_allclose(ref.mean, np.nanmean(others, 0), rtol=1e-5)
        np.testing.assert_allclose(ref.std, np.nanstd(others, 0), rtol=1e-4, atol=1e-7)
        assert ref.upper[0, 7, 7] == pytest.approx(0.3) and ref.mean[0, 7, 7] < 0.1  # image 1 left out
        assert ref.n_images == 12
    one = ReferenceAccumulator().add(maps[:3], np.zeros(3, int)).result()  # one image: no width
    np.testing.assert_allclose(one.upper, one.mean, rtol=1e-6)
    np.testing.assert_allclose(one.mean, maps[:3].mean(0), rtol=1e-5)  # its own maps serve
    with pytest.raises(ValueError, match="3 maps but 2 sources"):
        ReferenceAccumulator().add(maps[:3], [0, 1])
    # an image's maps split over two batches could not be left out: refused, naming the fix
    with pytest.raises(ValueError, match=r"image\(s\) \[0\] were added before.*in one call"):
        ReferenceAccumulator().add(maps[:2], [0, 1]).add(maps[2:3], [0])


def test_tail_needs_the_upper_tail_an_old_reference_lacks():
    ref = NormalReference.fit(np.random.default_rng(3).random((3, SIZE, SIZE), dtype=np.float32))
    arrays = ref.to_arrays()
    # written before tail existed, or when it stored the plain maximum ("max"): not read
    before = {k: v for k, v in arrays.items() if k != "upper"}
    for old in (before, {**before, "max": arrays["upper"]}):
        back = NormalReference.from_arrays(old)
        assert back.upper is None
        back.as_tensors("zscore")  # still serves the other modes
        with pytest.raises(ValueError, match="upper tail.*refit it with `kedro run --pipeline=evaluate`"):
            back.as_tensors("tail")
    with pytest.raises(ValueError, match="upper"):
        NormalReference.from_arrays({**ref.to_arrays(), "upper": np.zeros((2, 2), np.float32)})


def test_errors_name_the_setting_and_fix():
    ref = NormalReference.fit(np.zeros((3, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match="evaluation.anomaly_map.normal_reference"):
        MapSettings(normal_reference="median")
    with pytest.raises(ValueError, match="refit it"):
        ref.apply(torch.zeros(1, 1, 16, 16), "mean")
    with pytest.raises(ValueError, match="at least 2 normal images"):
        NormalReference.fit(np.zeros((1, SIZE, SIZE)))
    with pytest.raises(ValueError, match="lacks"):
        NormalReference.from_arrays({"mean": ref.mean})


def test_versioned_npz_roundtrip(tmp_path):
    ref = NormalReference.fit(np.random.default_rng(2).random((4, SIZE, SIZE), dtype=np.float32))
    from kedro.io.core import Version

    ds = NpzDataset(str(tmp_path / "normal_reference.npz"), version=Version(None, None))
    assert not ds.exists()
    ds.save(ref.to_arrays())
    assert ds.exists()
    back = NormalReference.from_arrays(
        NpzDataset(str(tmp_path / "normal_reference.npz"), version=Version(None, None)).load()
    )
    np.testing.assert_array_equal(back.mean, ref.mean)
    np.testing.assert_array_equal(back.std, ref.std)
    np.testing.assert_array_equal(back.upper, ref.upper)
    assert back.n_images == 4
    (version_dir,) = (tmp_path / "normal_reference.npz").iterdir()  # saved under a version folder
    assert (version_dir / "normal_reference.npz").is_file()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(AutoencoderConfig(image_size=SIZE)).eval()


def test_scores_use_the_corrected_map(model):
    rng = np.random.default_rng(3)
    train = rng.random((5, 1, SIZE, SIZE), dtype=np.float32)
    test = rng.random((3, 1, SIZE, SIZE), dtype=np.float32)
    raw_settings = MapSettings(smoothing_sigma=1.0)
    ref = fit_normal_reference(model, train, raw_settings, batch_size=2, device="cpu", precision="fp32")
    raw = reconstruct_and_score(model, train, raw_settings, 5, device="cpu", precision="fp32")
    np.testing.assert_allclose(ref.mean, _without_the_highest(raw["map"]).mean(0), rtol=1e-5, atol=1e-6)

    settings = MapSettings(smoothing_sigma=1.0, normal_reference="mean")
    plain = reconstruct_and_score(model, test, raw_settings, 3, device="cpu", precision="fp32")
    corrected = reconstruct_and_score(model, test, settings, 3, device="cpu", precision="fp32", reference=ref)
    np.testing.assert_allclose(corrected["map"], plain["map"] - ref.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(corrected["score"], corrected["map"].reshape(3, -1).max(1), rtol=1e-6)
    np.testing.assert_array_equal(corrected["ssim"], plain["ssim"])  # the paper's SSIM is untouched
    with pytest.raises(ValueError, match="normal_reference.npz"):
        reconstruct_and_score(model, test, settings, 3, device="cpu", precision="fp32")


def test_inspector_needs_the_reference_its_threshold_was_calibrated_with(model, tmp_path):
    checkpoint = build_checkpoint(model, None, epoch=1, history=[], config=TrainingConfig())
    threshold = {"value": 0.1, "score": {"smoothing_sigma": 1.0, "normal_reference": "zscore"}}
    with pytest.raises(ValueError, match="normal_reference.npz"):
        Inspector(checkpoint, threshold)
    ref = NormalReference.fit(np.random.default_rng(4).random((3, SIZE, SIZE), dtype=np.float32))
    inspector = Inspector(checkpoint, threshold, reference=ref.to_arrays(), device="cpu", precision="fp32")
    image = np.random.default_rng(5).random((SIZE, SIZE)).astype(np.float32)
    from PIL import Image

    (result,) = inspector.inspect([("a.png", Image.fromarray((image * 255).astype(np.uint8)))])
    assert result.error is None and result.score is not None
    assert result.score == pytest.approx(float(result.anomaly_map.max()), rel=1e-6)
    raw = Inspector(
        checkpoint, {"value": 0.1, "score": {"smoothing_sigma": 1.0}}, device="cpu", precision="fp32"
    )
    (plain,) = raw.inspect([("a.png", Image.fromarray((image * 255).astype(np.uint8)))])
    expected = (plain.anomaly_map - ref.mean) / (ref.std + ref.std.mean())
    np.testing.assert_allclose(result.anomaly_map, expected, rtol=1e-4, atol=1e-5)


def test_reference_of_another_image_size_is_refused(model):
    ref = NormalReference.fit(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="refit it"):
        reconstruct_and_score(
            model, np.zeros((1, 1, SIZE, SIZE), np.float32), MapSettings(normal_reference="mean"), 1,
            device="cpu", precision="fp32", reference=ref,
        )  # fmt: skip


def test_inspector_refuses_a_threshold_or_reference_of_another_model(model, tmp_path):
    checkpoint = build_checkpoint(model, None, epoch=1, history=[], config=TrainingConfig())
    torch.manual_seed(1)
    other_model = build_model(AutoencoderConfig(image_size=SIZE))
    other = build_checkpoint(other_model, None, epoch=1, history=[], config=TrainingConfig())
    assert checkpoint_fingerprint(checkpoint) == checkpoint_fingerprint(dict(checkpoint))
    assert checkpoint_fingerprint(checkpoint) != checkpoint_fingerprint(other)
    mine = {"value": 0.1, "score": {}, "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint)}
    assert Inspector(checkpoint, mine).threshold == 0.1
    with pytest.raises(ValueError, match="decision threshold was calibrated for another model"):
        Inspector(other, mine)
    ref = {**NormalReference.fit(np.zeros((3, SIZE, SIZE), np.float32)).to_arrays(),
           "checkpoint_fingerprint": np.asarray(checkpoint_fingerprint(other))}  # fmt: skip
    with pytest.raises(ValueError, match="normal reference was calibrated for another model"):
        Inspector(checkpoint, {**mine, "score": {"normal_reference": "mean"}}, reference=ref)
    # files written by the evaluate pipeline carry the fingerprint through from_files
    torch.save(checkpoint, tmp_path / "m.pt")
    (tmp_path / "t.json").write_text(json.dumps({**mine, "score": {"normal_reference": "mean"}}))
    np.savez(tmp_path / "r.npz", **ref)
    with pytest.raises(ValueError, match="normal reference was calibrated for another model"):
        Inspector.from_files(tmp_path / "m.pt", tmp_path / "t.json", tmp_path / "r.npz")


def test_the_reference_fitted_batch_by_batch_equals_the_one_pass_fit():
    from anomaly_ae.scoring.reference import ReferenceAccumulator

    maps = torch.rand(37, 8, 9, generator=torch.Generator().manual_seed(0)) * 3 + 5  # offset: cancellation
    others = torch.from_numpy(_without_the_highest(maps.double().numpy()))
    std, mean = torch.std_mean(others, dim=0, correction=0)
    accumulator = ReferenceAccumulator()
    for start in range(0, 37, 5):
        accumulator.add(maps[start : start + 5].unsqueeze(1))  # (N, 1, H, W) is accepted too
    streamed = accumulator.result()
    assert streamed.n_images == 37
    np.testing.assert_allclose(streamed.mean, mean.float().numpy(), rtol=1e-6)
    np.testing.assert_allclose(streamed.std, std.float().numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        ReferenceAccumulator().add(maps[:1]).result()


# ------------------------------------------------------------------ the low-pass channel


def test_the_lowpass_map_is_the_max_of_two_channels_each_in_its_normal_spread(model):
    """lowpass_sigma > 0: the reference holds one (mean, std) per channel, and the map is the
    per-pixel max of the z-scored map and the z-scored |blur(x - recon, sigma)|."""
    from anomaly_ae.scoring.ssim import gaussian_blur

    rng = np.random.default_rng(5)
    train = rng.random((6, 1, SIZE, SIZE), dtype=np.float32)
    test = rng.random((3, 1, SIZE, SIZE), dtype=np.float32)
    test[0, 0, 8:20, 8:20] += 0.15  # a faint, wide stain
    settings = MapSettings(smoothing_sigma=2.0, normal_reference="zscore", lowpass_sigma=4.0)
    ref = fit_normal_reference(model, train, settings, batch_size=4, device="cpu", precision="fp32")
    assert ref.mean.shape == ref.std.shape == (2, SIZE, SIZE) and ref.channels == 2
    scored = reconstruct_and_score(model, test, settings, 3, device="cpu", precision="fp32", reference=ref)

    plain_settings = MapSettings(smoothing_sigma=2.0, normal_reference="zscore")
    plain_ref = fit_normal_reference(
        model, train, plain_settings, batch_size=4, device="cpu", precision="fp32"
    )
    np.testing.assert_allclose(ref.mean[0], plain_ref.mean, rtol=1e-5, atol=1e-6)
    plain = reconstruct_and_score(
        model, test, plain_settings, 3, device="cpu", precision="fp32", reference=plain_ref
    )

    def lowpass_of(images):
        recon = reconstruct_and_score(model, images, MapSettings(), 8, device="cpu", keep_maps=False)["recon"]
        return gaussian_blur(torch.from_numpy(images - recon).double(), 4.0).abs()[:, 0].float()

    lp_ref = NormalReference.fit(lowpass_of(train))
    np.testing.assert_allclose(ref.mean[1], lp_ref.mean, rtol=1e-4, atol=1e-6)
    lp_z = lp_ref.apply(lowpass_of(test), "zscore").numpy()
    np.testing.assert_allclose(scored["map"], np.maximum(plain["map"], lp_z), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored["score"], scored["map"].reshape(3, -1).max(1), rtol=1e-6)

    # the reference of a one-channel map does not serve a two-channel one, and vice versa
    with pytest.raises(ValueError, match=r"2 channel\(s\).*refit"):
        reconstruct_and_score(model, test, settings, 3, device="cpu", reference=plain_ref)
    with pytest.raises(ValueError, match=r"1 channel\(s\).*refit"):
        reconstruct_and_score(model, test, plain_settings, 3, device="cpu", reference=ref)
    # and it survives the npz round trip
    back = NormalReference.from_arrays(ref.to_arrays())
    assert back.channels == 2 and np.array_equal(back.std, ref.std)


def test_the_lowpass_channel_needs_the_zscore_and_is_named():
    with pytest.raises(ValueError, match="lowpass_sigma.*normal_reference: zscore"):
        MapSettings(lowpass_sigma=4.0, normal_reference="mean")
    settings = MapSettings(smoothing_sigma=4.0, normal_reference="zscore", lowpass_sigma=8.0)
    assert settings.describe() == "1-SSIM(11) smooth 4 ref-zscore + lowpass 8 max"
    assert MapSettings.from_dict(settings.to_dict()) == settings


def test_moved_copies_are_the_images_moved_one_way_each_with_the_border_reflected():
    images = np.arange(2 * 1 * 4 * 5, dtype=np.uint8).reshape(2, 1, 4, 5)
    assert with_moved_copies(images, 0) is images
    moved = with_moved_copies(images, 1)
    assert moved.shape == (10, 1, 4, 5) and moved.dtype == np.uint8
    np.testing.assert_array_equal(moved[:2], images)
    down, up, right, left = moved[2:4], moved[4:6], moved[6:8], moved[8:10]
    np.testing.assert_array_equal(down[..., 1:, :], images[..., :-1, :])
    np.testing.assert_array_equal(down[..., 0, :], images[..., 1, :])  # reflected, not wrapped
    np.testing.assert_array_equal(up[..., :-1, :], images[..., 1:, :])
    np.testing.assert_array_equal(right[..., :, 1:], images[..., :, :-1])
    np.testing.assert_array_equal(left[..., :, :-1], images[..., :, 1:])
    with pytest.raises(ValueError, match="reference_shift.*4x5"):
        with_moved_copies(images, 4)


def test_a_shifted_reference_is_fitted_on_the_training_images_and_their_moved_copies(model):
    """reference_shift: the reference's normal maps are those of the training images and of
    their copies moved up, down, left and right; both channels of a low-pass map."""
    rng = np.random.default_rng(6)
    train = rng.random((3, 1, SIZE, SIZE), dtype=np.float32)
    settings = MapSettings(
        smoothing_sigma=2.0, normal_reference="zscore", lowpass_sigma=4.0, reference_shift=1
    )
    ref = fit_normal_reference(model, train, settings, batch_size=2, device="cpu", precision="fp32")
    assert ref.n_images == 15
    unmoved = dataclasses.replace(settings, reference_shift=0)
    moved = torch.from_numpy(with_moved_copies(train, 1))  # the 3 images, then 4 x 3 copies
    with torch.no_grad():
        maps = raw_map(moved, model(moved), unmoved)  # both channels, (15, 2, H, W)
    expected = ReferenceAccumulator().add(maps, np.tile(np.arange(3), 5)).result()  # copies as their image
    np.testing.assert_allclose(ref.mean, expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.std, expected.std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.upper, expected.upper, rtol=1e-5, atol=1e-6)
    plain = fit_normal_reference(model, train, unmoved, batch_size=2, device="cpu", precision="fp32")
    assert not np.allclose(ref.std, plain.std)  # the moved copies do change the reference


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(reference_shift=1), "reference_shift > 0.*needs normal_reference"),
        (dict(normal_reference="zscore", reference_shift=-1), "whole number of pixels"),
        (dict(normal_reference="zscore", reference_shift=1.5), "whole number of pixels"),
    ],
)
def test_invalid_reference_shift_is_refused_naming_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MapSettings(**kwargs)


def test_a_shifted_reference_is_named_in_the_map_description():
    settings = MapSettings(smoothing_sigma=4, normal_reference="zscore", lowpass_sigma=8, reference_shift=1)
    assert settings.describe() == "1-SSIM(11) smooth 4 ref-zscore moved 1 + lowpass 8 max"
    assert MapSettings.from_dict(settings.to_dict()) == settings


# ------------------------------------------------------------------ a separate localisation map


TWO_MAPS = MapSettings(
    smoothing_sigma=1.0,
    normal_reference="zscore",
    reference_shift=1,
    score_reduction="topk_mean",
    localisation=MapSettings(smoothing_sigma=3.0, normal_reference="zscore", lowpass_sigma=2.0),
)


def test_two_maps_each_with_its_own_reference_score_from_one_and_show_the_other(model, tmp_path):
    """The reference of each map is fitted as it would be alone; the score is the detection
    map's, ``map`` the localisation map's, ``detection_map`` the detection map; both travel
    in one npz (versioned dataset) and come back equal."""
    rng = np.random.default_rng(7)
    train = rng.random((4, 1, SIZE, SIZE), dtype=np.float32)
    test = rng.random((3, 1, SIZE, SIZE), dtype=np.float32)
    options = {"device": "cpu", "precision": "fp32"}
    ref = fit_normal_reference(model, train, TWO_MAPS, batch_size=2, **options)
    alone = fit_normal_reference(model, train, TWO_MAPS.map_part(), batch_size=2, **options)
    loc_alone = fit_normal_reference(model, train, TWO_MAPS.localisation, batch_size=2, **options)
    assert ref.n_images == 20 and ref.localisation.n_images == 4  # moved copies for detection only
    np.testing.assert_array_equal(ref.std, alone.std)
    np.testing.assert_array_equal(ref.localisation.mean, loc_alone.mean)
    assert ref.localisation.channels == 2 and ref.channels == 1

    dataset = NpzDataset(filepath=str(tmp_path / "normal_reference.npz"))
    dataset.save(ref.to_arrays())
    loaded = NormalReference.from_arrays(dataset.load())
    np.testing.assert_array_equal(loaded.localisation.std, ref.localisation.std)
    assert loaded.localisation.n_images == 4

    both = reconstruct_and_score(model, test, TWO_MAPS, 2, reference=loaded, **options)
    detection = reconstruct_and_score(
        model, test, dataclasses.replace(TWO_MAPS, localisation=None), 2, reference=alone, **options
    )
    heat = reconstruct_and_score(model, test, TWO_MAPS.localisation, 2, reference=loc_alone, **options)
    np.testing.assert_array_equal(both["score"], detection["score"])
    np.testing.assert_array_equal(both["detection_map"], detection["map"])
    np.testing.assert_allclose(both["map"], heat["map"], rtol=0, atol=1e-6)
    assert not np.allclose(both["map"], both["detection_map"])
    np.testing.assert_array_equal(both["ssim"], detection["ssim"])
    without_maps = reconstruct_and_score(
        model, test, TWO_MAPS, 2, reference=loaded, keep_maps=False, **options
    )
    assert "map" not in without_maps and "detection_map" not in without_maps
    with pytest.raises(ValueError, match="localisation map .* needs its normal reference"):
        reconstruct_and_score(model, test, TWO_MAPS, 2, reference=alone, **options)


def test_two_maps_with_the_same_moved_copies_reconstruct_each_image_once(model):
    """Both references come from one reconstruction of every normal image and its moved
    copies, and equal each map's reference fitted alone."""
    rng = np.random.default_rng(8)
    train = rng.random((4, 1, SIZE, SIZE), dtype=np.float32)
    options = {"batch_size": 2, "device": "cpu", "precision": "fp32"}
    settings = dataclasses.replace(
        TWO_MAPS, localisation=dataclasses.replace(TWO_MAPS.localisation, reference_shift=1)
    )
    seen = []
    handle = model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    try:
        ref = fit_normal_reference(model, train, settings, **options)
    finally:
        handle.remove()
    assert sum(seen) == 20  # 4 images and their 4 moved copies each, once for both maps
    alone = fit_normal_reference(model, train, settings.map_part(), **options)
    loc_alone = fit_normal_reference(model, train, settings.localisation, **options)
    assert ref.n_images == ref.localisation.n_images == 20
    assert ref.mean.shape == alone.mean.shape and ref.localisation.mean.shape == loc_alone.mean.shape
    np.testing.assert_allclose(ref.mean, alone.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ref.std, alone.std, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ref.localisation.mean, loc_alone.mean)
    np.testing.assert_array_equal(ref.localisation.std, loc_alone.std)


def test_inspector_shows_the_localisation_map_and_judges_by_the_detection_score(model):
    from PIL import Image

    checkpoint = build_checkpoint(model, None, epoch=1, history=[], config=TrainingConfig())
    train = np.random.default_rng(8).random((4, 1, SIZE, SIZE), dtype=np.float32)
    options = {"device": "cpu", "precision": "fp32"}
    ref = fit_normal_reference(model, train, TWO_MAPS, batch_size=2, **options)
    threshold = {"value": 0.5, "score": TWO_MAPS.to_dict()}
    with pytest.raises(ValueError, match="normal_reference.npz"):
        Inspector(checkpoint, threshold)
    inspector = Inspector(checkpoint, threshold, reference=ref.to_arrays(), **options)
    image = (np.random.default_rng(9).random((SIZE, SIZE)) * 255).astype(np.uint8)
    (result,) = inspector.inspect([("a.png", Image.fromarray(image))])
    expected = reconstruct_and_score(
        model, image[None, None] / np.float32(255), TWO_MAPS, 1, reference=ref, **options
    )
    assert result.score == pytest.approx(float(expected["score"][0]), rel=1e-6)
    np.testing.assert_allclose(result.anomaly_map, expected["map"][0], rtol=1e-5, atol=1e-5)
