"""Tests for anomaly_ae.data.transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_ae.data.transforms import (
    ImageDecodeError,
    as_unit_float,
    decode_image,
    image_shape,
    mask_to_array,
    to_grayscale_float,
    to_model_array,
    to_model_uint8,
)


def _check(arr: np.ndarray, size: int) -> None:
    assert arr.dtype == np.float32
    assert arr.shape == (size, size)
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0


def _gradient(h: int = 40, w: int = 40) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1)).round().astype(np.uint8)


def test_l_mode_values_and_shape():
    img = Image.fromarray(np.full((32, 32), 255, dtype=np.uint8))
    arr = to_model_array(img, size=16)
    _check(arr, 16)
    np.testing.assert_allclose(arr, 1.0)
    half = to_model_array(Image.fromarray(np.full((8, 8), 51, dtype=np.uint8)), size=8)
    np.testing.assert_allclose(half, 0.2, atol=1e-6)


@pytest.mark.parametrize("resample", ["area", "bilinear"])
def test_resample_methods_shape_and_range(resample):
    img = Image.fromarray(_gradient(64, 48))
    arr = to_model_array(img, size=20, resample=resample)
    _check(arr, 20)
    assert arr[:, 0].mean() < arr[:, -1].mean()


def test_area_is_box_average():
    data = np.zeros((4, 4), dtype=np.uint8)
    data[:2, :2] = 255  # top-left 2x2 block white
    arr = to_model_array(Image.fromarray(data), size=2, resample="area")
    np.testing.assert_allclose(arr, [[1.0, 0.0], [0.0, 0.0]], atol=1e-6)


def test_unknown_resample_raises():
    with pytest.raises(ValueError, match="resample"):
        to_model_array(Image.new("L", (4, 4)), size=4, resample="fancy")


def test_rgb_uses_luma():
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    arr = to_grayscale_float(Image.fromarray(rgb))
    _check(arr, 10)
    np.testing.assert_allclose(arr, 0.299, atol=1e-5)


def test_rgba_composited_on_black():
    rgba = np.full((10, 10, 4), 255, dtype=np.uint8)
    rgba[:5, :, 3] = 0  # top half transparent
    arr = to_model_array(Image.fromarray(rgba), size=10)
    _check(arr, 10)
    np.testing.assert_allclose(arr[:5], 0.0, atol=1e-6)
    np.testing.assert_allclose(arr[5:], 1.0, atol=1e-5)


def test_la_mode():
    img = Image.merge("LA", [Image.new("L", (6, 6), 200), Image.new("L", (6, 6), 255)])
    arr = to_model_array(img, size=6)
    np.testing.assert_allclose(arr, 200 / 255, atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_scaled_by_65535(mode):
    img = Image.new(mode, (2, 2))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 32768)
    img.putpixel((0, 1), 255)
    arr = to_grayscale_float(img)
    _check(arr, 2)
    assert arr[0, 0] == pytest.approx(1.0)
    assert arr[0, 1] == pytest.approx(0.5, abs=1e-4)
    assert arr[1, 0] == pytest.approx(255 / 65535, rel=1e-4)  # not clipped to 255 -> 1.0
    assert arr[1, 1] == 0.0


def test_16bit_png_roundtrip(tmp_path: Path):
    data = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(data).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
        arr = to_grayscale_float(img)
    np.testing.assert_allclose(arr, data / 65535.0, atol=1e-6)


def test_i_and_f_modes():
    i_img = Image.fromarray(np.array([[0, 65535], [70000, -5]], dtype=np.int32))
    assert i_img.mode == "I"
    np.testing.assert_allclose(to_grayscale_float(i_img), [[0, 1], [1, 0]], atol=1e-6)
    f_img = Image.fromarray(np.array([[0.25, 0.75], [2.0, -1.0]], dtype=np.float32))
    assert f_img.mode == "F"
    np.testing.assert_allclose(to_grayscale_float(f_img), [[0.25, 0.75], [1, 0]], atol=1e-6)


def test_palette_and_bilevel_modes():
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    pal = Image.frombytes("P", (2, 2), indices.tobytes())
    pal.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    assert pal.mode == "P"
    arr = to_grayscale_float(pal)
    _check(arr, 2)
    np.testing.assert_allclose(arr, [[0.0, 1.0], [0.299, 0.114]], atol=1e-5)

    bilevel = Image.new("1", (8, 8), 1)
    np.testing.assert_allclose(to_grayscale_float(bilevel), 1.0)


def test_output_is_contiguous_and_not_resized_when_matching():
    arr = to_model_array(Image.fromarray(_gradient(16, 16)), size=16)
    assert arr.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(arr[0], _gradient(16, 16)[0] / 255.0, atol=1e-6)


def test_mask_nearest_only_binary_values():
    mask = np.zeros((37, 37), dtype=np.uint8)
    mask[5:20, 7:30] = 255
    mask[30, 30] = 17  # any non-zero value is defective
    out = mask_to_array(Image.fromarray(mask), size=16)
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    assert set(np.unique(out).tolist()) == {0, 1}
    same = mask_to_array(Image.fromarray(mask), size=37)
    assert same[30, 30] == 1 and same.sum() == 15 * 23 + 1


def test_non_square_sizes_are_height_then_width():
    """``size=(height, width)`` keeps a non-square image's aspect: a 40x120 (h x w) gradient
    halved on both sides is 20x60, left-to-right still dark-to-bright; its mask follows."""
    wide = Image.fromarray(_gradient(40, 120))
    arr = to_model_array(wide, size=(20, 60))
    assert arr.shape == (20, 60)
    assert np.all(np.diff(arr[0]) >= 0) and arr[0, -1] > 0.95 and arr[0, 0] < 0.05
    np.testing.assert_array_equal(to_model_uint8(wide, size=[20, 60]), np.rint(arr * 255).astype(np.uint8))
    mask = np.zeros((40, 120), np.uint8)
    mask[:, 100:] = 255
    out = mask_to_array(Image.fromarray(mask), size=(20, 60))
    assert out.shape == (20, 60) and out[:, 50:].all() and not out[:, :50].any()
    # one side is a square; height+width is the command-line spelling of [height, width]
    assert image_shape(256) == (256, 256)
    assert image_shape([208, 512]) == image_shape("208+512") == (208, 512)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, [256], [256, 0], "256x512", "big", [1, 2, 3]])
def test_a_bad_image_size_is_refused_with_the_forms_it_takes(size):
    with pytest.raises(ValueError, match=r"positive integer.*\[height, width\].*256\+512"):
        image_shape(size)


def test_mask_from_rgb_and_bilevel():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[2:4, 2:4, 1] = 200
    out = mask_to_array(Image.fromarray(rgb), size=8)
    assert out.sum() == 4
    assert mask_to_array(Image.new("1", (8, 8), 1), size=4).tolist() == [[1] * 4] * 4


def test_decode_image_ok(tmp_path: Path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    img = decode_image(lambda: Image.open(path), str(path))
    assert img.size == (8, 8)


def test_decode_image_truncated_png(tmp_path: Path):
    path = tmp_path / "truncated.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as info:
        decode_image(lambda: Image.open(path), str(path))
    assert str(path) in str(info.value)
    assert "Replace" in str(info.value) and "remove" in str(info.value)


def test_decode_image_text_file(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageDecodeError, match="notes.png") as info:
        decode_image(lambda: Image.open(path), "test/good/notes")
    assert "test/good/notes" in str(info.value)
    assert info.value.__cause__ is not None


def test_decode_image_wraps_arbitrary_loader_errors():
    class DatasetError(Exception):
        pass

    def load() -> Image.Image:
        raise DatasetError("Failed while loading data")

    with pytest.raises(ImageDecodeError, match="train/good/007"):
        decode_image(load, "train/good/007")


def test_model_array_is_the_uint8_cache_over_255():
    """Training reads the compact uint8 cache; predict and the runtime read files through
    to_model_array: the two must be the same numbers."""
    image = Image.fromarray(_gradient(37, 53)).convert("RGB")
    as_uint8 = to_model_uint8(image, size=16)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (16, 16)
    np.testing.assert_array_equal(to_model_array(image, size=16), as_unit_float(as_uint8))
    exact = np.asarray(Image.fromarray(to_grayscale_float(image)).resize((16, 16), Image.BOX))
    assert np.abs(to_model_array(image, size=16) - exact).max() <= 0.5 / 255 + 1e-6
    floats = np.linspace(0, 1, 5, dtype=np.float32)
    assert as_unit_float(floats) is floats  # float32 passes through without a copy
