"""Label-free choice of the anomaly map: a lever grid scored on normal images and synthetic defects.

The trained model reconstructs three sets once: the NORMAL training images (they fit the
per-pixel normal reference), the held-out NORMAL validation images, and synthetic-defect
copies of the validation images (:func:`anomaly_ae.data.defects.paste_synthetic_defects`).
Every setting of the grid turns those into maps and scores through the scoring core
(:func:`~anomaly_ae.scoring.anomaly_map.error_terms` once per set, then
:func:`~anomaly_ae.scoring.anomaly_map.compose` once per distinct map). Test images are never
an input here.

The rule (the same for every category): ``selection_score = (synthetic image AUROC +
synthetic pixel AUROC) / 2`` (normal validation images vs their defective copies); settings
within ``tie_tolerance`` of the best are ties, resolved towards the fewest levers changed
from the paper's map, then grid order. The map that gives the image score need not be the
best to outline a defect: :func:`select_localisation` chooses the heat map (pixel AUROC,
AUPRO) by the synthetic pixel AUROC alone, ties going to the map nearest the detection map
(the detection map itself, when it ties: then there is one map).

Levers (``calibration.grid``): ``blend`` (``ssim``: 1 - local SSIM; ``l2``: squared error;
``ssim+l2``: 1 - SSIM + s * squared error with ``s = mean(1 - SSIM) / mean(squared error)``
on the normal validation images, so both terms weigh about the same), ``win_size`` (a window
or a list of them: the multi-scale mean), ``smoothing_sigma``, ``normal_reference``,
``lowpass_sigma`` (with ``zscore`` or ``tail`` only: the per-pixel max with the low-pass
difference, normalised the same way), ``reference_shift`` (with ``zscore`` or ``tail`` only:
the reference fitted on the training
images and their copies moved by that many px, :func:`~anomaly_ae.scoring.reference.with_moved_copies`),
``shift_tolerance`` (every error term at the reconstruction's best alignment within that many
px, ``MapSettings.shift_tolerance``), ``ssim_k2`` (SSIM's contrast constant,
``MapSettings.ssim_k2``; the error terms are computed once per tolerance and constant),
``memory_pool`` and ``memory_radius`` (with ``zscore`` or ``tail`` only: the per-pixel max with
the memory channel, the distance to the nearest training image's block averages,
``MapSettings.memory_pool``; optional keys, absent: no memory channel) and ``score_reduction``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from anomaly_ae.evaluation.metrics import grouped_auroc, rank_auroc
from anomaly_ae.evaluation.summary import keep_region
from anomaly_ae.scoring.anomaly_map import MapSettings, blend, error_terms, image_score, lowpass, smooth_terms
from anomaly_ae.scoring.inference import memory_bank, unit_float
from anomaly_ae.scoring.memory import memory_map
from anomaly_ae.scoring.reference import (
    SCALED_MODES,
    NormalReference,
    ReferenceAccumulator,
    correct,
    with_moved_copies,
)
from anomaly_ae.scoring.ssim import PAPER_K2

__all__ = [
    "BLENDS",
    "GridPoint",
    "GridReferences",
    "agreement",
    "build_grid",
    "fit_grid_references",
    "grid_maps",
    "l2_scale",
    "map_levers_between",
    "normal_l2_scale",
    "score_grid",
    "select",
    "select_localisation",
    "selection_score",
]

BLENDS = ("ssim", "ssim+l2", "l2")
TENSOR_TERMS = ("sq", "diff", "x", "recon")  # error_terms' tensors besides the SSIM errors


@dataclass(frozen=True)
class GridPoint:
    """One setting of the grid: a blend name and the :class:`MapSettings` it stands for."""

    blend: str
    settings: MapSettings

    @property
    def raw_key(self) -> tuple:
        """Settings sharing this key share the uncorrected map (and its normal reference)."""
        s = self.settings
        combine = s.scale_combine if s.ssim_weight and len(s.windows) > 1 else None
        # the last item is the terms key (a squared-error map's constant is the paper map's)
        return (self.blend, s.windows if s.ssim_weight else (), combine, s.smoothing_sigma, s.terms_key)

    @property
    def map_key(self) -> tuple:
        """Settings sharing this key share the corrected map (only the reduction differs)."""
        s = self.settings
        return (*self.raw_key, s.normal_reference, s.lowpass_sigma, s.reference_shift, *_memory_key(s))

    def levers_changed(self, paper: MapSettings) -> int:
        return map_levers_between(self.settings, paper) + int(
            self.settings.score_reduction != paper.score_reduction
        )


def _memory_key(settings: MapSettings) -> tuple[int, int]:
    """``(memory_pool, memory_radius)``, ``(0, 0)`` without a memory channel."""
    return (settings.memory_pool, settings.memory_radius) if settings.memory_pool else (0, 0)


def _blend_of(settings: MapSettings) -> str:
    if not settings.l2_weight:
        return "ssim"
    return "l2" if not settings.ssim_weight else "ssim+l2"


def map_levers_between(a: MapSettings, b: MapSettings) -> int:
    """How many of the grid's map levers differ between two maps (the score reduction aside):
    blend, window(s), their combination, SSIM's contrast constant, smoothing, reference, low-pass
    channel, moved copies, shift tolerance, memory channel (its block size or radius)."""
    window_changed = bool(a.ssim_weight) and a.windows != b.windows
    combine_changed = bool(a.ssim_weight) and len(a.windows) > 1 and a.scale_combine != b.scale_combine
    k2_changed = bool(a.ssim_weight) and a.ssim_k2 != b.ssim_k2
    return (
        int(_blend_of(a) != _blend_of(b))
        + int(window_changed)
        + int(combine_changed)
        + int(k2_changed)
        + int(a.smoothing_sigma != b.smoothing_sigma)
        + int(a.normal_reference != b.normal_reference)
        + int(a.lowpass_sigma != b.lowpass_sigma)
        + int(a.reference_shift != b.reference_shift)
        + int(a.shift_tolerance != b.shift_tolerance)
        + int(_memory_key(a) != _memory_key(b))
    )


def _weights(blend: str, scale: float) -> tuple[float, float]:
    if blend not in BLENDS:
        raise ValueError(f"calibration.grid.blend entries must be among {BLENDS}, got {blend!r}")
    return {"ssim": (1.0, 0.0), "l2": (0.0, 1.0), "ssim+l2": (1.0, float(scale))}[blend]


def build_grid(grid: dict, paper: MapSettings, scale: float) -> list[GridPoint]:
    """Every combination of the levers in ``grid`` (keys ``blend``, ``win_size``,
    ``scale_combine``, ``smoothing_sigma``, ``normal_reference``, ``lowpass_sigma``,
    ``reference_shift``, ``shift_tolerance``, ``ssim_k2``, ``score_reduction``; optionally
    ``memory_pool`` and ``memory_radius``), the paper's map first. A squared-error-only blend has
    no SSIM window (nor constant), so it is listed once; ``scale_combine`` only varies for
    multi-scale windows; a low-pass channel, a memory channel and moved reference images only go
    with the ``zscore`` and ``tail`` references."""
    expected = {
        "blend",
        "win_size",
        "scale_combine",
        "smoothing_sigma",
        "normal_reference",
        "lowpass_sigma",
        "reference_shift",
        "shift_tolerance",
        "ssim_k2",
        "score_reduction",
    }
    optional = {"memory_pool", "memory_radius"}
    if not expected <= set(grid) <= expected | optional:
        raise ValueError(
            f"calibration.grid must have exactly the keys {sorted(expected)} (and optionally "
            f"{sorted(optional)}), got {sorted(grid)}"
        )
    memories = _memory_levers(grid)
    points = [GridPoint("ssim", paper)]
    seen = {paper}
    for blend_name in grid["blend"]:
        ssim_w, l2_w = _weights(blend_name, scale)
        for window in grid["win_size"] if ssim_w else [paper.win_size]:
            multi = isinstance(window, list | tuple) and len(window) > 1
            for combine in grid["scale_combine"] if multi else [paper.scale_combine]:
                for sigma in grid["smoothing_sigma"]:
                    for reference in grid["normal_reference"]:
                        scaled = reference in SCALED_MODES
                        lowpasses = grid["lowpass_sigma"] if scaled else [0.0]
                        shifts = grid["reference_shift"] if scaled else [0]
                        k2s = grid["ssim_k2"] if ssim_w else [paper.ssim_k2]
                        mems = memories if scaled else [(0, paper.memory_radius)]
                        for low, shift, memory, tolerance, k2, reduction in itertools.product(
                            lowpasses, shifts, mems, grid["shift_tolerance"], k2s, grid["score_reduction"]
                        ):
                            settings = dataclasses.replace(
                                paper,
                                ssim_weight=ssim_w,
                                l2_weight=l2_w,
                                win_size=tuple(window) if isinstance(window, list) else window,
                                scale_combine=combine,
                                smoothing_sigma=float(sigma),
                                normal_reference=reference,
                                lowpass_sigma=float(low),
                                reference_shift=int(shift),
                                shift_tolerance=tolerance,
                                ssim_k2=k2,
                                memory_pool=memory[0],
                                memory_radius=memory[1] if memory[0] else paper.memory_radius,
                                score_reduction=reduction,
                            )
                            if settings not in seen:
                                seen.add(settings)
                                points.append(GridPoint(blend_name, settings))
    return points


def _memory_levers(grid: dict) -> list[tuple[int, int]]:
    """The grid's ``(memory_pool, memory_radius)`` pairs (pool 0, no memory channel, once)."""
    pools = [int(p) for p in grid.get("memory_pool", [0])]
    radii = [int(r) for r in grid.get("memory_radius", [1])]
    for name, values in (("memory_pool", pools), ("memory_radius", radii)):
        if not values or min(values) < 0:
            raise ValueError(f"calibration.grid.{name} must list whole numbers >= 0, got {grid.get(name)!r}")
    pairs = [(p, r) for p in pools for r in (radii if p else radii[:1])]
    return list(dict.fromkeys(pairs))


