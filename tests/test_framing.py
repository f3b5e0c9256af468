"""Images of many sizes (issue #14): ``preprocessing.fit`` (stretch, pad, auto), the rule
that chooses it from the normal training images, and one product end to end (checkpoint,
predict and the exported bundle frame an image as training did)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_ae.data.preprocess import choose_framing, framing_array, framing_of
from anomaly_ae.data.transforms import Framing, mask_to_array, to_model_array, to_model_uint8


def _noise(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def test_pad_keeps_the_pixel_size_and_mirrors_the_rest_of_the_frame():
    pixels = _noise((40, 70), 0)
    array = to_model_uint8(Image.fromarray(pixels), (64, 96), framing=Framing("pad", 1.0))
    assert array.shape == (64, 96)
    top, left = (64 - 40) // 2, (96 - 70) // 2
    assert np.array_equal(array[top : top + 40, left : left + 70], pixels)  # not resampled at all
    assert np.array_equal(array[top - 1, left : left + 70], pixels[0])  # mirrored margins
    assert np.array_equal(array[:, left - 1], array[:, left])
    # stretch (the paper, and None) fills the frame with the whole image instead
    stretched = to_model_uint8(Image.fromarray(pixels), (64, 96))
    assert np.array_equal(stretched, to_model_uint8(Image.fromarray(pixels), (64, 96), framing=Framing()))
    assert not np.array_equal(stretched[top : top + 40, left : left + 70], pixels)


def test_one_scale_for_all_and_an_image_too_large_for_it_is_shrunk_to_fit():
    framing = Framing("pad", 0.5)
    assert framing.placement(100, 60, (64, 64)) == (30, 50, 17, 7)  # 0.5 of 100x60, centred
    assert framing.placement(200, 100, (64, 64)) == (32, 64, 16, 0)  # 0.5 would not fit: 0.32
    assert Framing().placement(200, 100, (64, 64)) == (64, 64, 0, 0)
    with pytest.raises(ValueError, match="preprocessing.fit"):
        Framing("crop")
    with pytest.raises(ValueError, match="positive scale"):
        Framing("pad")


def test_a_mask_is_placed_and_mirrored_exactly_as_its_image():
    pixels = np.zeros((30, 50), np.uint8)
    pixels[5:9, 40:44] = 255
    framing = Framing("pad", 1.0)
    image = to_model_array(Image.fromarray(pixels), (48, 64), framing=framing)
    mask = mask_to_array(Image.fromarray(pixels), (48, 64), framing=framing)
    assert np.array_equal(mask.astype(bool), image > 0.5)
    assert mask.sum() > 16  # the mirrored margin holds mirrored copies, labelled as such


def test_the_framing_travels_with_the_cached_arrays():
    framing = Framing("pad", 0.75)
    assert framing_of({"framing": framing_array(framing)}) == framing
    assert framing_of({"images": np.zeros((1, 1, 4, 4))}) == Framing()  # caches from before: stretch
    assert Framing.from_dict(framing.to_dict()) == framing and Framing.from_dict(None) == Framing()


def _folder(images: list[np.ndarray]) -> tuple[dict, pd.DataFrame]:
    """Loaders and a manifest of normal training images, as the data_processing node sees them."""
    loaders, rows = {}, []
    for i, pixels in enumerate(images):
        name = f"train/good/{i:03d}.png"
        loaders[f"train/good/{i:03d}"] = lambda p=pixels: Image.fromarray(p)
        height, width = pixels.shape
        rows.append({"split": "train", "image_file": name, "width": width, "height": height})
    return loaders, pd.DataFrame(rows)


def _surface(seed: int = 0) -> np.ndarray:
    """A grayscale texture with detail at a few pixels' scale, 400x400."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((100, 100)).astype(np.float32)
    fine = np.asarray(Image.fromarray(coarse).resize((400, 400), Image.Resampling.BICUBIC))
    return (fine * 255).clip(0, 255)


