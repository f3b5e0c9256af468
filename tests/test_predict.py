"""Inspecting new images: every bad input becomes a row with an error, the rest is scored."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anomaly_ae import Inspector
from anomaly_ae.data.synthetic import generate_synthetic_category
from anomaly_ae.data.transforms import to_model_array
from anomaly_ae.inspect import find_images
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.model.checkpoint import model_from_checkpoint
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.inference import reconstruct_and_score
from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=64)).eval()
    return build_checkpoint(model, None, epoch=1, history=[], config=TrainingConfig())


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> Image.Image:
    folder = generate_synthetic_category(
        tmp_path_factory.mktemp("syn") / "bottle", n_train=1, n_test_good=1, n_test_per_defect=1, size=128
    )
    return Image.open(folder / "test" / "good" / "000.png").convert("RGB")


@pytest.fixture(scope="module")
def expected(checkpoint, good_image) -> dict[str, float]:
    """Score and SSIM of ``good_image`` computed directly: model, preprocessing, scoring core."""
    array = to_model_array(good_image, 64)[None, None]
    model = model_from_checkpoint(checkpoint)
    out = reconstruct_and_score(model, array, MapSettings(), 1, precision="fp32")
    return {"score": float(out["score"][0]), "ssim": float(out["ssim"][0])}


@pytest.fixture
def junk_folder(tmp_path, good_image) -> dict[str, str | None]:
    """File name -> expected error fragment (None: must be scored)."""
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    good_image.save(folder / "ok.png")
    good_image.save(folder / "sub" / "ok.jpg")
    good_image.save(folder / "ok.bmp")
    good_image.save(folder / "ok.tiff")
    good_image.convert("RGBA").save(folder / "rgba.png")
    sixteen = (np.asarray(good_image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen_bit.png")
    data = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    Image.new("L", (1, 1), 128).save(folder / "tiny.png")
    Image.new("L", (10000, 10000)).save(folder / "huge.png")  # small file, 100 Mpx when decoded
    return {
        "ok.png": None,
        "sub/ok.jpg": None,
        "ok.bmp": None,
        "ok.tiff": None,
        "rgba.png": None,
        "sixteen_bit.png": None,
        "truncated.png": "Error",
        "corrupt.png": "Error",
        "empty.png": "empty",
        "notes.txt": "not an image",
        "tiny.png": "too small",
        "huge.png": "too large",
    }, folder


def test_every_file_gets_a_verdict_or_a_clear_error(checkpoint, junk_folder, expected):
    errors, folder = junk_folder
    threshold = expected["score"] - 0.01
    inspector = Inspector(checkpoint, threshold=threshold, batch_size=2, precision="fp32")
    results = {
        r.file: r for r in inspector.inspect((str(p.relative_to(folder)), p) for p in find_images(folder))
    }
    assert set(results) == set(errors)
    for name, error in errors.items():
        result = results[name]
        if error is None:
            assert result.error is None, (name, result.error)
            # every readable file is the same picture: its score and SSIM (an untrained model
            # scores every image near 1; the SSIM, ~0.2 here, tells other images apart by > 0.02).
            # JPEG is lossy and the 16-bit file was rounded to 8-bit gray first.
            tolerance = 5e-3 if name in ("sub/ok.jpg", "sixteen_bit.png") else 1e-5
            assert result.ssim == pytest.approx(expected["ssim"], abs=tolerance), name
            assert result.score == pytest.approx(expected["score"], abs=tolerance), name
            assert result.score == pytest.approx(float(result.anomaly_map.max()), abs=1e-6)
            assert result.is_anomalous is (result.score > threshold)
        else:
            assert result.error and error.lower() in result.error.lower(), (name, result.error)
            assert result.score is None and result.is_anomalous is None


def test_conversions_give_the_same_score_as_the_original(checkpoint, good_image, tmp_path):
    inspector = Inspector(checkpoint, threshold=0.5, precision="fp32")
    gray = np.asarray(good_image.convert("L"), dtype=np.uint16)
    variants = {
        "l": good_image.convert("L"),
        "rgba": good_image.convert("L").convert("RGBA"),
        "sixteen": Image.fromarray((gray * 257).astype(np.uint16)),
    }
    scores = {name: r.score for name, r in zip(variants, inspector.inspect(variants.items()), strict=True)}
    assert scores["rgba"] == pytest.approx(scores["l"], abs=1e-4)
    assert scores["sixteen"] == pytest.approx(scores["l"], abs=1e-3)


def test_streams_in_bounded_batches(checkpoint, good_image, monkeypatch):
    import anomaly_ae.inspect as inspect_module

    sizes = []
    original = inspect_module.reconstruct_and_score
    monkeypatch.setattr(
        inspect_module,
        "reconstruct_and_score",
        lambda model, batch, *a, **k: sizes.append(len(batch)) or original(model, batch, *a, **k),
    )
    inspector = Inspector(checkpoint, threshold=0.5, batch_size=4, keep_maps=False)
    results = list(inspector.inspect((f"{i}.png", good_image) for i in range(10)))
    assert len(results) == 10 and sizes == [4, 4, 2]


def test_missing_or_empty_folder_and_missing_threshold(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="predict.input_dir"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no files"):
        find_images(tmp_path / "empty")
    torch.save(checkpoint, tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError, match="kedro run --pipeline=evaluate"):
        Inspector.from_files(tmp_path / "m.pt", tmp_path / "threshold.json")
    (tmp_path / "threshold.json").write_text(json.dumps({"value": 0.3, "score": {"score_reduction": "max"}}))
    assert Inspector.from_files(tmp_path / "m.pt", tmp_path / "threshold.json").threshold == 0.3


@pytest.mark.slow
def test_predict_pipeline_on_a_folder(quick, junk_folder, caplog):
    """The predict pipeline (in process, on the shared quick project): one row per file,
    errors included, one overlay per scored image; a missing folder is a clear error. The
    log says the false-alarm rate the threshold's validation images promise."""
    expected, folder = junk_folder
    with pytest.raises(FileNotFoundError, match="predict.input_dir"):
        quick.session_run(
            pipeline="predict", env="quick", params={"predict": {"input_dir": str(folder / "nope")}}
        )
    with caplog.at_level(logging.INFO, logger="anomaly_ae.pipelines.predict.nodes"):
        quick.session_run(pipeline="predict", env="quick", params={"predict": {"input_dir": str(folder)}})
    assert "validation images is flagged at" in caplog.text
    table = pd.read_csv(quick.latest("data/07_model_output/bottle/predictions.csv"))
    assert set(table["file"]) == set(expected)
    errors = table.set_index("file")["error"]
    # the pipeline reads through the catalog, so each junk file has an error (its wording is
    # the dataset's); the readable ones are scored
    assert {name for name in expected if pd.isna(errors[name])} == {
        n for n, e in expected.items() if e is None
    }
    scored = table[table["error"].isna()]
    overlays = quick.latest("data/08_reporting/bottle/prediction_overlays")  # this run's own folder
    assert len(list(overlays.rglob("*.png"))) == len(scored)
