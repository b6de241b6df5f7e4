"""DICOM input: LUTs, MONOCHROME1, files without an extension, refusals, no patient data."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from capsedge.cli import main
from capsedge.errors import ImageError
from capsedge.preprocess import Preprocessing, preprocess

from conftest import synthetic_xray

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

CONFIG = Preprocessing(input_size=32)
#: The compressed transfer syntaxes decode through python-gdcm (the dicom extra); without it the
#: message names the extra (test_without_the_decoders_the_message_names_the_extra).
NEEDS_GDCM = pytest.mark.skipif(importlib.util.find_spec("gdcm") is None,
                                reason="needs python-gdcm: pip install 'capsedge[dicom]'")
SECRET = "Secret^Patient"


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", frames: int = 1,
                syntax: str = ExplicitVRLittleEndian, **header: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = SECRET
    ds.PatientID = "ID-12345"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in header.items():
        setattr(ds, key, value)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:
        ds.PixelData = encapsulate([b"\x00\x01garbage-not-a-codestream" * 4])
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def twelve_bit() -> np.ndarray:
    return synthetic_xray().astype(np.uint16) * 16


def test_monochrome2_matches_the_same_picture_as_png(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", twelve_bit(), RescaleSlope=2, RescaleIntercept=-100)
    np.testing.assert_allclose(preprocess(path, CONFIG), preprocess(synthetic_xray(), CONFIG), atol=1e-4)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    inverted = 4095 - twelve_bit()
    path = write_dicom(tmp_path / "b.dcm", inverted, photometric="MONOCHROME1")
    np.testing.assert_allclose(preprocess(path, CONFIG), preprocess(synthetic_xray(), CONFIG), atol=1e-4)


def test_window_is_applied(tmp_path: Path) -> None:
    pixels = twelve_bit()
    windowed = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=1000, WindowWidth=600)
    plain = write_dicom(tmp_path / "p.dcm", pixels)
    assert not np.allclose(preprocess(windowed, CONFIG), preprocess(plain, CONFIG), atol=1e-2)


def test_file_without_extension_is_recognised(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM000001", twelve_bit())
    assert preprocess(path, CONFIG).shape == (32, 32, 1)
    assert preprocess(path.read_bytes(), CONFIG).shape == (32, 32, 1)


def test_multi_frame_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "m.dcm", np.stack([twelve_bit()] * 2), frames=2)
    with pytest.raises(ImageError, match="multi-frame"):
        preprocess(path, CONFIG)


#: No message ends in an exception's class name, as "(RuntimeError)" did.
CLASS_NAME = re.compile(r"\(\w*(Error|Exception|Warning)\)")


@NEEDS_GDCM
def test_a_corrupt_codestream_is_refused_in_words(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "c.dcm", twelve_bit(), syntax=JPEG2000Lossless)
    with pytest.raises(ImageError, match="cannot decode DICOM pixel data") as error:
        preprocess(path, CONFIG)
    assert "corrupt" in str(error.value) and not CLASS_NAME.search(str(error.value))


def test_truncated_uncompressed_pixels_are_refused_in_words(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "t.dcm", twelve_bit())
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path)
    with pytest.raises(ImageError) as error:
        preprocess(path, CONFIG)
    assert str(error.value) == "cannot decode DICOM pixel data (corrupt or truncated)"


def pydicom_test_file(name: str) -> Path:
    """One of the files pydicom ships (never downloaded: ``download=False``)."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom does not ship {name}")
    return Path(found)


# The transfer syntaxes hospital PACS exports use, in pydicom's own test files. The lossless
# ones are the same 64x64 MR image as the uncompressed MR_small.dcm.
LOSSLESS = ["MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
            "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
            "MR_small_RLE.dcm"]  # RLE Lossless
LOSSY = ["JPGExtended.dcm",  # JPEG Extended, 12-bit
         "JPEG-lossy.dcm",  # JPEG Extended, 12-bit, a broken scan stop value
         "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, 8-bit
         "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless, first-order prediction (process 14, SV1)
         "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
         "JPEG2000.dcm"]  # JPEG 2000


@NEEDS_GDCM
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_compressed_dicom_decodes_to_the_uncompressed_image(name: str) -> None:
    from capsedge.dicom import read_dicom

    reference = np.asarray(read_dicom(pydicom_test_file("MR_small.dcm")))
    np.testing.assert_array_equal(np.asarray(read_dicom(pydicom_test_file(name))), reference)


@NEEDS_GDCM
@pytest.mark.parametrize("name", LOSSY)
def test_compressed_dicom_decodes(name: str) -> None:
    image = np.asarray(preprocess(pydicom_test_file(name), CONFIG))
    assert image.shape == (32, 32, 1) and np.isfinite(image).all() and image.std() > 0


