"""What the cached inputs were made from, so a run never uses inputs of other data.

Ingestion records in ``dataset_info`` the request (``data.root``, ``data.category``,
``data.source``, ``data.image_suffix``) and a fingerprint of the image folder (every file's
relative name, size and modification time). Processing stamps each cached array file with
that fingerprint and the preprocessing settings. A run that reads the caches without
making them (``--pipeline=evaluate``, ``--pipeline=training``, ...) checks both against its
own parameters and the folder as it is now (:class:`anomaly_ae.hooks.CachedInputsHook`),
and refuses a mismatch with the command that rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from anomaly_ae.data.partitions import image_partitions

#: The stamp member of each cached ``.npz`` (a 0-d string array).
STAMP_KEY = "source_stamp"
#: ``data`` settings that decide which images are read.
REQUEST_KEYS = ("root", "category", "source", "image_suffix")
REBUILD = "kedro run --pipeline=data_ingestion && kedro run --pipeline=data_processing (or plain `kedro run`)"


class StaleInputsError(RuntimeError):
    """Cached inputs were made from other data or settings than this run's."""


def folder_fingerprint(folder: str | Path, suffix: str) -> tuple[str, int]:
    """``(sha256, number of files)`` over every image file ``suffix`` accepts below ``folder``: relative
    name, size and modification time (no pixel is read)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    images = image_partitions(str(folder), suffix)
    names = sorted(images.files.values())
    for name in names:
        stat = (folder / name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest(), len(names)


def data_request(data: dict[str, Any]) -> dict[str, str]:
    """The ``data`` settings that decide which images are read, ``root`` made absolute."""
    request = {key: str(data[key]) for key in REQUEST_KEYS}
    request["root"] = str(Path(data["root"]).resolve())
    return request


def inputs_stamp(dataset_info: dict[str, Any], preprocessing: dict[str, Any]) -> str:
    """The stamp processing writes into every cached array file."""
    text = json.dumps(
        {"data": dataset_info.get("fingerprint"), "preprocessing": preprocessing}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_dataset_info(dataset_info: dict[str, Any], data: dict[str, Any], where: str) -> None:
    """Refuse ``dataset_info`` (and the caches made from it) when it was made for other
    ``data`` settings than this run's (``data["category"]``: the namespace's category), or
    when the image folder changed since."""
    if "fingerprint" not in dataset_info:
        raise StaleInputsError(
            f"{where} was written by an older anomaly-ae without a data fingerprint. Rebuild the "
            f"cached inputs: {REBUILD}."
        )
    made, wanted = dataset_info["request"], data_request(data)
    different = [
        f"data.{k}: cached {made.get(k)!r}, this run {wanted[k]!r}"
        for k in REQUEST_KEYS
        if k != "source" and made.get(k) != wanted[k]
    ]
    if "auto" not in (made.get("source"), wanted["source"]) and made.get("source") != wanted["source"]:
        different.append(f"data.source: cached {made.get('source')!r}, this run {wanted['source']!r}")
    if different:
        raise StaleInputsError(
            f"The cached inputs ({where}) were made from other data than this run asks for ("
            + "; ".join(different)
            + f"). Rebuild them with the same --params: {REBUILD}."
        )
    folder = Path(dataset_info["path"])
    if not folder.is_dir():
        raise StaleInputsError(
            f"{folder}, which the cached inputs ({where}) were made from, is gone. {REBUILD}."
        )
    fingerprint, count = folder_fingerprint(folder, data["image_suffix"])
    if fingerprint != dataset_info["fingerprint"]:
        raise StaleInputsError(
            f"The images under {folder} changed since the cached inputs ({where}) were made from "
            f"them ({dataset_info.get('files')} files then, {count} now, or files replaced). "
            f"Rebuild them: {REBUILD}."
        )


def check_stamp(
    stamp: str | None, dataset_info: dict[str, Any], preprocessing: dict[str, Any], where: str
) -> None:
    """Refuse a cached array file not made from ``dataset_info`` with these preprocessing settings."""
    if stamp != inputs_stamp(dataset_info, preprocessing):
        raise StaleInputsError(
            f"{where} was not made from the current dataset_info with these preprocessing settings "
            f"(an earlier processing run, other preprocessing.* values, or a failed ingestion since). "
            f"Rebuild it: kedro run --pipeline=data_processing (after data_ingestion)."
        )