def test_auto_pads_crops_of_one_surface_and_stretches_one_view_at_several_resolutions():
    rng = np.random.default_rng(1)
    surface = _surface()
    sides = rng.integers(60, 200, size=24)
    crops = []
    for side in sides:
        y, x = rng.integers(0, 400 - side, size=2)
        crops.append(surface[y : y + side, x : x + side].astype(np.uint8))
    loaders, manifest = _folder(crops)
    framing, seen = choose_framing(loaders, manifest, "data", (64, 64), "auto")
    assert framing.fit == "pad" and seen["chosen"] == "pad"
    assert abs(seen["rho_detail_native"]) < abs(seen["rho_detail_stretched"])
    assert framing.scale == pytest.approx(64 / sides.max())  # the largest training image fills the frame
    # the same 160-px view of the surface, saved at several resolutions: stretch
    view = Image.fromarray(surface[:160, :160].astype(np.uint8))
    resolutions = [np.asarray(view.resize((int(s), int(s)), Image.Resampling.BOX)) for s in sides]
    loaders, manifest = _folder(resolutions)
    framing, seen = choose_framing(loaders, manifest, "data", (64, 64), "auto")
    assert framing == Framing() and seen["chosen"] == "stretch"
    assert abs(seen["rho_detail_native"]) > abs(seen["rho_detail_stretched"])


def test_auto_keeps_the_paper_for_images_of_one_size_without_decoding_them():
    def never():
        raise AssertionError("decoded")

    rows = [
        {"split": "train", "image_file": f"train/good/{i}.png", "width": 900, "height": 900} for i in range(9)
    ]
    manifest = pd.DataFrame(rows)
    loaders = {f"train/good/{i}": never for i in range(9)}
    framing, seen = choose_framing(loaders, manifest, "data", (256, 256), "auto")
    assert framing == Framing() and seen == {"fit": "auto", "size_spread": 1.0, "chosen": "stretch"}
    assert choose_framing(loaders, manifest, "data", (256, 256), "pad")[0] == Framing("pad", 256 / 900)
    with pytest.raises(ValueError, match="preprocessing.fit must be one of stretch, pad, auto"):
        choose_framing(loaders, manifest, "data", (256, 256), "crop")


def test_a_checkpoint_framed_otherwise_than_the_data_is_refused_naming_the_setting():
    from anomaly_ae.model import AutoencoderConfig, build_model
    from anomaly_ae.model.checkpoint import CheckpointError, checkpoint_framing, model_from_checkpoint

    model = build_model(AutoencoderConfig(architecture="paper_table1", image_size=64))
    checkpoint = {
        "format_version": 1,
        "model_config": model.config.to_dict(),
        "model_state": model.state_dict(),
        "metadata": {"framing": Framing("pad", 0.5).to_dict()},
    }
    assert checkpoint_framing(checkpoint) == Framing("pad", 0.5)
    model_from_checkpoint(checkpoint, framing=Framing("pad", 0.5))
    with pytest.raises(CheckpointError, match=r"preprocessing\.fit=pad and rebuild the inputs"):
        model_from_checkpoint(checkpoint, framing=Framing())
    with pytest.raises(CheckpointError, match="scaled by 0.5"):
        model_from_checkpoint(checkpoint, framing=Framing("pad", 0.25))
    del checkpoint["metadata"]  # checkpoints from before framing: stretched
    assert checkpoint_framing(checkpoint) == Framing()


def _crops_of_a_surface(root, n_train: int = 30) -> None:
    """A texture product photographed as crops of many sizes at one pixel size, MVTec layout:
    good crops, and crops with a dark spot (masked)."""
    rng = np.random.default_rng(5)
    surface = _surface(3)

    def crop() -> np.ndarray:
        side_y, side_x = rng.integers(48, 120, size=2)
        y, x = rng.integers(0, 400 - side_y), rng.integers(0, 400 - side_x)
        return surface[y : y + side_y, x : x + side_x].astype(np.uint8).copy()

    def save(pixels: np.ndarray, relative: str) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)

    for i in range(n_train):
        save(crop(), f"train/good/{i:03d}.png")
    for i in range(6):
        save(crop(), f"test/good/{i:03d}.png")
        pixels = crop()
        mask = np.zeros_like(pixels)
        cy, cx = pixels.shape[0] // 2, pixels.shape[1] // 2
        mask[cy - 4 : cy + 4, cx - 4 : cx + 4] = 255
        pixels[mask > 0] = 10
        save(pixels, f"test/spot/{i:03d}.png")
        save(mask, f"ground_truth/spot/{i:03d}_mask.png")


