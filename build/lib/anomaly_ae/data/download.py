"""Downloading and safely unpacking MVTec AD archives.

Only the standard library is used for networking (``urllib``); ``tqdm`` shows
progress. Everything is written to temporary names first and moved into place
at the end, so an interrupted run never leaves a half-written dataset where
the pipeline expects a complete one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "MVTEC_CATEGORY_URL",
    "MVTEC_FULL_URL",
    "MVTEC_FULL_SHA256",
    "DownloadError",
    "UnsafeArchiveError",
    "download_file",
    "safe_extract_tar",
    "fetch_category",
]

#: Per-category archive URL template (``{category}`` is substituted).
#: NOTE: on the MVTec server each category archive has its own numeric id in
#: the path (``420937370-1629951468`` is the id of ``bottle``), so this
#: template is only known to be right for ``bottle``. For other categories,
#: pass the correct URL (it is a parameter everywhere) or use
#: :data:`MVTEC_FULL_URL`.
MVTEC_CATEGORY_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420937370-1629951468/{category}.tar.xz"
)
#: The whole MVTec AD dataset (about 4.9 GB), all categories at the top level.
MVTEC_FULL_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
#: SHA-256 of the archive at :data:`MVTEC_FULL_URL`.
MVTEC_FULL_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"

_CHUNK = 1 << 20
_MANUAL_HINT = (
    "To use the data without downloading it here, get MVTec AD manually from "
    "https://www.mvtec.com/company/research/datasets/mvtec-ad , extract it, and set "
    "the `data.root` parameter to the folder that contains the category folder "
    "(e.g. <root>/bottle/train/good)."
)


class DownloadError(RuntimeError):
    """Downloading or unpacking a dataset archive failed."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the target folder, or is a special file."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    sha256: str | None = None,
    timeout: float = 30,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, atomically.

    The data is streamed into a temporary file next to ``dest`` (name ending
    in ``.part``), its SHA-256 is checked if ``sha256`` is given, and only then
    is it moved to ``dest`` with ``os.replace``. On any failure (including
    ``KeyboardInterrupt``) the partial file is deleted.

    Args:
        url: Any URL ``urllib`` can open (``https://``, ``http://``, ``file://``).
        dest: Final file path; its folder is created if needed. An existing
            file there is replaced only after a successful download.
        sha256: Expected hex digest (case-insensitive), or ``None`` to skip.
        timeout: Seconds to wait for connecting and for each read; network
            problems therefore fail after at most about this long.
        progress: Show a tqdm progress bar.

    Returns:
        ``dest``.

    Raises:
        DownloadError: The download failed, was incomplete, or the checksum
            did not match. The message says what happened and how to provide
            the data manually.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"Cannot create folder {dest.parent} for the download: {exc}") from exc

    fd, part_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    part = Path(part_name)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "anomaly_ae/1.0"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length_header = response.headers.get("Content-Length")
                total = int(length_header) if length_header and length_header.isdigit() else None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=False,
                ) as bar:
                    while True:
                        chunk = response.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(
                f"Incomplete download of {url}: got {received} of {total} bytes. {_MANUAL_HINT}"
            )
        if sha256 is not None and digest.hexdigest().lower() != sha256.strip().lower():
            raise DownloadError(
                f"Checksum mismatch for {url}: expected SHA-256 {sha256.strip().lower()}, "
                f"got {digest.hexdigest()}. The file is corrupt or has changed on the "
                f"server; the partial download was deleted. {_MANUAL_HINT}"
            )
        os.replace(part, dest)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    except Exception as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"Downloading {url} failed ({type(exc).__name__}: {exc}). "
            f"Check the network connection and the URL. {_MANUAL_HINT}"
        ) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    logger.info("Downloaded %s to %s (%d bytes)", url, dest, received)
    return dest


