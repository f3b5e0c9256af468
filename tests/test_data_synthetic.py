"""Tests for anomaly_ae.data.synthetic."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_ae.data.mvtec import count_warnings, index_layout
from anomaly_ae.data.synthetic import (
    SYNTHETIC_DEFECTS,
    SYNTHETIC_MARKER,
    SyntheticDataError,
    generate_synthetic_category,
    is_synthetic,
)

SMALL = dict(n_train=5, n_test_good=2, n_test_per_defect=3, size=64, seed=3)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _pixels(path: Path, mode: str | None = None) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert(mode) if mode else img, dtype=np.float32)


def _keys(folder: Path) -> list[str]:
    return [p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.png")]


def test_layout_and_index(tmp_path: Path):
    target = generate_synthetic_category(tmp_path / "bottle", **SMALL)
    assert target == tmp_path / "bottle"
    assert is_synthetic(target)
    assert "synthetic" in (target / "SOURCE.txt").read_text().lower()
    assert len(list((target / "train/good").glob("*.png"))) == 5
    assert len(list((target / "test/good").glob("*.png"))) == 2
    for defect in SYNTHETIC_DEFECTS:
        images = sorted((target / "test" / defect).glob("*.png"))
        assert [p.stem for p in images] == ["000", "001", "002"]
        for image in images:
            mask_path = target / "ground_truth" / defect / f"{image.stem}_mask.png"
            assert mask_path.is_file()
            with Image.open(mask_path) as mask:
                assert mask.mode == "L" and mask.size == (64, 64)
                values = set(np.unique(np.asarray(mask)).tolist())
            assert values == {0, 255}  # non-empty defect region
    with Image.open(target / "train/good/000.png") as img:
        assert img.mode == "RGB" and img.size == (64, 64)

    records = index_layout(_keys(target), target)
    assert len(records) == 5 + 2 + 3 * len(SYNTHETIC_DEFECTS)
    assert sum(r.label for r in records) == 3 * len(SYNTHETIC_DEFECTS)
    assert count_warnings(records, "synthetic-bottle") == []
    # no temp folders left next to the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bottle"]


def test_deterministic(tmp_path: Path):
    a = generate_synthetic_category(tmp_path / "a" / "bottle", **SMALL)
    b = generate_synthetic_category(tmp_path / "b" / "bottle", **SMALL)
    assert _hashes(a) == _hashes(b)
    c = generate_synthetic_category(tmp_path / "c" / "bottle", **{**SMALL, "seed": 4})
    assert _hashes(a)["train/good/000.png"] != _hashes(c)["train/good/000.png"]


def test_normal_images_vary(tmp_path: Path):
    target = generate_synthetic_category(tmp_path / "bottle", **SMALL)
    arrays = [_pixels(p) for p in sorted((target / "train/good").glob("*.png"))]
    assert np.abs(arrays[0] - arrays[1]).mean() > 1.0


def test_defects_change_pixels_inside_mask(tmp_path: Path):
    target = generate_synthetic_category(tmp_path / "bottle", **{**SMALL, "size": 128})
    for defect in SYNTHETIC_DEFECTS:
        img = _pixels(target / "test" / defect / "000.png", "L")
        mask = _pixels(target / "ground_truth" / defect / "000_mask.png") > 0
        # defective pixels are dark (missing rim / dark spots) compared with the bright rim
        assert img[mask].mean() < 0.6 * 255


def test_existing_complete_target_is_reused(tmp_path: Path):
    target = generate_synthetic_category(tmp_path / "bottle", **SMALL)
    before = _hashes(target)
    stamp = (target / SYNTHETIC_MARKER).stat().st_mtime_ns
    assert generate_synthetic_category(tmp_path / "bottle", **SMALL) == target
    assert _hashes(target) == before
    assert (target / SYNTHETIC_MARKER).stat().st_mtime_ns == stamp


def test_existing_different_params_raises(tmp_path: Path):
    generate_synthetic_category(tmp_path / "bottle", **SMALL)
    with pytest.raises(SyntheticDataError, match="different parameters"):
        generate_synthetic_category(tmp_path / "bottle", **{**SMALL, "seed": 99})


def test_existing_real_data_untouched(tmp_path: Path):
    real = tmp_path / "bottle"
    (real / "train/good").mkdir(parents=True)
    (real / "train/good/000.png").write_bytes(b"real")
    with pytest.raises(SyntheticDataError, match="not synthetic"):
        generate_synthetic_category(real, **SMALL)
    assert (real / "train/good/000.png").read_bytes() == b"real"
    assert not is_synthetic(real)


def test_invalid_counts(tmp_path: Path):
    with pytest.raises(ValueError, match="n_train"):
        generate_synthetic_category(tmp_path / "bottle", n_train=0)
    assert not (tmp_path / "bottle").exists()


def test_defaults_are_fast(tmp_path: Path):
    start = time.monotonic()
    target = generate_synthetic_category(tmp_path / "bottle")
    elapsed = time.monotonic() - start
    assert len(index_layout(_keys(target), target)) == 40 + 8 + 6 * 2
    assert elapsed < 5  # ~0.7 s on a 2-core machine; generous margin for CI
