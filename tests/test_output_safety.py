"""Valid output for every input (issue 16): strict JSON, no NaN, no forged lines, no destroyed
files, spreadsheet-safe CSV, unreadable folders, and ImageError for any object that is not an image."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge import Classifier, ImageError, ModelError
from capsedge.classifier import default_model_path
from capsedge.cli import main
from capsedge.metadata import read_metadata, sidecar_path
from capsedge.preprocess import Preprocessing, preprocess

from conftest import synthetic_xray

CONFIG = Preprocessing(input_size=16)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.load()


def run(*args: str) -> object:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    assert all(line.startswith("capsedge: error: ") for line in result.stderr.splitlines()), result.stderr
    return result


def strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def float_tiff(path: Path, value: float) -> Path:
    pixels = synthetic_xray((30, 20)).astype(np.float32)
    pixels[5, 5] = value
    Image.fromarray(pixels, mode="F").save(path)
    return path


# 3. Non-finite pixels are refused; non-finite probabilities are an error, never output.

@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_pixels_are_refused(tmp_path: Path, value: float) -> None:
    with pytest.raises(ImageError, match="non-finite"):
        preprocess(float_tiff(tmp_path / "f.tif", value), CONFIG)
    array = synthetic_xray().astype(np.float64)
    array[0, 0] = value
    with pytest.raises(ImageError, match="non-finite"):
        preprocess(array, CONFIG)


def test_nan_tiffs_give_strict_json_and_no_nan_text(tmp_path: Path, xray_png: Path) -> None:
    nan_everywhere = tmp_path / "nan.tif"
    Image.fromarray(np.full((20, 20), np.nan, np.float32), mode="F").save(nan_everywhere)
    inputs = [str(float_tiff(tmp_path / "inf.tif", np.inf)), str(nan_everywhere), str(xray_png)]
    result = run("classify", "--json", *inputs)
    records = [strict_json(line) for line in result.stdout.splitlines()]
    assert [("error" in r) for r in records] == [True, True, False]
    text = run("classify", *inputs)
    assert not re.search(r"\bnan\b", text.stdout.lower()) and text.exit_code == 1


def test_non_finite_probabilities_are_a_one_line_error(classifier: Classifier, xray_png: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    nan = np.full(len(classifier.labels), np.nan, np.float32)
    monkeypatch.setattr(Classifier, "predict_tensor", lambda self, tensor: nan)
    with pytest.raises(ModelError, match="non-finite"):
        classifier.classify(xray_png)
    result = run("classify", "--json", str(xray_png))
    assert result.exit_code == 1 and "non-finite" in strict_json(result.stdout)["error"]


# 7. A folder that can be listed but not entered fails alone; the walk goes on.

def test_unreadable_folders_fail_alone_and_the_walk_goes_on(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    study = tmp_path / "study"
    for folder in ("a", "locked", "listed_only", "z"):
        (study / folder).mkdir(parents=True)
        Image.fromarray(synthetic_xray()).save(study / folder / "x.png")
    locked, listed_only = study / "locked", study / "listed_only"
    if os.geteuid() != 0:
        locked.chmod(0o000)  # cannot be listed
        listed_only.chmod(0o644)  # can be listed, not entered: its entries cannot be examined
    else:  # root reads anything: make the same system calls fail as they would for a user
        real_scandir, real_is_file = os.scandir, Path.is_file

        def scandir(path: object) -> object:
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        def is_file(path: Path) -> bool:
            if path.parent == listed_only:
                raise PermissionError(13, "Permission denied", str(path))
            return real_is_file(path)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(Path, "is_file", is_file)
    try:
        result = run("classify", "--json", str(study))
    finally:
        locked.chmod(0o755)
        listed_only.chmod(0o755)
    records = [strict_json(line) for line in result.stdout.splitlines()]
    classified = [r["path"] for r in records if "label" in r]
    assert classified == [str(study / "a" / "x.png"), str(study / "z" / "x.png")]
    errors = [r for r in records if "error" in r]
    assert {Path(r["path"]).parent if Path(r["path"]).name == "x.png" else Path(r["path"]) for r in errors} \
        == {locked, listed_only}
    assert all("permission denied" in r["error"] for r in errors)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 3  # two failures and the summary


# 8. Output that forges or destroys.

def test_control_characters_in_names_cannot_forge_lines(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    forged = "a\nb.png: Zimmer (99.0 %)   Cofield   0.0 %\x1b[2J.png"
    Image.fromarray(synthetic_xray()).save(forged, format="PNG")
    broken = "c\rnot an image\n.png"
    Path(broken).write_text("not an image")
    result = run("classify", forged, broken)
    assert len(result.stdout.splitlines()) == 1 and result.stdout.startswith("a\\nb.png: ")
    assert "\x1b" not in result.stdout + result.stderr and "\r" not in result.stderr
    assert len(result.stderr.splitlines()) == 2 and "c\\rnot an image\\n.png: " in result.stderr
    records = [strict_json(line) for line in run("classify", "--json", forged, broken).stdout.splitlines()]
    assert [r["path"] for r in records] == [forged, broken]


def test_csv_never_overwrites_an_input_or_the_model(tmp_path: Path, xray_png: Path) -> None:
    original = xray_png.read_bytes()
    link = tmp_path / "link.png"
    link.symlink_to(xray_png)
    hard = tmp_path / "hard.png"
    os.link(xray_png, hard)
    for target in (xray_png, link, hard, tmp_path / ".." / tmp_path.name / "xray.png"):
        result = run("classify", "--csv", str(target), str(tmp_path))
        assert result.exit_code == 1 and "refusing to overwrite" in result.stderr and result.stdout == ""
    assert xray_png.read_bytes() == original
    model = tmp_path / "model.tflite"
    model.write_bytes(default_model_path().read_bytes())
    result = run("classify", "--model", str(model), "--csv", str(model), str(xray_png))
    assert result.exit_code == 1 and model.read_bytes() == default_model_path().read_bytes()


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png", "\tx.png", "\rx.png", "plain.png"]
    for name in names:
        Image.fromarray(synthetic_xray()).save(name, format="PNG")
    model = tmp_path / "m.tflite"
    data = default_model_path().read_bytes()
    model.write_bytes(data[: data.rfind(b"PK\x03\x04")])
    metadata = json.loads(read_metadata(default_model_path()).to_json())
    metadata["labels"] = ["=A", "+B", "-C", "@D"]
    sidecar_path(model).write_text(json.dumps(metadata))
    run("classify", "--model", str(model), "--csv", "out.csv", "--", *names)
    with open("out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    assert [row[0] for row in rows] == ["'" + name for name in names[:-1]] + ["plain.png"]
    assert all(row[1] in ("'=A", "'+B", "'-C", "'@D") for row in rows)


# 9. Any object that is not an image is an ImageError, not a TypeError.

@pytest.mark.parametrize(
    "source",
    [None, 42, 3.5, True, [[1, 2], [3, 4]], [[[0]]], {"a": 1}, object(), "", "bad\0path", b"",
     np.array([["a"]], dtype=object), np.zeros((0, 5))],
    ids=lambda source: type(source).__name__,
)
def test_objects_that_are_not_images_are_image_errors(classifier: Classifier, source: object) -> None:
    with pytest.raises(ImageError) as error:
        classifier.classify(source)
    assert "\n" not in str(error.value)


def test_text_mode_and_failing_file_objects_are_image_errors(classifier: Classifier, xray_png: Path) -> None:
    with xray_png.open("r", encoding="latin-1") as text, pytest.raises(ImageError, match="binary mode"):
        classifier.classify(text)

    class Failing:
        def read(self, size: int = -1) -> bytes:
            raise OSError("device gone")

    with pytest.raises(ImageError, match="cannot read"):
        classifier.classify(Failing())
    with xray_png.open("rb") as handle:
        assert classifier.classify(handle).label in classifier.labels


def test_reasons_are_words_never_class_names() -> None:
    """What a one-line message says after a failure: the system's words, or a phrase; never
    "(RuntimeError)" and never the exception's own text (it may quote a file's bytes)."""
    import struct

    from capsedge.errors import reason

    assert reason(PermissionError(13, "Permission denied")) == "permission denied"
    assert reason(OSError(28, "No space left on device")) == "No space left on device"
    assert reason(json.JSONDecodeError("x", "{", 0)) == "not valid JSON at line 1"
    assert reason(KeyError("classes")) == "no 'classes' entry"
    assert reason(struct.error("unpack requires a buffer of 4 bytes")) == "the data ends too early"
    for exc in (RuntimeError("Secret^Patient"), ValueError(), OSError("image file is truncated")):
        assert reason(exc) == "corrupt or unsupported data"
