"""DICOM X-rays, through the optional ``pydicom`` (``pip install 'capsedge[dicom]'``).

The pixel data goes through the modality LUT (rescale slope/intercept), then
the first VOI LUT or window (centre/width) the file names, then MONOCHROME1
is inverted so that bone and metal are bright, as in every other image.
Nothing from the header other than what these steps need is read, and no
header value (patient name, IDs, dates) ever appears in a message. The one
other element read is the Modality: an image the file itself says is no
radiograph (CT, MR, ultrasound, ...) is marked (:data:`NOT_A_RADIOGRAPH`), and
the classifier answers it as out of distribution without quoting the value.
"""

from __future__ import annotations

import importlib.util
import io
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from .errors import CapsedgeError, ImageError, pip_install
from .extras import require
from .limits import MAX_INFLATED_DICOM_BYTES, MAX_PIXELS
from .quiet import silenced

#: The 128-byte preamble is followed by this marker in a DICOM Part 10 file.
DICOM_MAGIC = b"DICM"


#: ``Image.info`` key set (to True) on a decoded DICOM whose Modality names no radiograph.
NOT_A_RADIOGRAPH = "capsedge.not_a_radiograph"

#: DICOM Modality codes (PS3.3 C.7.3.1.1.1) of images that are not projection X-rays: the
#: feature statistics alone let one of pydicom's test images through (an ultrasound answered
#: Depuy at 93 %, docs/trust.md). CR, DX, RG, RF, XA, PX, IO, MG, OT and RTIMAGE are not here,
#: nor is a missing or unknown code: those go to the model and its own checks.
NON_RADIOGRAPH_MODALITIES = frozenset({
    "CT", "MR", "US", "NM", "PT", "OP", "OPT", "OPM", "OAM", "OPR", "OPV", "IVOCT", "IVUS", "OCT",
    "XC", "ES", "GM", "SM", "TG", "LS", "BDUS", "DG", "BI", "EPS", "ECG", "HD", "RESP",
    "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SEG", "REG", "SR", "DOC", "KO", "PR",
})

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
    silenced while the file is read (:func:`capsedge.quiet.silenced`: thread-safe, and
    leaves no global state changed). A deflated data set is inflated step by step and
    refused past :data:`~capsedge.limits.MAX_INFLATED_DICOM_BYTES` (pydicom would inflate
    it whole: a 1.5 MB file can hold 1.5 GiB).

    Raises:
        ImageError: not a readable DICOM image, multi-frame, or compressed with
            no decoder installed.
        RuntimeMissingError: ``pydicom`` is not installed.
    """
    with silenced("pydicom"):
        return _read_dicom(data)


def _read_dicom(source: bytes | Path) -> Image.Image:
    pydicom = require("pydicom", extra="dicom", needed_by="a DICOM file")
    _register_plugins()
    try:
        return _decode(pydicom, source)
    except CapsedgeError:
        raise
    except Exception:  # noqa: BLE001 - a hostile header makes pydicom raise anything
        # Never pydicom's message: it quotes raw header bytes (patient data).
        raise ImageError("not a readable DICOM file (corrupt or truncated header)") from None


_plugins_lock = threading.Lock()
_plugins_added = False


def _register_plugins() -> None:
    """Add :mod:`capsedge.dicom_gdcm` to pydicom's 12-bit JPEG Extended decoder, once
    (pydicom's ``add_plugin`` is not thread-safe)."""
    global _plugins_added
    with _plugins_lock:
        if _plugins_added:
            return
        from pydicom.pixels import get_decoder
        from pydicom.uid import JPEGExtended12Bit

        get_decoder(JPEGExtended12Bit).add_plugin("capsedge-gdcm", ("capsedge.dicom_gdcm", "decode_frame"))
        _plugins_added = True


def _decode(pydicom: ModuleType, source: bytes | Path) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    inflated = _inflated(source)
    if inflated is not None:
        dataset = pydicom.dcmread(inflated, force=True)
        del inflated
    else:
        dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, force=True)
    if "PixelData" not in dataset:
        raise ImageError("DICOM file has no image (no pixel data)")
    try:
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageError("invalid DICOM image header (no number of rows, columns or frames)") from None
    if rows * columns > MAX_PIXELS:
        raise ImageError(f"image too large (over {MAX_PIXELS:,} pixels)")
    if frames > 1:
        raise ImageError("multi-frame DICOM is not supported; export one frame")
    try:
        pixels = dataset.pixel_array
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on missing decoders and corrupt data
        raise ImageError(_undecodable(dataset)) from None
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    not_radiograph = str(getattr(dataset, "Modality", "") or "").strip().upper() in NON_RADIOGRAPH_MODALITIES
    values = np.empty(pixels.shape[:2], np.float32)  # filled block by block: no float64 copy
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") or pixels.ndim == 3:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ImageError("unsupported DICOM pixel layout")
        weights = np.array([0.299, 0.587, 0.114], np.float32)
        for block in _row_blocks(pixels.shape):
            values[block] = pixels[block].astype(np.float32) @ weights
        return marked(Image.fromarray(values, mode="F"), not_radiograph)
    if pixels.ndim != 2:
        raise ImageError("unsupported DICOM pixel layout")
    try:
        for block in _row_blocks(pixels.shape):
            values[block] = apply_voi_lut(apply_modality_lut(pixels[block], dataset), dataset, index=0)
    except Exception:  # noqa: BLE001 - bad LUT/window values; never quote them (patient data)
        raise ImageError("invalid DICOM rescale, LUT or window values") from None
    del pixels, dataset
    if photometric == "MONOCHROME1":
        np.subtract(values.max(), values, out=values)
    return marked(Image.fromarray(values, mode="F"), not_radiograph)


