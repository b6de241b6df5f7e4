"""Hardening, round three (issue 25), outside the service: deflated-DICOM bombs, outputs that
would overwrite inputs, corrupt model files, and threads sharing one Classifier."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge import Classifier, ModelError
from capsedge.bundled import bundled_digest
from capsedge.classifier import default_model_path
from capsedge.cli import main
from capsedge.limits import MAX_INFLATED_DICOM_BYTES
from capsedge.model_guard import file_digest

from conftest import bench_script, synthetic_xray

#: A byte of the bundled model (offset, new value) that makes LiteRT abort the process in
#: allocate_tensors: for 0.9.0's file, one of the seven crashes among 2,000 random one-byte mutants
#: (seed 1). A new bundled file needs a new one: `python bench/model_fuzz.py` lists them.
CRASHING_BYTE = (4_099_416, 133)


def run(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: object, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsedge: error: ") and fragment in lines[0], lines


# --- 3. deflated DICOM: the inflated size is bounded ---------------------------------------------

def deflated_bomb(path: Path, inflated_mib: int) -> Path:
    """A deflated-explicit-VR DICOM whose data set (Rows, Columns, then a private element of
    zeros) inflates to ``inflated_mib`` MiB: about 1 KiB on disk per MiB."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(bytes(128) + b"DICM")
    write_file_meta_info(head, meta)
    body = b"".join(struct.pack("<HH2sHH", 0x28, element, b"US", 2, 64) for element in (0x10, 0x11))
    body += struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, inflated_mib << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with path.open("wb") as handle:
        handle.write(head.getvalue() + deflate.compress(body))
        for _ in range(inflated_mib):
            handle.write(deflate.compress(zeros))
        handle.write(deflate.flush())
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mib = MAX_INFLATED_DICOM_BYTES // 2**20 + 44
    return deflated_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm", mib)


def test_deflated_dicom_bomb_is_refused_with_bounded_memory(bomb: Path, tmp_path: Path) -> None:
    """300 MiB inflated from 300 KiB: refused past the limit, the process never holding it all
    (pydicom alone inflates it whole, then copies it: 700 MiB peak)."""
    assert bomb.stat().st_size < 1 << 20
    peak = tmp_path / "peak"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest).
    script = ("import re, sys\nfrom capsedge.cli import main\n"
              "try:\n    main(['classify', sys.argv[1]])\nexcept SystemExit as exc:\n    code = exc.code\n"
              "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]\n"
              "open(sys.argv[2], 'w').write(f'{code} {peak}')")
    done = subprocess.run([sys.executable, "-c", script, str(bomb), str(peak)], capture_output=True,
                          text=True, timeout=120)
    code, kib = peak.read_text().split()
    assert code == "1" and done.stdout == ""
    assert done.stderr.strip() == (f"capsedge: error: {bomb}: deflated DICOM data set too large once "
                                   f"inflated (over {MAX_INFLATED_DICOM_BYTES // 2**20} MiB)")
    assert int(kib) / 1024 < 500, f"peak {int(kib) / 1024:.0f} MiB"


def test_deflated_dicom_is_still_read(tmp_path: Path) -> None:
    """A deflated file under the limit gives the same answer as its uncompressed original, from a
    path and from bytes."""
    pydicom = pytest.importorskip("pydicom")
    from test_dicom import write_dicom

    plain = write_dicom(tmp_path / "plain.dcm", synthetic_xray().astype(np.uint16) * 16)
    dataset = pydicom.dcmread(plain)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    dataset.save_as(deflated)
    assert pydicom.dcmread(deflated).file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    classifier = Classifier.load()
    expected = classifier.classify(plain).probabilities
    assert classifier.classify(deflated).probabilities == expected
    assert classifier.classify(deflated.read_bytes()).probabilities == expected


# --- 7. no output path overwrites an input -------------------------------------------------------

def test_explain_never_overwrites_its_image_or_the_model(tmp_path: Path, xray_png: Path) -> None:
    original = xray_png.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(xray_png)
    for target in (xray_png, link, tmp_path / ".." / tmp_path.name / xray_png.name):
        result = run("explain", str(xray_png), "--grid", "2", "--out", str(target))
        one_line_error(result, "refusing to overwrite")
    assert xray_png.read_bytes() == original
    model = tmp_path / "model.tflite"
    model.write_bytes(default_model_path().read_bytes())
    result = run("explain", str(xray_png), "--grid", "2", "--model", str(model), "--out", str(model))
    one_line_error(result, "refusing to overwrite")
    assert model.read_bytes() == default_model_path().read_bytes()
    # The default output, <name>.explain.png in the working folder, is the image itself here.
    (tmp_path / "x.png.explain.png").write_bytes(original)
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        one_line_error(run("explain", "x.png.explain.png", "--grid", "2", "--out",
                           "x.png.explain.png"), "refusing")
    finally:
        os.chdir(cwd)
    assert run("explain", str(xray_png), "--grid", "2", "--out", str(tmp_path / "o.png")).exit_code == 0


def test_train_and_export_never_write_into_their_inputs(tmp_path: Path, xray_png: Path) -> None:
    pytest.importorskip("tensorflow")
    data = tmp_path / "data"
    for seed, label in enumerate(("Depuy", "Zimmer")):
        (data / label).mkdir(parents=True)
        Image.fromarray(synthetic_xray(seed=seed)).save(data / label / "a.png")
    for out in (data, data / "run", data / "Depuy"):
        one_line_error(run("train", "--data", str(data), "--out", str(out)), "refusing to write there")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    one_line_error(run("export", "--model", str(run_dir), "--out", str(run_dir)), "refusing to overwrite")
    one_line_error(run("export", "--model", str(run_dir), "--out", str(data), "--calib", str(data)),
                   "refusing to overwrite")