def _is_within(base: str, path: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _check_member(member: tarfile.TarInfo, real_target: str) -> str | None:
    """Return why ``member`` is unsafe, or ``None`` if it is fine. Only regular files and
    folders are allowed: dataset archives hold nothing else, and refusing every symbolic or
    hard link, device, FIFO and other special member means no earlier member can redirect
    where a later one is written (the symlink-chain attack, CVE-2025-4517)."""
    name = member.name
    if "\x00" in name:
        return "contains a NUL character"
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in posixpath.normpath(name).split("/"):
        return "would be written outside the target folder"
    dest = os.path.realpath(os.path.join(real_target, name))
    if not _is_within(real_target, dest):
        return "would be written outside the target folder"
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"is a {kind} link (to {member.linkname!r}); links are refused"
    if not (member.isfile() or member.isdir()):
        return "is a device file or other special file"
    return None


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, real_target: str) -> None:
    """Write one checked regular file or folder, re-checking the REAL path of where it lands
    (after its parent folders exist) and never following or creating a link."""
    dest = os.path.join(real_target, posixpath.normpath(member.name))
    parent = os.path.dirname(dest) if member.isfile() else dest
    os.makedirs(parent, exist_ok=True)
    if not _is_within(real_target, os.path.realpath(parent)):
        raise UnsafeArchiveError(f"{member.name!r} would be written outside {real_target}; nothing kept.")
    if member.isdir():
        return
    if os.path.lexists(dest) and (os.path.islink(dest) or not os.path.isfile(dest)):
        raise UnsafeArchiveError(f"{member.name!r} would replace a link or folder; nothing kept.")
    source = tar.extractfile(member)
    if source is None:  # pragma: no cover - isfile() members always have data
        raise UnsafeArchiveError(f"{member.name!r} has no data")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with source, os.fdopen(os.open(dest, flags, 0o644), "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def safe_extract_tar(
    archive: Path,
    target: Path,
    select: Callable[[list[tarfile.TarInfo]], list[tarfile.TarInfo]] | None = None,
) -> None:
    """Extract a (possibly compressed) tar archive, refusing unsafe members.

    All members are checked before anything is extracted. Refused are: absolute paths,
    paths that escape ``target`` (``..``), every symbolic and hard link, and device files,
    FIFOs and other special files. The checked regular files and folders are then written by
    this function itself (not ``tarfile.extractall``, so safety does not depend on the
    Python patch release's ``data`` filter): each file's real destination is verified to lie
    inside ``target`` and is opened without following links.

    Args:
        archive: Path of a ``.tar``, ``.tar.gz``, ``.tar.bz2`` or ``.tar.xz`` file.
        target: Folder to extract into (created if needed).
        select: Optional function that receives the list of all members and
            returns those to extract (all members are still checked for
            safety, whether selected or not).

    Raises:
        UnsafeArchiveError: The archive contains unsafe members; nothing was
            extracted.
        DownloadError: The archive is unreadable or corrupt.
    """
    archive = Path(archive)
    target = Path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        real_target = os.path.realpath(target)
        with tarfile.open(archive, "r:*") as tar:
            all_members = tar.getmembers()
            problems = []
            for member in all_members:
                reason = _check_member(member, real_target)
                if reason is not None:
                    problems.append(f"{member.name!r} {reason}")
            if problems:
                shown = "\n  ".join(problems[:10])
                more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
                raise UnsafeArchiveError(
                    f"Refusing to extract {archive}: {len(problems)} unsafe member(s):\n"
                    f"  {shown}{more}\nNothing was extracted. The archive is not a genuine "
                    f"dataset archive; delete it and obtain the data from the official source."
                )
            selected = all_members if select is None else select(list(all_members))
            for member in selected:
                _extract_member(tar, member, real_target)
    except DownloadError:
        raise
    except Exception as exc:  # lzma.LZMAError, zlib.error, ...
        raise DownloadError(
            f"Could not extract {archive}: {type(exc).__name__}: {exc}. The archive is "
            f"probably truncated or corrupt; delete it and download it again. {_MANUAL_HINT}"
        ) from exc


