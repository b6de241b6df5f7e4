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
    assert_one_line_error(result, "format 'onnx' needs capsedge_no_such_tool: pip install 'capsedge[export]'")


def test_trust_sources_are_the_runs_own_when_it_has_them(tmp_path: Path) -> None:
    """A ``--folds K --final`` run is calibrated by default; otherwise one line says why not."""
    import json

    from capsedge.export.run import trust_sources

    data = tmp_path / "data"
    data.mkdir()
    recipe = {"model": "m", "epochs": 3, "holdout": 0.0}
    final = tmp_path / "cv" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"train": recipe, "data": {"source": str(data)}}))
    summary = {"folds": 2, "accuracy_mean": 0.5, "accuracy_std": 0.1, "macro_f1_mean": 0.4,
               "macro_f1_std": 0.05, "per_fold": [], "pooled": {}, "train": {**recipe, "holdout": 0.2}}
    (tmp_path / "cv" / "cv_summary.json").write_text(json.dumps(summary))
    cv, train_data, note = trust_sources(final, None, None)
    assert (cv, train_data) == (tmp_path / "cv", data) and note.startswith("trust section fitted on")
    assert trust_sources(final / "classifier.keras", None, None)[:2] == (tmp_path / "cv", data)
    assert trust_sources(final, tmp_path / "x", tmp_path / "y") == (tmp_path / "x", tmp_path / "y", None)

    summary["train"]["epochs"] = 9
    (tmp_path / "cv" / "cv_summary.json").write_text(json.dumps(summary))
    cv, train_data, note = trust_sources(final, None, None)
    assert (cv, train_data) == (None, None) and "another recipe" in note and "\n" not in note

    lone = tmp_path / "first"
    lone.mkdir()
    (lone / "config.json").write_text(json.dumps({"train": recipe, "data": {}}))
    cv, train_data, note = trust_sources(lone, None, None)
    assert (cv, train_data) == (None, None)
    assert note.startswith("no calibration or outlier statistics: the run has no cross-validation")
    assert "uncalibrated" in note


def test_test_time_views_default_is_the_recipes() -> None:
    """One default everywhere: the sixteen views the recipe and the bundled model average."""
    import inspect

    from capsedge.classifier import default_model_path
    from capsedge.export import trust_fit, writer
    from capsedge.metadata import read_metadata

    option = next(p for p in command.params if p.name == "test_time_views")
    functions = (trust_fit.fit_trust, trust_fit.fit_file_trust)
    defaults = {inspect.signature(f).parameters["test_time_views"].default for f in functions}
    defaults.add(writer.ExportOptions().test_time_views)
    assert defaults == {int(option.default)} == {read_metadata(default_model_path()).test_time_views} == {16}


def test_cli_verification_without_images_fails_before_tensorflow(tmp_path: Path) -> None:
    result = invoke("--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "verification needs images: pass --eval DIR (or --calib DIR)")
    (tmp_path / "empty").mkdir()
    result = invoke("--model", str(tmp_path), "--out", str(tmp_path / "o"), "--eval", str(tmp_path / "empty"))
    assert_one_line_error(result, "no evaluation images found in")