def l2_scale(terms: dict, win_size: int) -> float:
    """``mean(1 - SSIM) / mean(squared error)`` over NORMAL images (their error terms)."""
    ssim_err = float(terms["ssim_err"][win_size].mean())
    sq = float(terms["sq"].mean())
    return ssim_err / sq if sq > 0 else 1.0


def _terms(
    images: np.ndarray,
    recon: np.ndarray,
    windows: tuple[int, ...],
    win_sigma: float,
    batch: int,
    keep_diff: bool = False,
    term_keys: Sequence[tuple[int, float]] = ((0, PAPER_K2),),
) -> dict[tuple, dict]:
    """The images' :func:`error_terms`, a batch at a time, once per terms key
    (:attr:`MapSettings.terms_key`: shift tolerance, SSIM's contrast constant): ``{key: terms}``.
    Each term is written batch by batch into one tensor for every image (not a list of
    batches concatenated at the end: that held each term twice)."""
    out = {}
    for key in term_keys:
        tolerance, k2 = key
        terms: dict = {}
        for i in range(0, len(images), batch):
            part = error_terms(
                unit_float(torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))),
                torch.from_numpy(np.ascontiguousarray(recon[i : i + batch])),
                windows,
                win_sigma,
                keep_diff=keep_diff,
                tolerance=tolerance,
                k2=k2,
            )
            if not terms:  # the first batch gives each term's shape and dtype
                terms = {
                    "ssim_err": {w: _for_every_image(part["ssim_err"][w], len(images)) for w in windows},
                    **{
                        name: _for_every_image(part[name], len(images))
                        for name in ("sq", "diff", "x", "recon")
                        if name in part
                    },
                    **({"tolerance": tolerance} if "tolerance" in part else {}),
                }
            for w in windows:
                terms["ssim_err"][w][i : i + batch] = part["ssim_err"][w]
            for name, value in terms.items():
                if name not in ("ssim_err", "tolerance"):
                    value[i : i + batch] = part[name]
        out[key] = terms
    return out


