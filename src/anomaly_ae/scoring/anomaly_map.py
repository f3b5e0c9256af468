"""The anomaly map and the image score, with all their levers, in one place.

``map = smooth(ssim_weight * mean_w clip(1 - local SSIM_w, 0, 1) + l2_weight * (x - recon)**2)``,
then compared with the normal reference (``none`` | ``mean`` | ``zscore`` | ``tail``, see
:mod:`anomaly_ae.scoring.reference`), then reduced to one score per image (``max`` | ``mean``
| ``topk_mean`` | ``blob``: the map's strongest compact peak, :func:`blob_response`). With
``lowpass_sigma`` > 0 (``zscore`` or ``tail`` only) the map is the
per-pixel maximum of that normalised map and the normalised **low-pass difference**
``|blur(x - recon, lowpass_sigma)|``: faint, wide changes (a stain, a shade) that
``1 - SSIM`` barely sees, each channel in units of its own normal variation. ``w`` runs
over ``win_size`` (one window, or several: the multi-scale mean). The defaults of
:class:`MapSettings` are the paper's Figure 1 map (``1 - local SSIM``,
11x11 Gaussian window, sigma 1.5) scored by its maximum; ``conf/base/parameters_evaluation.yml``
holds the same values (a test keeps them equal).

:func:`error_terms` computes the expensive part (one SSIM map per window, the squared
error) once; :func:`compose` turns those terms into the map of any setting. Evaluation,
``predict``/``Inspector``, the calibration grid and the benchmark all go through them
(the grid smooths the terms once per sigma with :func:`smooth_terms`, then :func:`blend`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from anomaly_ae.config import from_settings
from anomaly_ae.scoring.memory import memory_map
from anomaly_ae.scoring.reference import SCALED_MODES, check_mode, correct, move
from anomaly_ae.scoring.ssim import (
    PAPER_K2,
    PAPER_WIN_SIGMA,
    PAPER_WIN_SIZE,
    exact_scalar,
    gaussian_blur,
    gaussian_taps,
    map_dtype,
    ssim_map,
)

__all__ = [
    "REDUCTIONS",
    "NAME_LEGEND",
    "MapSettings",
    "error_terms",
    "shift_offsets",
    "smooth_terms",
    "blend",
    "lowpass",
    "compose",
    "anomaly_map",
    "raw_map",
    "image_score",
    "blob_response",
    "score_maps",
    "reference_tensors",
    "reference_pair",
    "memory_pair",
    "memory_channel",
    "map_dtype",
]

REDUCTIONS = ("max", "mean", "topk_mean", "blob")
#: The scales (Gaussian sigma, px of the model's image) the ``blob`` score spans: a peak
#: about 4 to 16 px across at 256 px, from a spot to a broken piece.
BLOB_SIGMAS = (4.0, 8.0, 16.0)
#: How to read :meth:`MapSettings.describe` (shown beside the names in the report).
NAME_LEGEND = (
    ("1-SSIM(w)", "one minus local SSIM with a w x w window (several: their mean, or max)"),
    ("sq.err", "the squared error, scaled to weigh about as much as 1 - SSIM"),
    ("smooth s", "Gaussian smoothing of the map, sigma s px"),
    ("ref-mean / ref-zscore / ref-tail", "compared per pixel with the normal training images' maps"),
    ("moved 1", "that reference also fitted on the training images moved by 1 px"),
    ("+ lowpass s", "per pixel the larger of the map and |blur(image - reconstruction, s)|, both normalised"),
    ("align r", "each pixel's error at the reconstruction's best alignment within r px"),
    (
        "+ memory p r",
        "per pixel the larger of the map and the distance to the nearest training image's p x p-px "
        "averages (with their neighbours) within r grid steps, both normalised",
    ),
    (
        "1-SSIM(w, k2 c)",
        "SSIM's contrast constant C2 = c² (the paper's 0.03; smaller sees fainter structure)",
    ),
    ("max / top1% / mean", "the image score: the map's largest pixel, mean of its top 1 %, or mean"),
    ("blob", "the image score: the map's strongest compact peak (a ridge along an edge does not count)"),
)
SCALE_COMBINES = ("mean", "max")


@dataclass(frozen=True)
class MapSettings:
    """How a reconstruction becomes an anomaly map and an image score (defaults: the paper).

    ``win_size`` is one odd window or a tuple of them (multi-scale: the ``1 - SSIM`` maps of
    the windows are combined by ``scale_combine``, their ``mean`` or their ``max``: the max
    keeps a defect that only one scale sees).

    ``shift_tolerance`` r (px, default 0: the paper) compares each pixel with the
    reconstruction at its best alignment within r px: every error term (each window's
    ``1 - SSIM``, the squared error, the low-pass difference) is, per pixel, the smallest over
    the reconstruction moved by every ``(dy, dx)`` with ``|dy|, |dx| <= r``
    (:func:`~anomaly_ae.scoring.reference.move`). A normal edge the network draws a pixel off
    lights up in the plain map; a defect, which the reconstruction lacks at every alignment,
    does not go away. It costs ``(2r + 1)**2`` SSIM maps per window instead of one.

    ``ssim_k2`` (default 0.03: the paper's, Wang et al.'s) sets SSIM's contrast constant
    ``C2 = ssim_k2**2``, which keeps the contrast-structure term ``(2 s_xy + C2) / (s_x^2 +
    s_y^2 + C2)`` near 1 wherever the local spread is below about ``ssim_k2``: a faint change
    in a flat region is hidden from ``1 - SSIM``. A smaller value lets the map see it, and the
    flat regions' normal noise with it (which the ``zscore`` / ``tail`` references divide by).
    It changes the map only, never the training loss.

    ``memory_pool`` p px (default 0: off, the paper) adds the memory channel
    (:func:`~anomaly_ae.scoring.memory.memory_map`): per pixel, how far its place's p x p-px
    averages (with their 3x3 neighbourhood) are from the nearest training image's within
    ``memory_radius`` grid steps of p px. A place with several normal looks (a reflection that
    moves) is near one of them; a spot no training image has there is far. Like the low-pass
    channel it needs the ``zscore`` or ``tail`` reference, is normalised by the training images'
    own channel (each image matched against the others) and joins the map by the per-pixel
    max. The bank (the training images' averages) is part of the normal reference.

    ``localisation`` (default None: the same map) is a second map's settings: the map shown as
    the heat map and scored per pixel, while this one gives the image score. What finds a
    defective image (a sharp peak) and what outlines a defect (a smoother map) are not always
    the same map; the calibration may choose each (``calibration.separate_localisation``).
    """

    ssim_weight: float = 1.0
    l2_weight: float = 0.0
    smoothing_sigma: float = 0.0
    win_size: int | tuple[int, ...] = PAPER_WIN_SIZE
    win_sigma: float = PAPER_WIN_SIGMA
    scale_combine: str = "mean"
    score_reduction: str = "max"
    topk_fraction: float = 0.01
    normal_reference: str = "none"
    lowpass_sigma: float = 0.0
    reference_shift: int = 0
    shift_tolerance: int = 0
    ssim_k2: float = PAPER_K2
    memory_pool: int = 0
    memory_radius: int = 1
    localisation: MapSettings | None = None

    def __post_init__(self) -> None:
        windows = self.win_size if isinstance(self.win_size, list | tuple) else (self.win_size,)
        windows = tuple(int(w) if float(w) == int(w) else w for w in windows)
        if not windows:
            raise ValueError("evaluation.anomaly_map.win_size needs at least one window")
        for w in windows:
            gaussian_taps(w, float(self.win_sigma))  # validates (odd, positive) with a clear message
        object.__setattr__(self, "win_size", windows[0] if len(windows) == 1 else windows)
        for name in ("ssim_weight", "l2_weight", "smoothing_sigma", "lowpass_sigma"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"evaluation.anomaly_map.{name} must be >= 0, got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.ssim_weight == 0 and self.l2_weight == 0:
            raise ValueError("evaluation.anomaly_map: ssim_weight and l2_weight cannot both be 0")
        if self.score_reduction not in REDUCTIONS:
            raise ValueError(
                f"evaluation.anomaly_map.score_reduction must be one of {REDUCTIONS}, "
                f"got {self.score_reduction!r}"
            )
        if not 0 < float(self.topk_fraction) <= 1:
            raise ValueError(
                f"evaluation.anomaly_map.topk_fraction must be in (0, 1], got {self.topk_fraction!r}"
            )
        if self.scale_combine not in SCALE_COMBINES:
            raise ValueError(
                f"evaluation.anomaly_map.scale_combine must be one of {SCALE_COMBINES}, "
                f"got {self.scale_combine!r}"
            )
        check_mode(self.normal_reference)
        if not (float(self.reference_shift) == int(self.reference_shift) and int(self.reference_shift) >= 0):
            raise ValueError(
                "evaluation.anomaly_map.reference_shift must be a whole number of pixels >= 0, "
                f"got {self.reference_shift!r}"
            )
        object.__setattr__(self, "reference_shift", int(self.reference_shift))
        if not (float(self.shift_tolerance) == int(self.shift_tolerance) and int(self.shift_tolerance) >= 0):
            raise ValueError(
                "evaluation.anomaly_map.shift_tolerance must be a whole number of pixels >= 0 "
                f"(0: the reconstruction as it is), got {self.shift_tolerance!r}"
            )
        object.__setattr__(self, "shift_tolerance", int(self.shift_tolerance))
        if not (isinstance(self.ssim_k2, int | float) and 0 < float(self.ssim_k2) < 1):
            raise ValueError(
                "evaluation.anomaly_map.ssim_k2 (SSIM's contrast constant, C2 = ssim_k2**2) must be "
                f"a number in (0, 1); the paper's is {PAPER_K2}; got {self.ssim_k2!r}"
            )
        object.__setattr__(self, "ssim_k2", float(self.ssim_k2))
        if self.reference_shift and self.normal_reference == "none":
            raise ValueError(
                "evaluation.anomaly_map.reference_shift > 0 moves the training images the normal "
                "reference is fitted on: it needs normal_reference: mean, zscore or tail (or "
                f"reference_shift: 0), got normal_reference={self.normal_reference!r}"
            )
        if self.lowpass_sigma and self.normal_reference not in SCALED_MODES:
            raise ValueError(
                "evaluation.anomaly_map.lowpass_sigma > 0 combines two channels in units of their "
                "normal variation: it needs normal_reference: zscore or tail (or lowpass_sigma: 0), got "
                f"normal_reference={self.normal_reference!r}"
            )
        for name in ("memory_pool", "memory_radius"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and float(value) == int(value) and int(value) >= 0):
                raise ValueError(
                    f"evaluation.anomaly_map.{name} must be a whole number >= 0 "
                    f"(memory_pool 0: no memory channel), got {value!r}"
                )
            object.__setattr__(self, name, int(value))
        if self.memory_pool and self.normal_reference not in SCALED_MODES:
            raise ValueError(
                "evaluation.anomaly_map.memory_pool > 0 combines the memory channel with the map in "
                "units of their normal variation: it needs normal_reference: zscore or tail (or "
                f"memory_pool: 0), got normal_reference={self.normal_reference!r}"
            )
        self._check_localisation()

    def _check_localisation(self) -> None:
        """``localisation`` (a dict from YAML/JSON, or MapSettings): the map shown and scored
        per pixel, when it is not this one. Its own score reduction is never used, so it is
        kept at the default; it cannot have a localisation map of its own."""
        loc = self.localisation
        if loc is None:
            return
        if isinstance(loc, dict):
            loc = from_settings(MapSettings, loc, "evaluation.anomaly_map.localisation")
        if not isinstance(loc, MapSettings):
            raise ValueError(
                "evaluation.anomaly_map.localisation must be a map's settings (a mapping like "
                f"evaluation.anomaly_map) or null, got {loc!r}"
            )
        if loc.localisation is not None:
            raise ValueError("evaluation.anomaly_map.localisation cannot have a localisation map of its own")
        loc = dataclasses.replace(loc, score_reduction="max", topk_fraction=0.01)
        object.__setattr__(self, "localisation", None if loc.map_part() == self.map_part() else loc)

    def map_part(self) -> MapSettings:
        """These settings without the score reduction and the localisation map: what makes
        the map itself."""
        return dataclasses.replace(self, score_reduction="max", topk_fraction=0.01, localisation=None)

    @property
    def terms_key(self) -> tuple[int, float]:
        """What the error terms (:func:`error_terms`) depend on besides the windows: the shift
        tolerance and SSIM's contrast constant. Maps sharing it share their terms."""
        return (self.shift_tolerance, self.ssim_k2)

    @property
    def heatmap(self) -> MapSettings:
        """The map shown as the heat map and scored per pixel (pixel AUROC, AUPRO): the
        localisation map when there is one, else this map (the detection map)."""
        return self.localisation or self

    @property
    def all_windows(self) -> tuple[int, ...]:
        """The SSIM windows of the detection and the localisation map (computed once)."""
        extra = self.localisation.windows if self.localisation else ()
        return tuple(dict.fromkeys((*self.windows, *extra)))

    @property
    def any_lowpass(self) -> bool:
        return bool(self.lowpass_sigma or (self.localisation and self.localisation.lowpass_sigma))

    @property
    def channels(self) -> int:
        """Uncorrected map channels: the map, then the low-pass difference and the memory
        channel when they are on."""
        return 1 + int(bool(self.lowpass_sigma)) + int(bool(self.memory_pool))

    @property
    def windows(self) -> tuple[int, ...]:
        return self.win_size if isinstance(self.win_size, tuple) else (self.win_size,)

    @classmethod
    def from_dict(cls, data: dict) -> MapSettings:
        return from_settings(cls, data, "evaluation.anomaly_map")

    def to_dict(self) -> dict:
        """JSON-friendly (a multi-scale window becomes a list)."""
        data = asdict(self)
        if isinstance(data["win_size"], tuple):
            data["win_size"] = list(data["win_size"])
        data["localisation"] = self.localisation.to_dict() if self.localisation else None
        return data

    def describe(self) -> str:
        """A short human-readable name, e.g. ``1-SSIM(11) smooth 4 ref-mean max``; with a
        localisation map ``<detection map>; heat map <localisation map>``."""
        if self.localisation:
            return f"{self.describe_detection()}; heat map {self.localisation.describe_map()}"
        return self.describe_detection()

    def describe_detection(self) -> str:
        """The detection map and its score reduction (the image score), e.g. ``1-SSIM(11) max``."""
        reduction = {"topk_mean": f"top{self.topk_fraction * 100:g}%"}.get(
            self.score_reduction, self.score_reduction
        )
        return f"{self.describe_map()} {reduction}"

    def describe_map(self) -> str:
        """The map's part of :meth:`describe` (no score reduction)."""
        parts = []
        if self.ssim_weight:
            wins = "/".join(str(w) for w in self.windows)
            if len(self.windows) > 1 and self.scale_combine != "mean":
                wins += f" {self.scale_combine}"
            if self.ssim_k2 != PAPER_K2:
                wins += f", k2 {self.ssim_k2:g}"
            parts.append(f"1-SSIM({wins})" + (f"x{self.ssim_weight:g}" if self.ssim_weight != 1 else ""))
        if self.l2_weight:
            parts.append(f"sq.err x{self.l2_weight:.3g}" if self.ssim_weight else "sq.err")
        name = " + ".join(parts)
        if self.smoothing_sigma:
            name += f" smooth {self.smoothing_sigma:g}"
        if self.normal_reference != "none":
            name += f" ref-{self.normal_reference}"
        if self.reference_shift:
            name += f" moved {self.reference_shift}"
        if self.lowpass_sigma:
            name += f" + lowpass {self.lowpass_sigma:g}"
        if self.memory_pool:
            name += f" + memory {self.memory_pool} r{self.memory_radius}"
        if self.shift_tolerance:
            name += f" align {self.shift_tolerance}"
        return name


def error_terms(
    x: Tensor,
    recon: Tensor,
    windows: tuple[int, ...] = (PAPER_WIN_SIZE,),
    win_sigma: float = PAPER_WIN_SIGMA,
    keep_ssim: bool = False,
    dtype: torch.dtype = torch.float32,
    keep_diff: bool = False,
    tolerance: int = 0,
    k2: float = PAPER_K2,
) -> dict:
    """The expensive part of every map, computed once (SSIM's statistics in float64, see
    :mod:`anomaly_ae.scoring.ssim`; the terms in ``dtype``: float32 for the calibration grid,
    which holds many, :func:`map_dtype` for the maps that are shipped): per window the
    same-size SSIM error ``clip(1 - local SSIM, 0, 1)`` (``{"ssim_err": {win: map}}``) and the
    squared error (``"sq"``); with ``keep_ssim`` also the raw SSIM maps (``"ssim"``), with
    ``keep_diff`` the signed difference ``x - recon`` (``"diff"``, for the low-pass channel).

    Colour images (``C`` = 3, ``preprocessing.color``): SSIM and the squared error are
    computed per colour channel and averaged over them (pytorch_msssim's convention for
    multi-channel SSIM), so every term has one channel; ``"diff"`` keeps the colour channels
    (see :func:`lowpass`).

    ``tolerance`` r > 0 (``MapSettings.shift_tolerance``): each term is, per pixel, the
    smallest over the reconstruction moved by every ``(dy, dx)`` with ``|dy|, |dx| <= r``
    (:func:`shift_offsets`); ``"ssim"`` stays the unmoved reconstruction's (the paper's
    per-image SSIM), and instead of ``"diff"`` the images and reconstructions are kept
    (``"x"``, ``"recon"``, ``"tolerance"``) for the low-pass channel's own minimum.

    ``k2``: SSIM's contrast constant (``MapSettings.ssim_k2``; the paper's 0.03)."""
    x, recon = x.float(), recon.float()
    ssim = {
        w: _colour_mean(ssim_map(x, recon, gaussian_taps(w, win_sigma), k2=k2, same_size=True, precise=True))
        for w in windows
    }
    ssim_err = {w: (1.0 - m).clamp(0.0, 1.0).to(dtype) for w, m in ssim.items()}
    sq = _colour_mean((x.to(dtype) - recon.to(dtype)).pow(2))
    for dy, dx in shift_offsets(tolerance)[1:]:
        moved = move(recon, dy, dx)
        for w in windows:
            m = _colour_mean(
                ssim_map(x, moved, gaussian_taps(w, win_sigma), k2=k2, same_size=True, precise=True)
            )
            ssim_err[w] = torch.minimum(ssim_err[w], (1.0 - m).clamp(0.0, 1.0).to(dtype))
        sq = torch.minimum(sq, _colour_mean((x.to(dtype) - moved.to(dtype)).pow(2)))
    terms = {"ssim_err": ssim_err, "sq": sq}
    if keep_ssim:
        terms["ssim"] = ssim
    if keep_diff and tolerance:
        terms |= {"x": x.to(dtype), "recon": recon.to(dtype), "tolerance": int(tolerance)}
    elif keep_diff:
        terms["diff"] = x.to(dtype) - recon.to(dtype)
    return terms


def shift_offsets(tolerance: int) -> list[tuple[int, int]]:
    """Every ``(dy, dx)`` with ``|dy|, |dx| <= tolerance``, ``(0, 0)`` first."""
    r = int(tolerance)
    if r < 0:
        raise ValueError(f"shift_tolerance must be >= 0, got {tolerance!r}")
    span = range(-r, r + 1)
    return [(0, 0)] + [(dy, dx) for dy in span for dx in span if dy or dx]


def _colour_mean(t: Tensor) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, 1, H, W)``: the mean over colour channels (a no-op for one)."""
    return t if t.shape[1] == 1 else t.mean(dim=1, keepdim=True)


def lowpass(terms: dict, sigma: float) -> Tensor:
    """The low-pass difference ``|blur(x - recon, sigma)|`` from :func:`error_terms`
    (``keep_diff``): blurring the *signed* difference first cancels the reconstruction's
    fine, zero-mean noise and keeps a faint change that spans many pixels. For colour images
    each channel's is taken, then their mean: a change of hue at equal brightness (red up,
    blue down) does not cancel.

    With a shift tolerance (``terms["tolerance"]`` r > 0, see :func:`error_terms`): per pixel
    the smallest over every alignment, ``min |blur(x) - move(blur(recon))|`` (blurring is
    linear and commutes with moving, but for the reflected border)."""
    tolerance = terms.get("tolerance", 0)
    if not tolerance:
        return _colour_mean(gaussian_blur(terms["diff"], sigma).abs())
    x, recon = gaussian_blur(terms["x"], sigma), gaussian_blur(terms["recon"], sigma)
    out = _colour_mean((x - recon).abs())
    for dy, dx in shift_offsets(tolerance)[1:]:
        out = torch.minimum(out, _colour_mean((x - move(recon, dy, dx)).abs()))
    return out


def smooth_terms(terms: dict, sigma: float) -> dict:
    """The error terms smoothed with ``sigma``. Smoothing is linear, so
    ``blend(smooth_terms(t, s), m) == compose(t, m)`` for a map ``m`` with smoothing ``s``:
    the calibration grid smooths each term once per sigma instead of every blend."""
    return {
        "ssim_err": {w: gaussian_blur(e, sigma) for w, e in terms["ssim_err"].items()},
        "sq": gaussian_blur(terms["sq"], sigma),
    }


def blend(terms: dict, settings: MapSettings) -> Tensor:
    """``ssim_weight * combine_w ssim_err_w + l2_weight * sq`` (combine: the windows' mean
    or max, ``scale_combine``): the map before smoothing."""
    amap = None
    if settings.ssim_weight:
        errors = [terms["ssim_err"][w] for w in settings.windows]
        if settings.scale_combine == "max" and len(errors) > 1:
            ssim_err = torch.stack(errors).amax(dim=0)
        else:
            ssim_err = sum(errors) / len(errors)
        amap = ssim_err * exact_scalar(settings.ssim_weight, ssim_err)
    if settings.l2_weight:
        sq = terms["sq"] * exact_scalar(settings.l2_weight, terms["sq"])
        amap = sq if amap is None else amap + sq
    return amap


def compose(terms: dict, settings: MapSettings, memory: Tensor | None = None) -> Tensor:
    """The uncorrected map of ``settings`` from :func:`error_terms`: blend, then smoothing;
    ``(N, 1, H, W)``, then as further channels the low-pass difference (``lowpass_sigma`` > 0)
    and ``memory``, the images' memory channel (``memory_pool`` > 0,
    :func:`~anomaly_ae.scoring.memory.memory_map`); each channel has its own normal reference."""
    amap = gaussian_blur(blend(terms, settings), settings.smoothing_sigma)
    channels = [amap]
    if settings.lowpass_sigma:
        channels.append(lowpass(terms, settings.lowpass_sigma).to(amap.dtype))
    if settings.memory_pool:
        if memory is None:
            raise ValueError(f"the map {settings.describe_map()} needs its memory channel (memory_map)")
        channels.append(memory.to(amap.dtype))
    return channels[0] if len(channels) == 1 else torch.cat(channels, dim=1)


def memory_channel(x: Tensor, settings: MapSettings, bank: Tensor | None, own=None) -> Tensor | None:
    """The memory channel of images ``x`` for ``settings`` (None when it has none), from the
    bank of :meth:`~anomaly_ae.scoring.reference.NormalReference.memory_tensor`; ``own``: each
    image's index in the bank (a training image matched against the others), or None."""
    if not settings.memory_pool:
        return None
    if bank is None:
        raise ValueError(
            f"the map {settings.describe_map()} needs the memory bank of the normal reference "
            "(normal_reference.npz) fitted by `kedro run --pipeline=evaluate`"
        )
    return memory_map(x, bank, settings.memory_pool, settings.memory_radius, own)


