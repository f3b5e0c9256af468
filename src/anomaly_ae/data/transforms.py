"""Turning decoded images and masks into model-ready numpy arrays.

All intensity work is done in float32 so that 16-bit images keep their
precision; resizing happens on a float (``"F"`` mode) image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "RESAMPLE_METHODS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "check_image_size",
    "image_shape",
    "decode_image",
    "to_grayscale_float",
    "to_rgb_float",
    "COLOR_MODES",
    "colourfulness",
    "model_channels",
    "FIT_MODES",
    "Framing",
    "to_model_array",
    "to_model_uint8",
    "as_unit_float",
    "mask_to_array",
]

#: Names accepted for ``resample``. ``"area"`` is box filtering (each output
#: pixel is the mean of the input pixels it covers), the right choice when
#: shrinking.
RESAMPLE_METHODS: dict[str, Image.Resampling] = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

# ITU-R 601-2 luma, the same weights PIL uses for convert("L").
#: The image formats the project reads (data folders, predict, the inspection runtime).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS", "I"}


class ImageDecodeError(ValueError):
    """An image file could not be read or decoded."""


class ImageTooLargeError(ValueError):
    """An image's header announces more pixels than the configured limit (checked before
    any pixel is decoded: a small compressed file can expand to gigabytes)."""


def check_image_size(image: Image.Image, name: str, max_pixels: int | None, setting: str) -> None:
    """Refuse ``image`` (opened, not yet decoded) when its header says it has more than
    ``max_pixels`` pixels; the message names the file and the setting that raises the limit."""
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {image.width}x{image.height} = {image.width * image.height:,} pixels, more than "
            f"{setting}={max_pixels:,}. Nothing was decoded. If the image is genuine, raise the limit "
            f"(--params {setting}=<pixels>); otherwise remove the file."
        )


def too_large_cause(exc: BaseException | None) -> ImageTooLargeError | None:
    """The :class:`ImageTooLargeError` in ``exc``'s chain (Kedro wraps dataset errors)."""
    while exc is not None:
        if isinstance(exc, ImageTooLargeError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def decode_image(load: Callable[[], Image.Image], name: str) -> Image.Image:
    """Load an image and force it to be fully decoded.

    PIL opens files lazily, so a truncated or corrupt file often only fails
    when pixels are first accessed, far from where the file name is known.
    This calls ``load()``, then ``img.load()`` to decode every pixel, and turns
    any failure into an :class:`ImageDecodeError` that names the file.

    Any ``Exception`` is wrapped (not only ``OSError``,
    ``PIL.UnidentifiedImageError``, ``SyntaxError``, ``ValueError`` and
    ``Image.DecompressionBombError``), because loaders such as Kedro datasets
    re-raise decoding errors as their own exception types. The original
    exception is kept as ``__cause__``.

    Args:
        load: Zero-argument callable returning a PIL image (e.g. a Kedro
            partition loader or ``lambda: Image.open(path)``).
        name: File name or partition id used in the error message.

    Returns:
        The fully decoded image.

    Raises:
        ImageDecodeError: The file could not be opened or decoded.
    """
    img: object = None
    try:
        img = load()
        if not isinstance(img, Image.Image):
            raise TypeError(f"loader returned {type(img).__name__}, not a PIL image")
        img.load()
    except Exception as exc:  # noqa: BLE001 - wrapped and re-raised with context
        too_large = too_large_cause(exc)
        if too_large is not None:  # refused from the header: not a corrupt file
            raise too_large from None
        if isinstance(img, Image.Image):
            try:
                img.close()  # release the file handle of a lazily opened image
            except Exception:  # noqa: BLE001
                pass
        raise ImageDecodeError(
            f"Could not read image '{name}': {type(exc).__name__}: {exc}. "
            f"The file is probably truncated or corrupt, or is not an image. "
            f"Replace it with an intact copy (e.g. re-extract the dataset archive) "
            f"or remove it from the dataset."
        ) from exc
    return img


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Palette, premultiplied-alpha and other colour spaces brought to L/LA/RGB/RGBA (the
    first step of both :func:`to_grayscale_float` and :func:`to_rgb_float`)."""
    mode = image.mode
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode == "PA":
        return image.convert("RGBA")
    if mode in ("RGBa", "La"):  # premultiplied alpha: already composited on black
        return image.convert("RGB" if mode == "RGBa" else "L")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return image.convert("RGB")
    return image


def to_grayscale_float(image: Image.Image) -> np.ndarray:
    """Convert an image of any common PIL mode to float32 grayscale in [0, 1].

    Mode handling:

    * ``1``, ``L``: divided by 255.
    * ``RGB`` (and ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` via RGB): ITU-R 601-2
      luma (0.299 R + 0.587 G + 0.114 B) in float, divided by 255.
    * ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and ``P`` with transparency:
      **composited on black**, i.e. the gray value is multiplied by
      alpha / 255. Fully transparent pixels become 0 whatever colour they
      store, and opaque images (alpha 255 everywhere) are unchanged.
    * ``P``: palette expanded to RGB (RGBA if it has transparency).
    * ``I;16``, ``I;16B``, ``I;16L`` ...: divided by 65535 (the real bit depth,
      so 65535 -> 1.0 and 32768 -> ~0.5; values are not clipped to 255).
    * ``I`` (32-bit int, which is how PIL opens some 16-bit PNGs): treated as
      16-bit, divided by 65535, and clipped to [0, 1].
    * ``F``: taken to be already in [0, 1]; values outside are clipped.
    """
    image = _normalise_mode(image)
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float32)  # bool -> 0.0 / 1.0
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode == "LA":
        arr = np.asarray(image, dtype=np.float32)
        return arr[..., 0] * arr[..., 1] / (255.0 * 255.0)
    if mode == "RGB":
        arr = np.asarray(image, dtype=np.float32)
        return (arr[..., :3] @ _LUMA) / 255.0
    if mode == "RGBA":
        arr = np.asarray(image, dtype=np.float32)
        return (arr[..., :3] @ _LUMA) * arr[..., 3] / (255.0 * 255.0)
    if mode in _16BIT_MODES:
        arr = np.asarray(image).astype(np.float32)
        return np.clip(arr / 65535.0, 0.0, 1.0)
    if mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    # Anything else: let PIL try.
    try:
        converted = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"Unsupported image mode {image.mode!r}") from exc
    return (np.asarray(converted, dtype=np.float32) @ _LUMA) / 255.0


def to_rgb_float(image: Image.Image) -> np.ndarray:
    """Convert an image of any common PIL mode to float32 RGB ``(height, width, 3)`` in
    [0, 1], with the same rules as :func:`to_grayscale_float`: alpha composited on black,
    16-bit scaled by 65535, ``F`` clipped; a grayscale image gives three equal channels."""
    image = _normalise_mode(image)
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.float32)[..., :3] / 255.0
    if mode == "RGBA":
        arr = np.asarray(image, dtype=np.float32)
        return arr[..., :3] * arr[..., 3:4] / (255.0 * 255.0)
    if mode in ("1", "L", "LA", "F") or mode in _16BIT_MODES:
        gray = to_grayscale_float(image)
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        converted = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"Unsupported image mode {image.mode!r}") from exc
    return np.asarray(converted, dtype=np.float32) / 255.0


#: ``preprocessing.color``: ``gray`` (the paper: one ITU-R 601 luma channel), ``rgb`` (three
#: channels), ``auto`` (``rgb`` when the normal training images carry colour, see
#: :func:`model_channels`).
COLOR_MODES = ("gray", "rgb", "auto")

#: :func:`model_channels`' ``auto`` rule: colour when the training images' median
#: :func:`colourfulness` is at least this (on the 0..1 scale): 0.02 is about 5 grey levels
#: of 255 between the strongest and the weakest channel on an average pixel. JPEG chroma noise
#: of a gray product, or a gray product under a faintly tinted light, stays below it.
COLOURFUL = 0.02


def colourfulness(image: Image.Image) -> float:
    """Mean over the pixels of ``max(R, G, B) - min(R, G, B)`` (0 for any grayscale image,
    1 for pure primaries), from :func:`to_rgb_float`; images without colour channels give 0
    without decoding them as RGB."""
    if _normalise_mode(image).mode not in ("RGB", "RGBA"):
        return 0.0
    rgb = to_rgb_float(image)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def model_channels(color: str, colourfulness_values=None) -> int:
    """The model's input channels for ``preprocessing.color``: 1 for ``gray``, 3 for ``rgb``;
    for ``auto`` 3 when the median of ``colourfulness_values`` (the normal training images',
    :func:`colourfulness`) is at least :data:`COLOURFUL`, else 1. The same rule for every
    category, from normal images only."""
    if color not in COLOR_MODES:
        raise ValueError(f"preprocessing.color must be one of {COLOR_MODES}, got {color!r}")
    if color != "auto":
        return 1 if color == "gray" else 3
    values = np.asarray(list(colourfulness_values or []), dtype=np.float64)
    if values.size == 0:
        raise ValueError("preprocessing.color=auto needs the training images' colourfulness; got none")
    return 3 if float(np.median(values)) >= COLOURFUL else 1


def _resample_filter(resample: str) -> Image.Resampling:
    try:
        return RESAMPLE_METHODS[resample]
    except KeyError:
        raise ValueError(
            f"Unknown resample method {resample!r}; choose one of {sorted(RESAMPLE_METHODS)}"
        ) from None


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def image_shape(size: int | tuple[int, int] | list[int] | str) -> tuple[int, int]:
    """``(height, width)`` of a model image: ``size`` is one side (a square, the paper's
    256) or ``[height, width]`` (non-square: the image's aspect ratio kept); on the command
    line, where Kedro's ``--params`` splits on commas, ``height+width`` (``256+512``)."""
    if isinstance(size, str) and "+" in size:
        parts = size.split("+")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            size = [int(p) for p in parts]
    if _positive_int(size):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(v) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(
        f"image size must be a positive integer (a square side) or [height, width] of two "
        f"positive integers (height+width on the command line, e.g. 256+512), got {size!r}"
    )


#: ``preprocessing.fit``: ``stretch`` (the paper: every image resized to the model's
#: height x width), ``pad`` (one scale for every image, the rest of the frame filled by
#: mirroring the image), ``auto`` (chosen from the normal training images, see
#: :func:`anomaly_ae.data.preprocess.choose_framing`).
FIT_MODES = ("stretch", "pad", "auto")


@dataclass(frozen=True)
class Framing:
    """How an image of any size becomes the model's ``height x width``.

    ``stretch`` (the paper) resizes every image to the frame, whatever its size: right when
    images of several sizes show the same field of view at different resolutions.
    ``pad`` resizes every image by the same ``scale`` (an image larger than the frame at that
    scale is shrunk further, to fit), centres it and fills the rest of the frame by mirroring
    the image (``numpy.pad`` ``symmetric``; masks alike): right when images of several
    sizes are crops of one surface at one pixel size, so a pit or a scratch keeps its size in
    pixels from image to image instead of being squeezed by each image's own factor.
    """

    fit: str = "stretch"
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.fit not in ("stretch", "pad"):
            raise ValueError(f"preprocessing.fit must be one of stretch, pad or auto, got {self.fit!r}")
        if self.fit == "pad" and not (isinstance(self.scale, float | int) and self.scale > 0):
            raise ValueError(f"fit 'pad' needs a positive scale, got {self.scale!r}")

    def to_dict(self) -> dict:
        return {"fit": self.fit, "scale": None if self.scale is None else float(self.scale)}

    @classmethod
    def from_dict(cls, value: dict | None) -> Framing:
        """``None`` or ``{}`` (checkpoints and bundles made before framing) is ``stretch``."""
        if not value:
            return cls()
        scale = value.get("scale")
        return cls(str(value.get("fit", "stretch")), None if scale is None else float(scale))

    def describe(self) -> str:
        if self.fit == "stretch":
            return "stretched to the frame"
        return f"scaled by {self.scale:.4g}, mirror-padded"

    def placement(self, width: int, height: int, size) -> tuple[int, int, int, int]:
        """``(height, width, top, left)`` of an image of ``width x height`` pixels inside the
        frame ``size``: the whole frame for ``stretch``."""
        frame_h, frame_w = image_shape(size)
        if self.fit == "stretch":
            return frame_h, frame_w, 0, 0
        scale = min(float(self.scale), frame_h / height, frame_w / width)
        new_h = min(frame_h, max(1, int(round(height * scale))))
        new_w = min(frame_w, max(1, int(round(width * scale))))
        return new_h, new_w, (frame_h - new_h) // 2, (frame_w - new_w) // 2


def _frame(plane: np.ndarray, size, top: int, left: int) -> np.ndarray:
    """Mirror-pad ``plane`` (already at its placed size) to the frame ``size``."""
    frame_h, frame_w = image_shape(size)
    bottom, right = frame_h - plane.shape[0] - top, frame_w - plane.shape[1] - left
    if top == bottom == left == right == 0:
        return plane
    return np.pad(plane, ((top, bottom), (left, right)), mode="symmetric")


def to_model_array(
    image: Image.Image,
    size: int | tuple[int, int] = 256,
    resample: str = "area",
    channels: int = 1,
    framing: Framing | None = None,
) -> np.ndarray:
    """Convert an image to a grayscale float32 array of shape ``(size, size)`` (or
    ``(height, width)`` when ``size`` is that pair) in [0, 1].

    The image is converted to grayscale in float (see
    :func:`to_grayscale_float` for how each PIL mode is handled, notably RGBA
    is composited on black and 16-bit images are scaled by 65535) and then
    resized in float precision to ``size`` x ``size`` (or ``height`` x ``width``). An
    image of another aspect ratio is stretched, not cropped (MVTec AD images are square),
    unless ``framing`` is ``pad`` (:class:`Framing`: one scale, mirrored margins).

    Args:
        image: A PIL image of mode L, RGB, RGBA, P, LA, 1, I;16, I;16B, I or F
            (other modes are converted through RGB).
        size: Side length of the output in pixels, or ``(height, width)``.
        resample: ``"area"`` (box filter, default; best for downscaling),
            ``"bilinear"``, or ``"bicubic"``, ``"lanczos"``, ``"nearest"``.
        channels: 1 (grayscale, the paper) or 3 (RGB, :func:`to_rgb_float`; each channel
            resized alike).
        framing: :class:`Framing`; ``None`` is ``stretch`` (the paper).

    Returns:
        C-contiguous float32 array of shape ``(height, width)`` (``(3, height, width)`` for
        ``channels=3``), values in [0, 1] on the
        1/255 grid: exactly ``to_model_uint8(...) / 255``, so the compact uint8 cache the
        model trains from and the float input that predict and the inspection runtime feed
        it are the same numbers.
    """
    return to_model_uint8(image, size, resample, channels, framing).astype(np.float32) / np.float32(255)


def _resize_plane(plane: np.ndarray, height: int, width: int, flt: Image.Resampling) -> np.ndarray:
    plane = np.ascontiguousarray(plane, dtype=np.float32)
    if plane.shape != (height, width):
        plane = np.asarray(Image.fromarray(plane).resize((width, height), resample=flt), dtype=np.float32)
    return np.rint(np.clip(plane, 0.0, 1.0) * 255)


def to_model_uint8(
    image: Image.Image,
    size: int | tuple[int, int] = 256,
    resample: str = "area",
    channels: int = 1,
    framing: Framing | None = None,
) -> np.ndarray:
    """:func:`to_model_array` as uint8 (0..255): the cached form, 4x smaller than float32.
    Colour conversion and resizing run in float precision; only the result is rounded."""
    height, width, top, left = (framing or Framing()).placement(image.width, image.height, size)
    flt = _resample_filter(resample)
    if channels == 1:
        gray = _frame(_resize_plane(to_grayscale_float(image), height, width, flt), size, top, left)
        return np.ascontiguousarray(gray, dtype=np.uint8)
    if channels != 3:
        raise ValueError(f"model images have 1 (gray) or 3 (RGB) channels, got {channels!r}")
    rgb = to_rgb_float(image)
    planes = [_frame(_resize_plane(rgb[..., c], height, width, flt), size, top, left) for c in range(3)]
    return np.ascontiguousarray(np.stack(planes), dtype=np.uint8)


def as_unit_float(images: np.ndarray) -> np.ndarray:
    """Model images as float32 in [0, 1]: uint8 caches are divided by 255, float arrays
    are returned as float32 (no copy when they already are)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)
    return images.astype(np.float32, copy=False)


def mask_to_array(
    mask: Image.Image, size: int | tuple[int, int] = 256, framing: Framing | None = None
) -> np.ndarray:
    """Convert a ground-truth mask to a uint8 array of shape ``(size, size)`` (or
    ``(height, width)``) with values {0, 1}.

    Any non-zero pixel counts as defective (for colour masks: any non-zero
    colour channel; alpha is ignored; palette masks are expanded first).
    Resizing uses nearest-neighbour so no intermediate values appear; with ``framing``
    ``pad`` the mask is placed and mirrored exactly as its image.
    """
    height, width, top, left = (framing or Framing()).placement(mask.width, mask.height, size)
    if mask.mode in ("P", "PA"):
        mask = mask.convert("RGB")
    arr = np.asarray(mask)
    if arr.ndim == 3:
        channels = {"LA": 1, "La": 1, "RGBA": 3, "RGBa": 3}.get(mask.mode, arr.shape[-1])
        arr = arr[..., :channels].max(axis=-1)
    binary = (arr > 0).astype(np.uint8)
    if binary.shape != (height, width):
        resized = Image.fromarray(binary * np.uint8(255)).resize(
            (width, height), resample=Image.Resampling.NEAREST
        )
        binary = (np.asarray(resized) > 0).astype(np.uint8)
    return np.ascontiguousarray(_frame(binary, size, top, left))