@pytest.mark.slow
def test_a_product_in_images_of_many_sizes_is_padded_in_training_predict_and_the_bundle(
    kedro_project, tmp_path, one_torch_thread
):
    from anomaly_ae import Inspector
    from anomaly_ae.model.checkpoint import load_checkpoint
    from anomaly_ae.runtime import load_bundle

    _crops_of_a_surface(tmp_path / "data" / "tiles")
    params = {
        "data": {"root": str(tmp_path / "data"), "category": "tiles", "source": "mvtec"},
        "training": {"epochs": 2, "progress": False},
        "preprocessing": {"fit": "auto"},  # the rule, on crops of one surface: pad
    }
    kedro_project.session_run(env="quick", params=params)
    kedro_project.session_run(pipeline="export", env="quick", params=params)

    test = np.load(kedro_project.latest("data/05_model_input/tiles/test_images.npz"))
    framing = framing_of(test)
    assert framing.fit == "pad" and 0 < framing.scale <= 128 / 48
    assert test["valid"].shape == test["masks"].shape and 0 < test["valid"].mean() < 1
    checkpoint_file = kedro_project.latest("data/06_models/tiles/model_checkpoint.pt")
    assert load_checkpoint(checkpoint_file)["metadata"]["framing"] == framing.to_dict()
    # the spot keeps its 8x8 pixels (times the one scale) in every test image, not each image's own factor
    from scipy import ndimage

    for mask in test["masks"][test["labels"] == 1]:  # the spot (and mirrored copies in the margin)
        boxes = ndimage.find_objects(ndimage.label(mask)[0])
        sides = max(((b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes), key=np.prod)
        assert all(abs(side - 8 * framing.scale) <= 1.5 for side in sides), sides
    bundle = load_bundle(kedro_project.latest("data/06_models/tiles/inspection_bundle"), threads=1)
    assert bundle.manifest["input"]["resize"]["non_square"] == "padded"
    assert bundle.framing == framing
    inspector = Inspector.from_files(
        checkpoint_file,
        kedro_project.latest("data/07_model_output/tiles/decision_threshold.json"),
        kedro_project.latest("data/07_model_output/tiles/normal_reference.npz"),
        device="cpu",
        resample="area",
    )
    assert inspector.framing == framing
    files = sorted((tmp_path / "data" / "tiles" / "test").rglob("*.png"))
    from test_export import _parity

    _parity(bundle, inspector, files)
    # the arrays evaluation scored are the ones predict prepares from the same files
    good = sorted((tmp_path / "data" / "tiles" / "test" / "good").glob("*.png"))
    prepared = inspector._prepare(good[0].name, good[0])[1]
    assert np.array_equal(prepared, test["images"][test["labels"] == 0][0, 0] / np.float32(255))
    metrics = json.loads(kedro_project.latest("data/08_reporting/tiles/evaluation_metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1


def test_pixel_metrics_leave_a_padded_frames_margins_out():
    from anomaly_ae.data.preprocess import frame_valid
    from anomaly_ae.evaluation.metrics import aupro, pixel_auroc

    rng = np.random.default_rng(2)
    masks = np.zeros((4, 20, 30), np.uint8)
    masks[:2, 8:12, 10:15] = 1
    maps = rng.random(masks.shape).astype(np.float32) + masks
    inside = (slice(None), slice(4, 16), slice(5, 25))
    valid = np.zeros(masks.shape, bool)
    valid[inside] = True
    # margins that mirror a defect and score high or low do not move the figures
    masks[:, :4], maps[:, :4] = 1, 0.0
    assert pixel_auroc(masks, maps, valid) == pixel_auroc(masks[inside], maps[inside])
    assert aupro(masks, maps, valid=valid) == pytest.approx(aupro(masks[inside], maps[inside]), abs=1e-12)
    assert pixel_auroc(masks, maps) < pixel_auroc(masks, maps, valid)
    rows = pd.DataFrame({"width": [40, 10], "height": [10, 40]})
    boxes = frame_valid(rows, (20, 20), Framing("pad", 0.5))
    assert boxes[0].sum() == 20 * 5 and boxes[0, 7:12].all() and boxes[1][:, 7:12].all()
