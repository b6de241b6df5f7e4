"""The export command's refusals that come before any model is loaded: no TensorFlow needed.

These run without the export extra. TensorFlow and Keras are hidden (importing either
fails) and every format's tools are taken as installed, so each test proves that its
error comes before TensorFlow would be imported, on any installation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from capsedge.export import formats as formats_module
from capsedge.export.cli import command


@pytest.fixture(autouse=True)
def without_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tensorflow", "keras"):
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorflow` now raises ImportError
    for name, fmt in formats_module.FORMATS.items():
        monkeypatch.setitem(formats_module.FORMATS, name, dataclasses.replace(fmt, requires=()))


def invoke(*args: str) -> object:
    return CliRunner().invoke(command, list(args))


def assert_one_line_error(result: object, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capsedge: error: "), result.stderr
    assert fragment in lines[0], lines[0]


def test_cli_missing_model(tmp_path: Path) -> None:
    result = invoke("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "no trained model at")


def test_cli_unknown_format_names_the_closest(tmp_path: Path) -> None:
    result = invoke("--model", str(tmp_path), "--out", str(tmp_path / "o"), "--formats", "onnx-int4")
    assert_one_line_error(result, "unknown format 'onnx-int4'")
    assert "did you mean 'onnx-int8'?" in result.stderr


def test_cli_empty_calibration_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("--model", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--formats", "tflite-int8", "--calib", str(tmp_path / "empty"))
    assert_one_line_error(result, "no calibration images found in")


def test_cli_int8_without_calibration(tmp_path: Path) -> None:
    result = invoke("--model", str(tmp_path), "--out", str(tmp_path / "o"), "--formats", "onnx-int8")
    assert_one_line_error(result, "onnx-int8 needs calibration images: pass --calib DIR")


def test_cli_missing_tool_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(formats_module.FORMATS["onnx"], requires=("capsedge_no_such_tool",))
    monkeypatch.setitem(formats_module.FORMATS, "onnx", missing)
    result = invoke("--model", str(tmp_path), "--out", str(tmp_path / "o"), "--formats", "onnx")
    assert_one_line_error(result, "format 'onnx' needs capsedge_no_such_tool, which is not installed")
    assert "pip install 'capsedge[export]'" in result.stderr