def _for_every_image(first: torch.Tensor, n: int) -> torch.Tensor:
    """An empty tensor like the first batch's ``first``, for ``n`` images."""
    return first.new_empty((n, *first.shape[1:]))


def _lowpass_terms(term_keys: Sequence[tuple[int, float]]) -> dict[int, tuple[int, float]]:
    """Per shift tolerance, the terms key whose terms give its low-pass channel (the channel
    does not depend on SSIM's constant: the first key with that tolerance)."""
    out: dict[int, tuple[int, float]] = {}
    for key in term_keys:
        out.setdefault(key[0], key)
    return out


def _train_references(
    train: tuple[np.ndarray, np.ndarray | Callable[[np.ndarray], np.ndarray]],
    windows: tuple[int, ...],
    win_sigma: float,
    batch_size: int,
    by_sigma: dict[float, dict[tuple, list[GridPoint]]],
    lowpass_sigmas: Sequence[float] = (),
    shifts: Sequence[int] = (0,),
    term_keys: Sequence[tuple[int, float]] = ((0, PAPER_K2),),
    memories: Sequence[tuple[int, int]] = (),
    banks: dict[int, np.ndarray] | None = None,
) -> dict[tuple, NormalReference]:
    """The normal reference of every uncorrected map of the grid, for every reference shift,
    fitted one batch of training images at a time (:class:`ReferenceAccumulator`): memory does
    not grow with the number of training images. ``train[1]`` is the reconstructions, or a
    function that reconstructs a batch (then not even they are held; moved copies,
    ``shifts`` other than 0, need it). References are keyed ``(shift, sigma, raw_key)`` (the
    raw key ends with the terms key: shift tolerance, SSIM constant), the low-pass channels'
    ``("lowpass", sigma, shift, tolerance)``, the memory channels' ``("memory", pool, radius,
    shift)`` (each training image matched against the others in ``banks[pool]``, the training
    images' block averages). A shift's reference holds the unmoved
    images and their moved copies (:func:`with_moved_copies`), each image with its copies in
    one batch (the accumulators leave each pixel's highest image out); the memory channel's,
    the same for every shift, the unmoved images only (as ``fit_normal_reference`` fits it)."""
    images, recon = train
    moves = sorted({int(s) for s in shifts} - {0})
    if moves and not callable(recon):
        raise ValueError("reference_shift > 0 needs the training images' reconstruction as a function")
    accumulators = {
        (shift, s, key): ReferenceAccumulator()
        for shift in shifts
        for s, by_raw in by_sigma.items()
        for key in by_raw
    }
    by_shift_tolerance = _lowpass_terms(term_keys)
    accumulators |= {
        ("lowpass", s, shift, r): ReferenceAccumulator()
        for s in lowpass_sigmas
        for shift in shifts
        for r in by_shift_tolerance
    }
    # the memory channel's reference: the unmoved images only, one for every shift (its search
    # leaves each image out of the bank, so an unmoved image is already one the bank has not seen)
    memory_references = {(pool, radius): ReferenceAccumulator() for pool, radius in memories}
    vectors = {pool: torch.from_numpy(banks[pool]).double() for pool in {p for p, _ in memories}}

    def add(
        batch: np.ndarray,
        rebuilt: np.ndarray,
        rows: dict[int, torch.Tensor],
        sources: dict[int, np.ndarray],
        ids: np.ndarray,
    ) -> None:
        """``batch``: images (``ids``, first) and their moved copies; ``rows[shift]``: those a
        shift's reference holds, ``sources[shift]``: their images."""
        x, y = unit_float(torch.from_numpy(batch)), torch.from_numpy(np.ascontiguousarray(rebuilt))
        terms = {
            (r, k2): error_terms(x, y, windows, win_sigma, keep_diff=bool(lowpass_sigmas), tolerance=r, k2=k2)
            for r, k2 in term_keys
        }
        for smoothing, by_raw in by_sigma.items():
            for terms_key, keys in _by_terms(by_raw).items():
                smoothed = smooth_terms(terms[terms_key], smoothing)
                for key in keys:
                    maps = blend(smoothed, by_raw[key][0].settings)[:, 0]
                    for shift, chosen in rows.items():
                        accumulators[shift, smoothing, key].add(maps[chosen], sources[shift])
        for s, (r, terms_key) in itertools.product(lowpass_sigmas, by_shift_tolerance.items()):
            maps = lowpass(terms[terms_key], s)[:, 0]
            for shift, chosen in rows.items():
                accumulators["lowpass", s, shift, r].add(maps[chosen], sources[shift])
        for pool, radius in memories:  # each unmoved image matched against the others
            maps = memory_map(x[: len(ids)], vectors[pool], pool, radius, ids)[:, 0].float()
            memory_references[pool, radius].add(maps, ids)

    # an image and all its moved copies in one batch (about batch_size maps in all)
    step = max(batch_size // (1 + 4 * len(moves)), 1)
    for start in range(0, len(images), step):
        batch = np.ascontiguousarray(images[start : start + step])
        n = len(batch)
        ids = np.arange(start, start + n)
        parts = [batch] + [with_moved_copies(batch, shift)[n:] for shift in moves]
        stacked = np.ascontiguousarray(np.concatenate(parts)) if moves else batch
        rebuilt = recon(stacked) if callable(recon) else recon[start : start + n]
        rows = {0: torch.arange(n)} if 0 in shifts else {}
        for k, shift in enumerate(moves):  # the unmoved images, then this shift's 4n copies
            rows[shift] = torch.cat([torch.arange(n), torch.arange(n + 4 * n * k, n + 4 * n * (k + 1))])
        sources = {shift: np.tile(ids, len(chosen) // n) for shift, chosen in rows.items()}
        add(stacked, rebuilt, rows, sources, ids)
    references = {key: accumulator.result() for key, accumulator in accumulators.items()}
    for (pool, radius), accumulator in memory_references.items():
        fitted = accumulator.result()
        references |= {("memory", pool, radius, shift): fitted for shift in shifts}
    return references


@dataclass(frozen=True)
class GridReferences:
    """The normal references a grid needs, fitted once on the training images
    (:func:`fit_grid_references`): one per uncorrected map and reference shift, keyed
    ``(shift, sigma, raw_key)``, and one per low-pass channel, keyed ``("lowpass", sigma,
    shift, tolerance)``. ``scale`` is the ``ssim+l2`` scale the blended maps were made with: the same
    references serve another scoring of the same grid (the calibration's references, the
    real test images' :func:`agreement`) only at that scale. ``banks``: per memory block size,
    the training images' block averages (the memory channels' bank)."""

    scale: float
    maps: dict[tuple, NormalReference]
    banks: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """What scoring a grid needs: its points, the SSIM windows, the points grouped by
    smoothing and uncorrected map, the low-pass sigmas, the reference shifts and the terms
    keys (shift tolerance, SSIM constant)."""

    points: list[GridPoint]
    windows: tuple[int, ...]
    by_sigma: dict[float, dict[tuple, list[GridPoint]]]
    lowpass_sigmas: list[float]
    shifts: list[int]
    term_keys: list[tuple[int, float]]
    memories: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def lowpass_terms(self) -> dict[int, tuple[int, float]]:
        """Per shift tolerance, the terms key its low-pass channel is taken from."""
        return _lowpass_terms(self.term_keys)

    @property
    def tolerances(self) -> list[int]:
        return sorted(self.lowpass_terms)

    @property
    def reference_keys(self) -> set[tuple]:
        return (
            {
                (shift, s, key)
                for shift in self.shifts
                for s, by_raw in self.by_sigma.items()
                for key in by_raw
            }
            | {
                ("lowpass", s, shift, r)
                for s in self.lowpass_sigmas
                for shift in self.shifts
                for r in self.tolerances
            }
            | {("memory", pool, radius, shift) for pool, radius in self.memories for shift in self.shifts}
        )


def _plan(grid: dict, paper: MapSettings, scale: float) -> _Plan:
    points = build_grid(grid, paper, scale)
    grid_windows = {
        int(w) for entry in grid["win_size"] for w in (entry if isinstance(entry, list) else [entry])
    }
    by_sigma: dict[float, dict[tuple, list[GridPoint]]] = {}
    for point in points:
        by_sigma.setdefault(point.settings.smoothing_sigma, {}).setdefault(point.raw_key, []).append(point)
    return _Plan(
        points,
        tuple(sorted(grid_windows | set(paper.windows))),
        by_sigma,
        sorted({float(s) for s in grid.get("lowpass_sigma", [])} - {0.0}),
        sorted({p.settings.reference_shift for p in points}),
        sorted({p.settings.terms_key for p in points}),
        sorted({_memory_key(p.settings) for p in points} - {(0, 0)}),
    )


def normal_l2_scale(normal: tuple[np.ndarray, np.ndarray], paper: MapSettings, batch_size: int) -> float:
    """The ``ssim+l2`` scale (:func:`l2_scale`) measured on the NORMAL ``(images,
    reconstructions)``, with the paper's first SSIM window: what :func:`score_grid`
    measures when it is given no scale."""
    terms = _terms(*normal, paper.windows, paper.win_sigma, batch_size, term_keys=(paper.terms_key,))
    return l2_scale(terms[paper.terms_key], paper.windows[0])


def fit_grid_references(
    grid: dict,
    paper: MapSettings,
    scale: float,
    train: tuple[np.ndarray, np.ndarray | Callable[[np.ndarray], np.ndarray]],
    batch_size: int,
) -> GridReferences:
    """Every normal reference ``grid`` needs at ``scale``, fitted on the training images
    ``train = (images, reconstructions or a function reconstructing a batch)``, streamed a
    batch at a time. Pass the result to :func:`score_grid` in place of ``train`` to score the
    grid on other images without streaming the training images again."""
    plan = _plan(grid, paper, scale)
    banks = {pool: memory_bank(train[0], pool) for pool in sorted({p for p, _ in plan.memories})}
    maps = _train_references(
        train,
        plan.windows,
        paper.win_sigma,
        batch_size,
        plan.by_sigma,
        plan.lowpass_sigmas,
        plan.shifts,
        plan.term_keys,
        plan.memories,
        banks,
    )
    return GridReferences(float(scale), maps, banks)


def _memory_maps(
    plan: _Plan, banks: dict[int, np.ndarray], images: np.ndarray, batch_size: int
) -> dict[tuple[int, int], torch.Tensor]:
    """The memory channel of ``images`` per ``(pool, radius)`` of the grid, ``(N, H, W)``
    float32, a batch at a time (against the training images' ``banks``)."""
    out = {}
    for pool, radius in plan.memories:
        vectors = torch.from_numpy(banks[pool]).double()
        out[pool, radius] = torch.cat(
            [
                memory_map(
                    unit_float(torch.from_numpy(np.asarray(images[i : i + batch_size]))),
                    vectors,
                    pool,
                    radius,
                )[:, 0].float()
                for i in range(0, len(images), batch_size)
            ]
        )
    return out


def _distinct_maps(
    plan: _Plan,
    references: dict[tuple, NormalReference],
    terms: dict[tuple, dict],
    memory: dict[tuple[int, int], torch.Tensor] | None = None,
) -> Iterator[tuple[list[GridPoint], torch.Tensor, NormalReference]]:
    """Every distinct corrected map of the grid, once: ``(the settings sharing it (they differ
    in the score reduction only), the maps (N, H, W), the reference of its uncorrected map)``,
    from the images' :func:`error_terms` per terms key (with ``keep_diff`` when the grid has
    low-pass channels) and their memory channels (:func:`_memory_maps`)."""
    # the low-pass channel of the images, once per sigma and tolerance; normalised per map
    # where it is used (one subtraction and division: holding it normalised for every shift
    # and mode cost BSData's grid agreement 1.8 GB at its peak; this costs it about 12 % more time)
    raw_lowpass = {
        (s, r): lowpass(terms[key], s)[:, 0]
        for s in plan.lowpass_sigmas
        for r, key in plan.lowpass_terms.items()
    }
    for smoothing, by_raw in plan.by_sigma.items():
        for terms_key, keys in _by_terms(by_raw).items():
            # smoothing is linear: smooth each error term once, then blend (see smooth_terms)
            smoothed = smooth_terms(terms[terms_key], smoothing)
            for raw_key in keys:
                raw = blend(smoothed, by_raw[raw_key][0].settings)[:, 0]
                by_map: dict[tuple, list[GridPoint]] = {}
                for point in by_raw[raw_key]:
                    s = point.settings
                    key = (s.normal_reference, s.lowpass_sigma, s.reference_shift, _memory_key(s))
                    by_map.setdefault(key, []).append(point)
                for (mode, low, shift, mem), group in by_map.items():
                    reference = references[shift, smoothing, raw_key]
                    maps = raw if mode == "none" else correct(raw, *reference.as_tensors(mode))
                    if low:  # the per-pixel max with the low-pass channel, normalised alike (MapSettings)
                        channel = references["lowpass", low, shift, terms_key[0]].as_tensors(mode)
                        maps = torch.maximum(maps, correct(raw_lowpass[low, terms_key[0]], *channel))
                    if mem[0]:  # the per-pixel max with the memory channel, normalised alike
                        channel = references["memory", *mem, shift].as_tensors(mode)
                        maps = torch.maximum(maps, correct(memory[mem], *channel))
                    yield group, maps, reference


def _rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``, or ``array`` itself where every row is taken (no copy)."""
    return array if rows.all() else array[rows]


def _by_terms(by_raw: dict[tuple, list[GridPoint]]) -> dict[tuple, list[tuple]]:
    """The raw keys of one smoothing grouped by their terms key (shift tolerance, SSIM
    constant: a raw key's last item), so that one key's smoothed terms are held at a time."""
    out: dict[tuple, list[tuple]] = {}
    for key in by_raw:
        out.setdefault(key[-1], []).append(key)
    return out


def grid_maps(
    grid: dict,
    paper: MapSettings,
    references: GridReferences,
    images: tuple[np.ndarray, np.ndarray],
    batch_size: int,
) -> Iterator[tuple[list[GridPoint], torch.Tensor]]:
    """The maps of every distinct setting of ``grid`` for ``images = (images,
    reconstructions)`` (``(N, C, H, W)`` in [0, 1]), as :func:`score_grid` scores them, one
    map at a time: ``(the settings sharing it, maps (N, H, W))``. For studies of the grid's
    maps beyond its metrics (e.g. a real AUPRO per setting)."""
    plan = _plan(grid, paper, references.scale)
    terms = _terms(
        *images,
        plan.windows,
        paper.win_sigma,
        batch_size,
        keep_diff=bool(plan.lowpass_sigmas),
        term_keys=plan.term_keys,
    )
    memory = _memory_maps(plan, references.banks, images[0], batch_size)
    for group, maps, _ in _distinct_maps(plan, references.maps, terms, memory):
        yield group, maps


def score_grid(
    grid: dict,
    paper: MapSettings,
    train: tuple[np.ndarray, np.ndarray | Callable[[np.ndarray], np.ndarray]] | GridReferences,
    normal: tuple[np.ndarray, np.ndarray],
    defects: tuple[np.ndarray, np.ndarray, np.ndarray, Sequence[str]],
    batch_size: int,
    scale: float | None = None,
    pixel_known: np.ndarray | None = None,
    defect_regions: np.ndarray | None = None,
) -> tuple[pd.DataFrame, float]:
    """Score every setting; returns the table (one row per setting, grid order) and the
    ``ssim+l2`` scale. ``train`` and ``normal`` are ``(images, reconstructions)`` of the
    normal training and validation images (for ``train`` the reconstructions may be a
    function of a batch of images: the training set is then streamed, never held as maps);
    ``train`` may also be the references already fitted on them
    (:func:`fit_grid_references`), which then also give the scale. ``defects`` is
    ``(images, reconstructions, masks, kinds)`` of the synthetic-defect copies. All images
    ``(N, 1, H, W)`` in [0, 1].

    ``scale`` fixes the ``ssim+l2`` scale (default: measured on ``normal``), so that the same
    grid can be scored on other images (:func:`agreement`); ``pixel_known`` (per defect
    image) leaves defect images without a mask out of the pixel AUROC. ``defect_regions``
    (bool, per defect image, e.g. its mask grown by a margin) adds ``syn_image_auroc_at_defect``:
    the image AUROC with each defect image (with a known, non-empty mask) scored on its map
    kept in its region and the normal mean map elsewhere (as
    :func:`~anomaly_ae.evaluation.summary.defect_region_metrics` does)."""
    fitted = train if isinstance(train, GridReferences) else None
    if fitted is not None:
        if scale is not None and not np.isclose(scale, fitted.scale, rtol=1e-9, atol=0.0):
            raise ValueError(
                f"the grid's references were fitted at ssim+l2 scale {fitted.scale}, not {scale}: "
                "fit them again (fit_grid_references) at this scale"
            )
        scale = fitted.scale
    elif scale is None:
        scale = normal_l2_scale(normal, paper, batch_size)
    plan = _plan(grid, paper, scale)
    points, windows, lowpass_sigmas = plan.points, plan.windows, plan.lowpass_sigmas
    if fitted is None:
        fitted = fit_grid_references(grid, paper, scale, train, batch_size)
    missing = plan.reference_keys - set(fitted.maps)
    if missing:
        raise ValueError(
            f"the grid's references were fitted for another grid: {len(missing)} missing "
            f"(e.g. {sorted(map(str, missing))[0]}); fit them for this grid (fit_grid_references)"
        )
    references = fitted.maps

    eval_images = np.concatenate([normal[0], defects[0]])
    memory = _memory_maps(plan, fitted.banks, eval_images, batch_size)
    eval_terms = _terms(
        eval_images,
        np.concatenate([normal[1], defects[1]]),
        windows,
        paper.win_sigma,
        batch_size,
        keep_diff=bool(lowpass_sigmas),
        term_keys=plan.term_keys,
    )
    n_normal, h, w = len(normal[0]), *normal[0].shape[-2:]
    # the pixel AUROC per kind (``syn_pixel_auroc_<kind>``): each kind's defect pixels against
    # the same negatives as the pooled figure (every pixel outside a defect), so the pooled
    # figure is the kinds' weighted by their defect pixels
    kinds = np.asarray(defects[3])
    kind_names = sorted(set(kinds.tolist()))
    code_type = np.min_scalar_type(len(kind_names))  # uint8 for any realistic number of kinds
    codes = (np.searchsorted(kind_names, kinds) + 1).astype(code_type)  # 1 + the kind's index
    defect_masks = np.where(np.asarray(defects[2]) != 0, codes[:, None, None], 0).astype(code_type)
    masks = np.concatenate([np.zeros((n_normal, h, w), code_type), defect_masks])  # 0: normal pixel
    labels = np.r_[np.zeros(n_normal, int), np.ones(len(defects[0]), int)]
    pixel_rows = np.r_[
        np.ones(n_normal, bool), np.ones(len(defects[0]), bool) if pixel_known is None else pixel_known
    ]
    at_defect = None
    if defect_regions is not None:
        regions = torch.from_numpy(np.asarray(defect_regions, bool))
        scored = pixel_rows[n_normal:] & regions.flatten(1).any(dim=1).numpy()
        at_defect = (np.flatnonzero(scored), regions[torch.from_numpy(scored)])

    pixel_masks = _rows(masks, pixel_rows).ravel()  # the same for every map: taken once
    rows: dict[GridPoint, dict] = {}
    for group, maps, reference in _distinct_maps(plan, references, eval_terms, memory):
        mode = group[0].settings.normal_reference
        kept = None  # the defect images' maps kept in their regions: one map for every reduction
        if at_defect is not None and len(at_defect[0]):
            typical = torch.from_numpy(reference.typical(mode))  # where a defect image is not scored
            kept = keep_region(maps[n_normal + at_defect[0]], at_defect[1], typical)
        pixel, pixel_by_code = grouped_auroc(pixel_masks, _rows(maps.numpy(), pixel_rows).ravel())
        pixel_by_kind = {
            f"syn_pixel_auroc_{name}": pixel_by_code.get(code, float("nan"))
            for code, name in enumerate(kind_names, start=1)
        }
        for point in group:
            rows[point] = (
                _image_metrics(point.settings, maps, labels, kinds, n_normal, pixel, at_defect, kept)
                | pixel_by_kind
            )
    table = pd.DataFrame(
        [
            {
                "setting": p.settings.describe(),
                "blend": p.blend,
                "ssim_weight": p.settings.ssim_weight,
                "l2_weight": p.settings.l2_weight,
                "win_size": "/".join(str(x) for x in p.settings.windows) if p.settings.ssim_weight else "-",
                "smoothing_sigma": p.settings.smoothing_sigma,
                "normal_reference": p.settings.normal_reference,
                "lowpass_sigma": p.settings.lowpass_sigma,
                "reference_shift": p.settings.reference_shift,
                "shift_tolerance": p.settings.shift_tolerance,
                "ssim_k2": p.settings.ssim_k2,
                "memory_pool": p.settings.memory_pool,
                "memory_radius": p.settings.memory_radius if p.settings.memory_pool else 0,
                "score_reduction": p.settings.score_reduction,
                "levers_changed": p.levers_changed(paper),
                **rows[p],
                "is_paper": i == 0,
                "map_settings": p.settings.to_dict(),
            }
            for i, p in enumerate(points)
        ]
    )
    return table, scale


def selection_score(image_auroc, pixel_auroc):
    """The rule's figure for a setting: the mean of its image AUROC and its pixel AUROC
    (floats, or columns of a table)."""
    return 0.5 * (image_auroc + pixel_auroc)


def _image_metrics(settings, maps, labels, kinds, n_normal, pixel, at_defect=None, kept=None) -> dict:
    reduction, fraction = settings.score_reduction, settings.topk_fraction
    scores = image_score(maps, reduction, fraction).numpy()
    image = rank_auroc(labels, scores)
    per_kind = {}
    for kind in sorted(set(kinds)):
        keep = np.r_[np.ones(n_normal, bool), kinds == kind]  # the normals vs this kind
        per_kind[f"syn_image_auroc_{kind}"] = rank_auroc(labels[keep], scores[keep])
    if at_defect is not None:  # the defect images scored on ``kept``: their maps in their regions only
        rows = at_defect[0]
        per_kind["syn_image_auroc_at_defect"] = (
            rank_auroc(
                np.r_[np.zeros(n_normal), np.ones(len(rows))],
                np.r_[scores[:n_normal], image_score(kept, reduction, fraction).numpy()],
            )
            if len(rows)
            else float("nan")
        )
    return {
        "syn_image_auroc": image,
        "syn_pixel_auroc": pixel,
        "selection_score": selection_score(image, pixel),
        **per_kind,
    }


def select(table: pd.DataFrame, tie_tolerance: float) -> int:
    """Index (row) of the chosen setting: the best ``selection_score``; ties within
    ``tie_tolerance`` go to the fewest levers changed from the paper's map, then grid order."""
    if table.empty:
        raise ValueError("the calibration grid is empty")
    best = table["selection_score"].max()
    tied = table[table["selection_score"] >= best - tie_tolerance]
    return int(tied.sort_values(["levers_changed"], kind="stable").index[0])


def select_localisation(table: pd.DataFrame, tie_tolerance: float, detection: int) -> int:
    """Index (row) of the localisation map: the best ``syn_pixel_auroc`` (how well the map
    outlines the synthetic defects, pixel by pixel); settings within ``tie_tolerance`` of it
    are ties, resolved towards the fewest map levers changed from the detection map (row
    ``detection``, :func:`select`'s choice; so when the detection map ties, it is kept and
    there is one map), then the fewest changed from the paper's map, then grid order. The same
    grid, the same images, label-free."""
    if table.empty:
        raise ValueError("the calibration grid is empty")
    chosen = _settings(table.loc[detection, "map_settings"])
    tied = table[table["syn_pixel_auroc"] >= table["syn_pixel_auroc"].max() - tie_tolerance]
    distance = [map_levers_between(_settings(m), chosen) for m in tied["map_settings"]]
    order = tied.assign(_distance=distance).sort_values(["_distance", "levers_changed"], kind="stable")
    return int(order.index[0])


def _settings(value: dict | str | MapSettings) -> MapSettings:
    """A ``map_settings`` cell of a grid table (a dict, or its JSON in a saved table)."""
    if isinstance(value, MapSettings):
        return value
    return MapSettings.from_dict(json.loads(value) if isinstance(value, str) else value)


def spearman(table: pd.DataFrame, a: str, b: str) -> float:
    """Spearman's rank correlation of two columns (NaN when ``a`` is constant)."""
    return float(table[a].rank().corr(table[b].rank())) if table[a].nunique() > 1 else float("nan")


#: Real-test columns of :func:`agreement` and the synthetic column each is compared with.
AGREEMENT_PAIRS = {
    "real_image_auroc": "syn_image_auroc",
    "real_pixel_auroc": "syn_pixel_auroc",
    "real_image_auroc_at_defect": "syn_image_auroc",
}


def agreement(
    calibration_table: pd.DataFrame, real_table: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Does the synthetic selection predict reality? ``real_table`` is :func:`score_grid` of
    the same grid on the real test images (labels and masks: development data, never used
    to choose). Returns one row per setting (synthetic columns beside the real ones) and the
    Spearman rank correlations over the grid: the selection score against the real image
    AUROC, pixel AUROC and their mean, and each synthetic metric against its real one. When
    ``real_table`` has ``syn_image_auroc_at_defect`` (:func:`score_grid` with defect
    regions), the real image AUROC with defective images scored only near their labelled
    defect is compared too: the image-level question without what else differs in them."""
    renames = {
        "syn_image_auroc": "real_image_auroc",
        "syn_pixel_auroc": "real_pixel_auroc",
        "syn_image_auroc_at_defect": "real_image_auroc_at_defect",
    }
    real = real_table[[c for c in ["setting", *renames] if c in real_table]].rename(columns=renames)
    columns = ["setting", "selection_score", "syn_image_auroc", "syn_pixel_auroc", "is_paper", "is_selected"]
    table = calibration_table[[c for c in columns if c in calibration_table]].merge(
        real, on="setting", how="inner"
    )
    if len(table) != len(calibration_table):
        raise ValueError(
            f"the real-test grid has {len(real_table)} settings, calibration {len(calibration_table)}: "
            "they must be scored on the same grid"
        )
    table["real_selection_score"] = selection_score(table["real_image_auroc"], table["real_pixel_auroc"])

    correlations = {
        "spearman_selection_vs_real_image_auroc": spearman(table, "selection_score", "real_image_auroc"),
        "spearman_selection_vs_real_pixel_auroc": spearman(table, "selection_score", "real_pixel_auroc"),
        "spearman_selection_vs_real_selection_score": spearman(
            table, "selection_score", "real_selection_score"
        ),
        **{
            f"spearman_{syn}_vs_{real}": spearman(table, syn, real)
            for real, syn in AGREEMENT_PAIRS.items()
            if real in table
        },
    }
    if "real_image_auroc_at_defect" in table:
        correlations["spearman_selection_vs_real_image_auroc_at_defect"] = spearman(
            table, "selection_score", "real_image_auroc_at_defect"
        )
    table["real_rank"] = table["real_selection_score"].rank(ascending=False, method="min").astype(int)
    return table, correlations
