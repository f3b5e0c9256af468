"""scripts/misalign.py, the unaligned development category: each image and its mask are
turned the same way, and nothing is overwritten."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "misalign.py"


def _module():
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: its folder first on the path
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("misalign", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _category(root: Path) -> Path:
    """A tiny MVTec-layout category: gray images with a bright off-centre square, the
    defective ones with its mask."""
    source = root / "part"
    for split, kind, n in (("train", "good", 3), ("test", "good", 2), ("test", "dent", 3)):
        (source / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = np.full((64, 80, 3), 90, np.uint8)
            mask = np.zeros((64, 80), np.uint8)
            image[8:20, 10:26] = 250
            mask[8:20, 10:26] = 255
            Image.fromarray(image).save(source / split / kind / f"{i:03d}.png")
            if kind != "good":
                (source / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(source / "ground_truth" / kind / f"{i:03d}_mask.png")
    return source


@pytest.mark.parametrize("turn", ["any", "flip4"])
def test_each_mask_is_turned_with_its_image(tmp_path, turn):
    module = _module()
    source = _category(tmp_path)
    target = tmp_path / "out" / "part_turned"
    assert module.turn_category(source, target, turn, seed=3) == 3 + 2 + 3 + 3
    moved = 0
    for i in range(3):
        image = np.asarray(Image.open(target / "test" / "dent" / f"{i:03d}.png").convert("L"), float)
        mask = np.asarray(Image.open(target / "ground_truth" / "dent" / f"{i:03d}_mask.png")) > 0
        assert image.shape == mask.shape == (64, 80)
        assert mask.sum() > 100  # the square survives the turn (its corners may be cut by a rotation)
        assert image[mask].mean() > 200 and image[~mask].mean() < 110  # the mask lies on the bright square
        moved += not mask[8:20, 10:26].all()
    assert moved >= 1  # at least one of the three was turned
    # corners brought in by a rotation are filled with the border's colour, not black
    good = np.asarray(Image.open(target / "train" / "good" / "000.png").convert("L"))
    assert good.min() >= 80


def test_refuses_a_used_target_and_a_bad_turn(tmp_path):
    module = _module()
    source = _category(tmp_path)
    target = tmp_path / "used"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        module.turn_category(source, target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="--turn"):
        module.turn_category(source, tmp_path / "new", "sideways")