def marked(image: Image.Image, not_radiograph: bool) -> Image.Image:
    """``image``, carrying the :data:`NOT_A_RADIOGRAPH` mark if ``not_radiograph``."""
    if not_radiograph:
        image.info[NOT_A_RADIOGRAPH] = True
    return image


#: Deflated Explicit VR Little Endian: the whole data set after the file meta is deflated.
DEFLATED = "1.2.840.10008.1.2.1.99"
_CHUNK = 1 << 20


def _inflated(source: bytes | Path) -> io.BytesIO | None:
    """For a deflated file, the same file in memory with its data set inflated (bounded) and
    declared Explicit VR Little Endian; ``None`` for any other file.

    Raises:
        ImageError: the data set inflates past the limit.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as handle:  # noqa: SIM115
        preamble = read_preamble(handle, True)
        meta = _read_file_meta_info(handle)
        if meta.get("TransferSyntaxUID") != DEFLATED:
            return None
        out = io.BytesIO()
        out.write((preamble or bytes(128)) + DICOM_MAGIC)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if "FileMetaInformationGroupLength" in meta:
            del meta.FileMetaInformationGroupLength  # stale once the UID changed; not needed
        write_file_meta_info(out, meta, enforce_standard=False)
        start = out.tell()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        while chunk := handle.read(_CHUNK):
            while chunk:  # at most a chunk of output per step: the bound holds inside a chunk
                out.write(inflater.decompress(chunk, _CHUNK))
                _check_inflated(out.tell() - start)
                chunk = inflater.unconsumed_tail
        out.write(inflater.flush())
        _check_inflated(out.tell() - start)
    out.seek(0)
    return out


def _check_inflated(size: int) -> None:
    if size > MAX_INFLATED_DICOM_BYTES:
        raise ImageError(f"deflated DICOM data set too large once inflated (over "
                         f"{MAX_INFLATED_DICOM_BYTES // 2**20} MiB)")


def _row_blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices of about a million pixels: the LUTs work in float64, one block at a time."""
    step = max(1, 2**20 // max(1, shape[1]))
    return (slice(top, top + step) for top in range(0, shape[0], step))


def _undecodable(dataset: Any) -> str:
    """Why the pixel data could not be decoded: the extra's decoder (GDCM) is not installed
    (what to install), or the data is corrupt or a variant no installed decoder reads."""
    compression = _compression(dataset)
    if not compression:
        return "cannot decode DICOM pixel data (unknown or corrupt transfer syntax)"
    if not dataset.file_meta.TransferSyntaxUID.is_compressed:
        return "cannot decode DICOM pixel data (corrupt or truncated)"
    if importlib.util.find_spec("gdcm") is None:
        return (f"cannot decode DICOM pixel data compressed as {compression}: its decoder is not "
                f"installed ({pip_install('dicom')})")
    return f"cannot decode DICOM pixel data compressed as {compression} (corrupt or unsupported variant)"


def _compression(dataset: Any) -> str:
    """The name of a transfer syntax pydicom knows, from pydicom's own table; ``""`` for any
    other value (a corrupt header can put anything there, patient data included)."""
    try:
        syntax = dataset.file_meta.TransferSyntaxUID
        name = syntax.name
        if name != str(syntax) and name.isprintable() and len(name) <= 120:
            return name
    except Exception:  # noqa: BLE001 - only a nicety for the message
        pass
    return ""
