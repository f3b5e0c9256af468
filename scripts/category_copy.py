"""Shared by the development-data scripts (crop_to_many_sizes.py, misalign.py): a transformed
copy of an MVTec-layout category, each image and its mask changed together."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

#: (image, its mask or None) -> (new image, new mask or None)
Transform = Callable[[Image.Image, Image.Image | None], tuple[Image.Image, Image.Image | None]]


def copy_category(source: Path, target: Path, transform: Transform) -> int:
    """Write ``transform`` of every ``t*/*/*.png`` of ``source`` (and of its
    ``ground_truth/<type>/<name>_mask.png``, when there is one) to the same place under
    ``target``, in sorted order; returns the number of files written. Refuses a source
    without ``train/`` and a target that is not empty (nothing is overwritten)."""
    if not (source / "train").is_dir():
        raise SystemExit(f"{source} has no train/ folder: pass an MVTec-layout category folder.")
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"{target} is not empty: pass a new folder (nothing is overwritten).")
    written = 0
    for path in sorted(source.glob("t*/*/*.png")):
        mask_path = source / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        with Image.open(path) as image:
            mask = Image.open(mask_path) if mask_path.exists() else None
            try:
                new_image, new_mask = transform(image, mask)
            finally:
                if mask is not None:
                    mask.close()
        for original, new in ((path, new_image), (mask_path, new_mask)):
            if new is not None:
                out = target / original.relative_to(source)
                out.parent.mkdir(parents=True, exist_ok=True)
                new.save(out)
                written += 1
    return written
