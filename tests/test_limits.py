"""Bounded reads and validated metadata (issue 16): each limit of capsedge.limits, refused in one line."""

from __future__ import annotations

import importlib
import io
import json
import resource
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from capsedge import dicom, limits
from capsedge.classifier import default_model_path
from capsedge.cli import main
from capsedge.errors import ImageError, ModelError
from capsedge.metadata import EMBEDDED_NAME, ModelMetadata, read_metadata, sidecar_path
from capsedge.preprocess import Preprocessing, preprocess

from conftest import synthetic_xray

CONFIG = Preprocessing(input_size=16)
preprocess_module = importlib.import_module("capsedge.preprocess")  # the package exports a function so named
METADATA = read_metadata(default_model_path())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_line_error(args: list[str], fragment: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("capsedge: error: ") for line in lines), result.stderr
    assert fragment in result.stderr, result.stderr
    return result.stderr


def bare_model(tmp_path: Path) -> Path:
    """The bundled model without its embedded metadata."""
    model = tmp_path / "bare.tflite"
    data = default_model_path().read_bytes()
    model.write_bytes(data[: data.rfind(b"PK\x03\x04")])
    return model


def test_each_limit_is_defined_once() -> None:
    assert preprocess_module.MAX_PIXELS is limits.MAX_PIXELS and dicom.MAX_PIXELS is limits.MAX_PIXELS


def test_an_oversized_image_file_is_refused_before_it_is_read(tmp_path: Path, xray_png: Path) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:  # sparse: no disk, no memory
        handle.truncate(limits.MAX_IMAGE_BYTES + 1)
    before = peak_rss_mib()
    with pytest.raises(ImageError, match="too large"):
        preprocess(huge, CONFIG)
    assert peak_rss_mib() - before < 64
    stderr = one_line_error(["classify", str(huge), str(xray_png)], "file too large (over 256 MiB)")
    assert stderr.count("\n") == 2  # that file and the summary; the other image was classified


def test_bytes_and_file_objects_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess_module, "MAX_IMAGE_BYTES", 1000)
    buffer = io.BytesIO()
    Image.fromarray(synthetic_xray((20, 20))).save(buffer, format="BMP")  # 1,478 bytes
    with pytest.raises(ImageError, match="too large"):
        preprocess(buffer.getvalue(), CONFIG)
    with pytest.raises(ImageError, match="too large"):
        preprocess(memoryview(buffer.getvalue()), CONFIG)

    class Endless:
        asked: list[int] = []

        def read(self, size: int = -1) -> bytes:
            self.asked.append(size)
            return b"\0" * (size if size >= 0 else 10**9)

    with pytest.raises(ImageError, match="too large"):
        preprocess(Endless(), CONFIG)
    assert Endless.asked == [1001]
    buffer.seek(0)
    monkeypatch.setattr(preprocess_module, "MAX_IMAGE_BYTES", 10_000)
    assert preprocess(buffer, CONFIG).shape == (16, 16, 1)  # a binary file object is an input


def test_an_oversized_model_file_is_refused_before_it_is_read(tmp_path: Path, xray_png: Path) -> None:
    model = tmp_path / "huge.tflite"
    with model.open("wb") as handle:
        handle.truncate(limits.MAX_MODEL_BYTES + 1)
    sidecar_path(model).write_text(METADATA.to_json())
    before = peak_rss_mib()
    one_line_error(["classify", "--model", str(model), str(xray_png)], "model file too large")
    assert peak_rss_mib() - before < 64


def embed(model: Path, member: bytes) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(EMBEDDED_NAME, member)
    model.write_bytes(model.read_bytes() + buffer.getvalue())


