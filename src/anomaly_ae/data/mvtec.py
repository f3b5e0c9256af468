"""The MVTec AD folder layout: indexing and validation.

A category folder of MVTec AD (for example ``bottle``) looks like this::

    bottle/
        train/good/000.png ...
        test/good/000.png ...
        test/<defect_type>/000.png ...
        ground_truth/<defect_type>/000_mask.png ...
        license.txt, readme.txt

The functions here work on *partition ids* (relative paths without the file
suffix, ``/``-separated), which is what Kedro's ``PartitionedDataset`` yields.
They never touch the file system themselves, so they know nothing of Kedro.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "PUBLISHED_COUNTS",
    "DatasetLayoutError",
    "ImageRecord",
    "index_layout",
    "count_warnings",
    "GOOD",
    "TRAIN",
    "TEST",
    "GROUND_TRUTH",
    "MASK_SUFFIX",
]

TRAIN = "train"
TEST = "test"
GROUND_TRUTH = "ground_truth"
GOOD = "good"
MASK_SUFFIX = "_mask"

#: Image counts per ``<split>/<defect_type>`` folder as published with MVTec AD.
#: Only categories whose counts have been checked against the real data are
#: listed; for other categories no count warnings are produced.
PUBLISHED_COUNTS: dict[str, dict[str, int]] = {
    "bottle": {
        "train/good": 209,
        "test/good": 20,
        "test/broken_large": 20,
        "test/broken_small": 22,
        "test/contamination": 21,
    },
}


class DatasetLayoutError(ValueError):
    """The folder does not follow the MVTec AD layout."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of an MVTec AD category.

    Attributes:
        split: ``"train"`` or ``"test"``.
        defect_type: Name of the sub-folder, ``"good"`` for defect-free images.
        label: 0 for good images, 1 for defective ones.
        image_key: Partition id of the image, relative path without suffix,
            e.g. ``"test/broken_large/000"``.
        mask_key: Partition id of the ground-truth mask, e.g.
            ``"ground_truth/broken_large/000_mask"``; ``None`` for good images.
    """

    split: str
    defect_type: str
    label: int
    image_key: str
    mask_key: str | None

    @property
    def name(self) -> str:
        """File stem of the image, e.g. ``"000"``."""
        return self.image_key.rsplit("/", 1)[-1]

    @property
    def group(self) -> str:
        """``"<split>/<defect_type>"``, the key used in :data:`PUBLISHED_COUNTS`."""
        return f"{self.split}/{self.defect_type}"


def _normalise_key(key: str) -> str:
    key = str(key).replace("\\", "/").strip()
    while key.startswith("./"):
        key = key[2:]
    return key.strip("/")


def _full_path(category_dir: str | os.PathLike[str], key: str, suffix: str = ".png") -> str:
    """Join with ``/`` without normalising, so that URLs such as ``s3://`` survive."""
    base = os.fspath(category_dir).rstrip("/\\")
    return f"{base}/{key}{suffix}" if base else f"{key}{suffix}"


def _format_list(items: Sequence[str], limit: int = 5) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {shown}{more}"