# --- 8. a corrupt model file is a one-line ModelError, never a native abort -----------------------

def mutant(tmp_path: Path) -> Path:
    offset, value = CRASHING_BYTE
    if offset is None:
        pytest.skip("no crashing byte recorded for this model")
    data = bytearray(default_model_path().read_bytes())
    data[offset] = value
    path = tmp_path / "mutant.tflite"
    path.write_bytes(bytes(data))
    return path


def test_bundled_model_matches_its_checksum() -> None:
    assert file_digest(default_model_path()) == bundled_digest(), \
        "the bundled model changed: write its sha256sum into edge/assets/default.sha256"


def test_a_model_that_crashes_litert_is_a_model_error(tmp_path: Path) -> None:
    path = mutant(tmp_path)
    raw = ("import sys\nfrom ai_edge_litert.interpreter import Interpreter\n"
           "Interpreter(model_path=sys.argv[1]).allocate_tensors()")
    crashed = subprocess.run([sys.executable, "-c", raw, str(path)], capture_output=True, timeout=60)
    assert crashed.returncode < 0, "the recorded byte no longer crashes LiteRT: find another"
    # In a child: on the unguarded code this aborted the process (exit 134, empty stderr).
    for args in (["classify", "--model", str(path), str(default_model_path())],
                 ["bench", "--model", str(path), "--runs", "1", "--warmup", "0"]):
        done = subprocess.run([sys.executable, "-m", "capsedge.cli", *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1, (args, done.returncode)
        assert "the runtime crashed loading it" in done.stderr and "Traceback" not in done.stderr
    script = ("import sys\nfrom capsedge import Classifier, ModelError\ntry:\n"
              "    Classifier.load(sys.argv[1])\nexcept ModelError as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == \
        "not a valid TFLite model (the runtime crashed loading it: corrupt file)"


def test_the_fuzz_script_tells_how_the_runtime_ends_on_each_mutant(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/model_fuzz.py: each mutant changes one byte; the guard's trial tells a file that runs,
    one the runtime refuses and one that crashes it; each that does not run is a ModelError."""
    from capsedge.model_guard import trial

    fuzz = bench_script("model_fuzz", monkeypatch)
    data = default_model_path().read_bytes()
    drawn = fuzz.draw_mutants(len(data), 50, seed=3)
    assert drawn == fuzz.draw_mutants(len(data), 50, seed=3) != fuzz.draw_mutants(len(data), 50, seed=4)
    assert len({offset for offset, _ in drawn}) == 50 and all(1 <= shift <= 255 for _, shift in drawn)
    changed, value = fuzz.mutate(data, *drawn[0])
    differs = np.flatnonzero(np.frombuffer(changed, np.uint8) != np.frombuffer(data, np.uint8))
    assert differs.tolist() == [drawn[0][0]] and changed[drawn[0][0]] == value

    copy = tmp_path / "copy.tflite"
    copy.write_bytes(data)
    assert trial(copy) == "runs"
    offset, crashing = CRASHING_BYTE
    shift = (crashing - data[offset]) % 256
    assert fuzz.try_mutant(data, offset, shift, tmp_path) == (offset, crashing, "crash")
    assert data[4:8] == b"TFL3"  # the file identifier: LiteRT raises an error on another
    assert fuzz.try_mutant(data, 4, 1, tmp_path) == (4, data[4] + 1, "error")
    assert fuzz.load_outcome(data, offset, crashing, tmp_path) == "ModelError"
    assert fuzz.load_outcome(data, 4, data[4] + 1, tmp_path) == "ModelError"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.tflite"]  # the mutants are removed


def test_a_corrupt_bundled_model_is_refused_before_litert(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Any changed byte of the bundled file (even one LiteRT would survive) is refused."""
    import capsedge.bundled

    data = bytearray(default_model_path().read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt = tmp_path / "default.tflite"
    corrupt.write_bytes(bytes(data))
    (tmp_path / "default.sha256").write_text(bundled_digest())
    monkeypatch.setattr(capsedge.bundled, "default_model_path", lambda: corrupt)
    with pytest.raises(ModelError, match="bundled model file is corrupt"):
        Classifier.load()


# --- 9. threads sharing a Classifier leave no global state changed --------------------------------

def test_threads_leave_warnings_and_loggers_as_they_were(tmp_path: Path) -> None:
    """8 threads decode PNG and DICOM (each classifies once, then preprocesses 40 times: the
    decoders are where the filters were swapped). Unguarded, every run left the host's first
    warnings filter 'ignore' and pydicom's logger silenced."""
    pytest.importorskip("pydicom")
    from test_dicom import write_dicom

    from capsedge.preprocess import preprocess

    dicom = write_dicom(tmp_path / "scan.dcm", synthetic_xray().astype(np.uint16) * 16).read_bytes()
    buffer = io.BytesIO()
    Image.fromarray(synthetic_xray()).save(buffer, format="PNG")
    images = [dicom, buffer.getvalue()]
    classifier = Classifier.load()
    logger = logging.getLogger("pydicom")
    filters = warnings.filters
    before = (list(filters), logger.level, logger.propagate, logger.disabled)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            classifier.classify(images[index % 2])
            for round_ in range(40):
                preprocess(images[(index + round_) % 2], classifier.metadata.preprocessing)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert warnings.filters is filters and list(warnings.filters) == before[0]
    assert (logger.level, logger.propagate, logger.disabled) == before[1:]
