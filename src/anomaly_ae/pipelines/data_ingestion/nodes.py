"""Nodes of the ``data_ingestion`` pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from anomaly_ae.data.download import DownloadError, fetch_category
from anomaly_ae.data.fingerprint import data_request, folder_fingerprint
from anomaly_ae.data.mvtec import count_warnings, index_layout
from anomaly_ae.data.partitions import image_partitions
from anomaly_ae.data.synthetic import generate_synthetic_category, is_synthetic
from anomaly_ae.data.transforms import decode_image

log = logging.getLogger(__name__)

SOURCES = ("auto", "mvtec", "synthetic")
SYNTHETIC_BANNER = (
    "SYNTHETIC DATA: the real MVTec AD '{category}' data is not available ({reason}). "
    "Using the built-in synthetic sample at {path}. Results are NOT comparable to the paper. "
    "Point data.root at a copy of MVTec AD (kedro run --params data.root=/path/to/mvtec_ad) "
    "to use the real data."
)


def _synthetic(data: dict[str, Any], reason: str) -> dict[str, Any]:
    cfg = data["synthetic"]
    target = Path(cfg["root"]) / data["category"]
    generate_synthetic_category(
        target,
        category=data["category"],
        n_train=cfg["n_train"],
        n_test_good=cfg["n_test_good"],
        n_test_per_defect=cfg["n_test_per_defect"],
        size=cfg["size"],
        seed=cfg["seed"],
        kind="texture" if data["category"] in cfg["texture_categories"] else "object",
    )
    log.warning("!" * 80)
    log.warning(SYNTHETIC_BANNER.format(category=data["category"], reason=reason, path=target))
    log.warning("!" * 80)
    return {"path": str(target), "source": "synthetic", "category": data["category"]}


def _validate_folder(path: Path, suffix: str, max_pixels: int | None) -> pd.DataFrame:
    """Index the layout, warn on unexpected counts, decode every image and mask (each
    image's size checked from its header first)."""
    loaders = image_partitions(str(path), suffix, max_pixels=max_pixels)
    records = index_layout(loaders.keys(), str(path))
    for note in count_warnings(records, path.name):  # a user's own data differs: not a warning
        log.info(note)
    rows = []
    for record in records:
        image_file = loaders.file(record.image_key)
        mask_file = loaders.file(record.mask_key) if record.mask_key else None
        image = decode_image(loaders[record.image_key], str(path / image_file))
        row = {
            "image_key": record.image_key,
            "split": record.split,
            "defect_type": record.defect_type,
            "label": record.label,
            "image_file": image_file,
            "mask_file": mask_file,
            "width": image.width,
            "height": image.height,
            "mode": image.mode,
        }
        if record.mask_key:
            mask_name = str(path / mask_file)
            mask = decode_image(loaders[record.mask_key], mask_name)
            if mask.size != image.size:
                raise ValueError(
                    f"Mask {mask_name} is {mask.size[0]}x{mask.size[1]} but its image is "
                    f"{image.width}x{image.height}; masks must match their image."
                )
        rows.append(row)
    return pd.DataFrame(rows)


def resolve_dataset(data: dict[str, Any], category_name: str) -> dict[str, Any]:
    """Locate ``<data.root>/<category>``; download it or fall back to synthetic data as
    ``data.source`` allows. Returns where the data is and what it is. The category is the
    node's Kedro namespace (``category_name``), ``data.category`` or one of ``categories``."""
    data = {**data, "category": category_name}
    source, category = data["source"], category_name
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r} is not one of {SOURCES}")
    if source == "synthetic":
        return _synthetic(data, "data.source is 'synthetic'")
    target = Path(data["root"]) / category
    if target.is_dir():
        kind = "synthetic" if is_synthetic(target) else "mvtec"
        log.info("Using %s data at %s", kind, target)
        return {"path": str(target), "source": kind, "category": category}
    download = data["download"]
    url = (download.get("urls") or {}).get(category)
    try:
        if not url:
            raise DownloadError(
                f"no download address is configured for category {category!r} (data.download.urls.{category})"
            )
        fetch_category(
            category,
            Path(data["root"]),
            url=url,
            sha256=(download.get("sha256") or {}).get(category),
            validate=lambda path: _validate_folder(path, data["image_suffix"], data["max_image_pixels"]),
            timeout=download["timeout_seconds"],
            progress=download["progress"],
        )
    except DownloadError as exc:
        if source == "mvtec":
            raise DownloadError(
                f"{target} does not exist and downloading it failed: {exc}. data.source is "
                f"'mvtec', which never falls back to synthetic data. Download MVTec AD "
                f"yourself and pass --params data.root=<folder holding {category}/>."
            ) from exc
        return _synthetic(data, f"{target} is absent and the download failed: {exc}")
    return {"path": str(target), "source": "mvtec", "category": category}


def validate_dataset(
    dataset_location: dict[str, Any], data: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Check the MVTec layout and decode every file; one manifest row per image.

    Returns the manifest and ``dataset_info``: where the data is, what it is, the ``data``
    settings that asked for it and a fingerprint of the folder (see
    :mod:`anomaly_ae.data.fingerprint`). Both are saved only when every file passed, so a
    failed ingestion never leaves a manifest that later stages would take for current."""
    folder, suffix = Path(dataset_location["path"]), data["image_suffix"]
    fingerprint, files = folder_fingerprint(folder, suffix)
    manifest = _validate_folder(folder, suffix, data["max_image_pixels"])
    if folder_fingerprint(folder, suffix)[0] != fingerprint:
        raise RuntimeError(f"The files under {folder} changed while they were being validated; run again.")
    counts = manifest.groupby(["split", "defect_type"]).size()
    log.info(
        "%s data '%s' at %s: %s; %d masks",
        dataset_location["source"],
        dataset_location["category"],
        dataset_location["path"],
        ", ".join(f"{s}/{d}={n}" for (s, d), n in counts.items()),
        int(manifest["mask_file"].notna().sum()),
    )
    request = data_request({**data, "category": dataset_location["category"]})
    info = {**dataset_location, "request": request, "fingerprint": fingerprint, "files": files}
    return manifest, info
