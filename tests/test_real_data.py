"""Integration on the real data in ../shared (skipped, saying why, when it is absent):
MVTec AD bottle end to end (one short training per test run, in process) and the BSData
pitting category through ingestion and preprocessing (any folder in the MVTec layout)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_BOTTLE, REAL_BSDATA_ROOT, REAL_DATA_ROOT, make_project, requires_real_data
from sklearn.metrics import roc_auc_score

from anomaly_ae.scoring import MapSettings

pytestmark = [pytest.mark.real_data, pytest.mark.slow]
BOTTLE = {"data": {"root": str(REAL_DATA_ROOT), "source": "mvtec"}}
EPOCHS = 8  # the calibrated map separates defects after a few epochs (the paper's map saturates)


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    if not REAL_BOTTLE.is_dir():
        pytest.skip(f"real MVTec AD bottle data not found at {REAL_BOTTLE} (../shared beside the repo)")
    project = make_project(tmp_path_factory.mktemp("real") / "project")
    project.session_run(pipeline="data_ingestion", params=BOTTLE)
    project.session_run(pipeline="data_processing", params=BOTTLE)
    return project


@requires_real_data
def test_ingestion_and_preprocessing_counts(real_project):
    info = json.loads(real_project.latest("data/02_intermediate/bottle/dataset_info.json").read_text())
    assert info["source"] == "mvtec" and info["category"] == "bottle"
    manifest = pd.read_csv(real_project.latest("data/05_model_input/bottle/image_manifest.csv"))
    counts = manifest.groupby("split").size().to_dict()
    assert counts["train"] + counts["validation"] == 209 and counts["validation"] == 21
    assert counts["test"] == 83
    assert manifest["mask_file"].notna().sum() == 63
    arrays = {}
    for split in ("train", "validation", "test"):
        with np.load(real_project.latest(f"data/05_model_input/bottle/{split}_images.npz")) as data:
            arrays[split] = {k: data[k] for k in data.files}
    assert arrays["train"]["images"].shape == (188, 1, 256, 256)
    assert arrays["test"]["images"].shape == (83, 1, 256, 256)
    for split in arrays.values():
        images = split["images"]
        assert images.dtype == np.uint8 and images.std() / 255 > 0.05  # the compact cache
    masks, labels = arrays["test"]["masks"], arrays["test"]["labels"]
    assert masks.shape == (83, 256, 256) and set(np.unique(masks)) == {0, 1}
    assert int((masks.reshape(83, -1).max(axis=1) > 0).sum()) == 63 == int(labels.sum())


@requires_real_data
def test_short_training_then_calibrate_evaluate_and_predict(real_project, tmp_path):
    real_project.session_run(
        pipeline="training",
        params={**BOTTLE, "training": {"epochs": EPOCHS, "progress": False, "compile": False}},
    )
    # calibration + evaluation + report; without the grid agreement (the whole grid scored again
    # on the test images: reported only, it chooses nothing; 3.6 of a real bottle evaluation's
    # 10 min with the default grid), which the quick run's tests check (tests/test_pipelines.py)
    real_project.session_run(pipeline="evaluate", params={**BOTTLE, "evaluation": {"grid_agreement": False}})
    chosen = json.loads(real_project.latest("data/07_model_output/bottle/calibrated_map.json").read_text())
    metrics = json.loads(real_project.latest("data/08_reporting/bottle/evaluation_metrics.json").read_text())
    table = pd.read_csv(real_project.latest("data/07_model_output/bottle/ssim_table.csv"))
    assert len(table) == 83 and table["label"].sum() == 63
    # the same map for both: the JSON keeps the heat map's settings, the evaluated map None
    evaluated, calibrated = (
        MapSettings.from_dict(d) for d in (metrics["anomaly_map"], chosen["map_settings"])
    )
    assert evaluated == calibrated and metrics["map_source"] == "calibrated"
    assert metrics["data_source"] == "mvtec" and metrics["n_test_images"] == 83
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(table["label"], table["score"]), abs=1e-9)
    # a short model with the calibrated map already ranks defects above normal images
    assert metrics["image_auroc"] > 0.8, metrics
    assert chosen["selection_score"] > chosen["paper_selection_score"]
    report = real_project.latest("data/08_reporting/bottle/report.html").read_text()
    assert "SYNTHETIC" not in report and "Table II" in report and chosen["setting"] in report

    # predict on copies of real test images plus junk
    folder = tmp_path / "incoming"
    for kind in ("good", "broken_large", "contamination"):
        (folder / kind).mkdir(parents=True)
        for source in sorted((REAL_BOTTLE / "test" / kind).glob("*.png"))[:5]:
            shutil.copy(source, folder / kind / source.name)
    (folder / "broken.png").write_bytes((folder / "good" / "000.png").read_bytes()[:5000])
    (folder / "readme.txt").write_text("junk")
    real_project.session_run(pipeline="predict", params={"predict": {"input_dir": str(folder)}})
    predictions = pd.read_csv(real_project.latest("data/07_model_output/bottle/predictions.csv"))
    assert len(predictions) == 17
    errors = predictions.set_index("file")["error"]
    assert errors.notna().sum() == 2 and pd.notna(errors["broken.png"]) and pd.notna(errors["readme.txt"])
    scored = predictions[predictions["error"].isna()]
    defective = scored[~scored["file"].str.startswith("good/")]
    good = scored[scored["file"].str.startswith("good/")]
    assert len(defective) == 10 and len(good) == 5
    assert defective["score"].mean() > good["score"].mean()
    # the same files score the same in predict as in evaluate (one scoring core, same preprocessing)
    by_file = table.set_index(table["file"].str.replace("test/", "", regex=False))["score"]
    for row in scored.itertuples():
        assert row.score == pytest.approx(by_file[row.file], abs=1e-5), row.file


BSDATA = REAL_BSDATA_ROOT / "bsdata_pitting"


@pytest.mark.skipif(not BSDATA.is_dir(), reason=f"BSData pitting not found at {BSDATA} (../shared/bsdata)")
def test_another_real_category_in_the_mvtec_layout(tmp_path):
    """A category that is not an MVTec AD name, with colour, non-square images, is its own namespace."""
    project = make_project(tmp_path / "project")
    params = {"data": {"root": str(REAL_BSDATA_ROOT), "category": "bsdata_pitting", "source": "mvtec"}}
    project.session_run(pipeline="data_ingestion", params=params)
    project.session_run(pipeline="data_processing", params=params)
    folder = "data/05_model_input/bsdata_pitting"
    manifest = pd.read_csv(project.latest(f"{folder}/image_manifest.csv"))
    counts = manifest.groupby("split").size().to_dict()
    assert counts["train"] + counts["validation"] == 390 and counts["test"] == 97 + 167
    with np.load(project.latest(f"{folder}/test_images.npz")) as test:
        # 512x208 images keep their aspect (preprocessing.keep_aspect): 256 high, 2 x 256 wide
        assert test["images"].shape == (264, 1, 256, 512)
        assert int(test["labels"].sum()) == 167
        assert int((test["masks"].reshape(264, -1).max(axis=1) > 0).sum()) <= 167
