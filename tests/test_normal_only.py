"""A product with normal images only (how every new product starts), and test sets of one class.

Training, the label-free map choice, the threshold and the export need nothing but normal
images; the evaluation measures what the test set allows and says what it cannot.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch

from anomaly_ae.data.mvtec import index_layout
from anomaly_ae.evaluation.summary import detection_metrics, kind_of_test_set
from anomaly_ae.reporting.report import render_report
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.inference import reconstruct_and_score


def test_a_category_with_training_images_only_is_indexed_and_says_the_evaluation_is_skipped(caplog):
    keys = [f"train/good/{i:03d}" for i in range(5)]
    with caplog.at_level(logging.INFO):
        records = index_layout(keys, "/data/widget")
    assert [r.split for r in records] == ["train"] * 5
    assert "No test images in /data/widget/test/" in caplog.text
    assert "evaluation is skipped" in caplog.text


def test_a_linked_training_folder_is_named_with_the_fix(tmp_path):
    from anomaly_ae.data.mvtec import DatasetLayoutError

    (tmp_path / "real" / "good").mkdir(parents=True)
    (tmp_path / "widget").mkdir()
    (tmp_path / "widget" / "train").symlink_to(tmp_path / "real")
    with pytest.raises(DatasetLayoutError, match="train is a symbolic link to a folder.*cp -rs"):
        index_layout([], str(tmp_path / "widget"))


def test_a_handful_of_training_images_still_holds_out_enough_to_calibrate():
    import pandas as pd

    from anomaly_ae.data.preprocess import MIN_VALIDATION, split_train_validation

    def held_out(n: int, fraction: float) -> int:
        manifest = pd.DataFrame(
            {"split": "train", "defect_type": "good", "image_key": [f"train/good/{i:03d}" for i in range(n)]}
        )
        return int((split_train_validation(manifest, fraction, seed=0)["split"] == "validation").sum())

    assert held_out(8, 0.1) == MIN_VALIDATION == 2  # 10 % of 8 rounds to 1: too few to calibrate
    assert held_out(209, 0.1) == 21 and held_out(390, 0.1) == 39  # the real categories: unchanged
    assert held_out(8, 0.0) == 0  # no validation asked for, none taken
    with pytest.raises(ValueError, match="Only 3 training images"):
        held_out(3, 0.1)


def _one_class(labels: list[int]) -> dict:
    labels = np.asarray(labels)
    n = len(labels)
    scores = np.linspace(0.0, 1.0, n)
    maps = np.zeros((n, 8, 8), np.float32)
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[labels == 1, 2:4, 2:4] = 1
    return detection_metrics(labels, scores, 1 - scores, masks, maps, threshold=0.5)


def test_a_test_set_of_good_images_only_measures_the_false_alarm_rate_and_nothing_it_cannot():
    metrics = _one_class([0, 0, 0, 0, 0])  # scores 0, .25, .5, .75, 1: two above 0.5
    assert metrics["test_set"] == "normal only"
    assert metrics["false_alarm_rate_at_threshold"] == pytest.approx(0.4)
    assert metrics["accuracy_at_threshold"] == pytest.approx(0.6)
    for name in ("image_auroc", "image_auroc_ci_low", "image_f1_max", "recall_at_threshold", "pixel_auroc"):
        assert math.isnan(metrics[name]), name


def test_a_test_set_of_defective_images_only_measures_the_recall():
    metrics = _one_class([1, 1, 1, 1])  # scores 0, 1/3, 2/3, 1: two above 0.5
    assert metrics["test_set"] == "defective only"
    assert metrics["recall_at_threshold"] == pytest.approx(0.5)
    assert math.isnan(metrics["false_alarm_rate_at_threshold"])
    assert math.isnan(metrics["image_auroc"]) and math.isnan(metrics["precision_at_threshold"])


def test_no_test_images_give_no_figure_but_the_threshold():
    metrics = _one_class([])
    assert metrics["test_set"] == "none" and metrics["n_normal"] == metrics["n_defective"] == 0
    assert metrics["threshold"] == 0.5
    assert all(math.isnan(v) for k, v in metrics.items() if isinstance(v, float) and k != "threshold")


def test_kind_of_test_set_names_every_case():
    assert [kind_of_test_set(x) for x in ([0, 1], [0], [1], [])] == [
        "normal and defective",
        "normal only",
        "defective only",
        "none",
    ]


def test_no_images_score_to_empty_arrays_of_the_right_shape(one_torch_thread):
    from anomaly_ae.model import AutoencoderConfig, build_model

    model = build_model(AutoencoderConfig(image_size=64, in_channels=1))
    out = reconstruct_and_score(model, np.zeros((0, 1, 64, 64), np.uint8), MapSettings(), batch_size=4)
    assert out["recon"].shape == (0, 1, 64, 64) and out["map"].shape == (0, 64, 64)
    assert out["score"].shape == (0,) and out["ssim"].shape == (0,)
    with torch.no_grad():  # the same keys as for images
        full = reconstruct_and_score(model, np.zeros((1, 1, 64, 64), np.uint8), MapSettings(), batch_size=4)
    assert set(out) == set(full)


def test_the_report_says_what_a_test_set_of_one_class_or_none_leaves_unmeasured():
    def page(metrics: dict) -> str:
        return render_report(
            title="t",
            run_id=None,
            dataset_info={"category": "widget", "source": "mvtec"},
            table2=__import__("pandas").DataFrame(),
            metrics=metrics,
            figures={},
            configuration={},
        )

    assert "No test images." in page({"test_set": "none", "threshold": 1.0})
    only_good = page({"test_set": "normal only", "n_normal": 5, "false_alarm_rate_at_threshold": 0.2})
    assert "holds good images only" in only_good and "0.2000" in only_good
    assert 'class="notice"' not in page({"test_set": "normal and defective", "image_auroc": 0.9})


def _copy_training_images_only(source, target) -> None:
    shutil.copytree(source / "train", target / "train")


@pytest.mark.slow
def test_normal_images_alone_train_choose_the_map_set_the_threshold_and_ship_the_same_model(
    kedro_project, tmp_path, one_torch_thread
):
    """The label-free rule, proven by running without labels: a category of normal training
    images only is trained, calibrated, thresholded and exported; the map and the threshold
    are exactly those of the same images with a test set beside them, and the bundle judges
    that test set."""
    from conftest import make_project

    from anomaly_ae.data.synthetic import generate_synthetic_category
    from anomaly_ae.runtime import load_bundle

    full = generate_synthetic_category(tmp_path / "full" / "widget", category="widget", size=128, n_train=24)
    _copy_training_images_only(full, tmp_path / "normal" / "widget")
    params = {"training": {"epochs": 2, "progress": False}}

    def run(project, root):
        data = {"data": {"root": str(root), "category": "widget", "source": "mvtec"}}
        project.session_run(env="quick", params={**params, **data})
        project.session_run(pipeline="export", env="quick", params={**params, **data})

    run(kedro_project, tmp_path / "normal")
    with_test = make_project(tmp_path / "with_test")
    run(with_test, tmp_path / "full")

    def read(project, name):
        return json.loads(project.latest(f"data/07_model_output/widget/{name}.json").read_text())

    # the choice and the threshold never saw a test image: the same without one
    assert (
        read(kedro_project, "calibrated_map")["map_settings"]
        == read(with_test, "calibrated_map")["map_settings"]
    )
    assert (
        read(kedro_project, "decision_threshold")["value"] == read(with_test, "decision_threshold")["value"]
    )

    metrics = json.loads(kedro_project.latest("data/08_reporting/widget/evaluation_metrics.json").read_text())
    assert metrics["test_set"] == "none" and metrics["n_test_images"] == 0
    assert metrics["image_auroc"] is None or math.isnan(metrics["image_auroc"])
    report = kedro_project.latest("data/08_reporting/widget/report.html").read_text()
    assert "No test images." in report and "Anomaly map" in report
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{kedro_project.path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    widget = [r for r in runs if r.data.tags.get("category") == "widget" and "threshold" in r.data.metrics]
    assert widget and all(r.data.tags.get("test_set") == "none" for r in widget)
    assert not any("image_auroc" in r.data.metrics for r in widget)  # left out, not logged as NaN
    assert (
        json.loads(with_test.latest("data/08_reporting/widget/evaluation_metrics.json").read_text())[
            "test_set"
        ]
        == "normal and defective"
    )

    # the bundle shipped from normal images alone judges the product's images, as the same
    # model shipped beside a test set does
    bundle = load_bundle(kedro_project.latest("data/06_models/widget/inspection_bundle"), threads=1)
    other = load_bundle(with_test.latest("data/06_models/widget/inspection_bundle"), threads=1)
    assert bundle.threshold == pytest.approx(read(kedro_project, "decision_threshold")["value"], rel=1e-6)
    files = sorted((full / "test").rglob("*.png"))
    verdicts, expected = bundle.inspect(files), other.inspect(files)
    assert all(v.error is None and np.isfinite(v.score) for v in verdicts)
    assert [v.score for v in verdicts] == pytest.approx([v.score for v in expected], rel=1e-5)


def test_the_score_histogram_shows_the_thresholds_basis_with_or_without_a_test_set():
    from anomaly_ae.pipelines.evaluate.reporting_nodes import make_score_histogram, threshold_rule_text

    threshold = {"value": 3.0, "rule": "quantile", "quantile": 0.99, "k_sigma": 3.0, "n_validation_images": 4}
    assert threshold_rule_text(threshold) == "0.99 quantile of 4 normal validation images"
    validation = {"score": np.array([1.0, 1.5, 2.0, 2.9])}
    for labels, scores in (([], []), ([0, 1, 1], [1.2, 5.0, 80.0])):  # none; log-spaced bins
        image = make_score_histogram(
            validation,
            {"score": np.asarray(scores, np.float32)},
            {"labels": np.asarray(labels, int)},
            threshold,
        )
        assert image.size[0] > 300 and image.size[1] > 200


def test_without_good_test_images_the_hardest_cases_are_the_highest_scoring_normal_validation_images(
    monkeypatch,
):
    import pandas as pd

    from anomaly_ae.pipelines.evaluate import reporting_nodes

    seen = {}
    monkeypatch.setattr(
        reporting_nodes.figures, "hardest_cases_figure", lambda rows, vmax: seen.setdefault("rows", rows)
    )
    monkeypatch.setattr(reporting_nodes.figures, "figure_to_image", lambda figure: figure)
    n = 4
    validation_images = {"images": np.zeros((n, 1, 16, 16), np.uint8), "labels": np.zeros(n, int)}
    validation_scores = {
        "score": np.array([1.0, 9.0, 3.0, 5.0], np.float32),
        "ssim": np.ones(n, np.float32),
        "mse": np.zeros(n, np.float32),
        "map": np.zeros((n, 16, 16), np.float32),
    }
    manifest = pd.DataFrame(
        {
            "split": "validation",
            "image_file": [f"train/good/{i:03d}.png" for i in range(n)],
            "defect_type": "good",
            "label": 0,
            "array_index": range(n),
        }
    )
    empty = {"images": np.zeros((0, 1, 16, 16), np.uint8), "labels": np.zeros(0, int)}
    scores = {"score": np.zeros(0, np.float32), "map": np.zeros((0, 16, 16), np.float32)}
    threshold = {"value": 4.0, "score": MapSettings().to_dict()}
    reporting_nodes.make_hardest_cases(
        empty,
        scores,
        pd.DataFrame(),
        threshold,
        validation_images,
        validation_scores,
        manifest,
        {"hardest_cases": 2},
    )
    rows = seen["rows"]
    assert [r["file"] for r in rows] == ["train/good/001.png", "train/good/003.png"]  # 9.0, then 5.0
    assert rows[0]["label"].startswith("normal validation image, flagged (false alarm): score 9")
    assert rows[0]["mask"] is None
