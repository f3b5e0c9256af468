"""Normal-reference correction of anomaly maps: where does a NORMAL image usually light up?

A reconstruction autoencoder does not reproduce every normal image equally well everywhere:
edges, the object's rim and the image border light up in the ``1 - SSIM`` map of every
image, normal or not. Those pixels dominate ``max``-scores and false-positive pixels. The
correction fits a per-pixel reference on the anomaly maps of the NORMAL *training* images
(objects in an inspection cell are placed consistently, so pixel position is meaningful)
and compares each new map against it:

* ``none`` — the map as it is (the paper);
* ``mean`` — ``map - mean_map``: how much more this pixel lights up than it does on normal
  images;
* ``zscore`` — ``(map - mean_map) / (std_map + mean(std_map))``: the same in units of the
  pixel's normal spread. The floor ``mean(std_map)`` (scale-free, no tuned constant) keeps
  pixels that never vary from dividing by ~0;
* ``tail`` — ``(map - mean_map) / max(upper_map - mean_map, its mean)``: the same in units of
  how far the pixel's normal maps reach above their mean, floored by the mean of that width.
  A pixel that glints now and then has a heavy upper tail that its standard deviation
  understates; here it is damped by what the normal images actually reached there, so an
  image's maximum compares like with like across pixels. ``upper_map`` is, per pixel, the
  largest value that a *second* normal image reached (the maximum over images once the
  highest image is left out; an image's moved copies count as that image): one unclean
  training image, a defect nobody labelled, cannot set the width at its defect's place and
  so blind the reference to a later defect there, as the maximum would. It is fitted in the
  same single streaming pass as the mean.

Every statistic (mean, spread, upper) is taken over the normal images with each pixel's
highest image left out (that pixel's largest value, with the rest of that image's maps: its
moved copies). One unclean training image then shifts none of them at its defect's place:
with the plain mean and spread, a defect nobody labelled would widen the spread there and
damp a later defect at that place (measured: ``scripts/map_study.py unclean``). Its cost on
clean images is one image of ``n``.

A map with more channels (the low-pass difference, ``MapSettings.lowpass_sigma``; the memory
channel, ``MapSettings.memory_pool``) has a reference per channel: ``mean``, ``std`` and
``upper`` are then ``(C, H, W)``, each channel with its own floor. A memory channel's bank, the
training images' ``memory_pool`` x ``memory_pool`` averages
(:func:`~anomaly_ae.scoring.memory.pooled_images`), is ``memory_bank``.

The reference uses training images only, so the held-out validation images that calibrate
the decision threshold (and the ablation's synthetic defects) stay unseen. But the model
has learnt those very images: it reconstructs them better than any new normal image, so a
reference of their maps alone understates how much a new normal image lights up.
``MapSettings.reference_shift`` (px) adds each training image moved by that many pixels up,
down, left and right (:func:`with_moved_copies`): the same normal content, which the model
has not seen at those positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "REFERENCE_MODES",
    "SCALED_MODES",
    "NormalReference",
    "ReferenceAccumulator",
    "correct",
    "move",
    "with_moved_copies",
]

REFERENCE_MODES = ("none", "mean", "zscore", "tail")
#: the modes that put a map in units of its normal variation (a low-pass channel and moved
#: copies go with these: each channel is compared in its own units)
SCALED_MODES = ("zscore", "tail")
LOCALISATION = "localisation_"  # prefix of the localisation map's arrays in normal_reference.npz


def check_mode(mode: str) -> str:
    if mode not in REFERENCE_MODES:
        raise ValueError(
            f"evaluation.anomaly_map.normal_reference must be one of {REFERENCE_MODES}, got {mode!r}"
        )
    return mode


@dataclass(frozen=True)
class NormalReference:
    """Per-pixel mean, standard deviation and upper tail of the anomaly maps of normal images,
    each over the images other than that pixel's highest (:class:`ReferenceAccumulator`)."""

    mean: np.ndarray  # (H, W) float32, or (C, H, W) for a map of C channels
    std: np.ndarray  # the same shape
    n_images: int
    #: the localisation map's reference (``MapSettings.localisation``), when it needs one
    localisation: NormalReference | None = None
    #: per pixel, the largest value a second normal image reached (the same shape; None in a
    #: reference fitted before ``tail`` used it)
    upper: np.ndarray | None = None
    #: the training images' block averages ``(N, C, H // p, W // p)`` float32 that the memory
    #: channel (``MapSettings.memory_pool`` p) compares with, or None
    memory_bank: np.ndarray | None = None

    @classmethod
    def fit(cls, maps: np.ndarray | torch.Tensor) -> NormalReference:
        """Fit on ``(N, H, W)`` (or ``(N, C, H, W)``) anomaly maps of normal images (N >= 2),
        each map an image of its own; accumulated in float64."""
        return ReferenceAccumulator().add(maps).result()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """For :class:`anomaly_ae.datasets.NpzDataset` (the localisation map's reference, if
        any, under ``localisation_mean``, ``localisation_std``, ``localisation_n_images``)."""
        arrays = {"mean": self.mean, "std": self.std, "n_images": np.asarray(self.n_images)}
        if self.upper is not None:
            arrays["upper"] = self.upper
        if self.memory_bank is not None:
            arrays["memory_bank"] = self.memory_bank
        if self.localisation is not None:
            arrays.update({f"{LOCALISATION}{k}": v for k, v in self.localisation.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], source: str = "normal_reference") -> NormalReference:
        missing = {"mean", "std", "n_images"} - set(arrays)
        if missing:
            raise ValueError(
                f"{source} lacks {sorted(missing)}; rerun `kedro run --pipeline=evaluate` to refit it."
            )
        mean = np.asarray(arrays["mean"], np.float32)
        std = np.asarray(arrays["std"], np.float32)
        if mean.ndim not in (2, 3) or mean.shape != std.shape:
            raise ValueError(
                f"{source}: mean {mean.shape} and std {std.shape} must be equal (H, W) or (C, H, W) maps"
            )
        # a reference of an older version may hold "max" (the plain maximum): not read, so
        # `tail` asks for a refit rather than silently changing its meaning
        upper = np.asarray(arrays["upper"], np.float32) if "upper" in arrays else None
        if upper is not None and upper.shape != mean.shape:
            raise ValueError(f"{source}: upper {upper.shape} must have the shape of mean {mean.shape}")
        bank = np.asarray(arrays["memory_bank"], np.float32) if "memory_bank" in arrays else None
        if bank is not None and (bank.ndim != 4 or len(bank) < 2):
            raise ValueError(
                f"{source}: memory_bank must hold (N >= 2, C, h, w) block averages, got {bank.shape}; "
                "refit it with `kedro run --pipeline=evaluate`."
            )
        nested = {k.removeprefix(LOCALISATION): v for k, v in arrays.items() if k.startswith(LOCALISATION)}
        localisation = cls.from_arrays(nested, f"{source} (localisation map)") if nested else None
        return cls(mean, std, int(arrays["n_images"]), localisation, upper, bank)

    @property
    def channels(self) -> int:
        return 1 if self.mean.ndim == 2 else self.mean.shape[0]

    def check_shape(self, map_shape: tuple[int, ...] | torch.Size, channels: int | None = None) -> None:
        """Refuse maps of another size (or, given ``channels``, another number of map
        channels) than the reference, saying how to fix it."""
        if tuple(map_shape[-2:]) != self.mean.shape[-2:]:
            raise ValueError(
                f"anomaly maps are {tuple(map_shape[-2:])} but the normal reference is "
                f"{self.mean.shape[-2:]}; refit it (kedro run --pipeline=evaluate) for this image size."
            )
        if channels is not None and channels != self.channels:
            raise ValueError(
                f"the map has {channels} channel(s) (the map, then lowpass_sigma's and memory_pool's "
                "when on) but "
                f"the normal reference has {self.channels}; refit it (kedro run --pipeline=evaluate) "
                "for this map."
            )

    def memory_tensor(self, pool: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The memory bank (the training images' block averages, ``(N, C, h, w)``) as a float32
        tensor on ``device``, for :func:`~anomaly_ae.scoring.memory.memory_map`. Refuses a bank
        of another block size than ``pool`` (``memory_pool``)."""
        if self.memory_bank is None:
            raise ValueError(
                "the memory channel needs the normal reference's memory bank, which this "
                "normal_reference.npz lacks; refit it with `kedro run --pipeline=evaluate`."
            )
        expected = (self.mean.shape[-2] // pool, self.mean.shape[-1] // pool)
        if tuple(self.memory_bank.shape[-2:]) != expected:
            raise ValueError(
                f"the memory bank holds {tuple(self.memory_bank.shape[-2:])} block averages, not the "
                f"{expected} of memory_pool {pool} on {tuple(self.mean.shape[-2:])} maps; refit the "
                "normal reference (kedro run --pipeline=evaluate) for this memory_pool."
            )
        return torch.as_tensor(self.memory_bank, dtype=torch.float32).to(device)

    def as_tensors(
        self, mode: str, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mean, scale)`` float32 tensors on ``device`` for :func:`correct` (``scale`` is
        None for ``mean``). Make them once, outside any ``torch.compile`` region."""
        if check_mode(mode) == "none":
            raise ValueError("normal_reference='none' needs no reference tensors")
        mean = torch.as_tensor(self.mean, dtype=torch.float32).to(device)
        if mode == "mean":
            return mean, None
        eps = torch.finfo(torch.float32).eps
        if mode == "tail":
            if self.upper is None:
                raise ValueError(
                    "normal_reference='tail' needs the normal maps' upper tail (`upper`: per pixel, "
                    "the largest value a second normal image reached), which this "
                    "normal_reference.npz lacks (fitted by an older version); refit it with "
                    "`kedro run --pipeline=evaluate`."
                )
            width = (torch.as_tensor(self.upper, dtype=torch.float32).to(device) - mean).clamp_min(0.0)
            floor = width.mean(dim=(-2, -1), keepdim=True)  # per channel
            return mean, torch.maximum(width, floor).clamp_min(eps)
        std = torch.as_tensor(self.std, dtype=torch.float32).to(device)
        floor = std.mean(dim=(-2, -1), keepdim=True)  # per channel
        return mean, (std + floor).clamp_min(eps)

    def typical(self, mode: str) -> np.ndarray:
        """The normal images' mean map in the units of ``mode``'s corrected maps: the mean
        map itself for ``none``, zeros for the others (by construction)."""
        if check_mode(mode) == "none":
            return self.mean.copy()
        return np.zeros(self.mean.shape[-2:], self.mean.dtype)  # one channel after the max

    def apply(self, maps: torch.Tensor, mode: str) -> torch.Tensor:
        """Correct ``(N, 1, H, W)`` or ``(N, H, W)`` maps (float32, any device) by ``mode``."""
        if check_mode(mode) == "none":
            return maps
        self.check_shape(maps.shape)
        return correct(maps, *self.as_tensors(mode, maps.device))


class ReferenceAccumulator:
    """:meth:`NormalReference.fit` one batch at a time: per-pixel sums in float64, so the
    maps of thousands of images never have to be held at once. ``add`` returns ``self``.

    Every statistic leaves each pixel's highest *image* out: per pixel it keeps the largest
    value and that image's own sums, and the largest value of every
    *other* image (``upper``, the ``tail`` reference's width). The mean and spread are those
    of the other images, so one unclean training image (a defect nobody labelled) cannot
    shift them at its defect's place, as it cannot set the width. ``sources`` names each
    map's image, so that an image's moved copies count as that one image (default: every map
    an image of its own); all maps of an image come in one ``add``, which a later ``add``
    naming the same image refuses (its earlier maps could not be left out)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None  # the first map: sums of (map - shift) stay small
        self.squares: torch.Tensor | None = None
        self.top: torch.Tensor | None = None  # per pixel, the largest value ...
        self.top_sums: torch.Tensor | None = None  # ... its image's count, sum and squares ...
        self.upper: torch.Tensor | None = None  # ... and the largest of every other image
        self.seen: set[int] = set()  # the images added so far

    def add(self, maps: np.ndarray | torch.Tensor, sources: np.ndarray | None = None) -> ReferenceAccumulator:
        """Add ``(N, H, W)`` or ``(N, C, H, W)`` maps; ``sources``: the image each came from (N
        integers; maps of one image, e.g. its moved copies, share one and come in this one
        call), default one each."""
        maps = torch.as_tensor(maps)
        if maps.dim() == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.dim() not in (3, 4):
            raise ValueError(
                f"anomaly maps must be shaped (N, H, W) or (N, C, H, W), got {tuple(maps.shape)}"
            )
        if len(maps) == 0:
            return self
        if sources is None:
            sources = np.arange(self.n, self.n + len(maps)) - (1 << 62)  # never an image's id
        sources = np.asarray(sources, np.int64).ravel()
        if len(sources) != len(maps):
            raise ValueError(f"{len(maps)} maps but {len(sources)} sources")
        ids, groups = np.unique(sources, return_inverse=True)
        again = self.seen.intersection(ids.tolist())
        if again:
            raise ValueError(
                f"image(s) {sorted(again)[:5]} were added before: add all maps of an image (its moved "
                "copies too) in one call, so that each pixel's highest image can be left out"
            )
        maps = maps.detach().to("cpu")
        if self.shift is None:
            self.shift = maps[0].double().clone()
            self.total = torch.zeros_like(self.shift)
            self.squares = torch.zeros_like(self.shift)
            self.top = torch.full(self.shift.shape, -torch.inf)
            self.top_sums = torch.zeros((3, *self.shift.shape), dtype=torch.float64)
            self.upper = torch.full(self.shift.shape, -torch.inf)
        elif maps.shape[1:] != self.shift.shape:
            raise ValueError(
                f"anomaly maps of {tuple(maps.shape[1:])} added to a reference of {tuple(self.shift.shape)}"
            )
        # per image of the batch: its largest value (float32, as the maps), count, sum, squares
        index = torch.from_numpy(groups)
        centred = maps.double() - self.shift
        sums = torch.zeros((3, len(ids), *self.shift.shape), dtype=torch.float64)
        counts = torch.from_numpy(np.bincount(groups, minlength=len(ids))).double()
        sums[0] = counts.view(-1, *(1,) * (centred.dim() - 1))
        sums[1].index_add_(0, index, centred)
        sums[2].index_add_(0, index, centred.square())
        tops = maps.float()
        if len(ids) < len(maps):
            spread = index.view(-1, *(1,) * (tops.dim() - 1)).expand_as(tops)
            tops = torch.full((len(ids), *tops.shape[1:]), -torch.inf).scatter_reduce_(
                0, spread, tops, "amax"
            )
        self.total += sums[1].sum(dim=0)
        self.squares += sums[2].sum(dim=0)
        self._merge_tops(tops, sums)
        self.seen.update(ids.tolist())
        self.n += len(maps)
        return self

    def _merge_tops(self, tops: torch.Tensor, sums: torch.Tensor) -> None:
        """Fold a batch's images (their largest values ``tops`` and ``(count, sum, squares)``
        sums) into the per-pixel top image: ``top`` the largest value, ``top_sums`` its image's
        sums, ``upper`` the largest value of every other image. A batch's images are new ones
        (:meth:`add`)."""
        if len(tops) > 1:
            first, where = tops.max(dim=0)  # (topk along the batch is 3x slower)
            second = tops.scatter(0, where[None], -torch.inf).amax(dim=0)
        else:
            first, where = tops[0], torch.zeros(tops.shape[1:], dtype=torch.int64)
            second = torch.full_like(tops[0], -torch.inf)
        higher = first > self.top
        self.upper = torch.where(higher, torch.maximum(self.top, second), torch.maximum(self.upper, first))
        chosen = sums.gather(1, where[None, None].expand(3, 1, *where.shape))[:, 0]
        self.top_sums = torch.where(higher, chosen, self.top_sums)
        self.top = torch.maximum(self.top, first)

    def result(self) -> NormalReference:
        if self.n < 2:
            raise ValueError(f"need the anomaly maps of at least 2 normal images, got {self.n}")
        # every image but each pixel's highest; with one image only (and its moved copies)
        # there is no other, so its own maps serve, and no width above the mean (the tail's
        # floor then holds the whole map)
        count, total, squares = self.top_sums
        alone = count >= self.n
        count = torch.where(alone, self.n, self.n - count)
        total = torch.where(alone, self.total, self.total - total)
        squares = torch.where(alone, self.squares, self.squares - squares)
        mean_centred = total / count
        var = (squares / count - mean_centred.square()).clamp_min(0.0)
        mean = mean_centred + self.shift
        upper = torch.where(torch.isfinite(self.upper), self.upper.double(), mean)
        return NormalReference(
            mean.float().numpy(), var.sqrt().float().numpy(), self.n, upper=upper.float().numpy()
        )


def correct(maps: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``(maps - mean) / scale`` (``scale`` None: no division); broadcasts over the batch."""
    corrected = maps - mean
    return corrected if scale is None else corrected / scale


def move(images, dy: int, dx: int):
    """``(..., H, W)`` images (a numpy array or a torch tensor, returned as the same kind)
    moved ``dy`` px down and ``dx`` px right (negative: up, left), the border reflected in
    (``numpy.pad``'s ``reflect``: the edge pixel is not repeated). Indexing only, so it traces
    into an ONNX graph as it is (the shift-tolerant map, ``MapSettings.shift_tolerance``)."""
    height, width = images.shape[-2:]
    if not (abs(dy) < height and abs(dx) < width):
        raise ValueError(
            f"cannot move {height}x{width} images by ({dy}, {dx}) px: at most {height - 1}, {width - 1}"
        )
    rows, cols = _reflected(height, dy), _reflected(width, dx)
    if isinstance(images, torch.Tensor):
        rows = torch.from_numpy(rows).to(images.device)
        cols = torch.from_numpy(cols).to(images.device)
        return images.index_select(-2, rows).index_select(-1, cols)
    return images[..., rows, :][..., cols]


def _reflected(n: int, d: int) -> np.ndarray:
    """The source index of each of ``n`` positions moved by ``d``, reflected at both ends."""
    index = np.abs(np.arange(n) - d)
    return np.where(index >= n, 2 * (n - 1) - index, index)


def with_moved_copies(images: np.ndarray, shift: int) -> np.ndarray:
    """``(N, C, H, W)`` images followed by their copies moved by ``shift`` px down, up, right
    and left (:func:`move`): ``(5N, C, H, W)``, or the images themselves for ``shift`` 0. The
    normal images a ``reference_shift`` reference is fitted on."""
    if shift == 0:
        return images
    height, width = images.shape[-2:]
    if not 0 < shift < min(height, width):
        raise ValueError(
            f"evaluation.anomaly_map.reference_shift must be 0 or between 1 and {min(height, width) - 1} px "
            f"for {height}x{width} images, got {shift}"
        )
    moves = ((shift, 0), (-shift, 0), (0, shift), (0, -shift))
    return np.concatenate([images, *(move(images, dy, dx) for dy, dx in moves)])