def test_embedded_metadata_that_inflates_past_the_limit_is_refused(tmp_path: Path, xray_png: Path) -> None:
    model = bare_model(tmp_path)
    padded = METADATA.to_json().replace("{", "{" + " " * (2 * limits.MAX_METADATA_BYTES), 1)
    embed(model, padded.encode())  # valid JSON, a few KiB deflated, 2 MiB inflated
    assert model.stat().st_size < default_model_path().stat().st_size + 64 * 1024
    with pytest.raises(ModelError, match="too large"):
        read_metadata(model)
    one_line_error(["classify", "--model", str(model), str(xray_png)], "embedded metadata is too large")


@pytest.mark.parametrize("depth", [limits.MAX_METADATA_DEPTH + 1, 200_000])
def test_deeply_nested_metadata_is_refused(tmp_path: Path, xray_png: Path, depth: int) -> None:
    data = json.loads(METADATA.to_json())
    text = json.dumps(data)[:-1] + ', "provenance_extra": ' + "[" * depth + "]" * depth + "}"
    model = bare_model(tmp_path)
    sidecar_path(model).write_text(text)
    one_line_error(["classify", "--model", str(model), str(xray_png)], "nested too deeply")
    embedded = bare_model(tmp_path)
    embed(embedded, text.encode())
    with pytest.raises(ModelError, match="nested too deeply"):
        read_metadata(embedded)


def test_an_oversized_sidecar_is_refused(tmp_path: Path) -> None:
    model = bare_model(tmp_path)
    sidecar_path(model).write_text(METADATA.to_json().replace("{", "{" + " " * limits.MAX_METADATA_BYTES, 1))
    with pytest.raises(ModelError, match="too large"):
        read_metadata(model)


def with_field(path: tuple[str, ...], value: object) -> dict:
    data = json.loads(METADATA.to_json())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("labels",), [{"a": 1}, None, 3, "x\ny"]),
        (("labels",), ["Cofield", "Depuy", "Tornier", "x\ny"]),
        (("labels",), ["Cofield", "Depuy", "Tornier", ""]),
        (("labels",), ["Cofield", "Depuy", "Tornier", " Zimmer"]),
        (("labels",), ["Cofield", "Depuy", "Tornier", "Z" * (limits.MAX_LABEL_LENGTH + 1)]),
        (("labels",), ["Cofield", "Depuy", "Tornier", "Zimmer\u2028"]),
        (("labels",), ["Cofield", "Depuy", "Depuy", "Zimmer"]),
        (("labels",), ["only"]),
        (("labels",), [f"L{i}" for i in range(limits.MAX_LABELS + 1)]),
        (("version",), 2),
        (("version",), "1.0\n[fake] line"),
        (("version",), ""),
        (("name",), None),
        (("name",), "n" * (limits.MAX_NAME_LENGTH + 1)),
        (("format_version",), True),
        (("preprocessing",), "512"),
        (("preprocessing", "input_size"), True),
        (("preprocessing", "input_size"), "512"),
        (("preprocessing", "input_size"), 512.0),
        (("preprocessing", "input_size"), 10**9),
        (("preprocessing", "channels"), True),
        (("preprocessing", "letterbox"), 1),
        (("preprocessing", "layout"), ["NHWC"]),
        (("provenance",), [["a", 1]]),
    ],
)
def test_invalid_metadata_content_is_a_one_line_model_error(path: tuple[str, ...], value: object) -> None:
    with pytest.raises(ModelError) as error:
        ModelMetadata.from_dict(with_field(path, value))
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


def test_valid_metadata_is_still_accepted() -> None:
    assert ModelMetadata.from_dict(json.loads(METADATA.to_json())) == METADATA
    assert ModelMetadata.from_dict(with_field(("labels",), ["Cofield", "Depuy", "Tornier", "Zimmer Biomet"]))


def test_invalid_labels_are_never_printed(tmp_path: Path, xray_png: Path) -> None:
    model = bare_model(tmp_path)
    sidecar_path(model).write_text(json.dumps(with_field(("labels",), [{"a": 1}, None, 3, "x\ny"])))
    stderr = one_line_error(["classify", "--model", str(model), str(xray_png)], "invalid model metadata")
    assert stderr.count("\n") == 1
