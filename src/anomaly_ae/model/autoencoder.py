"""The convolutional autoencoder of the paper's Table I, as a plain PyTorch module."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from anomaly_ae.config import from_settings
from anomaly_ae.data.transforms import image_shape


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything needed to rebuild the network. Defaults are the paper's Table I.

    Keras defaults are kept where the paper relies on them: LeakyReLU slope 0.3,
    BatchNorm epsilon 1e-3 and momentum 0.99 (PyTorch's ``momentum`` is ``1 - 0.99``).
    """

    architecture: str = "paper_table1"
    #: The image side (square, the paper's 256) or ``[height, width]`` (non-square;
    #: ``"height+width"`` on the command line). Stored as the side or a ``(height, width)``
    #: tuple. (``auto`` in the parameters: see :func:`config_for_images`.)
    image_size: int | tuple[int, int] | str = 256
    #: Side of the square tiles the network sees; ``None`` (the paper) = the whole image.
    #: With the image's height and width multiples of it, the image is cut into
    #: (height / tile_size) x (width / tile_size) non-overlapping tiles, each encoded and
    #: decoded by the same Table I network (its own 128-d code per tile), and the
    #: reconstructions are put back in place.
    tile_size: int | str | None = None
    in_channels: int = 1
    encoder_filters: tuple[int, ...] = (16, 32, 64, 128)
    latent_dim: int = 128
    kernel_size: int = 5
    final_kernel_size: int = 3
    leaky_slope: float = 0.3
    dropout: float = 0.2
    batchnorm_eps: float = 1e-3
    batchnorm_momentum: float = 0.01
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            height, width = image_shape(self.image_size)
        except ValueError as exc:
            raise ValueError(f"model.image_size: {exc}") from None
        # A square is stored as its side, so the configs written before non-square images
        # existed are unchanged.
        object.__setattr__(self, "image_size", height if height == width else (height, width))
        downscale = 2 ** len(self.encoder_filters)
        if self.tile_size is not None:
            if not str(self.tile_size).isdigit():
                raise ValueError(
                    f"model.tile_size must be a positive integer, null or auto, got {self.tile_size!r}"
                    + (
                        " (auto is resolved against the data: config_for_images)"
                        if self.tile_size == AUTO
                        else ""
                    )
                )
            object.__setattr__(self, "tile_size", int(self.tile_size))
            if self.tile_size <= 0 or height % self.tile_size or width % self.tile_size:
                raise ValueError(
                    f"model.tile_size={self.tile_size} must divide model.image_size="
                    f"{self.size_text()} (e.g. image_size 512 or [256, 512] with tile_size 256), "
                    "or be null for no tiles."
                )
            if self.tile_size == height == width:
                object.__setattr__(self, "tile_size", None)
        for side in self.network_shape:
            if side % downscale:
                name = "tile_size" if self.tile_size else "image_size"
                raise ValueError(
                    f"model.{name}={self.tile_size or self.size_text()} must be divisible by "
                    f"{downscale} (each side; 2 ** number of encoder layers); use e.g. 256."
                )
        object.__setattr__(self, "encoder_filters", tuple(int(f) for f in self.encoder_filters))

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the images the model takes."""
        return image_shape(self.image_size)

    def size_text(self) -> str:
        """``256`` or ``[256, 512]``: the value to write as ``image_size``."""
        height, width = self.shape
        return str(height) if height == width else f"[{height}, {width}]"

    @property
    def network_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the network's input: the tile, or the whole image."""
        return (self.tile_size, self.tile_size) if self.tile_size else self.shape

    @property
    def tile_grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of tiles: ``(1, 1)`` without tiles."""
        (height, width), (th, tw) = self.shape, self.network_shape
        return height // th, width // tw

    def tiling(self) -> str:
        """What the network sees: ``the whole image`` or e.g. ``2x2 tiles of 256 px``
        (rows x columns)."""
        if self.tile_size is None:
            return "the whole image"
        rows, cols = self.tile_grid
        return f"{rows}x{cols} tiles of {self.tile_size} px"

    def describe(self) -> str:
        """E.g. ``paper_table1, 256 px``, ``paper_table1, 512 px as 2x2 tiles of 256 px`` or
        ``paper_table1, 256x512 px (height x width) as 1x2 tiles of 256 px``; a colour model
        adds ``, RGB`` after the size."""
        height, width = self.shape
        size = f"{height} px" if height == width else f"{height}x{width} px (height x width)"
        text = f"{self.architecture}, {size}" + (", RGB" if self.in_channels == 3 else "")
        return f"{text} as {self.tiling()}" if self.tile_size else text

    @property
    def bottleneck_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the last encoder feature map."""
        return tuple(side // 2 ** len(self.encoder_filters) for side in self.network_shape)

    def to_dict(self) -> dict:
        """JSON-friendly. An untiled model leaves ``tile_size`` out, so its stored config (in
        checkpoints, training-state keys, MLflow) is the one written before tiles existed."""
        data = asdict(self)
        data["encoder_filters"] = list(self.encoder_filters)
        if isinstance(self.image_size, tuple):
            data["image_size"] = list(self.image_size)
        if self.tile_size is None:
            del data["tile_size"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AutoencoderConfig:
        return from_settings(cls, data, "model")


AUTO = "auto"


def config_for_images(model: dict, shape: tuple[int, int], channels: int | None = None) -> AutoencoderConfig:
    """The ``model`` parameters made concrete for images of ``shape`` ``(height, width)``
    (the preprocessed arrays'): ``image_size: auto`` is that shape; ``tile_size: auto`` is
    the shorter side when it divides the longer one and they differ, so a 256x512 image is
    1x2 tiles of the paper's 256 px network, and otherwise null: the paper's one network
    over the whole image (square images; an explicit size such as 208x500). Explicit values
    are kept (and checked against the data by the caller). ``channels`` (the arrays' 1 or 3,
    ``preprocessing.color``) sets ``in_channels``."""
    data = dict(model or {})
    if channels is not None:
        data["in_channels"] = int(channels)
    if data.get("image_size") == AUTO:
        data["image_size"] = tuple(int(v) for v in shape)
    if data.get("tile_size") == AUTO:
        height, width = image_shape(data.get("image_size", AutoencoderConfig.image_size))
        short, long = sorted((height, width))
        data["tile_size"] = short if short != long and long % short == 0 else None
    return AutoencoderConfig.from_dict(data)


def _act_norm_drop(cfg: AutoencoderConfig, features: int, dims: int) -> list[nn.Module]:
    """LeakyReLU -> BatchNorm -> Dropout, the order of the author's notebook."""
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return [
        nn.LeakyReLU(cfg.leaky_slope),
        norm(features, eps=cfg.batchnorm_eps, momentum=cfg.batchnorm_momentum),
        nn.Dropout(cfg.dropout),
    ]


class ConvAutoencoder(nn.Module):
    """Table I: 4 strided 5x5 convolutions, a 128-d dense latent, a mirrored decoder.

    With ``config.tile_size`` set, :meth:`forward` runs this network on each tile of the
    image (:func:`to_tiles`) and returns the whole reconstruction; :meth:`encode` and
    :meth:`decode` work on tiles.

    Keras "same" padding with stride 2 is reproduced in output size (each conv halves,
    each transposed conv doubles the side). Keras pads odd totals on the bottom/right;
    PyTorch pads symmetrically, a one-pixel shift of the sampling grid that changes no
    shape and no parameter count.
    """

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or AutoencoderConfig()
        pad = cfg.kernel_size // 2
        layers: list[nn.Module] = []
        channels = cfg.in_channels
        for filters in cfg.encoder_filters:
            layers.append(nn.Conv2d(channels, filters, cfg.kernel_size, stride=2, padding=pad))
            layers += _act_norm_drop(cfg, filters, dims=2)
            channels = filters
        rows, cols = cfg.bottleneck_shape
        flat = channels * rows * cols
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, cfg.latent_dim))

        self.decoder_dense = nn.Sequential(
            nn.Linear(cfg.latent_dim, flat), *_act_norm_drop(cfg, flat, dims=1)
        )
        self._bottleneck_shape = (channels, rows, cols)
        layers = []
        for filters in reversed(cfg.encoder_filters[:-1]):
            layers.append(
                nn.ConvTranspose2d(
                    channels, filters, cfg.kernel_size, stride=2, padding=pad, output_padding=1
                )
            )
            layers += _act_norm_drop(cfg, filters, dims=2)
            channels = filters
        final_pad = cfg.final_kernel_size // 2
        layers += [
            nn.ConvTranspose2d(
                channels,
                cfg.in_channels,
                cfg.final_kernel_size,
                stride=2,
                padding=final_pad,
                output_padding=1,
            ),
            nn.Sigmoid(),
        ]
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.decoder_dense(z).reshape(z.shape[0], *self._bottleneck_shape)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.config.tile_grid
        if grid == (1, 1):
            return self.decode(self.encode(x))
        return untile(self.decode(self.encode(to_tiles(x, grid))), grid)


