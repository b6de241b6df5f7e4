"""DICOM X-rays, through the optional ``pydicom`` (``pip install 'capsedge[dicom]'``).

The pixel data goes through the modality LUT (rescale slope/intercept), then
the first VOI LUT or window (centre/width) the file names, then MONOCHROME1
is inverted so that bone and metal are bright, as in every other image.
Nothing from the header other than what these steps need is read, and no
header value (patient name, IDs, dates) ever appears in a message.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError, missing_extra

#: Same limit as for other images (decompression bombs); checked before decoding.
MAX_PIXELS = 64_000_000

#: The 128-byte preamble is followed by this marker in a DICOM Part 10 file.
DICOM_MAGIC = b"DICM"


#: Leading bytes of formats Pillow reads, so that a PNG or JPEG named ``.dcm`` is not forced through pydicom.
_OTHER_FORMATS = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def looks_like_dicom(header: bytes, name: str = "") -> bool:
    """A DICOM file by its marker at byte 128, or a ``.dcm`` name on data no other format claims."""
    if header[128:132] == DICOM_MAGIC:
        return True
    return name.lower().endswith((".dcm", ".dicom")) and not header.startswith(_OTHER_FORMATS)


def read_dicom(data: bytes | Path) -> Image.Image:
    """Decode a single-frame DICOM image into a float (``F``) greyscale image.

    pydicom's warnings and log records can quote header values, so they are
    silenced while the file is read.

    Raises:
        ImageError: not a readable DICOM image, multi-frame, or compressed with
            no decoder installed.
        RuntimeMissingError: ``pydicom`` is not installed.
    """
    logger = logging.getLogger("pydicom")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_dicom(data)
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


def _read_dicom(data: bytes | Path) -> Image.Image:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise missing_extra("pydicom", "dicom") from None
    stream = io.BytesIO(data if isinstance(data, bytes) else Path(data).read_bytes())
    try:
        dataset = pydicom.dcmread(stream, force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise ImageError(f"not a readable DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in dataset:
        raise ImageError("DICOM file has no image (no pixel data)")
    try:
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageError(f"invalid DICOM image header ({type(exc).__name__})") from None
    if rows * columns > MAX_PIXELS:
        raise ImageError(f"image too large ({columns}x{rows} pixels, limit {MAX_PIXELS:,})")
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported; export one frame")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(syntax, "name", str(syntax))
        raise ImageError(
            f"cannot decode DICOM pixel data compressed as {name}: install a decoder "
            f"(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg) ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on corrupt pixel data
        raise ImageError(f"cannot decode DICOM pixel data ({type(exc).__name__})") from None
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or pixels.ndim == 3:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ImageError(f"unsupported DICOM pixel layout {pixels.shape}")
        grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return Image.fromarray(grey, mode="F")
    if pixels.ndim != 2:
        raise ImageError(f"unsupported DICOM pixel layout {pixels.shape}")
    try:
        values = apply_modality_lut(pixels, dataset)
        values = apply_voi_lut(values, dataset, index=0)
        values = np.asarray(values, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - bad LUT/window values; never quote them (patient data)
        raise ImageError(f"invalid DICOM rescale, LUT or window values ({type(exc).__name__})") from None
    if photometric == "MONOCHROME1":
        values = values.max() - values
    return Image.fromarray(np.nan_to_num(values), mode="F")
