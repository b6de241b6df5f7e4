"""DICOM input: LUTs, MONOCHROME1, files without an extension, refusals, no patient data."""

from __future__ import annotations

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


def test_undecodable_compression_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "c.dcm", twelve_bit(), syntax=JPEG2000Lossless)
    with pytest.raises(ImageError, match="cannot decode DICOM pixel data"):
        preprocess(path, CONFIG)


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
