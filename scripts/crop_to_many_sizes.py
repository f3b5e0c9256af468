"""A category in images of many sizes at one pixel size, made from one in a single size.

Development data for ``preprocessing.fit`` (README -> "Images of many sizes"): no real
category at hand comes in many sizes, so this crops every image of an MVTec-layout category
(and its mask alike) to a random fraction ``f ~ U[low, 1]`` of both sides, keeping the
aspect; a defective test image's crop is placed to contain its mask's centre of mass. The
output is derived from the input and carries its licence: never commit it.

    python scripts/crop_to_many_sizes.py ../shared/bsdata/bsdata_pitting /tmp/crops/bsdata_crops

Then train and evaluate it as any category:
``kedro run --params data.root=/tmp/crops,data.category=bsdata_crops,data.source=mvtec,...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from category_copy import copy_category
from PIL import Image


def crop_category(source: Path, target: Path, low: float = 0.4, seed: int = 7) -> int:
    """Write the cropped copy of ``source`` to ``target``; returns the number of files written."""
    rng = np.random.default_rng(seed)

    def crop(image: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
        width, height = image.size
        fraction = rng.uniform(low, 1.0)
        crop_w, crop_h = int(round(width * fraction)), int(round(height * fraction))
        if mask is not None:
            ys, xs = np.nonzero(np.asarray(mask.convert("L")) > 0)
            cy, cx = (ys.mean(), xs.mean()) if len(ys) else (height / 2, width / 2)
            left = int(np.clip(rng.uniform(cx - crop_w + 8, cx - 8), 0, width - crop_w))
            top = int(np.clip(rng.uniform(cy - crop_h + 8, cy - 8), 0, height - crop_h))
        else:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
        box = (left, top, left + crop_w, top + crop_h)
        return image.crop(box), None if mask is None else mask.crop(box)

    return copy_category(source, target, crop)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="an MVTec-layout category folder")
    parser.add_argument("target", type=Path, help="a new folder for the cropped copy")
    parser.add_argument("--low", type=float, default=0.4, help="smallest fraction of each side kept (0.4)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{crop_category(args.source, args.target, args.low, args.seed)} files written to {args.target}")


if __name__ == "__main__":
    main()
