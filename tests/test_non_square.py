"""Non-square products: the shape rule (preprocessing.keep_aspect), the model made concrete
for it (model.image_size / tile_size ``auto``), and one product end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_ae.data.preprocess import model_shape
from anomaly_ae.model import AutoencoderConfig, config_for_images
from anomaly_ae.param_schema import ParameterError, validate_parameters


def _manifest(train_sizes: list[tuple[int, int]], test_sizes: list[tuple[int, int]] = ()) -> pd.DataFrame:
    rows = [{"split": "train", "width": w, "height": h} for w, h in train_sizes]
    rows += [{"split": "test", "width": w, "height": h} for w, h in test_sizes]
    return pd.DataFrame(rows)


def test_keep_aspect_rounds_the_training_images_median_ratio_to_whole_tiles():
    # BSData: 512 wide x 208 high, ratio 2.46 -> two 256 px squares side by side
    bsdata = _manifest([(512, 208)] * 5, test_sizes=[(208, 2000)] * 9)  # test images are not read
    assert model_shape(bsdata, 256, keep_aspect=True) == (256, 512)
    # tall images the other way round; the median decides between sizes
    tall = _manifest([(300, 1000), (310, 900), (320, 950)])
    assert model_shape(tall, 128, keep_aspect=True) == (384, 128)
    # square-ish products (ratio < 1.5) stay square, as the paper's
    assert model_shape(_manifest([(900, 900)]), 256, keep_aspect=True) == (256, 256)
    assert model_shape(_manifest([(640, 480), (1000, 700)]), 256, keep_aspect=True) == (256, 256)
    # stretching (the paper) and an explicit [height, width] ignore the images' sizes
    assert model_shape(bsdata, 256, keep_aspect=False) == (256, 256)
    assert model_shape(bsdata, [208, 512], keep_aspect=True) == (208, 512)
    assert model_shape(bsdata, "128+384", keep_aspect=False) == (128, 384)


def test_auto_model_sizes_follow_the_data():
    paper = config_for_images({"image_size": "auto", "tile_size": "auto"}, (256, 256))
    assert paper == AutoencoderConfig()  # square data: the paper's one network
    wide = config_for_images({"image_size": "auto", "tile_size": "auto"}, (256, 512))
    assert wide.shape == (256, 512) and wide.tile_size == 256 and wide.tile_grid == (1, 2)
    assert wide.describe() == "paper_table1, 256x512 px (height x width) as 1x2 tiles of 256 px"
    whole = config_for_images({"image_size": "auto", "tile_size": None}, (256, 512))
    assert whole.tile_size is None and whole.tile_grid == (1, 1)
    # explicit values are kept (the nodes compare them with the data)
    assert config_for_images({"image_size": 512, "tile_size": 256}, (128, 128)).shape == (512, 512)
    # a shorter side that does not divide the longer one: one network over the whole image
    odd = config_for_images({"image_size": "auto", "tile_size": "auto"}, (208, 512))
    assert odd.tile_size is None and odd.shape == (208, 512)
    with pytest.raises(ValueError, match=r"model\.tile_size=256 must divide model\.image_size=\[256, 640\]"):
        config_for_images({"image_size": "auto", "tile_size": 256}, (256, 640))
    with pytest.raises(ValueError, match=r"model\.tile_size must be a positive integer, null or auto"):
        AutoencoderConfig(tile_size="big")


def test_auto_passes_the_parameter_check_and_other_model_keys_are_still_checked():
    validate_parameters({"model": {"image_size": "auto", "tile_size": "auto", "dropout": 0.2}})
    with pytest.raises(ParameterError, match=r"model\.dropout"):
        validate_parameters({"model": {"image_size": "auto", "tile_size": "auto", "dropout": "x"}})
    with pytest.raises(ParameterError, match=r"tile_size"):
        validate_parameters({"model": {"image_size": "auto", "tile_size": "huge"}})


def _wide_product(root, size: tuple[int, int]) -> None:
    """The synthetic bottle sample stretched to ``size`` (width, height): a wide product in
    the MVTec layout, images and masks alike."""
    from anomaly_ae.data.synthetic import generate_synthetic_category

    source = generate_synthetic_category(
        root.parent / "square", "bottle", n_train=24, n_test_good=4, n_test_per_defect=2, size=128
    )
    for path in source.rglob("*.png"):
        target = root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            mask = "ground_truth" in path.parts
            image.resize(size, Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR).save(target)


@pytest.mark.slow
def test_a_wide_product_is_trained_evaluated_and_exported_at_its_aspect(kedro_project, tmp_path):
    """224 px wide x 96 high images (ratio 2.33): with the defaults (keep_aspect, auto sizes)
    the quick project trains 1x2 tiles of the paper network on 128x256 images; calibration,
    the report and the bundle all see 128x256, and the bundle judges a file as torch does."""
    from anomaly_ae.model.checkpoint import load_checkpoint
    from anomaly_ae.runtime import load_bundle

    _wide_product(tmp_path / "data" / "widget", (224, 96))
    params = {
        "data": {"root": str(tmp_path / "data"), "category": "widget", "source": "mvtec"},
        "training": {"epochs": 3, "progress": False},
    }
    kedro_project.session_run(env="quick", params=params)
    kedro_project.session_run(pipeline="export", env="quick", params=params)

    train = np.load(kedro_project.latest("data/05_model_input/widget/train_images.npz"))
    assert train["images"].shape[1:] == (1, 128, 256)
    checkpoint = load_checkpoint(kedro_project.latest("data/06_models/widget/model_checkpoint.pt"))
    config = AutoencoderConfig.from_dict(checkpoint["model_config"])
    assert (config.shape, config.tile_size) == ((128, 256), 128)
    metrics = json.loads(kedro_project.latest("data/08_reporting/widget/evaluation_metrics.json").read_text())
    assert metrics["model"] == "paper_table1, 128x256 px (height x width) as 1x2 tiles of 128 px"
    report = kedro_project.latest("data/08_reporting/widget/report.html").read_text()
    assert f"model <b>{metrics['model']}</b>" in report
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{kedro_project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert metrics["model"] in {r.data.tags.get("model") for r in runs}  # the MLflow UI names the network
    bundle_dir = kedro_project.latest("data/06_models/widget/inspection_bundle")
    bundle = load_bundle(bundle_dir, threads=1)
    assert bundle.image_size == (128, 256)
    assert bundle.manifest["input"]["resize"]["size"] == [128, 256]
    (verdict,) = bundle.inspect([tmp_path / "data/widget/test/good/000.png"], keep_maps=True)
    assert verdict.error is None and (verdict.width, verdict.height) == (224, 96)
    assert verdict.anomaly_map.shape == (128, 256)