@NEEDS_GDCM
@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_twelve_bit_jpeg_extended_meets_pydicoms_reference_values(name: str) -> None:
    """pydicom's own reference pixels for these files (its tests/pixels/pixels_reference.py),
    decoded through capsedge's GDCM plugin: pydicom's GDCM plugin refuses 12 bits."""
    from capsedge.dicom import _register_plugins

    _register_plugins()
    pixels = pydicom.dcmread(pydicom_test_file(name)).pixel_array
    assert pixels[420, 140] == 244 and pixels[230, 120] == 95


@NEEDS_GDCM
def test_twelve_bit_jpeg_prints_nothing_from_the_native_decoder() -> None:
    """GDCM's libjpeg writes "Unsupported JPEG data precision 12" to fd 2 before it succeeds."""
    path = pydicom_test_file("JPGExtended.dcm")
    code = f"from capsedge.dicom import read_dicom; print(read_dicom({str(path)!r}).size)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "(256, 1024)" and run.stderr == "", run.stderr


def test_without_the_decoders_the_message_names_the_extra() -> None:
    """With GDCM missing, a compressed file is refused with what to install, in words."""
    path = pydicom_test_file("MR_small_jpeg_ls_lossless.dcm")
    code = ("import sys; sys.modules['gdcm'] = None\n"
            "from capsedge.dicom import read_dicom\n"
            f"try:\n    read_dicom({str(path)!r})\nexcept Exception as exc:\n    print(exc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    message = run.stdout.strip()
    assert message == ("cannot decode DICOM pixel data compressed as JPEG-LS Lossless Image Compression: "
                       "its decoder is not installed (pip install 'capsedge[dicom]')"), run.stderr


def test_broken_dicom_is_an_image_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 50)
    with pytest.raises(ImageError):
        preprocess(path, CONFIG)


def test_patient_data_never_printed(tmp_path: Path) -> None:
    good = write_dicom(tmp_path / "good.dcm", twelve_bit())
    bad = write_dicom(tmp_path / "multi.dcm", np.stack([twelve_bit()] * 2), frames=2)
    for args in (["classify", str(good), str(bad)], ["classify", "--json", str(good), str(bad)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1
        assert "Secret" not in result.stdout + result.stderr
        assert "ID-12345" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "header",
    [{"WindowCenter": 100, "WindowWidth": 0}, {"RescaleSlope": "abc"}, {"NumberOfFrames": "x"}],
)
def test_bad_header_values_are_image_errors_and_the_batch_goes_on(tmp_path: Path, header: dict) -> None:
    bad = tmp_path / "bad.dcm"
    try:
        write_dicom(bad, twelve_bit(), **header)
    except Exception:  # noqa: BLE001 - pydicom may refuse to write some of them
        pytest.skip(f"pydicom cannot write {header}")
    good = write_dicom(tmp_path / "good.dcm", twelve_bit())
    result = CliRunner().invoke(main, ["classify", str(bad), str(good)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "good.dcm: " in result.stdout
    assert result.stderr.startswith(f"capsedge: error: {bad}: ")


def test_a_png_named_dcm_is_read_as_a_png(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "mislabelled.dcm"
    Image.fromarray(synthetic_xray()).save(path, format="PNG")
    np.testing.assert_allclose(preprocess(path, CONFIG), preprocess(synthetic_xray(), CONFIG), atol=1e-6)


def test_a_dicom_that_says_it_is_no_radiograph_gets_no_answer(tmp_path: Path) -> None:
    """The same pixels as CR go to the model; as MR or an ophthalmic tomogram (OPT) they are out of
    distribution by their Modality, whatever the features say, and the code is never quoted."""
    import json

    from capsedge.classifier import NOT_A_RADIOGRAPH_REASON

    files = [write_dicom(tmp_path / f"{name}.dcm", twelve_bit(), Modality=code)
             for name, code in (("radiograph", "CR"), ("mr", "MR"), ("tomogram", "opt "))]
    result = CliRunner().invoke(main, ["classify", "--json", *map(str, files)])
    assert result.exit_code == 0, result.output
    records = {Path(r["path"]).stem: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["radiograph"]["ood_reason"] != NOT_A_RADIOGRAPH_REASON
    for name in ("mr", "tomogram"):
        assert records[name]["out_of_distribution"] is True and records[name]["answer"] is None
        assert records[name]["ood_reason"] == NOT_A_RADIOGRAPH_REASON
    assert "OPT" not in result.stdout.upper() and "Secret" not in result.stdout
