"""Shipping to the line: the ONNX inspection bundle and the torch-free runtime.

* the exported graph scores like the torch scorer (maps, scores, verdicts) on the quick
  project's model and, when ../shared has it, on real MVTec AD bottle images;
* the runtime loads and judges without torch, Kedro or MLflow importable;
* the console command: an error row per junk file, exit status 0, thresholds that move;
* ``kedro run --pipeline=export`` writes a versioned bundle of the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_BOTTLE, torch_threads

from anomaly_ae.runtime import BundleError, load_bundle
from anomaly_ae.runtime.cli import main as inspect_main

NS = "bottle"
SCORE_TOL = 1e-5  # absolute (issue #16), for every map, z-score ones included: the maps'
MAP_TOL = 1e-4  # SSIM statistics are float64 (anomaly_ae.scoring.ssim), so engines agree
RUNTIME_BIN = Path(sys.executable).with_name("anomaly-ae-inspect")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _parity(bundle, inspector, files: list[Path], threshold: float | None = None) -> dict[str, float]:
    """Score ``files`` with the runtime and with the torch Inspector; assert they agree."""
    ort = bundle.inspect(files, threshold=threshold, keep_maps=True)
    torch_results = inspector.inspect_paths(files)
    assert [v.file for v in ort] == [r.file for r in torch_results]
    assert all(v.error is None for v in ort), [v.error for v in ort if v.error]
    assert all(r.error is None for r in torch_results)
    scores = np.array([v.score for v in ort])
    expected = np.array([r.score for r in torch_results])
    maps = np.stack([v.anomaly_map for v in ort])
    expected_maps = np.stack([r.anomaly_map for r in torch_results])
    result = {
        "n": len(files),
        "score": float(np.abs(scores - expected).max()),
        "map": float(np.abs(maps - expected_maps).max()),
    }
    print(
        f"parity on {result['n']} images: max |score diff| {result['score']:.3g}, "
        f"max |map diff| {result['map']:.3g}"
    )
    assert result["score"] <= SCORE_TOL
    assert result["map"] <= MAP_TOL
    assert [v.is_anomalous for v in ort] == [bool(s > (threshold or inspector.threshold)) for s in expected]
    # a threshold amid the scores (midway between two neighbours) makes the verdicts count
    ordered = np.sort(expected)
    middle = float((ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2)
    assert [v.is_anomalous for v in bundle.inspect(files, threshold=middle)] == list(expected > middle)
    return result


# ---------------------------------------------------------------- the quick project


@pytest.fixture(scope="module")
def exported(quick) -> Path:
    """``kedro run --pipeline=export --env quick`` on the trained quick project: the bundle."""
    quick.session_run(pipeline="export", env="quick")
    return quick.latest(f"data/06_models/{NS}/inspection_bundle")


@pytest.fixture(scope="module")
def quick_inspector(quick):
    """The torch scorer of the same checkpoint, threshold and normal reference."""
    from anomaly_ae import Inspector

    return Inspector.from_files(
        quick.latest(f"data/06_models/{NS}/model_checkpoint.pt"),
        quick.latest(f"data/07_model_output/{NS}/decision_threshold.json"),
        quick.latest(f"data/07_model_output/{NS}/normal_reference.npz"),
        device="cpu",
        resample="area",
    )


@pytest.mark.slow
def test_export_pipeline_writes_a_versioned_bundle_of_the_latest_checkpoint(quick, exported):
    from anomaly_ae.model.checkpoint import checkpoint_fingerprint, load_checkpoint

    assert sorted(p.name for p in exported.iterdir()) == ["bundle.json", "model.onnx"]
    assert not [p for p in exported.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left
    manifest = _json(exported / "bundle.json")
    checkpoint = load_checkpoint(quick.latest(f"data/06_models/{NS}/model_checkpoint.pt"))
    threshold = _json(quick.latest(f"data/07_model_output/{NS}/decision_threshold.json"))
    assert manifest["checkpoint"]["fingerprint"] == checkpoint_fingerprint(checkpoint)
    assert manifest["checkpoint"]["epoch"] == checkpoint["epoch"]
    assert manifest["category"] == NS
    assert manifest["anomaly_ae_version"]
    assert manifest["git_commit"]  # the quick project is a git repository
    assert manifest["threshold"]["value"] == threshold["value"]
    assert manifest["threshold"]["rule"] == threshold["rule"]
    for key, value in threshold["score"].items():
        assert manifest["score"][key] == value
    assert manifest["input"]["shape"] == ["batch", 1, 128, 128]  # the quick environment
    assert manifest["input"]["resize"]["resample"] == "area"
    assert manifest["validation_scores"]["n"] == threshold["n_validation_images"]
    if threshold["rule"] == "quantile":  # the exported graph reproduces the calibration
        assert manifest["threshold"]["recomputed_on_export"] == pytest.approx(
            threshold["value"], abs=SCORE_TOL
        )
    from anomaly_ae.scoring import MapSettings, NormalReference

    reference = NormalReference.from_arrays(
        dict(np.load(quick.latest(f"data/07_model_output/{NS}/normal_reference.npz")))
    )
    mode = MapSettings.from_dict(threshold["score"]).normal_reference  # the quick model's choice
    assert mode in ("zscore", "tail") and reference.n_images
    reference.as_tensors(mode)  # the stored reference serves it (tail: it holds the maximum)
    assert manifest["export_check"]["max_abs_score_diff"] <= SCORE_TOL
    assert manifest["export_check"]["max_abs_map_diff"] <= MAP_TOL
    quantiles = manifest["validation_scores"]["quantiles"]
    assert list(quantiles) == ["0.5", "0.9", "0.95", "0.99", "0.995", "0.999"]
    assert list(quantiles.values()) == sorted(quantiles.values())
    # a second export is another version; both stay complete
    quick.session_run(pipeline="export", env="quick", params={"export": {"exporter": "torchscript"}})
    versions = sorted((quick.path / f"data/06_models/{NS}/inspection_bundle").iterdir())
    assert len(versions) >= 2
    assert (
        _json(quick.latest(f"data/06_models/{NS}/inspection_bundle") / "bundle.json")["model"]["exporter"]
        == "torchscript"
    )


@pytest.mark.slow
def test_onnx_runtime_scores_like_torch_on_the_quick_test_images(quick, exported, quick_inspector):
    bundle = load_bundle(exported, threads=1)
    assert bundle.threshold == quick_inspector.threshold
    files = sorted((quick.path / "data/01_raw/synthetic/bottle/test").rglob("*.png"))
    assert len(files) >= 20
    _parity(bundle, quick_inspector, files)


@pytest.mark.slow
def test_scoring_in_chunks_equals_one_call(exported, monkeypatch):
    """The runtime runs the graph a few images at a time (cache-sized chunks, for speed): the
    same maps and scores as one call on the whole batch."""
    from anomaly_ae.runtime import bundle as runtime_bundle

    bundle = load_bundle(exported, threads=1)
    x = np.random.default_rng(0).random((5, 1, *bundle.image_size), dtype=np.float32)
    whole_maps, whole_scores = bundle.session.run(None, {bundle.input_name: x})
    monkeypatch.setattr(
        runtime_bundle, "CHUNK_PIXELS", 2 * int(np.prod(bundle.image_size))
    )  # calls of 2, 2, 1
    calls = []
    run = bundle.session.run
    monkeypatch.setattr(
        bundle, "session", type("S", (), {"run": lambda _, o, f: calls.append(1) or run(o, f)})()
    )
    maps, scores = bundle.score_batch(x)
    assert len(calls) == 3
    np.testing.assert_allclose(scores, whole_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps, whole_maps[:, 0], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_refuses_a_threshold_of_another_model(quick):
    from anomaly_ae.export import export_onnx
    from anomaly_ae.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(quick.latest(f"data/06_models/{NS}/model_checkpoint.pt"))
    threshold = {**_json(quick.latest(f"data/07_model_output/{NS}/decision_threshold.json"))}
    threshold["checkpoint_fingerprint"] = "0123456789abcdef"
    target = quick.path / "data/06_models/refused_bundle"
    with pytest.raises(ValueError, match="another model"):
        export_onnx(checkpoint, threshold, None, None, target, validation_scores=np.ones(3))
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".refused")]


@pytest.mark.slow
def test_export_refuses_a_graph_whose_scores_disagree_and_writes_nothing(quick, monkeypatch):
    """The export check itself: runtime scores 2e-5 off the torch scorer's (beyond the 1e-5
    bound; verdicts unchanged) are refused, the message says why and how to proceed, and no
    bundle (or staging folder) is left behind."""
    from anomaly_ae.export import export_onnx, onnx_export
    from anomaly_ae.model.checkpoint import load_checkpoint
    from anomaly_ae.scoring import MapSettings

    real_scores = onnx_export._ort_scores

    def drifting_scores(model_path, images):
        maps, scores = real_scores(model_path, images)
        return maps, scores + np.float32(2e-5)

    monkeypatch.setattr(onnx_export, "_ort_scores", drifting_scores)
    checkpoint = load_checkpoint(quick.latest(f"data/06_models/{NS}/model_checkpoint.pt"))
    threshold = _json(quick.latest(f"data/07_model_output/{NS}/decision_threshold.json"))
    reference = dict(np.load(quick.latest(f"data/07_model_output/{NS}/normal_reference.npz")))
    validation = np.load(quick.latest(f"data/05_model_input/{NS}/validation_images.npz"))["images"]
    target = quick.path / "data/06_models/drifting_bundle"
    with pytest.raises(RuntimeError, match="disagrees with the torch scorer") as refused:
        export_onnx(checkpoint, threshold, reference, validation[:4], target, category=NS)
    message = str(refused.value)
    assert "'max_abs_score_diff'" in message and "not shipping it" in message
    if MapSettings.from_dict(threshold["score"]).normal_reference in ("zscore", "tail"):
        assert "raise export.parity_tolerance" in message
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".drifting")]


@pytest.mark.slow
def test_runtime_imports_and_judges_without_torch_kedro_or_mlflow(exported, tmp_path, quick):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys

            # the runtime extra has none of these (scipy, pandas: what the pipelines use)
            BLOCKED = ("torch", "kedro", "mlflow", "scipy", "pandas", "sklearn")

            class Blocker:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in BLOCKED:
                        raise ImportError(f"{name} is blocked in this test")
                    return None

            sys.meta_path.insert(0, Blocker())
            """
        )
    )
    images = sorted((quick.path / "data/01_raw/synthetic/bottle/test").rglob("*.png"))[:3]
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    script = textwrap.dedent(
        f"""
        import json, sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        from anomaly_ae.runtime import load_bundle
        bundle = load_bundle({str(exported)!r}, threads=1)
        rows = [v.row() for v in bundle.inspect({[str(p) for p in images]!r})]
        blocked = ("torch", "kedro", "mlflow", "scipy", "pandas", "sklearn")
        assert not [m for m in sys.modules if m.split(".")[0] in blocked]
        print(json.dumps(rows))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 3 and all(r["error"] is None and r["score"] is not None for r in rows)
    # the console script, too
    done = subprocess.run(
        [str(RUNTIME_BIN), str(exported), str(images[0]), "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert images[0].name in done.stdout
    # the false-alarm rate the bundle's validation images promise, in the header
    n = json.loads((exported / "bundle.json").read_text())["validation_scores"]["n"]
    assert f"like the {n} validation images is flagged at" in done.stdout


@pytest.fixture
def incoming(quick, tmp_path) -> Path:
    """Good and defective quick test images plus junk files."""
    folder = tmp_path / "incoming"
    source = quick.path / "data/01_raw/synthetic/bottle/test"
    for path in sorted(source.rglob("*.png"))[::3]:
        target = folder / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    from PIL import Image

    Image.new("L", (8000, 6000)).save(folder / "huge.png")  # 48 Mpx from the header
    return folder


def _rows(csv_path: Path) -> list[dict]:
    import csv

    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_console_command_error_rows_and_thresholds(exported, incoming, tmp_path, capsys):
    out = tmp_path / "verdicts.csv"
    assert inspect_main([str(exported), str(incoming), "--csv", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    rows = {Path(r["file"]).relative_to(incoming).as_posix(): r for r in _rows(out)}
    errors = {name: r["error"] for name, r in rows.items() if r["error"]}
    assert set(errors) == {"notes.txt", "empty.png", "corrupt.png", "huge.png"}
    assert "not an image" in errors["notes.txt"] and "empty" in errors["empty.png"]
    assert "too large" in errors["huge.png"]
    assert rows["huge.png"]["width"] == "8000"
    assert "ERROR" in printed and "not judged" in printed
    judged = [r for r in rows.values() if not r["error"]]
    assert len(judged) >= 5
    scores = np.array([float(r["score"]) for r in judged])

    def anomalous(*extra: str) -> int:
        assert inspect_main([str(exported), str(incoming), "--csv", str(out), "--threads", "1", *extra]) == 0
        capsys.readouterr()
        return sum(r["is_anomalous"] == "True" for r in _rows(out) if not r["error"])

    assert anomalous("--threshold", str(float(scores.max()) + 1.0)) == 0
    assert anomalous("--threshold", str(float(scores.min()) - 1.0)) == len(judged)
    bundle = load_bundle(exported, threads=1)
    lenient, strict = bundle.threshold_for(0.0), bundle.threshold_for(1.0)
    assert lenient == max(bundle.manifest["validation_scores"]["values"])
    assert strict == min(bundle.manifest["validation_scores"]["values"])
    n_lenient = anomalous("--false-alarm-rate", "0")
    assert n_lenient == int((scores > lenient).sum())
    n_strict = anomalous("--false-alarm-rate", "1")
    assert n_strict == int((scores > strict).sum()) >= n_lenient
    assert {float(r["threshold"]) for r in _rows(out)} == {strict}
    with pytest.raises(SystemExit):  # one or the other
        inspect_main([str(exported), str(incoming), "--threshold", "1", "--false-alarm-rate", "0.1"])
    capsys.readouterr()


@pytest.mark.slow
def test_an_altered_bundle_is_refused(exported, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(copy)
    assert inspect_main([str(copy), str(tmp_path)]) == 2
    assert "checksum" in capsys.readouterr().err
    with pytest.raises(BundleError, match="not an inspection bundle"):
        load_bundle(tmp_path)


# ---------------------------------------------------------------- real MVTec AD bottle


def _quantile_threshold(scores: np.ndarray, settings, fingerprint: str, epoch: int) -> dict:
    """A ``decision_threshold.json`` as calibrate_threshold writes it: the 0.99 quantile of
    the normal validation ``scores``."""
    return {
        "value": float(np.quantile(scores, 0.99)),
        "rule": "quantile",
        "quantile": 0.99,
        "k_sigma": 3.0,
        "n_validation_images": len(scores),
        "score": settings.to_dict(),
        "checkpoint_fingerprint": fingerprint,
        "checkpoint_epoch": epoch,
    }


def _briefly_trained(config, arrays: np.ndarray, steps: int):
    """``(checkpoint, model)``: a seeded network of ``config`` trained ``steps`` Adam steps
    (MSE) on ``arrays``, in eval mode.

    It trains on one intra-op thread, so the network is the same whatever the machine's core
    count: 40 steps are chaotic enough that the thread count changes where they end. Trained
    on two threads (a 2-core machine's default), the bottle network below came out with a
    normal z-score spread 24x smaller (mean std 0.0016 against 0.038), which turns the
    engines' 1.9e-7 difference on the reconstruction into 2.4e-5 on the score (CI, stop 41);
    the one-thread network's is 4e-6."""
    import torch

    from anomaly_ae.model import build_model
    from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

    with torch_threads(1):
        torch.manual_seed(0)
        model = build_model(config)
        batch = torch.from_numpy(arrays)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(batch), batch).backward()
            optimizer.step()
    model.eval()
    return build_checkpoint(model, None, epoch=1, history=[], config=TrainingConfig()), model


def _export_with_reference(
    checkpoint, model, normal: np.ndarray, validation: np.ndarray, settings, path: Path
):
    """Fit a normal reference on ``normal``, set the threshold on ``validation`` (0.99
    quantile), export the bundle to ``path``; ``(bundle, torch Inspector)`` of the same model."""
    from anomaly_ae import Inspector
    from anomaly_ae.export import export_onnx
    from anomaly_ae.model.checkpoint import checkpoint_fingerprint
    from anomaly_ae.scoring.inference import fit_normal_reference, reconstruct_and_score

    fingerprint = checkpoint_fingerprint(checkpoint)
    reference = fit_normal_reference(model, normal, settings, batch_size=len(normal), device="cpu")
    scores = reconstruct_and_score(model, validation, settings, 8, device="cpu", reference=reference)["score"]
    threshold = _quantile_threshold(scores, settings, fingerprint, epoch=1)
    reference_arrays = {**reference.to_arrays(), "checkpoint_fingerprint": np.asarray(fingerprint)}
    export_onnx(checkpoint, threshold, reference_arrays, validation, path, category="bottle")
    bundle = load_bundle(path, threads=1)
    assert bundle.manifest["export_check"]["n_images"] == len(validation)
    inspector = Inspector(checkpoint, threshold, reference=reference_arrays, device="cpu", resample="area")
    return bundle, inspector


@pytest.fixture(scope="module")
def briefly_trained_on_real_bottle():
    """A seeded network trained for 40 Adam steps on 12 real good bottle images (~20 s): the
    scoring, not the training, is under test, but an untrained network reconstructs a flat
    grey whose SSIM is far more sensitive to one-ulp differences than any model one would
    ship (its unsmoothed z-score map differs by 1.4e-5 between the engines; this one's by
    4e-6). Returns ``(checkpoint, model, 256-px arrays of 24 good images)``."""
    if not REAL_BOTTLE.is_dir():
        pytest.skip(f"real MVTec AD bottle data not found at {REAL_BOTTLE} (../shared beside the repo)")
    from PIL import Image

    from anomaly_ae.data.transforms import to_model_array
    from anomaly_ae.model import AutoencoderConfig

    good = sorted((REAL_BOTTLE / "train" / "good").glob("*.png"))[:24]
    arrays = np.stack([to_model_array(Image.open(p), 256, "area") for p in good])[:, None]
    checkpoint, model = _briefly_trained(AutoencoderConfig(image_size=256), arrays[12:], steps=40)
    return checkpoint, model, arrays


REAL_PARITY_MAPS = {
    # the map the rule recommends on real bottle (README), z-score: it magnifies differences
    "zscore_smooth4_max": {"smoothing_sigma": 4.0, "normal_reference": "zscore"},
    # unsmoothed z-score: nothing averages the differences away
    "zscore_max": {"normal_reference": "zscore"},
    # with the z-scored low-pass difference: a second channel, its own reference, the max
    "zscore_smooth4_lowpass4_max": {
        "smoothing_sigma": 4.0,
        "normal_reference": "zscore",
        "lowpass_sigma": 4.0,
    },
    # two maps, as the calibration chooses them on bottle: the score from the moved-reference
    # map, the map output from a smoother one with its own reference (two references as constants)
    "two_maps": {
        "smoothing_sigma": 4.0,
        "normal_reference": "zscore",
        "reference_shift": 1,
        "lowpass_sigma": 8.0,
        "localisation": {"smoothing_sigma": 8.0, "normal_reference": "zscore", "lowpass_sigma": 4.0},
    },
    # the normal maps' upper tail (per-pixel maximum) for both channels, moved copies included
    "tail_smooth4_lowpass8_moved1": {
        "smoothing_sigma": 4.0,
        "normal_reference": "tail",
        "lowpass_sigma": 8.0,
        "reference_shift": 1,
    },
    # the shift tolerance (every error term at the reconstruction's best alignment within 1 px,
    # the low-pass channel moved by indexing in the graph) on the score, whose tolerance is the
    # strictest, with the tail reference; beside it a heat map without the tolerance and with
    # its own reference: the error terms once per tolerance in one graph. (One case, not two:
    # each export of a tolerant graph and its parity run cost minutes of CI.)
    "aligned1_tail_lowpass4_plain_heat_map": {
        "smoothing_sigma": 4.0,
        "normal_reference": "tail",
        "lowpass_sigma": 4.0,
        "shift_tolerance": 1,
        "localisation": {"smoothing_sigma": 4.0, "normal_reference": "zscore", "lowpass_sigma": 4.0},
    },
    # SSIM's contrast constant 0.01 on the score (a smaller C2: flat regions' faint structure
    # and float64 noise weigh more), the paper's on the heat map: the error terms once per
    # constant in one graph
    "k2_001_zscore_smooth2_lowpass8_paper_heat_map": {
        "smoothing_sigma": 2.0,
        "normal_reference": "zscore",
        "lowpass_sigma": 8.0,
        "ssim_k2": 0.01,
        "localisation": {"smoothing_sigma": 8.0, "normal_reference": "zscore", "lowpass_sigma": 4.0},
    },
    # the blob score (the map's strongest compact peak over three blurs, a Hessian per pixel)
    "zscore_smooth4_lowpass8_blob": {
        "smoothing_sigma": 4.0,
        "normal_reference": "zscore",
        "lowpass_sigma": 8.0,
        "score_reduction": "blob",
    },
    # the memory channel (the distance to the nearest training image's 4x4-px averages within
    # one grid step: slices, matrix products, a minimum; its bank a constant) beside the
    # low-pass channel, on both maps: the heat map shares the detection map's channel
    "memory4_zscore_smooth4_lowpass8_two_maps": {
        "smoothing_sigma": 4.0,
        "normal_reference": "zscore",
        "lowpass_sigma": 8.0,
        "memory_pool": 4,
        "localisation": {"smoothing_sigma": 8.0, "normal_reference": "zscore", "memory_pool": 4},
    },
    "mean_smooth2_top1%": {
        "smoothing_sigma": 2.0,
        "score_reduction": "topk_mean",
        "normal_reference": "mean",
    },
}


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("map_name", list(REAL_PARITY_MAPS))
def test_onnx_runtime_scores_like_torch_on_real_bottle_images(
    map_name, briefly_trained_on_real_bottle, tmp_path, one_torch_thread
):
    """A normal reference fitted on real good images; parity on real test images of every
    kind, within 1e-5 on scores and 1e-4 on maps, absolute, and identical verdicts."""
    from anomaly_ae.scoring import MapSettings

    checkpoint, model, arrays = briefly_trained_on_real_bottle
    settings = MapSettings(**REAL_PARITY_MAPS[map_name])
    bundle, inspector = _export_with_reference(
        checkpoint, model, arrays[:6], arrays[6:12], settings, tmp_path / "bundle"
    )
    files = sorted((REAL_BOTTLE / "test").rglob("*.png"))[::3]
    assert len(files) >= 20
    _parity(bundle, inspector, files)


# ---------------------------------------------------------------- served with MLflow


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    """GET (or POST ``body`` as JSON) on loopback, bypassing any proxy settings."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.mark.slow
@pytest.mark.real_data
def test_served_mlflow_model_judges_real_bottle_images_like_the_runtime(tmp_path, one_torch_thread):
    """One bundle (a seeded, untrained network: the serving is under test), logged as a pyfunc
    model in a fresh MLflow store and served by ``mlflow models serve --env-manager local``:
    real bottle images POSTed as base64 get the scores and verdicts of ``load_bundle().inspect``."""
    if not REAL_BOTTLE.is_dir():
        pytest.skip(f"real MVTec AD bottle data not found at {REAL_BOTTLE} (../shared beside the repo)")
    import base64
    import signal
    import time

    import mlflow
    import torch
    from PIL import Image

    from anomaly_ae.data.transforms import to_model_array
    from anomaly_ae.export import export_onnx
    from anomaly_ae.model import AutoencoderConfig, build_model
    from anomaly_ae.model.checkpoint import checkpoint_fingerprint
    from anomaly_ae.runtime.pyfunc import log_bundle_model
    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.scoring.inference import reconstruct_and_score
    from anomaly_ae.training.trainer import TrainingConfig, build_checkpoint

    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=256)).eval()
    checkpoint = build_checkpoint(model, None, epoch=0, history=[], config=TrainingConfig())
    good = sorted((REAL_BOTTLE / "train" / "good").glob("*.png"))[:6]
    validation = np.stack([to_model_array(Image.open(p), 256, "area") for p in good])[:, None]
    settings = MapSettings(smoothing_sigma=2.0, score_reduction="topk_mean", normal_reference="none")
    scores = reconstruct_and_score(model, validation, settings, 8, device="cpu")["score"]
    threshold = _quantile_threshold(scores, settings, checkpoint_fingerprint(checkpoint), epoch=0)
    bundle_dir = tmp_path / "bundle"
    export_onnx(checkpoint, threshold, None, validation, bundle_dir, category="bottle")

    # log it into a fresh store (the process-wide tracking URI is restored afterwards)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("served", artifact_location=(tmp_path / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_bundle_model(bundle_dir, name="inspection_model", threads=1)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert info.run_id == run.info.run_id

    files = sorted((REAL_BOTTLE / "test").rglob("*.png"))[::14][:6]
    assert len(files) == 6 and len({p.parent.name for p in files}) >= 3  # good and defect kinds
    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in files]
    bundle = load_bundle(bundle_dir, threads=1)
    expected = bundle.inspect(files)
    ordered = np.sort([v.score for v in expected])
    middle = float((ordered[2] + ordered[3]) / 2)  # verdicts of both kinds
    expected_middle = bundle.inspect(files, threshold=middle)
    assert {v.is_anomalous for v in expected_middle} == {True, False}

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    command += ["models", "serve", "-m", f"runs:/{run.info.run_id}/inspection_model"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": uri,
                "NO_PROXY": "127.0.0.1,localhost",
                # mlflow starts `uvicorn` from the PATH: this interpreter's, even when the
                # venv is not activated
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            },
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers go with it
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
            try:
                if _http(f"{base}/ping", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /ping after 120 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)

        # dataframe_split, the calibrated threshold
        status, answer = _http(
            f"{base}/invocations",
            {
                "dataframe_split": {
                    "columns": ["name", "image"],
                    "data": [[p.name, e] for p, e in zip(files, encoded, strict=True)],
                }
            },
        )
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["name"] for r in rows] == [p.name for p in files]
        assert all(r["error"] is None for r in rows), rows
        served = np.array([r["score"] for r in rows])
        runtime = np.array([v.score for v in expected])
        print(
            f"served vs runtime on {len(files)} real images: "
            f"max |score diff| {np.abs(served - runtime).max():.3g}"
        )
        np.testing.assert_allclose(served, runtime, rtol=0, atol=1e-6)
        assert [r["is_anomalous"] for r in rows] == [v.is_anomalous for v in expected]
        assert {r["threshold"] for r in rows} == {bundle.threshold}

        # dataframe_records, a threshold amid the scores, junk rows, no names
        records = [{"image": e} for e in encoded] + [{"image": "not base64 !"}, {"image": encoded[0][:200]}]
        status, answer = _http(
            f"{base}/invocations", {"dataframe_records": records, "params": {"threshold": middle}}
        )
        assert status == 200, answer
        rows = answer["predictions"]
        assert len(rows) == len(files) + 2
        assert [r["is_anomalous"] for r in rows[:6]] == [v.is_anomalous for v in expected_middle]
        np.testing.assert_allclose([r["score"] for r in rows[:6]], runtime, rtol=0, atol=1e-6)
        assert [r["name"] for r in rows] == [f"<image {i}>" for i in range(len(rows))]
        assert "base64" in rows[6]["error"] and rows[6]["score"] is None
        assert rows[7]["error"] and rows[7]["score"] is None and rows[7]["is_anomalous"] is None  # truncated

        # a false-alarm rate; both at once is a client error
        rate = bundle.threshold_for(0.5)
        status, answer = _http(
            f"{base}/invocations", {"dataframe_records": records[:6], "params": {"false_alarm_rate": 0.5}}
        )
        assert status == 200, answer
        assert [r["is_anomalous"] for r in answer["predictions"]] == [
            v.is_anomalous for v in bundle.inspect(files, threshold=rate)
        ]
        status, answer = _http(
            f"{base}/invocations",
            {"dataframe_records": records[:1], "params": {"threshold": 1.0, "false_alarm_rate": 0.5}},
        )
        assert status == 400, answer
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.mark.slow
def test_export_pipeline_logs_the_bundle_as_a_served_mlflow_model(quick, exported):
    """``kedro run --pipeline=export`` logs the bundle it saved to the category's MLflow run as
    a pyfunc model, and ``served_model.json`` says where; the model judges like the bundle."""
    import base64

    import mlflow
    import pandas as pd

    from anomaly_ae.pipelines.export.nodes import log_served_model

    record = _json(quick.latest(f"data/06_models/{NS}/served_model.json"))
    bundle_dir = quick.latest(f"data/06_models/{NS}/inspection_bundle")  # the one saved with it
    assert record["logged"] is True and record["category"] == NS
    assert record["model_uri"] == f"runs:/{record['run_id']}/inspection_model"
    assert record["tracking_uri"].startswith("sqlite:///") and record["tracking_uri"].endswith("mlflow.db")
    assert record["serve"].split("mlflow models serve -m ")[1].startswith(record["model_uri"])
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(record["tracking_uri"])
    try:
        run = mlflow.get_run(record["run_id"])
        assert run.data.tags.get("category") == NS  # the category's nested run
        assert run.data.tags.get("mlflow.parentRunId")
        model = mlflow.pyfunc.load_model(record["model_uri"])
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert model.unwrap_python_model().bundle.manifest == _json(bundle_dir / "bundle.json")
    files = sorted((quick.path / "data/01_raw/synthetic/bottle/test").rglob("*.png"))[:4]
    frame = pd.DataFrame(
        {"image": [base64.b64encode(p.read_bytes()).decode() for p in files], "name": [p.name for p in files]}
    )
    served = model.predict(frame)
    expected = load_bundle(bundle_dir).inspect(files)
    assert served["name"].tolist() == [p.name for p in files]
    np.testing.assert_allclose(served["score"].astype(float), [v.score for v in expected], rtol=0, atol=1e-6)
    assert served["is_anomalous"].tolist() == [v.is_anomalous for v in expected]

    # no active run (or served_model: null): nothing logged, and the record says why
    files_dict = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    params = {
        "opset": 18,
        "exporter": "dynamo",
        "false_alarm_quantiles": [0.5],
        "batch_size": 4,
        "parity_tolerance": 1e-5,
        "map_parity_tolerance": 1e-4,
        "max_image_pixels": 1000,
        "min_image_side": 16,
        "served_model": "inspection_model",
    }
    assert mlflow.active_run() is None
    assert log_served_model(files_dict, params)["reason"] == "no active MLflow run"
    assert log_served_model(files_dict, {**params, "served_model": None})["logged"] is False


def test_the_runtime_extra_installs_no_torch_kedro_or_mlflow():
    """``pip install 'anomaly-ae[runtime]'`` = the base dependencies + the ``runtime`` extra:
    numpy, Pillow and onnxruntime, nothing else (the import-blocking test above shows the
    runtime needs no more; README, Deploy, measures a real fresh venv)."""
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["runtime"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}

    assert names(requirements) == {"numpy", "pillow", "onnxruntime"}
    assert {"kedro", "torch", "mlflow"} <= names(project["optional-dependencies"]["pipelines"])


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [128, (64, 128)], ids=["square", "non-square"])
def test_a_tiled_model_exports_and_scores_like_torch(tmp_path, one_torch_thread, image_size):
    """model.tile_size: the exported graph cuts the image into tiles, runs the one network
    on each and puts the reconstructions back exactly as torch does (1e-5 on scores); a
    non-square image (a 1x2 grid of tiles) is resized to the same [height, width] by the
    bundle's preprocessing as by torch's."""
    from PIL import Image

    from anomaly_ae.data.synthetic import generate_synthetic_category
    from anomaly_ae.data.transforms import to_model_array
    from anomaly_ae.model import AutoencoderConfig
    from anomaly_ae.scoring import MapSettings

    root = generate_synthetic_category(
        tmp_path / "data", "bottle", n_train=16, n_test_good=3, n_test_per_defect=2, size=128
    )
    files = sorted((root / "test").rglob("*.png"))
    good = sorted((root / "train" / "good").glob("*.png"))
    arrays = np.stack([to_model_array(Image.open(p), size=image_size) for p in good])[:, None]
    config = AutoencoderConfig(image_size=image_size, tile_size=64, latent_dim=32)
    checkpoint, model = _briefly_trained(config, arrays[8:], steps=30)
    settings = MapSettings(smoothing_sigma=4.0, normal_reference="zscore")
    bundle, inspector = _export_with_reference(
        checkpoint, model, arrays[:4], arrays[4:8], settings, tmp_path / "bundle"
    )
    assert bundle.image_size == config.shape == arrays.shape[-2:]
    assert bundle.manifest["input"]["resize"]["size"] == list(config.shape)
    _parity(bundle, inspector, files)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_the_memory_channel_exports_with_either_exporter(exporter, tmp_path, one_torch_thread):
    """The memory channel's graph (its bank a constant; the upsampling a constant matrix, not a
    Resize, which ONNX Runtime has no float64 kernel for) runs in ONNX Runtime from either
    exporter, as torch scores it. A network trained briefly on smooth synthetic images: an
    untrained one's flat grey makes z-scores hypersensitive (see briefly_trained_on_real_bottle)."""
    import torch

    from anomaly_ae.export.onnx_export import ScoringGraph, _export_graph, _ort_scores
    from anomaly_ae.model import AutoencoderConfig
    from anomaly_ae.scoring import MapSettings
    from anomaly_ae.scoring.inference import fit_normal_reference, reconstruct_and_score

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    base = 0.5 + 0.2 * np.sin(5 * yy) * np.cos(3 * xx)
    images = np.clip(base + rng.normal(0, 0.03, (12, 1, 64, 64)), 0, 1).astype(np.float32)
    _, model = _briefly_trained(AutoencoderConfig(image_size=64), images[:8], steps=20)
    settings = MapSettings(normal_reference="zscore", smoothing_sigma=4, memory_pool=4)
    reference = fit_normal_reference(model, images[:8], settings, batch_size=4)
    path = tmp_path / "model.onnx"
    _export_graph(ScoringGraph(model, settings, reference), 64, 18, exporter, path)
    maps, scores = _ort_scores(path, images[8:])
    expected = reconstruct_and_score(model, torch.from_numpy(images[8:]), settings, 4, reference=reference)
    np.testing.assert_allclose(scores, expected["score"], atol=SCORE_TOL, rtol=0)
    np.testing.assert_allclose(maps, expected["map"], atol=MAP_TOL, rtol=0)
