"""The evaluation-lever ablation: outputs, selection without test labels, synthetic defects."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from anomaly_ae import ablation
from anomaly_ae.model import AutoencoderConfig, build_model
from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

SIZE = 64


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = 0.5 + 0.3 * np.sin(6 * yy) * np.cos(4 * xx)
    imgs = base[None] + rng.normal(0, 0.02, size=(n, SIZE, SIZE))
    return np.clip(imgs, 0, 1).astype(np.float32)[:, None]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=SIZE)).eval()
    checkpoint = root / "model_checkpoint.pt"
    torch.save(build_checkpoint(model, None, epoch=1, history=[], config=TrainingConfig()), checkpoint)

    rng = np.random.default_rng(0)
    model_input = root / "model_input"
    model_input.mkdir()
    np.savez(model_input / "train_images.npz", images=_images(rng, 5), labels=np.zeros(5, np.int64))
    np.savez(model_input / "validation_images.npz", images=_images(rng, 4), labels=np.zeros(4, np.int64))
    test_images = _images(rng, 6)
    labels = np.array([0, 0, 0, 1, 1, 1], np.int64)
    masks = np.zeros((6, SIZE, SIZE), np.uint8)
    for i in (3, 4, 5):
        y, x = 10 + 8 * i - 24, 20 + 4 * i
        test_images[i, 0, y : y + 10, x : x + 10] = 0.0
        masks[i, y : y + 10, x : x + 10] = 1
    np.savez(model_input / "test_images.npz", images=test_images, labels=labels, masks=masks)
    return root, checkpoint, model_input


def _run(root, checkpoint, model_input, out_name):
    out = root / out_name
    result = ablation.main([
        "--checkpoint", str(checkpoint), "--model-input", str(model_input), "--out", str(out),
        "--grid", "small", "--per-image", "2", "--batch-size", "8",
    ])  # fmt: skip
    return result, out


def test_main_writes_csv_and_markdown(inputs, capsys):
    root, checkpoint, model_input = inputs
    result, out = _run(root, checkpoint, model_input, "out")
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == ablation.CSV_COLUMNS
    assert [r["setting"] for r in rows] == [s.name for s in ablation.grid("small")]
    assert len(rows) == 16
    assert {r["reference"] for r in rows} == {"none", "mean"}
    assert sum(r["is_default"] == "True" for r in rows) == 1
    assert sum(r["is_selected"] == "True" for r in rows) == 1
    assert rows[0]["setting"] == ablation.DEFAULT_SETTING.name and rows[0]["is_default"] == "True"
    for r in rows:
        for col in ("syn_image_auroc", "syn_pixel_auroc", "selection_score", "test_image_auroc",
                    "test_pixel_auroc", "test_aupro"):  # fmt: skip
            assert 0.0 <= float(r[col]) <= 1.0
    md = (out / "ablation.md").read_text()
    assert "validation + synthetic defects only" in md
    assert "(paper default)" in md and "(selected)" in md
    assert md in capsys.readouterr().out
    assert result["selected"] in {r["setting"] for r in rows}


def test_selection_never_reads_test_labels(inputs):
    root, checkpoint, model_input = inputs
    first, _ = _run(root, checkpoint, model_input, "clean")
    # poison the test set: inverted labels, masks moved elsewhere
    with np.load(model_input / "test_images.npz") as t:
        images, labels, masks = t["images"], t["labels"], t["masks"]
    poisoned = root / "poisoned_input"
    poisoned.mkdir()
    for name in ("train_images.npz", "validation_images.npz"):
        (poisoned / name).write_bytes((model_input / name).read_bytes())
    np.savez(
        poisoned / "test_images.npz", images=images, labels=1 - labels, masks=np.roll(masks, 30, axis=(1, 2))
    )
    second, _ = _run(root, checkpoint, poisoned, "poisoned")
    assert second["selected"] == first["selected"]
    sel = ("syn_image_auroc", "syn_pixel_auroc", "selection_score")
    assert [[r[c] for c in sel] for r in second["rows"]] == [[r[c] for c in sel] for r in first["rows"]]
    # ...while the test metrics did change, so the poisoned file was really read
    test_cols = ("test_image_auroc", "test_pixel_auroc", "test_aupro")
    assert [[r[c] for c in test_cols] for r in second["rows"]] != [
        [r[c] for c in test_cols] for r in first["rows"]
    ]


def test_select_setting_tie_goes_to_simpler():
    settings = ablation.grid("small")
    metrics = {s: {"selection_score": 0.9} for s in settings}
    metrics[settings[-1]] = {"selection_score": 0.9005}
    assert ablation.select_setting(settings, metrics, tie_tolerance=1e-3) == ablation.DEFAULT_SETTING
    assert ablation.select_setting(settings, metrics, tie_tolerance=0.0) == settings[-1]


def test_synthetic_defects_deterministic_and_inside_image():
    images = _images(np.random.default_rng(1), 5)
    a_img, a_mask, a_kinds = ablation.paste_synthetic_defects(images, per_image=3, seed=7)
    b_img, b_mask, b_kinds = ablation.paste_synthetic_defects(images, per_image=3, seed=7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_kinds == b_kinds and set(a_kinds) == set(ablation.DEFECT_KINDS)
    assert a_img.shape == (15, 1, SIZE, SIZE) and a_mask.shape == (15, SIZE, SIZE)
    assert a_img.dtype == np.float32 and a_mask.dtype == np.uint8
    assert a_img.min() >= 0.0 and a_img.max() <= 1.0
    source = np.repeat(images, 3, axis=0)
    for img, mask, src in zip(a_img[:, 0], a_mask, source[:, 0], strict=True):
        assert mask.any() and not mask.all()
        changed = img != src
        assert changed.any()
        assert not changed[mask == 0].any()  # pixels change only inside the mask
    c_img, _, _ = ablation.paste_synthetic_defects(images, per_image=3, seed=8)
    assert not np.array_equal(a_img, c_img)


def test_multiscale_and_map_settings_match_anomaly_map():
    rng = np.random.default_rng(2)
    x = _images(rng, 2)
    r = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    from anomaly_ae.evaluation.anomaly_map import anomaly_map

    s = ablation.AblationSetting("ssim+l2", "7", 2.0, "topk_mean")
    ms = s.map_settings(l2_scale=3.0)
    expected = anomaly_map(torch.from_numpy(x), torch.from_numpy(r), ms.ssim_weight, ms.l2_weight,
                           ms.smoothing_sigma, win_size=ms.win_size)[:, 0].numpy()  # fmt: skip
    np.testing.assert_allclose(ablation.compute_maps(x, r, s, 3.0), expected, rtol=1e-6, atol=1e-7)
    multi = ablation.compute_maps(x, r, ablation.AblationSetting("ssim", "ms", 0.0, "max"), 1.0)
    singles = [ablation.compute_maps(x, r, ablation.AblationSetting("ssim", str(k), 0.0, "max"), 1.0)
               for k in ablation.MULTI_SCALE_WINDOWS]  # fmt: skip
    np.testing.assert_allclose(multi, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)


def test_reference_setting_matches_the_pipeline_correction():
    """An ablation ``ref-mean``/``ref-zscore`` map is the raw map corrected by the reference
    fitted on the training maps, exactly as the evaluate pipeline computes it."""
    from anomaly_ae.evaluation.reference import NormalReference

    rng = np.random.default_rng(3)
    train, x = _images(rng, 5), _images(rng, 2)
    train_r = np.clip(train + rng.normal(0, 0.05, train.shape), 0, 1).astype(np.float32)
    r = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    settings = [ablation.AblationSetting("ssim", "11", 2.0, "max", ref) for ref in ("none", "mean", "zscore")]
    refs = ablation.fit_references(settings, train, train_r, 1.0)
    assert list(refs) == [settings[0].raw_key]  # one reference per uncorrected map
    raw = ablation.compute_maps(x, r, settings[0], 1.0)
    fitted = NormalReference.fit(ablation.compute_maps(train, train_r, settings[0], 1.0))
    mean_maps = ablation.compute_maps(x, r, settings[1], 1.0, references=refs)
    np.testing.assert_allclose(mean_maps, raw - fitted.mean, rtol=1e-5, atol=1e-6)
    expected = (raw - fitted.mean) / (fitted.std + fitted.std.mean())
    zscore_maps = ablation.compute_maps(x, r, settings[2], 1.0, references=refs)
    np.testing.assert_allclose(zscore_maps, expected, rtol=1e-4, atol=1e-5)
    assert settings[1].map_settings(1.0).normal_reference == "mean"
    assert settings[2].levers_changed() == 2 and "ref-zscore" in settings[2].name
    with pytest.raises(ValueError, match="needs a normal reference"):
        ablation.compute_maps(x, r, settings[1], 1.0)
