"""Integration on the real MVTec AD bottle data in ../shared (skipped when it is absent)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_BOTTLE, REAL_DATA_ROOT, make_project, requires_real_data

pytestmark = [requires_real_data, pytest.mark.real_data, pytest.mark.slow]
DATA = f"data.root={REAL_DATA_ROOT},data.source=mvtec"


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("real") / "project")
    project.run("run", "--pipeline=data_ingestion", "--params", DATA)
    project.run("run", "--pipeline=data_processing", "--params", DATA)
    return project


def test_ingestion_and_preprocessing_counts(real_project):
    info = json.loads((real_project.path / "data/02_intermediate/dataset_info.json").read_text())
    assert info["source"] == "mvtec" and info["category"] == "bottle"
    manifest = pd.read_csv(real_project.path / "data/05_model_input/image_manifest.csv")
    counts = manifest.groupby("split").size().to_dict()
    assert counts["train"] + counts["validation"] == 209 and counts["validation"] == 21
    assert counts["test"] == 83
    assert manifest["mask_file"].notna().sum() == 63
    arrays = {}
    for split in ("train", "validation", "test"):
        with np.load(real_project.path / f"data/05_model_input/{split}_images.npz") as data:
            arrays[split] = {k: data[k] for k in data.files}
    assert arrays["train"]["images"].shape == (188, 1, 256, 256)
    assert arrays["test"]["images"].shape == (83, 1, 256, 256)
    for split in arrays.values():
        images = split["images"]
        assert (
            images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
        )
    masks, labels = arrays["test"]["masks"], arrays["test"]["labels"]
    assert masks.shape == (83, 256, 256) and set(np.unique(masks)) == {0, 1}
    assert int((masks.reshape(83, -1).max(axis=1) > 0).sum()) == 63 == int(labels.sum())


def test_short_training_then_evaluate_and_predict(real_project, tmp_path):
    # 20 epochs: enough for BatchNorm's slow (Keras momentum 0.99) running statistics to settle
    real_project.run("run", "--pipeline=training", "--params", "training.epochs=20,training.progress=false")
    # the recommended (smoothed) map: the paper-default max of the raw 1 - SSIM map saturates
    # at 1.0 on a briefly trained model, which would make every score equal
    real_project.run("run", "--pipeline=evaluate", "--env", "recommended")
    table = pd.read_csv(real_project.latest("data/07_model_output/ssim_table.csv"))
    assert len(table) == 83 and table["label"].sum() == 63
    metrics = json.loads(real_project.latest("data/08_reporting/evaluation_metrics.json").read_text())
    for name in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "ssim_normal_mean",
        "ssim_defect_mean",
    ):
        assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
    assert metrics["data_source"] == "mvtec" and metrics["n_test_images"] == 83
    report = (real_project.path / "data/08_reporting/report.html").read_text()
    assert "SYNTHETIC" not in report and "Table II" in report

    # predict on copies of real test images plus junk
    folder = tmp_path / "incoming"
    for kind in ("good", "broken_large", "contamination"):
        (folder / kind).mkdir(parents=True)
        for source in sorted((REAL_BOTTLE / "test" / kind).glob("*.png"))[:5]:
            shutil.copy(source, folder / kind / source.name)
    (folder / "broken.png").write_bytes((folder / "good" / "000.png").read_bytes()[:5000])
    (folder / "readme.txt").write_text("junk")
    real_project.run("run", "--pipeline=predict", "--params", f"predict.input_dir={folder}")
    predictions = pd.read_csv(real_project.latest("data/07_model_output/predictions.csv"))
    assert len(predictions) == 17
    errors = predictions.set_index("file")["error"]
    assert errors.notna().sum() == 2 and pd.notna(errors["broken.png"]) and pd.notna(errors["readme.txt"])
    scored = predictions[predictions["error"].isna()]
    defective = scored[~scored["file"].str.startswith("good/")]
    good = scored[scored["file"].str.startswith("good/")]
    assert len(defective) == 10 and len(good) == 5
    assert defective["score"].mean() > good["score"].mean()