def _archive_name(url: str, category: str) -> str:
    name = posixpath.basename(urllib.parse.urlparse(url).path)
    return name or f"{category}.tar.xz"


def _in_category(category: str) -> Callable[[list[tarfile.TarInfo]], list[tarfile.TarInfo]]:
    """Select members under a ``<category>`` folder at depth 0 or 1 of the archive.

    If there is no such folder (an archive holding the category's contents
    without a wrapping folder), everything is selected.
    """

    def select(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
        def keep(member: tarfile.TarInfo) -> bool:
            parts = [p for p in member.name.replace("\\", "/").split("/") if p not in ("", ".")]
            return category in parts[:2]

        chosen = [m for m in members if keep(m)]
        return chosen or members

    return select


def _locate_category(extracted: Path, category: str) -> Path:
    candidates = [extracted / category] + sorted(extracted.glob(f"*/{category}"))
    found = [c for c in candidates if c.is_dir() and not c.is_symlink()]
    if found:
        return found[0]
    if (extracted / "train").is_dir() or (extracted / "test").is_dir():
        return extracted  # archive holds the category contents without a wrapping folder
    top = sorted(p.name for p in extracted.iterdir())[:20]
    raise DownloadError(
        f"The downloaded archive does not contain a '{category}' folder (top-level entries: "
        f"{top}). Check the URL for category '{category}'. {_MANUAL_HINT}"
    )


def fetch_category(
    category: str,
    root: Path,
    url: str,
    sha256: str | None,
    validate: Callable[[Path], None],
    timeout: float = 30,
    progress: bool = True,
) -> Path:
    """Download one MVTec AD category and install it atomically at ``root/category``.

    Steps: download ``url`` into a temporary folder ``root/.download-<category>-XXXX``,
    verify ``sha256``, extract it safely there, locate the ``<category>``
    folder (a whole-dataset archive holds all categories at the top level;
    only this category is extracted and kept), call ``validate`` on it, and
    finally ``os.rename`` it to ``root/category``. The temporary folder is
    always removed, on success and on failure, so an interrupted or failed
    run leaves nothing at ``root/category``. (A hard kill, e.g. SIGKILL, can
    leave a ``.download-*`` folder behind; it is safe to delete.)

    Args:
        category: Category name, e.g. ``"bottle"``.
        root: Data root folder; created if needed.
        url: Archive URL; ``{category}`` in it is replaced by ``category``.
        sha256: Expected SHA-256 of the archive, or ``None``.
        validate: Called with the extracted category folder before it is
            moved into place; should raise if the data is not usable. Its
            exception propagates unchanged.
        timeout: Network timeout in seconds (see :func:`download_file`).
        progress: Show a progress bar.

    Returns:
        ``root / category``.

    Raises:
        DownloadError: ``root/category`` already exists, or download,
            checksum, extraction or locating the category failed.
    """
    root = Path(root)
    final = root / category
    if final.exists() or final.is_symlink():
        raise DownloadError(
            f"{final} already exists; refusing to overwrite it. Delete it to download again, "
            f"or use it as it is."
        )
    url = url.replace("{category}", category)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".download-{category}-", dir=root))
    except OSError as exc:
        raise DownloadError(f"Cannot create a temporary folder in {root}: {exc}") from exc
    try:
        archive = download_file(
            url, tmp / _archive_name(url, category), sha256=sha256, timeout=timeout, progress=progress
        )
        extracted = tmp / "extracted"
        safe_extract_tar(archive, extracted, select=_in_category(category))
        archive.unlink()
        source = _locate_category(extracted, category)
        validate(source)
        if final.exists() or final.is_symlink():
            raise DownloadError(f"{final} appeared while downloading; refusing to overwrite it.")
        try:
            os.rename(source, final)
        except OSError as exc:
            raise DownloadError(f"Could not move {source} to {final}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Installed MVTec AD category %r at %s", category, final)
    return final
