"""`capsedge classify` through click's CliRunner: output shapes, exit codes, one-line errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge import __version__, default_model_path
from capsedge.cli import main
from capsedge.metadata import read_metadata, sidecar_path

from conftest import implant_data, synthetic_xray

LABELS = ["Cofield", "Depuy", "Tornier", "Zimmer"]


def run(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: object, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert any(fragment in line for line in lines), result.stderr
    assert all(line.startswith("capsedge: error: ") for line in lines), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_version_and_help() -> None:
    assert __version__ in run("--version").stdout
    result = run("--help")
    assert result.exit_code == 0 and "classify" in result.stdout and "not a medical device" in result.stdout


def test_classify_prints_label_and_every_probability() -> None:
    xray = implant_data() / "Zimmer.40.jpg"
    result = run("classify", str(xray))
    assert result.exit_code == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{xray}: ")
    assert line.split(": ", 1)[1].split(" ")[0] in LABELS
    assert all(f"{label} " in line for label in LABELS)


def test_a_generated_picture_is_not_an_xray(xray_png: Path) -> None:
    """The synthetic test picture is out of distribution: the text names no maker, the CSV says why."""
    table = xray_png.parent / "out.csv"
    result = run("classify", "--csv", str(table), str(xray_png))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{xray_png}: not a shoulder-implant X-ray, no answer: not like")
    assert not any(label in result.stdout for label in LABELS)
    row = next(csv.DictReader(table.open(encoding="utf-8")))
    assert row["answer"] == "" and row["label"] in LABELS and row["out_of_distribution"] == "true"
    assert row["ood_reason"].startswith("not like the shoulder-implant X-rays")
    assert row["model_version"] == "effcaps_ncp_lite0h_512-0.9.0"
    assert float(row["threshold"]) == pytest.approx(0.888, abs=1e-3)


def test_json_output_shape(xray_png: Path) -> None:
    result = run("classify", "--json", str(xray_png), str(xray_png))
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    for record in records:
        assert set(record) == {"path", "answer", "label", "probabilities", "latency_ms", "model_version",
                               "uncertain", "calibrated", "threshold", "out_of_distribution", "ood_reason"}
        assert record["path"] == str(xray_png)
        assert record["model_version"] == "effcaps_ncp_lite0h_512-0.9.0"
        assert list(record["probabilities"]) == LABELS
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)
        assert record["latency_ms"] > 0


def test_batch_goes_on_past_bad_files(tmp_path: Path, xray_png: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    result = run("classify", "--json", str(missing), str(xray_png), str(empty), str(text))
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(missing), str(xray_png), str(empty), str(text)]
    assert "label" in records[1]
    assert [("error" in r) for r in records] == [True, False, True, True]
    assert_one_line_error(result, "3 of 4 images failed")
    assert_one_line_error(result, f"{missing}: no such file")


def test_single_missing_file_exits_non_zero(tmp_path: Path) -> None:
    result = run("classify", str(tmp_path / "nope.png"))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_one_line_error(result, "no such file")


def _bare_model(tmp_path: Path) -> Path:
    """The bundled model without its embedded metadata."""
    model = tmp_path / "bare.tflite"
    data = default_model_path().read_bytes()
    model.write_bytes(data[: data.rfind(b"PK\x03\x04")])  # the archive's one member starts it
    return model


def test_corrupt_model(tmp_path: Path, xray_png: Path) -> None:
    model = tmp_path / "broken.tflite"
    model.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8)))
    sidecar_path(model).write_text(read_metadata(default_model_path()).to_json())
    result = run("classify", "--model", str(model), str(xray_png))
    assert result.exit_code == 1
    assert_one_line_error(result, "not a valid TFLite model")


def test_model_without_metadata(tmp_path: Path, xray_png: Path) -> None:
    model = _bare_model(tmp_path)
    result = run("classify", "--model", str(model), str(xray_png))
    assert result.exit_code == 1
    assert_one_line_error(result, "no capsedge metadata")


def test_metadata_that_does_not_match_the_model(tmp_path: Path, xray_png: Path) -> None:
    model = _bare_model(tmp_path)
    wrong = json.loads(read_metadata(default_model_path()).to_json())
    wrong["preprocessing"]["input_size"] = 64
    sidecar_path(model).write_text(json.dumps(wrong))
    result = run("classify", "--model", str(model), str(xray_png))
    assert result.exit_code == 1
    assert_one_line_error(result, "does not match its metadata")
    wrong["preprocessing"]["input_size"] = read_metadata(default_model_path()).preprocessing.input_size
    wrong["labels"] = ["a", "b", "c"]
    sidecar_path(model).write_text(json.dumps(wrong))
    assert_one_line_error(run("classify", "--model", str(model), str(xray_png)), "3 labels")


def test_missing_model_and_unknown_type(tmp_path: Path, xray_png: Path) -> None:
    assert_one_line_error(run("classify", "--model", str(tmp_path / "x.tflite"), str(xray_png)), "not found")
    other = tmp_path / "model.bin"
    other.write_bytes(b"123")
    assert_one_line_error(run("classify", "--model", str(other), str(xray_png)), "unknown model file type")


def test_unusual_file_names(tmp_path: Path) -> None:
    path = tmp_path / "Röntgen Bild ümlaut 1.png"
    Image.fromarray(synthetic_xray()).save(path)
    result = run("classify", "--json", str(path))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(path)


def test_directory_walk_and_csv(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(synthetic_xray(seed=1)).save(folder / "a.png")
    Image.fromarray(synthetic_xray(seed=2)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("skipped: not an image suffix")
    (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    (folder / "IM0001").write_bytes(b"no suffix, so taken, and it is not an image")
    table = tmp_path / "out.csv"
    result = run("classify", "--json", "--csv", str(table), str(folder))
    assert result.exit_code == 1  # IM0001 is not an image
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert paths == [str(folder / "IM0001"), str(folder / "a.png"), str(folder / "sub" / "b.jpg")]
    rows = table.read_text(encoding="utf-8").splitlines()
    assert rows[0] == ("path,label,answer,p_Cofield,p_Depuy,p_Tornier,p_Zimmer,latency_ms,model_version,"
                       "uncertain,threshold,out_of_distribution,ood_reason,error")
    assert len(rows) == 4 and rows[1].endswith("not a readable image") and rows[2].split(",")[1] in LABELS


def test_empty_directory(tmp_path: Path) -> None:
    result = run("classify", str(tmp_path))
    assert result.exit_code == 1
    assert_one_line_error(result, "no images found")


def test_empty_model_file(tmp_path: Path, xray_png: Path) -> None:
    model = tmp_path / "empty.tflite"
    model.write_bytes(b"")
    sidecar_path(model).write_text(read_metadata(default_model_path()).to_json())
    result = run("classify", "--model", str(model), str(xray_png))
    assert result.exit_code == 1
    assert_one_line_error(result, "not a valid TFLite model")


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One helper (capsedge.extras.require) imports every optional package; its error says what
    to install, and a module of capsedge itself missing is a bug shown as such."""
    from capsedge.errors import RuntimeMissingError
    from capsedge.extras import require

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if not installed
    with pytest.raises(RuntimeMissingError) as info:
        require("pydicom", extra="dicom", needed_by="a DICOM file")
    assert str(info.value) == "a DICOM file needs pydicom: pip install 'capsedge[dicom]'"
    with pytest.raises(ImportError):
        require("capsedge.no_such_module", extra="serve")
    with pytest.raises(ValueError, match="unknown extra"):
        require("pydicom", extra="dicomm")
    dicom = tmp_path / "scan.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    result = run("classify", str(dicom))
    assert result.exit_code == 1
    assert "a DICOM file needs pydicom: pip install 'capsedge[dicom]'" in result.stderr
