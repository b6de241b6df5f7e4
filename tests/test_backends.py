"""The ONNX backend and ONNX metadata, on a tiny hand-built model (no TensorFlow needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsedge import Classifier, ModelError, ModelMetadata, Preprocessing, RuntimeMissingError
from capsedge.backends import OnnxBackend, open_backend
from capsedge.classifier import default_model_path
from capsedge.metadata import (
    ONNX_METADATA_KEY,
    read_embedded,
    read_metadata,
    read_onnx_metadata_props,
    sidecar_path,
)

from conftest import synthetic_xray

LABELS = ("Cofield", "Depuy", "Tornier", "Zimmer")
SIZE = 8


def metadata(version: str = "tiny-1") -> ModelMetadata:
    return ModelMetadata("tiny", version, LABELS, Preprocessing(input_size=SIZE), {"note": "test"})


def tiny_onnx(path: Path, embedded: ModelMetadata | None = None, batch: int | str = 1) -> Path:
    """image (batch, 8, 8, 1) -> Flatten -> Gemm -> Softmax -> (batch, 4)."""
    onnx = pytest.importorskip("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(SIZE * SIZE, 4)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32) * 0.1, "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [batch, SIZE, SIZE, 1])],
        [helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [batch, 4])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if embedded is not None:
        helper.set_model_props(model, {"other": "x", ONNX_METADATA_KEY: embedded.to_json()})
    onnx.save(model, path)
    return path


def test_the_backend_is_chosen_by_the_suffix_or_by_name_and_aliases(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    shouting = tmp_path / "M.ONNX"
    shouting.write_bytes(onnx_file.read_bytes())
    bundled = default_model_path()
    assert isinstance(open_backend(onnx_file), OnnxBackend)
    assert open_backend(shouting).name == "onnxruntime"  # the suffix in any case
    assert open_backend(onnx_file, "onnx").name == "onnxruntime"
    assert open_backend(bundled).name == open_backend(bundled, "tflite").name == "litert"
    other = tmp_path / "m.pb"
    other.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=re.escape("unknown model file type '.pb'; expected one of "
                                                   "['.onnx', '.tflite']")):
        open_backend(other)
    choices = "['auto', 'litert', 'edgetpu', 'onnxruntime', 'onnx', 'tflite']"
    with pytest.raises(ModelError, match=re.escape(f"unknown backend 'tensorrt'; choose from {choices}")):
        open_backend(onnx_file, "tensorrt")


def test_onnx_metadata_props_are_onnxruntimes_custom_metadata_map(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tiny_onnx(tmp_path / "m.onnx", metadata())
    props = read_onnx_metadata_props(path)
    assert set(props) == {"other", ONNX_METADATA_KEY} and props["other"] == "x"
    assert read_embedded(path) == metadata()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        read_onnx_metadata_props(broken)
    assert read_embedded(broken) is None  # then the sidecar is read, if there is one


def test_classifier_loads_onnx_with_embedded_metadata_and_classifies(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tiny_onnx(tmp_path / "m.onnx", metadata())
    classifier = Classifier.load(path, threads=1)
    assert classifier.backend.name == "onnxruntime"
    assert classifier.backend.providers[-1] == "CPUExecutionProvider"
    assert classifier.labels == LABELS
    prediction = classifier.classify(synthetic_xray())
    assert prediction.label in LABELS and prediction.model_version == "tiny-1"
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-5


def test_onnx_metadata_falls_back_to_the_sidecar(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="no capsedge metadata"):
        read_metadata(path)
    sidecar_path(path).write_text(metadata("from-sidecar").to_json(), encoding="utf-8")
    assert Classifier.load(path).metadata.version == "from-sidecar"


def test_dynamic_batch_is_reported_and_refused_by_the_classifier(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tiny_onnx(tmp_path / "m.onnx", metadata(), batch="N")
    assert open_backend(path).input_shape == (-1, SIZE, SIZE, 1)
    with pytest.raises(ModelError, match="does not match its metadata"):
        Classifier.load(path)


def test_a_corrupt_onnx_file_is_a_model_error(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f not a model")
    assert read_embedded(path) is None
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        open_backend(path)


def test_missing_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(RuntimeMissingError, match=r"pip install 'capsedge\[onnx\]'"):
        open_backend(path)


def test_the_edge_package_imports_no_onnx_library_until_an_onnx_model_is_opened() -> None:
    script = (
        "import sys, capsedge, capsedge.backends, capsedge.metadata\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_edgetpu_model_without_a_delegate_is_a_clear_error(tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from capsedge.backends import is_edgetpu_compiled
    from capsedge.cli import main
    from capsedge.metadata import read_metadata, sidecar_path

    bundled = default_model_path()
    compiled = tmp_path / "model_edgetpu.tflite"
    shutil.copyfile(bundled, compiled)
    with compiled.open("ab") as handle:  # what edgetpu_compiler output carries: its custom op's name
        handle.write(b"edgetpu-custom-op")
    sidecar_path(compiled).write_text(read_metadata(bundled).to_json())
    assert is_edgetpu_compiled(compiled) and not is_edgetpu_compiled(bundled)
    image = tmp_path / "x.png"
    Image.fromarray(synthetic_xray()).save(image)
    runner = CliRunner()
    for args in (["--model", str(compiled)], ["--backend", "edgetpu"]):
        result = runner.invoke(main, ["classify", *args, str(image)])
        assert result.exit_code == 1
        assert result.stderr.startswith("capsedge: error: the Edge TPU runtime (libedgetpu.so.1) is not")
        assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(main, ["classify", "--backend", "tflite", str(image)])
    assert result.exit_code == 0, result.stderr


def test_jetson_providers_come_first_when_the_build_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Jetson's onnxruntime-gpu build, TensorRT then CUDA are asked for before the CPU."""
    ort = pytest.importorskip("onnxruntime")
    path = tiny_onnx(tmp_path / "m.onnx", metadata())
    real_session = ort.InferenceSession
    asked: list[list[str]] = []

    def session(model: str, sess_options: object = None, providers: list[str] | None = None) -> object:
        asked.append(list(providers or []))
        return real_session(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: everything)
    monkeypatch.setattr(ort, "InferenceSession", session)
    Classifier.load(path)
    assert asked == [["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]]
