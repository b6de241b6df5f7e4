"""The one preprocessing path, shared by training, export calibration and inference.

numpy and Pillow only. An image of any common kind (8/16-bit greyscale, RGB,
RGBA, palette, CMYK, 32-bit integer or float, EXIF-rotated, animated: first
frame) becomes a ``(size, size, 1)`` float32 tensor in ``[0, 1]``:

1. decode (DICOM too, with the optional ``pydicom``: see :mod:`capsedge.dicom`);
   apply the EXIF orientation; keep the first frame;
2. convert to one greyscale channel (transparent pixels become black);
3. resize (antialiased bilinear) so that the longer side is ``size``;
4. stretch the intensities to ``[0, 1]`` (per-image min-max, so that 8-bit,
   12-bit and 16-bit radiographs all look alike to the network);
5. letterbox: centre on a black square of ``size`` x ``size``.

An image with NaN or infinite pixel values is refused (``ImageError``): no
stretch of such values means anything. Sizes are checked against
:mod:`capsedge.limits` before a file is read.

The parameters live in :class:`Preprocessing`, which is stored in every
exported model so that the runtime reads them instead of assuming them.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from .dicom import NOT_A_RADIOGRAPH, looks_like_dicom, marked, read_dicom
from .errors import CapsedgeError, ImageError, preview, reason
from .limits import MAX_IMAGE_BYTES, MAX_PIXELS
from .quiet import silenced, warnings_raised

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray

#: Why an image with NaN or infinite pixel values is refused (README, "Reliability").
NON_FINITE = "image has non-finite pixel values (NaN or infinity)"

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input tensor is made from an image.

    Every model carries its own (its metadata; a network's in ``ModelConfig.preprocessing``):
    there is no default input size.

    Attributes:
        input_size: side of the square input, in pixels.
        channels: channels of the input tensor (1: greyscale).
        layout: tensor layout of the batch, ``"NHWC"``.
        intensity: ``"minmax"``, per-image stretch of the grey levels to [0, 1].
        resample: ``"bilinear"`` (antialiased when downscaling).
        letterbox: keep the aspect ratio and pad with black to a square.
    """

    input_size: int
    channels: int = 1
    layout: str = "NHWC"
    intensity: str = "minmax"
    resample: str = "bilinear"
    letterbox: bool = True

    def __post_init__(self) -> None:
        if type(self.input_size) is not int or not 8 <= self.input_size <= 1024:
            raise ValueError(f"input_size must be an integer in [8, 1024], got {preview(self.input_size)}")
        for name, value, valid in (
            ("channels", self.channels, (1,)),
            ("layout", self.layout, ("NHWC",)),
            ("intensity", self.intensity, ("minmax",)),
            ("resample", self.resample, ("bilinear",)),
            ("letterbox", self.letterbox, (True,)),
        ):
            # type() too: True == 1 and 1 == True, but neither is the other in a model's metadata.
            if type(value) is not type(valid[0]) or value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {preview(value)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form stored in model metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict`; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing must be an object, got {preview(data)}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            names = preview(sorted(unknown))
            raise ValueError(f"unknown preprocessing keys {names}; valid: {sorted(known)}")
        if "input_size" not in data:
            raise ValueError("preprocessing must give its input_size")
        return cls(**data)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image, ``(H, W, C)``."""
        return (self.input_size, self.input_size, self.channels)


def open_image(source: ImageSource) -> Image.Image:
    """Open a path, bytes, binary file, PIL image or array as a PIL image (not yet decoded).

    Nothing larger than :data:`~capsedge.limits.MAX_IMAGE_BYTES` is read: a file's size
    is checked before it is opened, bytes by their length, a file object by reading at
    most one byte more than the limit.

    Raises:
        ImageError: the file is missing, unreadable, empty, not an image, too large, or
            the source is of a type that is not an image.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _array_to_image(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes > MAX_IMAGE_BYTES:
            raise _too_large()
        return _open_bytes(_bounded(bytes(source)))
    if isinstance(source, (str, os.PathLike)):
        return _open_path(source)
    if callable(getattr(source, "read", None)):
        try:
            data = source.read(MAX_IMAGE_BYTES + 1)
        except Exception as exc:  # noqa: BLE001 - any file-like object: its read is not ours
            raise ImageError(f"cannot read from the file object ({reason(exc)})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("a file object must be opened in binary mode ('rb')")
        return _open_bytes(_bounded(bytes(data)))
    raise ImageError(
        f"cannot classify an object of type {type(source).__name__}: give a path, bytes, "
        "a binary file, a PIL image or a numpy array"
    )


def _too_large() -> ImageError:
    return ImageError(f"file too large (over {MAX_IMAGE_BYTES // 2**20} MiB)")


def _bounded(data: bytes) -> bytes:
    if not data:
        raise ImageError("empty image data")
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large()
    return data


def _open_path(source: str | os.PathLike) -> Image.Image:
    try:
        name = os.fsdecode(os.fspath(source))
    except (TypeError, ValueError):
        raise ImageError("invalid path") from None
    if not name:
        raise ImageError("empty path")
    path = Path(name)
    try:
        status = path.stat()
        if stat.S_ISDIR(status.st_mode):
            raise ImageError("is a directory, not an image")
        if not stat.S_ISREG(status.st_mode):
            raise ImageError("not a regular file")
        if status.st_size == 0:
            raise ImageError("empty file")
        if status.st_size > MAX_IMAGE_BYTES:
            raise _too_large()
        with path.open("rb") as handle:
            header = handle.read(132)
            if looks_like_dicom(header, path.name):
                data = None  # pydicom reads the file itself: no second copy of the pixel data
            else:
                data = header + handle.read(MAX_IMAGE_BYTES + 1 - len(header))
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except ValueError:  # an embedded NUL character
        raise ImageError("invalid path") from None
    except OSError as exc:
        raise ImageError(f"cannot read file ({reason(exc)})") from None
    if data is None:
        return read_dicom(path)
    return _open_bytes(_bounded(data), path.name)


def _open_bytes(data: bytes, name: str = "") -> Image.Image:
    if looks_like_dicom(data[:132], name):
        return read_dicom(data)
    try:
        with warnings_raised(Image.DecompressionBombWarning):
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large (over {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's messages can quote the file's bytes
        raise ImageError(f"not a readable image ({reason(exc)})") from None


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise ImageError("empty array")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise ImageError(f"an image array must hold integers or floats, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.shape[0] * array.shape[1] > MAX_PIXELS:
            raise ImageError(f"image too large (over {MAX_PIXELS:,} pixels)")
        grey = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        if array.shape[-1] == 4:
            alpha = array[..., 3].astype(np.float32)
            grey = grey * alpha / (alpha.max() or 1.0)
        array = grey
    if array.ndim != 2:
        raise ImageError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got {array.shape}")
    if array.size > MAX_PIXELS:
        raise ImageError(f"image too large (over {MAX_PIXELS:,} pixels)")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ImageError(NON_FINITE)
    return Image.fromarray(array, mode="F")


def _to_grey(image: Image.Image) -> Image.Image:
    """One channel, mode ``L`` (8-bit), ``I`` (integer) or ``F`` (float)."""
    mode = image.mode
    if mode in ("L", "F"):
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return image.convert("I")
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        # Grey times alpha is the image composited onto black; two single-channel
        # images instead of two more full-size RGBA copies (alpha_composite's way).
        return ImageChops.multiply(image.convert("L"), image.getchannel("A"))
    return image.convert("L")


def load_grey(source: ImageSource, size_hint: int = 0) -> Image.Image:
    """Decode an image to one upright greyscale channel.

    Args:
        source: a path, encoded bytes, a binary file, a PIL image or a numpy array.
        size_hint: the final size; large JPEGs are decoded at a reduced scale
            no smaller than twice this.

    Raises:
        ImageError: the image cannot be read or decoded (whatever the decoder
            raised: the message names the problem, never the file's content).
    """
    try:
        with silenced():  # Pillow's warnings on corrupt files would reach stderr
            return _load_grey(source, size_hint)
    except CapsedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow and pydicom raise many kinds on corrupt data
        raise ImageError(f"cannot decode image ({reason(exc)})") from None


def _load_grey(source: ImageSource, size_hint: int) -> Image.Image:
    image = open_image(source)
    not_radiograph = not_a_radiograph(image)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"image too large (over {MAX_PIXELS:,} pixels)")
    if size_hint and image.format == "JPEG" and min(width, height) > 4 * size_hint:
        image.draft(image.mode, (2 * size_hint, 2 * size_hint))
    image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    image.load()
    return marked(_to_grey(image), not_radiograph)  # the mark goes on to the classifier


def not_a_radiograph(grey: Image.Image) -> bool:
    """Whether :func:`load_grey` read an image its own file calls no radiograph (a DICOM's
    Modality: CT, MR, ultrasound, ...)."""
    return bool(grey.info.get(NOT_A_RADIOGRAPH))


def to_model_input(grey: Image.Image, config: Preprocessing) -> np.ndarray:
    """Resize, stretch and letterbox a greyscale image into a ``(H, W, 1)`` float32 tensor.

    Raises:
        ImageError: the image has NaN or infinite pixel values.
    """
    size = config.input_size
    if grey.mode == "F" and not all(np.isfinite(grey.getextrema())):
        raise ImageError(NON_FINITE)
    factor = _reduction(grey.size, size)
    if factor > 1:  # cheap box reduction first; the bilinear pass below antialiases the rest
        grey = grey.reduce(factor)
    top, left, new_h, new_w = content_box(grey.size, size)
    resized = grey.convert("F").resize((new_w, new_h), Image.Resampling.BILINEAR)
    # float64 on the small resized image: no overflow however wide the range.
    pixels = np.asarray(resized, dtype=np.float64)
    if not np.isfinite(pixels).all():  # a NaN that the extrema skipped
        raise ImageError(NON_FINITE)
    low, high = float(pixels.min()), float(pixels.max())
    pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = np.clip(pixels, 0.0, 1.0)
    return canvas[..., np.newaxis]


def _reduction(image_size: tuple[int, int], size: int) -> int:
    return max(1, max(image_size) // (2 * size))


def content_box(image_size: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Where an image of ``(width, height)`` lands in the ``size`` x ``size`` letterboxed input:
    ``(top, left, height, width)`` in input pixels."""
    factor = _reduction(image_size, size)
    width, height = (-(-image_size[0] // factor), -(-image_size[1] // factor))  # Image.reduce rounds up
    scale = size / max(width, height)
    new_w = max(1, min(size, round(width * scale)))
    new_h = max(1, min(size, round(height * scale)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def preprocess(source: ImageSource, config: Preprocessing) -> np.ndarray:
    """Turn an image into the model's ``(H, W, C)`` float32 input tensor.

    Raises:
        ImageError: the image cannot be read or decoded.
        RuntimeMissingError: a DICOM file and no ``pydicom``.
    """
    return to_model_input(load_grey(source, config.input_size), config)