def index_layout(keys: Iterable[str], category_dir: str | os.PathLike[str]) -> list[ImageRecord]:
    """Index and validate the images of one MVTec AD category.

    Args:
        keys: Partition ids of all image files under the category folder
            (relative paths without file suffix, ``/`` separated), as given by
            Kedro's ``PartitionedDataset``. Keys outside ``train/``, ``test/``
            and ``ground_truth/`` (``readme``, ``license`` ...) and hidden
            files (any path component starting with ``.``) are ignored.
        category_dir: The category folder; used only in error messages.
            Masks are assumed to be ``.png`` files, as in MVTec AD.

    Returns:
        One record per train/test image, sorted: train images first, then
        test images by defect type, then by file name.

    Raises:
        DatasetLayoutError: There is no ``train/good``, there are train images
            in other ``train/`` sub-folders, a file sits at an unexpected depth, or a
            defective test image has no ground-truth mask. No test images at all is
            allowed: a new product's normal images alone train, calibrate and export.
            The message names the files and how to fix it.
    """
    where = os.fspath(category_dir)
    train: list[tuple[str, str]] = []  # (defect_type, name)
    test: list[tuple[str, str]] = []
    masks: set[str] = set()
    misplaced: list[str] = []
    bad_train: list[str] = []

    for raw in keys:
        key = _normalise_key(raw)
        if not key:
            continue
        parts = key.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        top = parts[0]
        if top not in (TRAIN, TEST, GROUND_TRUTH):
            continue
        if len(parts) != 3:
            misplaced.append(_full_path(where, key, ""))
            continue
        _, folder, name = parts
        if top == TRAIN:
            if folder != GOOD:
                bad_train.append(_full_path(where, key, ""))
            else:
                train.append((folder, name))
        elif top == TEST:
            test.append((folder, name))
        else:
            masks.add(key)

    if bad_train:
        raise DatasetLayoutError(
            f"Found {len(bad_train)} training image(s) outside '{TRAIN}/{GOOD}' in {where}:\n"
            f"{_format_list(sorted(bad_train))}\n"
            f"MVTec AD trains on defect-free images only. Move these images to "
            f"'{TRAIN}/{GOOD}' if they are defect-free, or to 'test/<defect_type>' "
            f"(with masks in 'ground_truth/<defect_type>') if they are defective."
        )
    if misplaced:
        raise DatasetLayoutError(
            f"Found {len(misplaced)} image(s) at an unexpected depth in {where}:\n"
            f"{_format_list(sorted(misplaced))}\n"
            f"Expected '<split>/<defect_type>/<name>' under '{TRAIN}', '{TEST}' and "
            f"'{GROUND_TRUTH}', with no further sub-folders. Move or remove these files."
        )
    if not train:
        links = [
            p for p in (os.path.join(where, TRAIN), os.path.join(where, TRAIN, GOOD)) if os.path.islink(p)
        ]
        raise DatasetLayoutError(
            f"No training images found in {_full_path(where, f'{TRAIN}/{GOOD}', '/')}. "
            + (
                f"{links[-1]} is a symbolic link to a folder, which the file listing does not "
                f"follow: link the files instead (cp -rs <real folder> {os.path.dirname(links[-1])}/) "
                f"or point data.root at the real folder."
                if links
                else f"Point the data root at a folder that contains the category folder in the "
                f"MVTec AD layout ('{TRAIN}/{GOOD}/*.png', 'test/<type>/*.png', "
                f"'{GROUND_TRUTH}/<type>/*_mask.png'), or let the pipeline download or "
                f"generate the data."
            )
        )
    if not test:
        # Normal images only: how a new product starts. Training, the label-free map choice,
        # the threshold and the export need nothing else; the evaluation says it was skipped.
        logger.info(
            "No test images in %s: the model is trained, its map chosen and its threshold set on "
            "normal images only, and the evaluation is skipped. Add '%s/%s/*.png' and "
            "'%s/<defect_type>/*.png' (masks in '%s/<defect_type>/') to measure it.",
            _full_path(where, TEST, "/"),
            TEST,
            GOOD,
            TEST,
            GROUND_TRUTH,
        )

    records: list[ImageRecord] = [
        ImageRecord(TRAIN, folder, 0, f"{TRAIN}/{folder}/{name}", None) for folder, name in train
    ]
    missing: list[str] = []
    used_masks: set[str] = set()
    # A defect type with no mask at all is allowed (image metrics only; pixel metrics are
    # skipped for it and the report says so). One with *some* masks missing is an error:
    # that is a damaged copy, not a choice.
    masked_types = {key.split("/")[1] for key in masks}
    unmasked = sorted({folder for folder, _ in test if folder != GOOD} - masked_types)
    if unmasked:
        logger.info(
            "No ground-truth masks for defect type(s) %s in %s: image metrics only, pixel "
            "metrics skipped for them.",
            ", ".join(unmasked),
            where,
        )
    for folder, name in test:
        image_key = f"{TEST}/{folder}/{name}"
        if folder == GOOD:
            records.append(ImageRecord(TEST, folder, 0, image_key, None))
            continue
        if folder in unmasked:
            records.append(ImageRecord(TEST, folder, 1, image_key, None))
            continue
        mask_key = f"{GROUND_TRUTH}/{folder}/{name}{MASK_SUFFIX}"
        if mask_key not in masks:
            missing.append(_full_path(where, mask_key))
        used_masks.add(mask_key)
        records.append(ImageRecord(TEST, folder, 1, image_key, mask_key))

    if missing:
        missing.sort()
        raise DatasetLayoutError(
            f"Missing ground-truth mask for {len(missing)} defective test image(s) in "
            f"{where}. Expected mask file(s):\n{_format_list(missing)}\n"
            f"Every defective image '{TEST}/<type>/NNN.png' needs a binary mask "
            f"'{GROUND_TRUTH}/<type>/NNN_mask.png' of the same size (any image format). "
            f"Restore the missing mask files (e.g. re-extract the original archive), remove "
            f"the images that have no mask, or remove the type's whole "
            f"'{GROUND_TRUTH}/<type>' folder to evaluate that type without pixel metrics."
        )

    orphans = sorted(m for m in masks - used_masks if m.split("/")[1] != GOOD)
    if orphans:
        logger.warning(
            "%d ground-truth mask(s) in %s have no matching test image, e.g. %s",
            len(orphans),
            where,
            _full_path(where, orphans[0]),
        )

    def sort_key(r: ImageRecord) -> tuple[int, str, str]:
        return (0 if r.split == TRAIN else 1, r.defect_type, r.name)

    return sorted(records, key=sort_key)


def count_warnings(records: Iterable[ImageRecord], category: str) -> list[str]:
    """Compare image counts with the published MVTec AD counts.

    Args:
        records: Records as returned by :func:`index_layout`.
        category: MVTec AD category name, e.g. ``"bottle"``.

    Returns:
        One human-readable message per ``<split>/<defect_type>`` folder whose
        count differs from :data:`PUBLISHED_COUNTS` (including folders that are
        missing or unexpected). Empty if the category is unknown or all
        counts match.
    """
    expected = PUBLISHED_COUNTS.get(category)
    if not expected:
        return []
    found = Counter(r.group for r in records)
    messages: list[str] = []
    for group in sorted(set(expected) | set(found)):
        want = expected.get(group)
        have = found.get(group, 0)
        if want is None:
            messages.append(
                f"{category}: folder '{group}' has {have} image(s) but is not part of the "
                f"published MVTec AD '{category}' category."
            )
        elif have != want:
            messages.append(
                f"{category}: folder '{group}' has {have} image(s), the published MVTec AD count is {want}."
            )
    return messages
