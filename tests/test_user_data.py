"""A user's own category: any name, mixed image formats, non-square images of varying
sizes, and a defect type without masks (image metrics only, pixel metrics skipped)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly_ae.data.mvtec import DatasetLayoutError, index_layout
from anomaly_ae.data.partitions import DuplicateImageError, image_partitions
from anomaly_ae.data.synthetic import generate_synthetic_category
from anomaly_ae.evaluation.metrics import auroc_interval
from anomaly_ae.evaluation.summary import detection_metrics, per_defect_type
from anomaly_ae.pipelines.evaluate.reporting_nodes import defect_type_section


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_one_folder_may_mix_png_jpeg_bmp_and_tiff(tmp_path):
    image = Image.new("RGB", (12, 10), (90, 120, 30))
    for name in ("a.png", "b.JPG", "c.jpeg", "d.bmp", "e.tif", "f.TIFF"):
        _save(image, tmp_path / "train" / "good" / name)
    (tmp_path / "train" / "good" / "notes.txt").write_text("not an image")
    found = image_partitions(str(tmp_path))
    assert sorted(found) == [f"train/good/{s}" for s in "abcdef"]
    assert found.file("train/good/b") == "train/good/b.JPG"
    assert found["train/good/e"]().size == (12, 10)
    # One suffix still selects only that format (case-insensitive).
    assert sorted(image_partitions(str(tmp_path), ".tiff")) == ["train/good/f"]


def test_the_same_name_with_two_suffixes_is_refused_naming_both(tmp_path):
    image = Image.new("L", (8, 8))
    _save(image, tmp_path / "train" / "good" / "000.png")
    _save(image, tmp_path / "train" / "good" / "000.jpg")
    with pytest.raises(DuplicateImageError, match=r"000\.jpg.*000\.png|000\.png.*000\.jpg"):
        image_partitions(str(tmp_path))


def test_an_unknown_suffix_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.image_suffix"):
        image_partitions(str(tmp_path), ".gif")


def test_a_defect_type_without_any_mask_is_indexed_without_masks():
    keys = [
        "train/good/000",
        "test/good/000",
        "test/crack/000",
        "test/crack/001",
        "ground_truth/crack/000_mask",
        "ground_truth/crack/001_mask",
        "test/stain/000",  # no ground_truth/stain at all
    ]
    records = {r.image_key: r for r in index_layout(keys, "/data/thing")}
    assert records["test/crack/000"].mask_key == "ground_truth/crack/000_mask"
    assert records["test/stain/000"].mask_key is None
    assert records["test/stain/000"].label == 1


def test_a_type_with_some_masks_missing_is_still_an_error():
    keys = ["train/good/000", "test/crack/000", "test/crack/001", "ground_truth/crack/000_mask"]
    with pytest.raises(DatasetLayoutError, match="001_mask"):
        index_layout(keys, "/data/thing")


def _toy_scores():
    """Two good images, two 'crack' (masked, found) and two 'stain' (no masks, missed)."""
    labels = np.array([0, 0, 1, 1, 1, 1])
    types = np.array(["good", "good", "crack", "crack", "stain", "stain"])
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.15, 0.05])
    masks = np.zeros((6, 4, 4), dtype=np.uint8)
    masks[2:4, 1, 1] = 1
    maps = np.full((6, 4, 4), 0.1, dtype=np.float32)
    maps[2:4, 1, 1] = 0.9
    maps[4:, 0, 0] = 5.0  # would be a false positive pixel if stain were counted as all-normal
    has_mask = np.array([True, True, True, True, False, False])
    return types, labels, scores, masks, maps, has_mask


def test_per_defect_type_table_and_types_without_masks():
    types, labels, scores, masks, maps, has_mask = _toy_scores()
    table = per_defect_type(types, labels, scores, masks, maps, threshold=0.5, has_mask=has_mask)
    crack, stain = table.set_index("defect_type").loc["crack"], table.set_index("defect_type").loc["stain"]
    assert crack["image_auroc"] == 1.0 and crack["pixel_auroc"] == 1.0 and crack["has_masks"]
    assert crack["recall_at_threshold"] == 1.0
    assert stain["image_auroc"] == 0.25  # 0.15 beats one of two good scores, 0.05 none
    assert not stain["has_masks"] and math.isnan(stain["pixel_auroc"]) and math.isnan(stain["aupro"])
    assert stain["recall_at_threshold"] == 0.0
    # its interval: the same DeLong interval as the type's images against the good ones
    good_or_stain = (labels == 0) | (types == "stain")
    expected = auroc_interval(labels[good_or_stain], scores[good_or_stain])
    assert (stain["image_auroc_ci_low"], stain["image_auroc_ci_high"]) == pytest.approx(expected)
    assert stain["image_auroc_ci_low"] < 0.25 < stain["image_auroc_ci_high"]
    page = defect_type_section(table)
    assert f"{expected[0]:.3f}–{expected[1]:.3f}" in page and "image_auroc_ci_low" not in page


def test_pixel_metrics_leave_out_images_without_masks():
    types, labels, scores, masks, maps, has_mask = _toy_scores()
    with_gaps = detection_metrics(labels, scores, 1 - scores, masks, maps, 0.5, has_mask=has_mask)
    assert with_gaps["pixel_auroc"] == 1.0  # the unmasked stain pixels are not counted as normal
    assert with_gaps["n_defective_without_mask"] == 2
    interval = with_gaps["image_auroc_ci_low"], with_gaps["image_auroc_ci_high"]
    assert interval == pytest.approx(auroc_interval(labels, scores))
    assert interval[0] <= with_gaps["image_auroc"] <= interval[1]
    assert detection_metrics(labels, scores, 1 - scores, masks, maps, 0.5)["pixel_auroc"] < 1.0
    none = detection_metrics(labels, scores, 1 - scores, masks, maps, 0.5, has_mask=labels == 0)
    assert math.isnan(none["pixel_auroc"]) and math.isnan(none["aupro"])


def _users_own_category(root: Path) -> Path:
    """The synthetic object, turned into a user's folder: other name, JPEG/BMP/TIFF mixed
    with PNG, non-square images of several sizes, one defect type without masks."""
    folder = generate_synthetic_category(
        root / "widget-2",
        category="widget-2",
        n_train=24,
        n_test_good=6,
        n_test_per_defect=4,
        size=96,
        seed=3,
    )
    (folder / ".synthetic").unlink()
    (folder / "SOURCE.txt").unlink()
    formats = [".jpg", ".bmp", ".tif", ".png"]
    sizes = [(120, 96), (96, 96), (144, 112)]
    images = sorted(p for p in folder.rglob("*.png") if "ground_truth" not in p.parts)
    for i, path in enumerate(images):
        size = sizes[i % len(sizes)]
        image = Image.open(path).convert("RGB").resize(size)
        mask = folder / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        if mask.exists():
            Image.open(mask).resize(size, Image.NEAREST).save(mask)
        path.unlink()
        image.save(path.with_suffix(formats[i % len(formats)]))
    unmasked = sorted(p.name for p in (folder / "ground_truth").iterdir())[0]
    for mask in (folder / "ground_truth" / unmasked).iterdir():
        mask.unlink()
    (folder / "ground_truth" / unmasked).rmdir()
    return folder


@pytest.mark.slow
def test_a_users_own_category_runs_end_to_end(kedro_project, tmp_path, one_torch_thread):
    folder = _users_own_category(tmp_path / "root")
    unmasked = sorted(
        {p.parent.name for p in (folder / "test").rglob("*")}
        - {"good", "test"}
        - {p.name for p in (folder / "ground_truth").iterdir()}
    )
    assert len(unmasked) == 1
    kedro_project.session_run(
        env="quick",
        params={
            "data": {"root": str(tmp_path / "root"), "category": "widget-2", "source": "mvtec"},
            "training": {"epochs": 2},
        },
    )
    manifest = pd.read_csv(kedro_project.latest("data/02_intermediate/widget-2/raw_manifest.csv"))
    assert {Path(f).suffix for f in manifest["image_file"]} == {".jpg", ".bmp", ".tif", ".png"}
    assert manifest["width"].nunique() > 1 and (manifest["width"] != manifest["height"]).any()
    per_type = pd.read_csv(kedro_project.latest("data/08_reporting/widget-2/defect_type_table.csv"))
    row = per_type.set_index("defect_type").loc[unmasked[0]]
    assert not row["has_masks"] and math.isnan(row["pixel_auroc"]) and 0 <= row["image_auroc"] <= 1
    masked = per_type[per_type["has_masks"]]
    assert len(masked) >= 1 and masked["pixel_auroc"].between(0, 1).all()
    metrics = json.loads(
        kedro_project.latest("data/08_reporting/widget-2/evaluation_metrics.json").read_text()
    )
    assert metrics["defect_types_without_masks"] == unmasked
    assert metrics["n_defective_without_mask"] == 4 and 0 <= metrics["pixel_auroc"] <= 1
    report = kedro_project.latest("data/08_reporting/widget-2/report.html").read_text()
    assert "Per defect type" in report and "no masks" in report


def test_table2_compares_with_the_paper_for_the_papers_product_only():
    from anomaly_ae.pipelines.evaluate.nodes import build_table2

    ssim = pd.DataFrame(
        {
            "label": [0, 0, 1, 1],
            "defect_type": ["good", "good", "scratch", "scratch"],
            "ssim": [0.9, 0.92, 0.8, 0.7],
        }
    )
    paper = {
        "hybrid": {
            "mse_weight": 0.5,
            "ssim_weight": 0.5,
            "normal": [0.9055, 0.0161],
            "defective": [0.8553, 0.0251],
        }
    }
    checkpoint = {"loss": {"mse_weight": 0.5, "ssim_weight": 0.5}}
    evaluation = {"paper_protocol_defects": ["broken_large"], "paper_category": "bottle"}
    bottle = build_table2(ssim, checkpoint, {"category": "bottle"}, paper, evaluation)
    assert "paper protocol" in set(bottle["subset"]) and bottle["paper_ssim_mean"].notna().any()
    widget = build_table2(ssim, checkpoint, {"category": "widget"}, paper, evaluation)
    assert set(widget["subset"]) == {"full test set"}  # no broken_large row for a product without one
    assert widget["paper_ssim_mean"].isna().all() and widget["paper_variant"].isna().all()
    assert widget.loc[widget["images"] == "defective", "ssim_mean"].item() == pytest.approx(0.75)
