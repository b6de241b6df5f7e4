"""A pydicom decoder plugin for 12-bit JPEG Extended (lossy CR/DX X-rays) through GDCM.

pydicom 3's own GDCM plugin refuses 12-bit JPEG Extended, and the only other plugin that
decodes it, pylibjpeg-libjpeg, is GPL-3.0, which this Apache-2.0 package does not depend on.
GDCM itself decodes it: pydicom's reference values for its ``JPGExtended.dcm`` and
``JPEG-lossy.dcm`` test files are met (``tests/test_dicom.py``). :func:`capsedge.dicom.read_dicom`
registers this module with pydicom's decoder (its documented plugin interface).
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import JPEGExtended12Bit

from .quiet import native_stderr_silenced

try:
    import gdcm

    HAVE_GDCM = True
except ImportError:
    HAVE_GDCM = False

#: What pydicom reports as missing when GDCM is not installed.
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("gdcm>=3.0.10",)}


def is_available(uid: str) -> bool:
    """The plugin decodes 12-bit JPEG Extended when GDCM is installed."""
    return HAVE_GDCM and uid in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner: Any) -> bytes:
    """One encoded frame ``src`` to raw pixels, laid out as ``runner`` (a pydicom
    ``DecodeRunner``) describes: ``bits_allocated`` per sample, one frame."""
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))))
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated, bits, bits - 1,
                                          runner.pixel_representation))
    # GDCM's libjpeg first tries its 16-bit decoder and prints "Unsupported JPEG data
    # precision 12" to the process's stderr before the 12-bit one succeeds.
    with native_stderr_silenced():
        frame = image.GetBuffer()
    expected = runner.rows * runner.columns * runner.samples_per_pixel * (runner.bits_allocated // 8)
    data = frame.encode("utf-8", "surrogateescape")  # GDCM hands the char* back as str
    if len(data) != expected:
        raise ValueError("GDCM could not decode the JPEG Extended frame")
    return data
