"""Hostile DICOM headers (issue 16): no header value in any output, one ImageError per file.

Thousands of headers are mutated in memory (wrong lengths, unknown VRs, flipped
bytes, truncation) and read directly; a few go through the CLI. Every patient
and study field holds a marker, and no marker, nor any 4-character piece of
one, may appear in a message, on stdout or stderr, in JSON or in the CSV.
"""

from __future__ import annotations

import io
import json
import re
import warnings
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
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage  # noqa: E402

CONFIG = Preprocessing(input_size=16)
#: Letters that make no English word or message of ours: no 4-letter piece of a marker can
#: appear in an output by chance.
MARKERS = {
    "PatientName": "QZXJ^VKWQ",
    "PatientID": "JXQZWVKX",
    "PatientBirthDate": "XWQJZVQK",
    "InstitutionName": "KQVZJXWJ",
    "AccessionNumber": "WZKXQJVZ",
    "StudyDescription": "VJWKZQXQ",
    "ReferringPhysicianName": "ZKJW^QXVW",
}
PIECES = sorted({value[i : i + 4] for value in MARKERS.values() for i in range(len(value) - 3)})
LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OL", b"OV"}


def leaked(text: str) -> list[str]:
    return [piece for piece in PIECES if piece in text]


def seed_dicom() -> bytes:
    """A small, valid, explicit VR little endian file with a marker in every patient/study field."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CR"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a birth date of letters: pydicom warns, and keeps it
        for keyword, value in MARKERS.items():
            setattr(ds, keyword, value)
    pixels = synthetic_xray((24, 20)).astype(np.uint16) * 16
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


SEED = seed_dicom()


def elements(data: bytes) -> list[tuple[int, int, int]]:
    """``(offset, length field offset, length field size)`` of each top-level element."""
    found, position = [], 132
    while position + 8 <= len(data):
        vr = data[position + 4 : position + 6]
        if vr in LONG_VRS:
            found.append((position, position + 8, 4))
            length = int.from_bytes(data[position + 8 : position + 12], "little")
            position += 12 + length
        else:
            found.append((position, position + 6, 2))
            position += 8 + int.from_bytes(data[position + 6 : position + 8], "little")
    return found


ELEMENTS = elements(SEED)
PIXEL_DATA = SEED.find(b"\xe0\x7f\x10\x00")


def mutate(rng: np.random.Generator) -> bytes:
    data = bytearray(SEED)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 5))
        offset, length_at, size = ELEMENTS[int(rng.integers(0, len(ELEMENTS)))]
        if kind == 0:  # a wrong length: short, long, or far past the end
            value = int(rng.choice([rng.integers(0, 400), rng.integers(0, 2**16), 2**size - 1]))
            data[length_at : length_at + size] = min(value, 2**(8 * size) - 1).to_bytes(size, "little")
        elif kind == 1:  # an unknown or wrong VR
            data[offset + 4 : offset + 6] = bytes(rng.integers(65, 91, 2, dtype=np.uint8))
        elif kind == 2:  # random bytes anywhere in the header
            for position in rng.integers(0, PIXEL_DATA, int(rng.integers(1, 8))):
                data[int(position) % len(data)] = int(rng.integers(0, 256))
        elif kind == 3:  # a wrong tag
            data[offset : offset + 4] = bytes(rng.integers(0, 256, 4, dtype=np.uint8))
        else:  # truncated
            del data[int(rng.integers(133, len(data))) :]
    return bytes(data)


def test_the_seed_is_read_and_holds_the_markers() -> None:
    assert preprocess(SEED, CONFIG).shape == (16, 16, 1)
    assert all(marker.encode() in SEED for marker in MARKERS.values())


def test_a_wrong_transfer_syntax_length_quotes_nothing_from_the_header(tmp_path: Path) -> None:
    """The issue's example: the syntax UID's length swallows the patient's fields."""
    data = bytearray(SEED)
    syntax = data.find(b"\x02\x00\x10\x00UI")
    rows = data.find(b"\x28\x00\x02\x00")  # the element after the patient and study fields
    data[syntax + 6 : syntax + 8] = (rows - syntax - 8).to_bytes(2, "little")
    path = tmp_path / "swallowed.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as error:
        preprocess(path, CONFIG)
    assert not leaked(str(error.value)), str(error.value)
    table = tmp_path / "out.csv"
    for args in (["--json", "--csv", str(table)], []):
        result = CliRunner().invoke(main, ["classify", *args, str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert not leaked(result.stdout + result.stderr + table.read_text()), result.output


def test_thousands_of_mutated_headers_are_one_line_image_errors_quoting_nothing(
        capfd: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(16)
    outcomes = {"read": 0, "refused": 0}
    for _ in range(2500):
        data = mutate(rng)
        try:
            tensor = preprocess(data, CONFIG)
        except ImageError as exc:
            message = str(exc)
            assert message and "\n" not in message and not leaked(message), message
            outcomes["refused"] += 1
        else:
            assert tensor.shape == (16, 16, 1) and np.isfinite(tensor).all()
            outcomes["read"] += 1
    printed = capfd.readouterr()
    assert not leaked(printed.out + printed.err)
    assert min(outcomes.values()) > 50, outcomes  # both kinds of outcome were exercised


def test_mutated_files_through_the_cli_leak_nothing_and_the_batch_goes_on(tmp_path: Path) -> None:
    rng = np.random.default_rng(61)
    folder = tmp_path / "study"
    folder.mkdir()
    for i in range(12):
        (folder / f"IM{i:04d}").write_bytes(mutate(rng))
    (folder / "IM9999").write_bytes(SEED)
    table = tmp_path / "out.csv"
    for args in (["--json", "--csv", str(table)], []):
        result = CliRunner().invoke(main, ["classify", *args, str(folder)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert not leaked(result.stdout + result.stderr + table.read_text()), result.output
        assert all(line.startswith("capsedge: error: ") for line in result.stderr.splitlines())
        if args:
            records = [json.loads(line) for line in result.stdout.splitlines()]
            assert len(records) == 13 and "label" in records[-1]


@pytest.mark.parametrize(
    ("tag", "offset", "value"),
    [(b"\x28\x00\x10\x00", 4, b"QQ"), (b"\x28\x00\x10\x00", 4, b"UL"), (b"\x02\x00\x10\x00", 4, b"FD")],
    ids=["unknown-vr", "bytes-length", "bytes-length-in-file-meta"],
)
def test_pydicom_exceptions_are_image_errors(tag: bytes, offset: int, value: bytes) -> None:
    """Rows with an unknown VR (NotImplementedError) or a 4-byte VR for its 2 bytes
    (BytesLengthException); the transfer syntax as a float."""
    data = bytearray(SEED)
    at = data.find(tag) + offset
    data[at : at + 2] = value
    with pytest.raises(ImageError) as error:
        preprocess(bytes(data), CONFIG)
    assert not leaked(str(error.value)) and "\n" not in str(error.value)
    assert not re.search(r"\(\w*(Error|Exception)\)", str(error.value)), str(error.value)  # words, no class
