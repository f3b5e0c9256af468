"""Tests for checkpoint files (atomic save, weights-only load) and the custom Kedro datasets."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io.core import DatasetError, Version

import anomaly_ae.model.checkpoint as checkpoint_module
from anomaly_ae.datasets import NpzDataset, TorchCheckpointDataset
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_fingerprint,
    load_checkpoint,
    save_checkpoint_atomic,
)
from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(seed: int = 0, epoch: int = 3) -> dict:
    torch.manual_seed(seed)
    model = build_model(AutoencoderConfig(image_size=64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # one step so that the optimizer has state tensors too
    x = torch.rand(2, 1, 64, 64)
    ((model(x) - x) ** 2).mean().backward()
    optimizer.step()
    return build_checkpoint(
        model,
        optimizer,
        epoch=epoch,
        history=[{"epoch": e, "train_loss": 1.0 / e} for e in range(1, epoch + 1)],
        config=TrainingConfig(epochs=epoch, progress=False, device="cpu"),
        best_state={k: v.clone() for k, v in model.state_dict().items()},
        best_epoch=2,
        best_val_loss=0.25,
        metadata={"category": "bottle"},
    )


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: proof that arbitrary code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip(tmp_path):
    ckpt = _checkpoint()
    path = save_checkpoint_atomic(ckpt, tmp_path / "sub" / "model.pt")
    assert path == tmp_path / "sub" / "model.pt" and path.is_file()
    loaded = load_checkpoint(path)
    _assert_same(ckpt, loaded)
    assert loaded["format_version"] == CHECKPOINT_FORMAT
    model = build_model(AutoencoderConfig.from_dict(loaded["model_config"]))
    model.load_state_dict(loaded["model_state"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model_state"][key])
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_fingerprint_identifies_the_weights(tmp_path):
    ckpt = _checkpoint()
    fingerprint = checkpoint_fingerprint(ckpt)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    # survives a save/load round trip; training metadata does not enter it
    assert (
        checkpoint_fingerprint(load_checkpoint(save_checkpoint_atomic(ckpt, tmp_path / "m.pt")))
        == fingerprint
    )
    assert checkpoint_fingerprint({**ckpt, "epoch": 99, "history": []}) == fingerprint
    # one weight moved by one float32 ulp is another model
    state = {k: v.clone() for k, v in ckpt["model_state"].items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = torch.nextafter(state[name].view(-1)[0], torch.tensor(1.0))
    assert checkpoint_fingerprint({**ckpt, "model_state": state}) != fingerprint
    assert checkpoint_fingerprint(_checkpoint(seed=1)) != fingerprint
    with pytest.raises(CheckpointError):
        checkpoint_fingerprint({"model_state": {}})


def test_checkpoint_file_is_world_readable(tmp_path):
    path = save_checkpoint_atomic(
        {"format_version": 1, "model_config": {}, "model_state": {}}, tmp_path / "m.pt"
    )
    assert path.stat().st_mode & 0o644 == 0o644


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint_atomic(_checkpoint(seed=0, epoch=1), path)
    save_checkpoint_atomic(_checkpoint(seed=1, epoch=2), path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2
    _assert_same(loaded["model_state"], _checkpoint(seed=1, epoch=2)["model_state"])


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "model.pt"
    save_checkpoint_atomic(_checkpoint(epoch=1), path)
    before = path.read_bytes()
    calls = []

    def broken_save(obj, f, *args, **kwargs):
        calls.append(f)
        f.write(b"PK\x03\x04 half a zip file")
        f.flush()
        raise exc

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint_atomic(_checkpoint(epoch=2), path)
    assert calls, "torch.save was not used through the checkpoint module"
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "temporary file left behind"
    assert load_checkpoint(path)["epoch"] == 1


def test_crash_on_first_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"garbage")
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint_atomic(_checkpoint(), tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save(
        {"format_version": 1, "model_config": {}, "model_state": {}, "extra": _Payload(str(marker))},
        path,
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "load_checkpoint executed pickled code"
    # Sanity check of the test itself: a full (unsafe) unpickle does run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_refuses_garbage_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="training") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "data, missing",
    [
        ({"model_state": {}}, "format_version"),
        ({"format_version": 1, "model_state": {}}, "model_config"),
        ({"format_version": 1, "model_config": {}}, "model_state"),
        ({}, "format_version"),
        ([1, 2, 3], "format_version"),
        (torch.zeros(3), "format_version"),
    ],
)
def test_dict_without_required_keys(tmp_path, data, missing):
    path = tmp_path / "partial.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=missing) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_wrong_format_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format_version": CHECKPOINT_FORMAT + 1, "model_config": {}, "model_state": {}}, path)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


# ---------------------------------------------------------------- Kedro datasets


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_versioned_torch_dataset_saves_two_versions_and_loads_latest(tmp_path):
    filepath = tmp_path / "m.pt"
    first, second = _checkpoint(seed=0, epoch=1), _checkpoint(seed=1, epoch=2)

    ds = TorchCheckpointDataset(filepath=str(filepath), version=Version(None, None))
    assert not ds.exists()
    ds.save(first)
    assert ds.exists()
    time.sleep(0.01)  # kedro's save versions are millisecond timestamps
    ds.save(second)
    versions = _versions(filepath)
    assert len(versions) == 2, versions
    for v in versions:
        assert (filepath / v / "m.pt").is_file()
        assert [p.name for p in (filepath / v).iterdir()] == ["m.pt"], "temporary files left"

    latest = ds.load()
    assert latest["epoch"] == 2
    _assert_same(latest, second)

    # A fresh dataset object (as in a new kedro run) also loads the newest version ...
    fresh = TorchCheckpointDataset(filepath=str(filepath), version=Version(None, None))
    _assert_same(fresh.load(), second)
    # ... and a pinned load version gives the older one.
    pinned = TorchCheckpointDataset(filepath=str(filepath), version=Version(versions[0], None))
    _assert_same(pinned.load(), first)


def test_versioned_torch_dataset_new_object_per_save(tmp_path):
    filepath = tmp_path / "m.pt"
    for epoch in (1, 2, 3):
        TorchCheckpointDataset(filepath=str(filepath), version=Version(None, None)).save(
            {
                "format_version": 1,
                "model_config": {},
                "model_state": {"w": torch.full((2,), float(epoch))},
                "epoch": epoch,
            }
        )
        time.sleep(0.01)
    assert len(_versions(filepath)) == 3
    loaded = TorchCheckpointDataset(filepath=str(filepath), version=Version(None, None)).load()
    assert loaded["epoch"] == 3 and torch.equal(loaded["model_state"]["w"], torch.full((2,), 3.0))


def test_unversioned_torch_dataset(tmp_path):
    ds = TorchCheckpointDataset(filepath=str(tmp_path / "plain.pt"))
    assert not ds.exists()
    ckpt = _checkpoint()
    ds.save(ckpt)
    assert (tmp_path / "plain.pt").is_file()
    _assert_same(ds.load(), ckpt)


def test_torch_dataset_load_is_weights_only(tmp_path):
    filepath = tmp_path / "evil.pt"
    marker = tmp_path / "code_ran"
    torch.save(
        {"format_version": 1, "model_config": {}, "model_state": {}, "x": _Payload(str(marker))}, filepath
    )
    with pytest.raises(Exception) as info:  # kedro wraps it in a DatasetError
        TorchCheckpointDataset(filepath=str(filepath)).load()
    assert "evil.pt" in str(info.value)
    assert not marker.exists()


def test_torch_dataset_missing_version(tmp_path):
    ds = TorchCheckpointDataset(filepath=str(tmp_path / "none.pt"), version=Version(None, None))
    assert not ds.exists()
    with pytest.raises(DatasetError):
        ds.load()


def test_npz_round_trip(tmp_path):
    data = {
        "images": np.random.default_rng(0).random((3, 64, 64), dtype=np.float32),
        "labels": np.array([0, 1, 1], dtype=np.int64),
        "masks": np.zeros((3, 64, 64), dtype=np.uint8),
        "names": np.array(["good/000", "contamination/001", "missing_rim/002"]),
    }
    path = tmp_path / "05_model_input" / "test.npz"
    ds = NpzDataset(filepath=str(path))
    assert not ds.exists()
    ds.save(data)
    assert ds.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.npz"]
    loaded = NpzDataset(filepath=str(path)).load()
    assert set(loaded) == set(data)
    for key, value in data.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value)
    # lists are accepted and stored as arrays
    ds.save({"x": [1.0, 2.0]})
    np.testing.assert_array_equal(ds.load()["x"], np.array([1.0, 2.0]))


def test_npz_missing_file_names_pipeline(tmp_path):
    ds = NpzDataset(filepath=str(tmp_path / "missing.npz"))
    assert not ds.exists()
    with pytest.raises(DatasetError, match="data_processing") as info:
        ds.load()
    assert "missing.npz" in str(info.value)