def anomaly_map(
    x: Tensor,
    recon: Tensor,
    settings: MapSettings = MapSettings(),
    reference: tuple[Tensor, Tensor | None] | None = None,
    bank: Tensor | None = None,
) -> Tensor:
    """Per-pixel anomaly map ``(N, C, H, W)`` of images and their reconstructions, in
    :func:`map_dtype` (float64; ``.float()`` it to keep or ship it; :func:`image_score`
    takes it as it is).

    ``reference`` is ``(mean, scale)`` from :meth:`NormalReference.as_tensors`; it is needed
    (and applied) exactly when ``settings.normal_reference`` is not ``none``; ``bank`` (its
    :meth:`~anomaly_ae.scoring.reference.NormalReference.memory_tensor`) when
    ``settings.memory_pool`` is set.
    """
    return _correct(raw_map(x, recon, settings, bank), settings, reference)


def raw_map(x: Tensor, recon: Tensor, settings: MapSettings, bank: Tensor | None = None, own=None) -> Tensor:
    """The uncorrected map of ``settings`` (:func:`compose`; one to three channels), in
    :func:`map_dtype`: what the normal reference is fitted on (``bank`` and ``own`` as
    :func:`memory_channel`'s)."""
    terms = error_terms(
        x,
        recon,
        settings.windows,
        settings.win_sigma,
        dtype=map_dtype(x.device),
        keep_diff=bool(settings.lowpass_sigma),
        tolerance=settings.shift_tolerance,
        k2=settings.ssim_k2,
    )
    return compose(terms, settings, memory_channel(x, settings, _as_map_dtype(bank, x), own))


