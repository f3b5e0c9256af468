"""An unaligned category made from an aligned one: each image turned its own way.

Development data for products whose parts are not placed the same way every time (a screw
or a nut lying at any angle): no such real category is at hand, so this turns every image of
an MVTec-layout category (and its mask alike) by its own random rotation:

* ``--turn any``: an angle ~ U[0, 360) about the centre (bilinear for the image, nearest for
  the mask), the corners that come in filled with the mean of the image's border pixels;
* ``--turn flip4``: one of the four orientations a part placed either way round can have
  (as it is, mirrored left-right, mirrored top-bottom, turned 180 degrees), exact.

The output is derived from the input and carries its licence: never commit it.

    python scripts/misalign.py ../shared/mvtec_ad/bottle /tmp/turned/bottle_turned --turn any

Then train and evaluate it as any category:
``kedro run --params data.root=/tmp/turned,data.category=bottle_turned,data.source=mvtec,...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from category_copy import copy_category
from PIL import Image

FLIPS = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180)


def _border_mean(image: Image.Image) -> tuple[int, ...] | int:
    array = np.asarray(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    mean = np.rint(border.reshape(len(border), -1).mean(0)).astype(int)
    return tuple(mean) if array.ndim == 3 else int(mean[0])


def _turned(image: Image.Image, turn, resample, fill) -> Image.Image:
    if isinstance(turn, float):
        return image.rotate(turn, resample=resample, fillcolor=fill)
    return image if turn is None else image.transpose(turn)


def turn_category(source: Path, target: Path, turn: str = "any", seed: int = 7) -> int:
    """Write the turned copy of ``source`` to ``target``; returns the number of files written."""
    if turn not in ("any", "flip4"):
        raise SystemExit(f"--turn must be any or flip4, got {turn!r}")
    rng = np.random.default_rng(seed)

    def turned(image: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
        how = float(rng.uniform(0.0, 360.0)) if turn == "any" else FLIPS[int(rng.integers(0, 4))]
        new_mask = None if mask is None else _turned(mask.convert("L"), how, Image.Resampling.NEAREST, 0)
        return _turned(image, how, Image.Resampling.BILINEAR, _border_mean(image)), new_mask

    return copy_category(source, target, turned)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="an MVTec-layout category folder")
    parser.add_argument("target", type=Path, help="a new folder for the turned copy")
    parser.add_argument(
        "--turn", default="any", help="any (a random angle) or flip4 (one of four orientations)"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{turn_category(args.source, args.target, args.turn, args.seed)} files written to {args.target}")


if __name__ == "__main__":
    main()
