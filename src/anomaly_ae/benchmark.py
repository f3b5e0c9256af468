"""Throughput benchmark of the REAL training step and the REAL inference path.

    python -m anomaly_ae.benchmark                                  # defaults of TrainingConfig
    python -m anomaly_ae.benchmark --precision bf16 --channels-last --compile
    python -m anomaly_ae.benchmark --compare fp32 cl cl+compile cl+bf16+compile --rounds 3
    python -m anomaly_ae.benchmark --compare fp32 cl+compile --keras-reference /tmp/tfvenv/bin/python
    python -m anomaly_ae.benchmark --onnx --threads 2 --rounds 3    # ONNX Runtime vs torch eager

Training is timed through :func:`anomaly_ae.training.trainer.prepare_training` and
:func:`~anomaly_ae.training.trainer.train_one_epoch` (the code train_autoencoder runs:
autocast forward, float32 HybridLoss, backward, Adam) on random images of the real shape
(209 x 1 x 256 x 256, batch 8 -> 26 steps, the last of 9 images). Inference is timed
through :func:`anomaly_ae.scoring.inference.reconstruct_and_score` (reconstruction,
anomaly map, per-image SSIM, score). Every configuration is built and warmed up (compiled)
first; then the timed rounds run the configurations interleaved in this one process, so
their ratios are fair on a shared, noisy machine. Figures are medians over rounds.

A configuration spec is ``+``-joined tokens: ``fp32`` | ``bf16`` | ``fp16`` | ``auto``
(precision), ``cl`` (channels_last), ``compile``, ``ma`` (compile mode
max-autotune-no-cudagraphs), ``ro`` (compile mode reduce-overhead: CUDA graphs on CUDA), ``cd`` (compile mode
default; ``compile`` alone takes the configured mode, ``auto``: ro on CUDA, cd elsewhere),
``fused`` | ``foreach`` | ``loop`` (Adam implementation), ``nodet`` (no deterministic
algorithms), ``t1``/``t2``/... (intra-op threads), ``default`` (TrainingConfig defaults).

``--onnx`` instead times the deployed scoring graph (network + anomaly map + score, the
``model.onnx`` of an inspection bundle, :class:`anomaly_ae.export.ScoringGraph`) in ONNX
Runtime against the same module in torch eager fp32, torch compiled fp32 and (on a CPU with
native bf16) compiled bf16 autocast, plus the network alone in ONNX Runtime (what the Keras
reference's ``predict`` times), in this one process, interleaved, with as many ONNX Runtime
intra-op threads as torch has: images/s at ``--onnx-batch-size`` (8) and the latency of one
image (p50/p95 over ``--latency-runs`` calls per round).
This is a script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from anomaly_ae.data.transforms import image_shape
from anomaly_ae.model import AutoencoderConfig, count_parameters
from anomaly_ae.scoring import MapSettings
from anomaly_ae.scoring.inference import reconstruct_and_score
from anomaly_ae.training.trainer import (
    TrainingConfig,
    batch_slices,
    prepare_training,
    train_one_epoch,
)

#: The author's Keras model timed on the same machine: ../shared/tools beside the repository.
KERAS_SCRIPT = str(Path(__file__).resolve().parents[3] / "shared" / "tools" / "seed_keras_epoch.py")


@dataclass
class Variant:
    name: str
    config: TrainingConfig


def parse_spec(spec: str, base: TrainingConfig) -> Variant:
    """Turn ``cl+bf16+compile`` into a TrainingConfig (starting from ``base``)."""
    changes: dict[str, Any] = {}
    for token in filter(None, spec.strip().split("+")):
        if token == "default":
            continue
        if token in ("fp32", "bf16", "fp16", "auto"):
            changes["precision"] = token
        elif token == "cl":
            changes["channels_last"] = True
        elif token == "nocl":
            changes["channels_last"] = False
        elif token == "compile":
            changes["compile"] = True
        elif token == "nocompile":
            changes["compile"] = False
        elif token == "ma":
            changes.update(compile=True, compile_mode="max-autotune-no-cudagraphs")
        elif token == "ro":
            changes.update(compile=True, compile_mode="reduce-overhead")
        elif token == "cd":
            changes.update(compile=True, compile_mode="default")
        elif token in ("fused", "foreach", "loop"):
            changes["optimizer_impl"] = token
        elif token == "nodet":
            changes["deterministic"] = False
        elif re.fullmatch(r"t\d+", token):
            changes["num_threads"] = int(token[1:])
        else:
            raise SystemExit(f"unknown token {token!r} in configuration {spec!r}")
    return Variant(spec, replace(base, **changes))


def _shape_arg(text: str) -> tuple[int, int]:
    try:
        return image_shape(int(text) if text.isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def model_config(args: argparse.Namespace) -> AutoencoderConfig:
    """The paper's network at ``--image-size``, on tiles of ``--tile-size`` if given."""
    return AutoencoderConfig(image_size=args.image_size, tile_size=args.tile_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One configuration: its training setup and its inference settings."""

    def __init__(self, variant: Variant, args: argparse.Namespace, train_data: torch.Tensor, infer_data):
        self.variant, self.args = variant, args
        cfg = variant.config
        started = time.perf_counter()
        self.setup = prepare_training(model_config(args), cfg)
        self.device = self.setup.device
        self.train_data = train_data.to(self.device)
        self.infer_data = infer_data
        self.slices = batch_slices(len(train_data), cfg.batch_size)
        self.epoch = 0
        self.build_seconds = time.perf_counter() - started
        self.train_times: list[float] = []
        self.infer_times: list[float] = []
        self.losses: list[float] = []

    def train_epoch(self) -> float:
        self.epoch += 1
        _sync(self.device)
        t = time.perf_counter()
        losses = train_one_epoch(
            self.setup, self.train_data, self.slices, epoch=self.epoch, config=self.variant.config
        )
        last = float(losses[-1])  # one sync per epoch, as in train_autoencoder
        elapsed = time.perf_counter() - t
        self.losses.append(last)
        return elapsed

    def warm_train(self, steps: int) -> float:
        """Run the first steps (compiles, both batch sizes) and time them."""
        t = time.perf_counter()
        cfg = self.variant.config
        self.setup.model.train()
        sizes = sorted({s.stop - s.start for s in self.slices})
        for _ in range(max(steps, 1)):
            for size in sizes:
                x = self.train_data[:size]
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.setup.train_step(x)
        _sync(self.device)
        return time.perf_counter() - t

    def infer(self) -> float:
        cfg = self.variant.config
        _sync(self.device)
        t = time.perf_counter()
        reconstruct_and_score(
            self.setup.model,
            self.infer_data,
            MapSettings(),
            batch_size=self.args.infer_batch_size,
            device=str(self.device),
            precision=cfg.precision,
            keep_maps=True,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            compile_mode="default" if cfg.compile_mode == "reduce-overhead" else cfg.compile_mode,
        )
        _sync(self.device)
        return time.perf_counter() - t


def breakdown(runner: Runner, steps: int = 4) -> dict[str, float]:
    """Eager per-phase timing (ms per step) of forward, loss, backward, optimizer step."""
    from anomaly_ae.device import autocast

    s, cfg = runner.setup, runner.variant.config
    x = runner.train_data[: cfg.batch_size]
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s.model.train()
    totals = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i in range(steps + 1):
        marks = [time.perf_counter()]
        with autocast(s.device, s.dtype):
            recon = s.model(x)
        _sync(s.device)
        marks.append(time.perf_counter())
        loss = s.loss_fn(x, recon)
        _sync(s.device)
        marks.append(time.perf_counter())
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(s.device)
        marks.append(time.perf_counter())
        s.optimizer.step()
        _sync(s.device)
        marks.append(time.perf_counter())
        if i:  # first is warm-up
            for key, a, b in zip(totals, marks[:-1], marks[1:], strict=True):
                totals[key] += b - a
    return {k: 1000 * v / steps for k, v in totals.items()}


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {"peak_rss_mb": rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_keras(python: str, script: str, n_train: int, epochs: int) -> dict[str, float]:
    """Run the author's Keras script in a subprocess; parse its img/s lines."""
    proc = subprocess.run(
        [python, script, str(n_train), str(epochs)], capture_output=True, text=True, check=False
    )
    text = proc.stdout + proc.stderr
    train = re.search(r"keras train ([\d.]+) img/s", text)
    infer = re.search(r"keras infer ([\d.]+) img/s", text)
    if not (train and infer):
        raise RuntimeError(f"Keras reference failed (rc {proc.returncode}):\n{text[-2000:]}")
    return {"train_img_s": float(train.group(1)), "infer_img_s": float(infer.group(1))}


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anomaly_ae.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 | auto (default: TrainingConfig's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--optimizer-impl", default=None, choices=("auto", "fused", "foreach", "loop"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (0: torch default)")
    p.add_argument("--interop-threads", type=int, default=None)
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="SPEC",
        help="configurations to run interleaved, e.g. fp32 cl cl+compile cl+bf16+compile",
    )
    p.add_argument("--n-train", type=int, default=209, help="training images per epoch (paper split: 209)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-infer", type=int, default=83, help="images scored per inference round")
    p.add_argument("--infer-batch-size", type=int, default=32)
    p.add_argument(
        "--image-size",
        type=_shape_arg,
        default=(256, 256),
        help="a side (256) or height+width (256+512, a non-square product)",
    )
    p.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="model.tile_size: the network runs on tiles of this side "
        "(e.g. --image-size 512 --tile-size 256)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="timed rounds (each: one epoch + one inference pass)"
    )
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-infer", action="store_true")
    p.add_argument(
        "--breakdown", action="store_true", help="also time forward/loss/backward/optimizer (eager)"
    )
    p.add_argument(
        "--keras-reference", metavar="PYTHON", help="python with tensorflow; runs the Keras script"
    )
    p.add_argument("--keras-script", default=KERAS_SCRIPT)
    p.add_argument("--keras-epochs", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--calibration",
        metavar="MODEL_INPUT",
        help="instead: time the calibrate pipeline's nodes (the default lever grid of conf/base) on the "
        "cached arrays in this folder (e.g. data/05_model_input/bottle) with --checkpoint",
    )
    p.add_argument("--checkpoint", help="model checkpoint for --calibration")
    p.add_argument(
        "--env",
        default="base",
        help="for --calibration: the Kedro environment merged over conf/base, as kedro run --env "
        "(e.g. tolerant: the grid with the shift tolerance)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="instead: time the exported scoring graph in ONNX Runtime against torch eager (same model, "
        "same map settings, same threads): img/s at --onnx-batch-size and latency p50/p95 at batch 1",
    )
    p.add_argument("--onnx-batch-size", type=int, default=8)
    p.add_argument("--latency-runs", type=int, default=30, help="batch-1 calls per engine and round (--onnx)")
    p.add_argument(
        "--map-settings",
        default="{}",
        metavar="JSON",
        help='MapSettings for --onnx, e.g. \'{"smoothing_sigma": 2, "score_reduction": "topk_mean"}\' '
        "(default: MapSettings(), as the inference benchmark)",
    )
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"), help="for --onnx")
    p.add_argument("--opset", type=int, default=18, help="for --onnx")
    return p


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def onnx_benchmark(args: argparse.Namespace, say) -> dict[str, Any]:
    """ONNX Runtime against torch (eager, compiled fp32 and, on a CPU with native bf16, compiled
    bf16 autocast) on one freshly built (seeded) model's scoring graph:
    throughput at ``args.onnx_batch_size`` over ``args.n_infer`` random images and batch-1
    latency, the engines interleaved per round; medians of the rounds, percentiles of all
    batch-1 calls. Also the largest score difference between the two (a sanity check)."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from anomaly_ae.export.onnx_export import INPUT_NAME, ScoringGraph, _export_graph
    from anomaly_ae.model import build_model
    from anomaly_ae.runtime.bundle import run_in_chunks

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started_in = environment()  # the load average before
    keras: list[dict[str, float]] = []
    if args.keras_reference:  # the paper's Keras model, before and after, in this same run
        say("Keras reference (before) ...")
        keras.append(run_keras(args.keras_reference, args.keras_script, args.n_train, args.keras_epochs))
        say(f"  keras: {keras[-1]}")
    settings = MapSettings.from_dict(json.loads(args.map_settings))
    torch.manual_seed(0)
    model = build_model(model_config(args)).eval()
    graph = ScoringGraph(model, settings).eval()
    with tempfile.TemporaryDirectory(prefix="anomaly_ae_bench_onnx_") as folder:
        path = Path(folder) / "model.onnx"
        started = time.perf_counter()
        _export_graph(graph, args.image_size, args.opset, args.exporter, path)
        export_seconds = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        onnx_mb = path.stat().st_size / 1e6
        # the network alone, what the Keras reference's predict times: where the time goes
        recon_path = Path(folder) / "reconstruction.onnx"
        with torch.no_grad():
            torch.onnx.export(
                model,
                (torch.rand(2, 1, *args.image_size),),
                str(recon_path),
                dynamo=True,
                external_data=False,
                input_names=[INPUT_NAME],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}},
                verbose=False,
            )
        recon_session = ort.InferenceSession(str(recon_path), options, providers=["CPUExecutionProvider"])

    gen = torch.Generator().manual_seed(0)
    images = torch.rand((args.n_infer, 1, *args.image_size), generator=gen)
    arrays = images.numpy()
    batch = args.onnx_batch_size

    def run_torch(x: torch.Tensor):
        with torch.inference_mode():
            amap, score = graph(x)
        return amap.numpy(), score.numpy()

    def run_ort(x: np.ndarray):  # as anomaly_ae.runtime runs a bundle: in cache-sized chunks
        amap, score = run_in_chunks(session, INPUT_NAME, x)
        return amap[:, None], score

    def run_ort_whole(x: np.ndarray):  # the whole batch in one call
        return session.run(None, {INPUT_NAME: x})

    def run_ort_recon(x: np.ndarray):
        recon = recon_session.run(None, {INPUT_NAME: x})[0]
        return recon, recon[:, 0, 0, 0]  # (no map, no score: not compared)

    from anomaly_ae.device import autocast, cpu_has_native_bf16

    compiled = torch.compile(graph)

    def compiled_runner(dtype):
        def run(x: torch.Tensor):
            with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
                amap, score = compiled(x)
            return amap.float().numpy(), score.float().numpy()

        return run

    engines = {
        "torch eager": (run_torch, images),
        "torch compiled fp32": (compiled_runner(None), images),
        "onnxruntime": (run_ort, arrays),
        "onnxruntime, one call per batch": (run_ort_whole, arrays),
    }
    if cpu_has_native_bf16():  # the project's default inference on such a CPU (Performance)
        engines["torch compiled bf16"] = (compiled_runner(torch.bfloat16), images)
    engines["onnxruntime, reconstruction only"] = (run_ort_recon, arrays)
    outputs = {}
    for name, (fn, data) in engines.items():  # warm-up (compilation, first-call allocations), parity
        done = [fn(data[i : i + batch]) for i in range(0, len(data), batch)]
        outputs[name] = [np.concatenate([d[k] for d in done]) for k in (0, 1)]
        fn(data[:1])
        fn(data[:1])  # batch 1 compiles (dynamic shapes) on its second distinct size
    max_diff = float(np.abs(outputs["torch eager"][1] - outputs["onnxruntime"][1]).max())
    max_map_diff = float(np.abs(outputs["torch eager"][0] - outputs["onnxruntime"][0]).max())
    del outputs

    say(
        f"ONNX Runtime {ort.__version__} vs torch {torch.__version__} eager fp32: one scoring graph "
        f"({args.image_size[0]}x{args.image_size[1]}, {settings.describe()}), "
        f"{threads} intra-op threads each; export ({args.exporter}, opset {args.opset}) "
        f"{export_seconds:.1f} s, {onnx_mb:.1f} MB; max |score diff| {max_diff:.2e}, "
        f"max |map diff| {max_map_diff:.2e}"
    )
    throughput: dict[str, list[float]] = {name: [] for name in engines}
    latency: dict[str, list[float]] = {name: [] for name in engines}
    for rnd in range(args.rounds):
        for name, (fn, data) in engines.items():
            t = time.perf_counter()
            for i in range(0, len(data), batch):
                fn(data[i : i + batch])
            throughput[name].append(len(data) / (time.perf_counter() - t))
            for i in range(args.latency_runs):
                x = data[i % len(data) : i % len(data) + 1]
                t = time.perf_counter()
                fn(x)
                latency[name].append(1000 * (time.perf_counter() - t))
        say(
            f"round {rnd + 1}/{args.rounds}: "
            + ", ".join(f"{name} {throughput[name][-1]:.1f} img/s" for name in engines)
        )
    rows = []
    for name in engines:
        rows.append(
            {
                "engine": name,
                f"img_s_batch{batch}": statistics.median(throughput[name]),
                f"img_s_batch{batch}_all": throughput[name],
                "latency_ms_p50": _percentile(latency[name], 50),
                "latency_ms_p95": _percentile(latency[name], 95),
                "latency_calls": len(latency[name]),
            }
        )
    first = rows[0]
    for row in rows:
        row["img_s_vs_torch"] = row[f"img_s_batch{batch}"] / first[f"img_s_batch{batch}"]
        row["p50_vs_torch"] = row["latency_ms_p50"] / first["latency_ms_p50"]
    result = {
        "environment": started_in,
        "settings": {**vars(args), "map_settings": settings.to_dict()},
        "threads": threads,
        "export_seconds": export_seconds,
        "onnx_mb": onnx_mb,
        "max_abs_score_diff": max_diff,
        "max_abs_map_diff": max_map_diff,
        "engines": rows,
        "peak_memory": peak_memory_mb(torch.device("cpu")),
    }
    if keras:
        say("Keras reference (after) ...")
        keras.append(run_keras(args.keras_reference, args.keras_script, args.n_train, args.keras_epochs))
        say(f"  keras: {keras[-1]}")
        keras_infer = statistics.median(k["infer_img_s"] for k in keras)
        result["keras"] = {"runs": keras, "infer_img_s": keras_infer}
        for row in rows:
            row["img_s_vs_keras"] = row[f"img_s_batch{batch}"] / keras_infer
    result["environment"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    say(
        f"\n{'engine':34s} {f'img/s @{batch}':>11s} {'x torch':>8s} {'p50 ms @1':>10s} {'p95 ms @1':>10s} "
        f"{'x torch':>8s}"
    )
    for row in rows:
        say(
            f"{row['engine']:34s} {row[f'img_s_batch{batch}']:11.1f} {row['img_s_vs_torch']:8.2f} "
            f"{row['latency_ms_p50']:10.1f} {row['latency_ms_p95']:10.1f} {row['p50_vs_torch']:8.2f}"
        )
    if keras:
        say(
            "Keras reference (the paper's model, its script's predict at batch 32): "
            f"{result['keras']['infer_img_s']:.1f} img/s; "
            + ", ".join(f"{row['engine']} {row['img_s_vs_keras']:.2f}x Keras" for row in rows)
        )
    say(
        f"{args.rounds} rounds of {args.n_infer} images and {args.latency_runs} batch-1 calls per engine; "
        f"load {_load(result['environment']['load_average'])} -> "
        f"{_load(result['environment']['load_average_end'])}; "
        f"peak RSS {result['peak_memory']['peak_rss_mb']:.0f} MB"
    )
    return result


def calibration_benchmark(model_input: str, checkpoint_path: str, say, env: str = "base") -> dict[str, Any]:
    """Wall time of the calibrate pipeline's three nodes, run as the pipeline runs them
    (parameters from conf/base, merged with ``conf/<env>`` as ``kedro run --env <env>``
    merges them), on real cached arrays."""
    from kedro.config import OmegaConfigLoader
    from kedro.io.core import Version

    from anomaly_ae.datasets import NpzDataset
    from anomaly_ae.model.checkpoint import load_checkpoint
    from anomaly_ae.pipelines.calibrate.nodes import score_lever_grid, select_map, synthesise_defects
    from anomaly_ae.settings import CONFIG_LOADER_ARGS

    params = OmegaConfigLoader("conf", **{**CONFIG_LOADER_ARGS, "default_run_env": env})["parameters"]
    folder = Path(model_input)
    latest = Version(None, None)  # the caches are versioned: read the newest
    train = NpzDataset(str(folder / "train_images.npz"), version=latest).load()
    validation = NpzDataset(str(folder / "validation_images.npz"), version=latest).load()
    checkpoint = load_checkpoint(checkpoint_path)
    started = time.perf_counter()
    defects = synthesise_defects(validation, params["calibration"])
    table, _ = score_lever_grid(
        checkpoint, train, defects, params["model"], params["evaluation"], params["calibration"]
    )
    choice, _ = select_map(table, checkpoint, params["calibration"])
    seconds = time.perf_counter() - started
    result = {
        "calibration_seconds": seconds,
        "settings": len(table),
        "train_images": len(train["images"]),
        "validation_images": len(defects["normal"]),
        "synthetic_defects": len(defects["images"]),
        "threads": torch.get_num_threads(),
        "chosen": choice["setting"],
        "peak_memory": peak_memory_mb(torch.device("cpu")),
    }
    say(
        f"calibration: {result['settings']} settings on {result['train_images']} train + "
        f"{result['validation_images']} validation + {result['synthetic_defects']} synthetic images "
        f"in {seconds:.1f} s ({result['threads']} threads); chose {choice['setting']}; "
        f"peak RSS {result['peak_memory']['peak_rss_mb']:.0f} MB"
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.calibration:
        if not args.checkpoint:
            raise SystemExit("--calibration needs --checkpoint <model_checkpoint.pt>")
        if args.threads:
            torch.set_num_threads(args.threads)
        result = calibration_benchmark(
            args.calibration, args.checkpoint, print if not args.json else lambda *a: None, env=args.env
        )
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        return result
    if args.onnx:
        result = onnx_benchmark(args, print if not args.json else lambda *a: None)
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        return result
    overrides: dict[str, Any] = {"device": args.device, "batch_size": args.batch_size, "progress": False}
    for arg, field in (
        ("precision", "precision"),
        ("channels_last", "channels_last"),
        ("compile", "compile"),
        ("compile_mode", "compile_mode"),
        ("optimizer_impl", "optimizer_impl"),
        ("threads", "num_threads"),
        ("interop_threads", "num_interop_threads"),
    ):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    base = TrainingConfig(**overrides)
    variants = [parse_spec(s, base) for s in args.compare] if args.compare else [Variant("config", base)]
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    gen = torch.Generator().manual_seed(0)
    shape = (1, *args.image_size)
    train_data = torch.rand((args.n_train, *shape), generator=gen)
    infer_data = torch.rand((args.n_infer, *shape), generator=gen)
    report: dict[str, Any] = {"environment": environment(), "settings": vars(args), "variants": []}
    say(
        f"model {model_config(args).describe()}; "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"interop {torch.get_num_interop_threads()}, "
        f"cpu {torch.backends.cpu.get_cpu_capability()}, load {report['environment']['load_average']}"
    )

    keras: list[dict[str, float]] = []
    if args.keras_reference:
        say("Keras reference (before) ...")
        keras.append(run_keras(args.keras_reference, args.keras_script, args.n_train, args.keras_epochs))
        say(f"  keras: {keras[-1]}")

    runners = []
    for v in variants:
        r = Runner(v, args, train_data, infer_data)
        if not args.no_train:
            r.warm_seconds = r.warm_train(args.warmup_steps)
        else:
            r.warm_seconds = 0.0
        t = time.perf_counter()
        if not args.no_infer:
            r.infer()  # warm-up / compile of the inference graph
        r.infer_warm_seconds = time.perf_counter() - t
        say(
            f"[{v.name}] device {r.device}; warm-up train {r.warm_seconds:.1f} s "
            f"(compile included), inference {r.infer_warm_seconds:.1f} s"
        )
        runners.append(r)

    for rnd in range(args.rounds):
        for r in runners:
            if not args.no_train:
                r.train_times.append(r.train_epoch())
            if not args.no_infer:
                r.infer_times.append(r.infer())
        say(
            f"round {rnd + 1}/{args.rounds}: "
            + ", ".join(
                f"{r.variant.name} train {args.n_train / r.train_times[-1]:.1f}"
                if r.train_times
                else r.variant.name
                for r in runners
            )
        )

    if keras:
        say("Keras reference (after) ...")
        keras.append(run_keras(args.keras_reference, args.keras_script, args.n_train, args.keras_epochs))
        say(f"  keras: {keras[-1]}")

    ref = runners[0]
    for r in runners:
        cfg = r.variant.config
        row: dict[str, Any] = {
            "name": r.variant.name,
            "device": str(r.device),
            "settings": {
                k: v
                for k, v in asdict(cfg).items()
                if k
                in (
                    "precision",
                    "channels_last",
                    "compile",
                    "compile_mode",
                    "optimizer_impl",
                    "num_threads",
                    "num_interop_threads",
                    "deterministic",
                    "batch_size",
                )
            },
            "adam": {k: r.setup.optimizer.param_groups[0].get(k) for k in ("fused", "foreach")},
            "parameters": count_parameters(r.setup.model),
            "warmup_train_seconds": round(r.warm_seconds, 2),
            "warmup_infer_seconds": round(r.infer_warm_seconds, 2),
        }
        if r.train_times:
            med = statistics.median(r.train_times)
            row.update(
                train_img_s=args.n_train / med,
                epoch_seconds=med,
                train_img_s_all=[args.n_train / t for t in r.train_times],
                last_loss=r.losses[-1],
            )
        if r.infer_times:
            med = statistics.median(r.infer_times)
            row.update(
                infer_img_s=args.n_infer / med, infer_img_s_all=[args.n_infer / t for t in r.infer_times]
            )
        if args.breakdown:
            row["breakdown_ms"] = breakdown(r)
        report["variants"].append(row)
    for row in report["variants"]:
        base_row = report["variants"][0]
        for key in ("train_img_s", "infer_img_s"):
            if key in row and key in base_row:
                row[f"{key}_vs_first"] = row[key] / base_row[key]
    report["peak_memory"] = peak_memory_mb(ref.device)
    if keras:
        k = {key: statistics.mean(d[key] for d in keras) for key in keras[0]}
        report["keras"] = {"runs": keras, **k}
        for row in report["variants"]:
            if "train_img_s" in row:
                row["train_vs_keras"] = row["train_img_s"] / k["train_img_s"]
            if "infer_img_s" in row:
                row["infer_vs_keras"] = row["infer_img_s"] / k["infer_img_s"]
    report["environment"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(
            f"\n{'configuration':32s} {'train img/s':>11s} {'s/epoch':>8s} {'infer img/s':>11s} "
            f"{'x first':>13s} {'x keras':>13s} {'warm-up s':>10s}"
        )
        for row in report["variants"]:
            tr, inf = row.get("train_img_s", float("nan")), row.get("infer_img_s", float("nan"))
            nan = float("nan")
            vs = f"{row.get('train_img_s_vs_first', nan):.2f}/{row.get('infer_img_s_vs_first', nan):.2f}"
            vk = f"{row.get('train_vs_keras', nan):.2f}/{row.get('infer_vs_keras', nan):.2f}"
            print(
                f"{row['name']:32s} {tr:11.1f} {row.get('epoch_seconds', float('nan')):8.2f} {inf:11.1f} "
                f"{vs:>13s} {vk:>13s} {row['warmup_train_seconds'] + row['warmup_infer_seconds']:10.1f}"
            )
            if "breakdown_ms" in row:
                parts = ", ".join(f"{k} {v:.0f}" for k, v in row["breakdown_ms"].items())
                print(f"   eager breakdown ms/step: {parts}")
        if keras:
            print(
                f"keras reference: train {report['keras']['train_img_s']:.1f} img/s, "
                f"infer {report['keras']['infer_img_s']:.1f} img/s (mean of {len(keras)} runs)"
            )
        print(f"peak RSS {report['peak_memory']['peak_rss_mb']:.0f} MB (whole process, all configurations)")
        for row in report["variants"]:
            print(f"  {row['name']}: {row['settings']} adam={row['adam']} device={row['device']}")
    return report


if __name__ == "__main__":
    main()