def _grid(tiles: int | tuple[int, int]) -> tuple[int, int]:
    return (tiles, tiles) if isinstance(tiles, int) else tuple(tiles)


def to_tiles(images: torch.Tensor, tiles: int | tuple[int, int]) -> torch.Tensor:
    """``(N, C, r*s, c*s)`` images -> ``(N*r*c, C, s, s)`` tiles, row by row per image
    (``tiles``: ``(r, c)``, or one number for a square grid)."""
    rows, cols = _grid(tiles)
    n, c, h, w = images.shape
    s = h // rows
    grid = images.reshape(n, c, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(n * rows * cols, c, s, s)


def untile(tiles_batch: torch.Tensor, tiles: int | tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`to_tiles`."""
    rows, cols = _grid(tiles)
    m, c, s, _ = tiles_batch.shape
    n = m // (rows * cols)
    grid = tiles_batch.reshape(n, rows, cols, c, s, s).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, c, rows * s, cols * s)


ARCHITECTURES = {"paper_table1": ConvAutoencoder}


def build_model(config: AutoencoderConfig | dict | None = None) -> nn.Module:
    """Build a registered architecture from its config (or a dict of its fields)."""
    if isinstance(config, dict) or config is None:
        config = AutoencoderConfig.from_dict(config or {})
    try:
        cls = ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(
            f"Unknown model.architecture {config.architecture!r}; choose one of {sorted(ARCHITECTURES)}"
        ) from None
    return cls(config)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