def _as_map_dtype(bank: Tensor | None, x: Tensor) -> Tensor | None:
    return None if bank is None else bank.to(map_dtype(x.device))


def _require_reference(reference, mode: str) -> None:
    if reference is None:
        raise ValueError(
            f"evaluation.anomaly_map.normal_reference={mode!r} needs the normal reference "
            "(normal_reference.npz) fitted by `kedro run --pipeline=evaluate`"
        )


def _correct(amap: Tensor, settings: MapSettings, reference) -> Tensor:
    if settings.normal_reference == "none":
        return amap
    _require_reference(reference, settings.normal_reference)
    corrected = correct(amap, *reference)
    # more channels (low-pass, memory): each in units of its normal spread, the largest
    return corrected.amax(dim=1, keepdim=True) if corrected.shape[1] > 1 else corrected


def score_maps(
    x: Tensor,
    recon: Tensor,
    settings: MapSettings,
    reference: tuple[Tensor, Tensor | None] | None = None,
    localisation_reference: tuple[Tensor, Tensor | None] | None = None,
    paper_ssim: bool = True,
    banks: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(detection map, heat map, the paper's per-image SSIM (float32; None without
    paper_ssim))`` in one pass, the maps in :func:`map_dtype`. The heat map is the
    localisation map (``settings.localisation``, corrected with ``localisation_reference``)
    or, without one, the detection map itself (the same tensor). The error terms of both maps
    are computed once; when a map uses the paper's 11x11 window, the interior of its same-size
    SSIM map IS the valid-mode map of :func:`~anomaly_ae.scoring.ssim.per_image_ssim`, so SSIM
    is filtered once. ``banks``: the memory banks of the detection and the localisation map
    (:func:`memory_pair`), where they have a memory channel."""
    windows = settings.all_windows
    paper = (
        paper_ssim
        and PAPER_WIN_SIZE in windows
        and settings.win_sigma == PAPER_WIN_SIGMA
        and settings.ssim_k2 == PAPER_K2
    )  # the detection map's SSIM is the paper's: keep it for the per-image SSIM
    if settings.localisation and settings.localisation.win_sigma != settings.win_sigma:
        raise ValueError("the detection and localisation maps must share win_sigma")
    keys = dict.fromkeys(
        m.terms_key for m in (settings, settings.localisation) if m is not None
    )  # the error terms once per shift tolerance and SSIM constant (usually one)
    by_key = {
        key: error_terms(
            x,
            recon,
            windows,
            settings.win_sigma,
            keep_ssim=paper and i == 0,
            dtype=map_dtype(x.device),
            keep_diff=settings.any_lowpass,
            tolerance=key[0],
            k2=key[1],
        )
        for i, key in enumerate(keys)
    }
    terms = by_key[settings.terms_key]
    memory = memory_channel(x, settings, _as_map_dtype(banks[0], x))
    detection = _correct(compose(terms, settings, memory), settings, reference)
    heat = detection
    if settings.localisation:
        loc = settings.localisation
        if loc.memory_pool and (loc.memory_pool, loc.memory_radius) == (
            settings.memory_pool,
            settings.memory_radius,
        ):
            loc_memory = memory  # the same channel: computed once
        else:
            loc_memory = memory_channel(x, loc, _as_map_dtype(banks[1], x))
        heat = _correct(compose(by_key[loc.terms_key], loc, loc_memory), loc, localisation_reference)
    if not paper_ssim:
        return detection, heat, None
    p = PAPER_WIN_SIZE // 2
    h, w = x.shape[-2:]
    if paper and 2 * p < min(h, w):
        valid = terms["ssim"][PAPER_WIN_SIZE][..., p : h - p, p : w - p]
    else:
        valid = ssim_map(x.float(), recon.float(), gaussian_taps(), precise=True)
    return detection, heat, valid.flatten(1).mean(-1).float()


def blob_response(amap: Tensor, sigma: float) -> Tensor:
    """How strongly maps ``(N, 1, H, W)`` peak in a compact spot about ``sigma`` px wide:
    ``sigma**2 * max(0, -l)``, ``l`` the larger eigenvalue of the Hessian of the map blurred
    at ``sigma``. A peak curves down both ways and counts; a ridge (a normal residual along
    an edge, a line) curves down only across itself, ``l`` is about 0 and it does not.
    Scale-normalised: a Gaussian peak of height ``a`` gives about ``a / 4`` at the ``sigma``
    of its own width. Computed on a grid ``f = sigma // 2`` times coarser (the map averaged
    over f x f blocks, the rows and columns beyond the last whole block dropped; then
    blurred at ``sigma / f`` and differentiated by central differences, the border
    replicated), so every scale costs about as much as the finest: the response per pixel of
    that grid, ``(N, 1, H // f, W // f)``."""
    f = max(1, int(sigma // 2))
    coarse = amap
    if f > 1:  # block means by a reshape: ONNX Runtime has no float64 AveragePool
        h, w = amap.shape[-2] // f, amap.shape[-1] // f
        coarse = amap[..., : h * f, : w * f].reshape(-1, 1, h, f, w, f).mean(dim=(3, 5))
    m = torch.nn.functional.pad(gaussian_blur(coarse, sigma / f), (1, 1, 1, 1), mode="replicate")
    c = m[..., 1:-1, 1:-1]
    dxx = m[..., 1:-1, 2:] - 2 * c + m[..., 1:-1, :-2]
    dyy = m[..., 2:, 1:-1] - 2 * c + m[..., :-2, 1:-1]
    dxy = (m[..., 2:, 2:] - m[..., 2:, :-2] - m[..., :-2, 2:] + m[..., :-2, :-2]) * 0.25
    larger = (dxx + dyy) * 0.5 + (((dxx - dyy) * 0.5).square() + dxy.square()).sqrt()
    # sigma**2 * curvature per px = (sigma / f)**2 * curvature per coarse px
    return (-larger).clamp(min=0) * exact_scalar(float(sigma / f) ** 2, larger)


def _blob_score(maps: Tensor, chunk: int = 64) -> Tensor:
    """Per map ``(N, 1, H, W)``, the largest :func:`blob_response` over :data:`BLOB_SIGMAS`
    (in chunks of maps, to bound the memory of the blurred copies)."""
    out = []
    for start in range(0, maps.shape[0], chunk):
        part = maps[start : start + chunk]
        per_sigma = [blob_response(part, s).flatten(1).amax(1) for s in BLOB_SIGMAS]
        out.append(torch.stack(per_sigma).amax(0))
    return torch.cat(out)


def image_score(amap: Tensor, reduction: str = "max", topk_fraction: float = 0.01) -> Tensor:
    """One float32 score per image from maps ``(N, ...)`` (computed in the maps' precision,
    float32 at least): the maximum pixel, the mean pixel, the mean of the
    ``ceil(topk_fraction * pixels)`` highest pixels (``topk_mean``), or the strongest compact
    peak (``blob``: the largest :func:`blob_response` over :data:`BLOB_SIGMAS`; maps
    ``(N, H, W)`` or ``(N, 1, H, W)``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"score reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction!r}")
    if amap.dim() < 2:
        raise ValueError(f"maps must have a batch dimension and pixels, got shape {tuple(amap.shape)}")
    maps = amap if amap.dtype == torch.float64 else amap.float()
    if reduction == "blob":
        if amap.dim() < 3 or amap[0].numel() != amap.shape[-2] * amap.shape[-1]:
            raise ValueError(f"the blob score needs one 2-D map per image, got shape {tuple(amap.shape)}")
        return _blob_score(maps.reshape(amap.shape[0], 1, *amap.shape[-2:])).float()
    flat = maps.reshape(amap.shape[0], -1)
    if reduction == "max":
        return flat.max(dim=1).values.float()
    if reduction == "mean":
        return flat.mean(dim=1).float()
    k = max(1, math.ceil(topk_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1).float()


def reference_tensors(reference, mode: str, device) -> tuple[Tensor, Tensor | None] | None:
    """``reference.as_tensors(mode, device)``, or None when ``mode`` is ``none``."""
    if mode == "none":
        return None
    _require_reference(reference, mode)
    return reference.as_tensors(mode, torch.device(device))


def reference_pair(reference, settings: MapSettings, device) -> tuple:
    """The reference tensors of the detection map and of the localisation map (None where a
    map needs none) from a :class:`~anomaly_ae.scoring.reference.NormalReference` (whose
    ``localisation`` holds the second map's)."""
    detection = reference_tensors(reference, settings.normal_reference, device)
    if settings.localisation is None or settings.localisation.normal_reference == "none":
        return detection, None
    localisation = getattr(reference, "localisation", None) if reference is not None else None
    if localisation is None:
        raise ValueError(
            f"the localisation map ({settings.localisation.describe_map()}) needs its normal "
            "reference; refit normal_reference.npz (kedro run --pipeline=evaluate) for this map"
        )
    return detection, reference_tensors(localisation, settings.localisation.normal_reference, device)


def memory_pair(reference, settings: MapSettings, device) -> tuple[Tensor | None, Tensor | None]:
    """The memory banks (:meth:`~anomaly_ae.scoring.reference.NormalReference.memory_tensor`)
    of the detection and the localisation map, None where a map has no memory channel."""

    def bank(ref, one: MapSettings | None) -> Tensor | None:
        if one is None or not one.memory_pool:
            return None
        if ref is None or ref.memory_bank is None:
            raise ValueError(
                f"the map {one.describe_map()} needs the memory bank of the normal reference, which "
                "this normal_reference.npz lacks; refit it (kedro run --pipeline=evaluate) for this map"
            )
        return ref.memory_tensor(one.memory_pool, torch.device(device))

    loc = settings.localisation
    return bank(reference, settings), bank(getattr(reference, "localisation", None), loc)
