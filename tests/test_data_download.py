"""Tests for anomaly_ae.data.download (no network: file:// URLs and a closed local port)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from pathlib import Path

import pytest

from anomaly_ae.data.download import (
    DownloadError,
    UnsafeArchiveError,
    download_file,
    fetch_category,
    safe_extract_tar,
)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def _make_tar(path: Path, build, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        build(tar)
    return path


def _category_tar(path: Path, category: str = "bottle", wrapper: str | None = None) -> Path:
    prefix = f"{wrapper}/" if wrapper else ""

    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, f"{prefix}{category}/train/good/000.png", b"train")
        _add_file(tar, f"{prefix}{category}/test/good/000.png", b"test")
        _add_file(tar, f"{prefix}{category}/readme.txt", b"readme")
        _add_file(tar, f"{prefix}other_category/train/good/000.png", b"other")
        _add_file(tar, f"{prefix}license.txt", b"license")

    return _make_tar(path, build, "w:xz")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- safe_extract_tar


def test_safe_extract_good_archive(tmp_path: Path):
    def build(tar):
        _add_file(tar, "bottle/train/good/000.png", b"abc")
        _add_file(tar, "bottle/test/good/000.png", b"defg")

    archive = _make_tar(tmp_path / "good.tar.gz", build, "w:gz")
    target = tmp_path / "out"
    safe_extract_tar(archive, target)
    assert (target / "bottle/train/good/000.png").read_bytes() == b"abc"
    assert (target / "bottle/test/good/000.png").read_bytes() == b"defg"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_safe_extract_refuses_even_links_inside_the_target(tmp_path: Path, kind):
    """Dataset archives hold no links; refusing all of them closes every link trick."""

    def build(tar):
        _add_file(tar, "bottle/train/good/000.png", b"abc")
        _add_link(
            tar,
            "bottle/link.png",
            "train/good/000.png" if kind == tarfile.SYMTYPE else "bottle/train/good/000.png",
            kind,
        )

    with pytest.raises(UnsafeArchiveError, match="links are refused"):
        safe_extract_tar(_make_tar(tmp_path / "links.tar", build), tmp_path / "out")
    assert not (tmp_path / "out" / "bottle").exists()


def test_safe_extract_refuses_a_symlink_chain_escape(tmp_path: Path):
    """The archive of nested symlinks (each harmless on its own as text) that, extracted in
    order, let a later member write three levels above the target (CVE-2025-4517 style)."""
    root = tmp_path / "a" / "b" / "c"
    target = root / "out"

    def build(tar):
        _add_link(tar, "bottle/l1", ".")
        _add_link(tar, "bottle/l1/l2", "..")
        _add_link(tar, "bottle/l1/l2/l3", "../..")
        _add_link(tar, "bottle/l1/l2/l3/escape", "../../../..")
        _add_file(tar, "bottle/l1/l2/l3/escape/pwned.txt", b"outside!")

    with pytest.raises(UnsafeArchiveError, match="Refusing"):
        safe_extract_tar(_make_tar(tmp_path / "chain.tar", build), target)
    assert not list(tmp_path.rglob("pwned.txt"))
    assert not (target / "bottle").exists()


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda tar: _add_file(tar, "../evil", b"evil"), "outside"),
        (lambda tar: _add_file(tar, "bottle/../../evil", b"evil"), "outside"),
        (lambda tar: _add_file(tar, "/tmp/evil_absolute", b"evil"), "absolute"),
        (lambda tar: _add_link(tar, "bottle/passwd", "/etc/passwd"), "/etc/passwd"),
        (lambda tar: _add_link(tar, "bottle/up", "../../etc"), "../../etc"),
        (lambda tar: _add_link(tar, "bottle/hard", "../etc/passwd", tarfile.LNKTYPE), "hard link"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-rel", "hardlink"],
)
def test_safe_extract_refuses_unsafe_members(tmp_path: Path, build, expected):
    def full(tar):
        _add_file(tar, "bottle/train/good/000.png", b"first, harmless")
        build(tar)

    archive = _make_tar(tmp_path / "bad.tar", full)
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="Refusing") as info:
        safe_extract_tar(archive, target)
    assert expected in str(info.value)
    # nothing extracted, not even the harmless first member
    assert not any(target.rglob("*")) if target.exists() else True
    assert not (tmp_path / "evil").exists()


def test_safe_extract_refuses_device_files(tmp_path: Path):
    def build(tar):
        info = tarfile.TarInfo("bottle/null")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        tar.addfile(info)

    archive = _make_tar(tmp_path / "dev.tar", build)
    with pytest.raises(UnsafeArchiveError, match="device"):
        safe_extract_tar(archive, tmp_path / "out")


def test_safe_extract_corrupt_archive(tmp_path: Path):
    archive = _category_tar(tmp_path / "c.tar.xz")
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DownloadError, match="corrupt"):
        safe_extract_tar(archive, tmp_path / "out")


# ---------------------------------------------------------------- download_file


def test_download_file_from_file_url(tmp_path: Path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    dest = tmp_path / "dl" / "copy.bin"
    result = download_file(source.as_uri(), dest, sha256=_sha(source).upper(), progress=False)
    assert result == dest
    assert dest.read_bytes() == source.read_bytes()
    assert not list(dest.parent.glob("*.part"))


def test_download_file_wrong_sha_leaves_nothing(tmp_path: Path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    dest = tmp_path / "dl" / "copy.bin"
    with pytest.raises(DownloadError, match="Checksum mismatch") as info:
        download_file(source.as_uri(), dest, sha256="0" * 64, progress=False)
    assert "data.root" in str(info.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_file_missing_source(tmp_path: Path):
    dest = tmp_path / "dl" / "copy.bin"
    with pytest.raises(DownloadError, match="data.root"):
        download_file((tmp_path / "nope.bin").as_uri(), dest, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_download_unreachable_url_fails_quickly(tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="failed"):
        download_file("http://127.0.0.1:9/x.tar.xz", tmp_path / "x.tar.xz", timeout=5, progress=False)
    assert time.monotonic() - start < 10
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- fetch_category


def _no_temp_dirs(root: Path) -> bool:
    return not list(root.glob(".download-*"))


@pytest.mark.parametrize("wrapper", [None, "mvtec_anomaly_detection"])
def test_fetch_category_installs_only_the_category(tmp_path: Path, wrapper):
    archive = _category_tar(tmp_path / "bottle.tar.xz", wrapper=wrapper)
    root = tmp_path / "raw"
    seen: list[Path] = []

    def validate(path: Path) -> None:
        assert (path / "train/good/000.png").is_file()
        seen.append(path)

    result = fetch_category("bottle", root, archive.as_uri(), _sha(archive), validate, progress=False)
    assert result == root / "bottle"
    assert (root / "bottle/train/good/000.png").read_bytes() == b"train"
    assert (root / "bottle/readme.txt").is_file()
    assert len(seen) == 1
    assert sorted(p.name for p in root.iterdir()) == ["bottle"]  # no other category, no temp


def test_fetch_category_url_template(tmp_path: Path):
    _category_tar(tmp_path / "bottle.tar.xz")
    template = (tmp_path / "bottle.tar.xz").as_uri().replace("bottle.tar.xz", "{category}.tar.xz")
    root = tmp_path / "raw"
    fetch_category("bottle", root, template, None, lambda p: None, progress=False)
    assert (root / "bottle/test/good/000.png").is_file()


def test_fetch_category_failing_validate_leaves_nothing(tmp_path: Path):
    archive = _category_tar(tmp_path / "bottle.tar.xz")
    root = tmp_path / "raw"

    class Invalid(ValueError):
        pass

    def validate(path: Path) -> None:
        raise Invalid("bad layout")

    with pytest.raises(Invalid, match="bad layout"):
        fetch_category("bottle", root, archive.as_uri(), None, validate, progress=False)
    assert not (root / "bottle").exists()
    assert _no_temp_dirs(root)
    assert list(root.iterdir()) == []


def test_fetch_category_bad_checksum_leaves_nothing(tmp_path: Path):
    archive = _category_tar(tmp_path / "bottle.tar.xz")
    root = tmp_path / "raw"
    with pytest.raises(DownloadError, match="Checksum"):
        fetch_category("bottle", root, archive.as_uri(), "f" * 64, lambda p: None, progress=False)
    assert list(root.iterdir()) == []


def test_fetch_category_missing_category_folder(tmp_path: Path):
    archive = _category_tar(tmp_path / "cable.tar.xz", category="cable")
    root = tmp_path / "raw"
    # 'cable' archive has train/ only inside cable/ and other_category/, not bottle/
    with pytest.raises(DownloadError, match="'bottle'"):
        fetch_category("bottle", root, archive.as_uri(), None, lambda p: None, progress=False)
    assert list(root.iterdir()) == []


def test_fetch_category_refuses_existing_target(tmp_path: Path):
    archive = _category_tar(tmp_path / "bottle.tar.xz")
    root = tmp_path / "raw"
    (root / "bottle").mkdir(parents=True)
    with pytest.raises(DownloadError, match="already exists"):
        fetch_category("bottle", root, archive.as_uri(), None, lambda p: None, progress=False)
    assert list((root / "bottle").iterdir()) == []
    assert _no_temp_dirs(root)


def test_fetch_category_unreachable_url(tmp_path: Path):
    root = tmp_path / "raw"
    start = time.monotonic()
    with pytest.raises(DownloadError):
        fetch_category(
            "bottle",
            root,
            "http://127.0.0.1:9/x.tar.xz",
            None,
            lambda p: None,
            timeout=5,
            progress=False,
        )
    assert time.monotonic() - start < 10
    assert list(root.iterdir()) == []


def test_fetch_category_interrupted_leaves_nothing(tmp_path: Path):
    archive = _category_tar(tmp_path / "bottle.tar.xz")
    root = tmp_path / "raw"

    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch_category("bottle", root, archive.as_uri(), None, interrupt, progress=False)
    assert list(root.iterdir()) == []
