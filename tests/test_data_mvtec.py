"""Tests for anomaly_ae.data.mvtec."""

from __future__ import annotations

import pytest

from anomaly_ae.data.mvtec import (
    PUBLISHED_COUNTS,
    DatasetLayoutError,
    ImageRecord,
    count_warnings,
    index_layout,
)


def _keys(n_train: int = 3, n_good: int = 2, defects: dict[str, int] | None = None) -> list[str]:
    defects = {"broken_large": 2, "contamination": 1} if defects is None else defects
    keys = [f"train/good/{i:03d}" for i in range(n_train)]
    keys += [f"test/good/{i:03d}" for i in range(n_good)]
    for defect, n in defects.items():
        keys += [f"test/{defect}/{i:03d}" for i in range(n)]
        keys += [f"ground_truth/{defect}/{i:03d}_mask" for i in range(n)]
    return keys + ["readme", "license"]


def test_index_layout_good_keys_sorted_and_labelled():
    keys = list(reversed(_keys()))
    records = index_layout(keys, "/data/bottle")
    assert [r.image_key for r in records] == [
        "train/good/000",
        "train/good/001",
        "train/good/002",
        "test/broken_large/000",
        "test/broken_large/001",
        "test/contamination/000",
        "test/good/000",
        "test/good/001",
    ]
    assert records[0] == ImageRecord("train", "good", 0, "train/good/000", None)
    broken = records[3]
    assert broken.split == "test" and broken.defect_type == "broken_large"
    assert broken.label == 1
    assert broken.mask_key == "ground_truth/broken_large/000_mask"
    good_test = records[-1]
    assert good_test.label == 0 and good_test.mask_key is None


def test_index_layout_normalises_backslashes_and_ignores_hidden():
    keys = [k.replace("/", "\\") for k in _keys()] + ["train/good/.DS_Store", ".cache/x"]
    records = index_layout(keys, "/data/bottle")
    assert len(records) == 8
    assert all("\\" not in r.image_key for r in records)


def test_index_layout_missing_mask_names_file():
    keys = [k for k in _keys() if k != "ground_truth/broken_large/001_mask"]
    with pytest.raises(DatasetLayoutError) as info:
        index_layout(keys, "/data/bottle")
    message = str(info.value)
    assert "/data/bottle/ground_truth/broken_large/001_mask.png" in message
    assert "000_mask" not in message
    assert "Restore" in message or "remove" in message


def test_index_layout_requires_train_good():
    keys = [k for k in _keys() if not k.startswith("train/")]
    with pytest.raises(DatasetLayoutError, match="train/good"):
        index_layout(keys, "/data/bottle")


def test_index_layout_takes_training_images_alone():  # a new product: tests/test_normal_only.py
    keys = [k for k in _keys() if not k.startswith(("test/", "ground_truth/"))]
    records = index_layout(keys, "/data/bottle")
    assert records and all(r.split == "train" for r in records)


def test_index_layout_rejects_defective_train_images():
    keys = _keys() + ["train/broken_large/000"]
    with pytest.raises(DatasetLayoutError, match="train/broken_large/000"):
        index_layout(keys, "/data/bottle")


def test_index_layout_rejects_nested_images():
    keys = _keys() + ["test/good/sub/000"]
    with pytest.raises(DatasetLayoutError, match="unexpected depth"):
        index_layout(keys, "/data/bottle")


def test_count_warnings_match_and_mismatch():
    published = PUBLISHED_COUNTS["bottle"]
    defects = {group.split("/")[1]: n for group, n in published.items() if group.startswith("test/")}
    n_good = defects.pop("good")
    records = index_layout(_keys(published["train/good"], n_good, defects), "bottle")
    assert count_warnings(records, "bottle") == []
    assert count_warnings(records, "unknown_category") == []

    fewer = [r for r in records if r.image_key != "test/broken_small/000"]
    warnings = count_warnings(fewer, "bottle")
    assert len(warnings) == 1
    assert "test/broken_small" in warnings[0] and "21" in warnings[0] and "22" in warnings[0]


def test_count_warnings_extra_and_missing_groups():
    records = index_layout(_keys(defects={"scratch": 1}), "bottle")
    warnings = count_warnings(records, "bottle")
    joined = "\n".join(warnings)
    assert "test/scratch" in joined
    assert "test/broken_large" in joined  # missing folder -> 0 images
    assert "train/good" in joined
