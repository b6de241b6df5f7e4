"""Export to every format, then run the files: op lists, metadata, parity with Keras, report, CLI.

One small Efficient-CapsNet + NCP model (32x32 input, untrained) is exported once
per session; the tests read its artifacts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsedge import Classifier, Preprocessing, __version__
from capsedge.metadata import read_embedded, read_onnx_metadata_props, read_sidecar

from conftest import classifier_with_ncps_cfc, synthetic_xray
from test_export_cli import assert_one_line_error, invoke

tf2onnx = pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("tensorflow")

from capsedge.export.graph import (  # noqa: E402
    FORBIDDEN_ONNX,
    FORBIDDEN_TFLITE,
    forbidden_ops,
    input_shape,
    onnx_nodes,
    op_counts,
    tflite_graph,
)
from capsedge.export.verify import verify_export  # noqa: E402
from capsedge.export.writer import ExportOptions, export  # noqa: E402

LABELS = ("Cofield", "Depuy", "Tornier", "Zimmer")
SIZE = 32
ALL = ("tflite-f32", "tflite-f16", "tflite-int8", "onnx", "onnx-int8", "edgetpu")


def write_images(folder: Path, per_class: int = 3) -> Path:
    """Folder-per-class PNGs of different sizes, so labels are known."""
    for c, label in enumerate(LABELS):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            seed = 10 * c + i
            image = synthetic_xray((60 + 7 * seed, 50 + 3 * c), seed=seed)
            Image.fromarray(image).save(folder / label / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as ``capsedge train`` writes it, with an untrained small model."""
    from capsedge.models import ConvSpec, build_model, get_model_config

    config = dataclasses.replace(
        get_model_config("effcaps_ncp_implant_128"),
        name="tiny_effcaps_ncp",
        input_shape=(SIZE, SIZE, 1),
        stem=(ConvSpec(8, 3, 2, "same"), ConvSpec(32, 3, 2, "same")),
        primary_caps=8,
        primary_dim=4,
        primary_kernel=8,
        class_dim=8,
        ncp_units=8,
    )
    built = build_model(config)
    run = tmp_path_factory.mktemp("run")
    built.classifier.save(run / "classifier.keras")
    (run / "config.json").write_text(json.dumps({
        "model": {"name": config.name},
        "preprocessing": Preprocessing(input_size=SIZE).to_dict(),
        "classes": list(LABELS),
        "data": {"layout": "folders", "images": 12, "attribution": "synthetic test images"},
    }), encoding="utf-8")
    return run


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def exported(tiny_run: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("exported")
    result = export(tiny_run, out, ExportOptions(formats=ALL, calibration=images))
    return out, result.files, verify_export(result)


@pytest.fixture(scope="session")
def reference(tiny_run: Path, images: Path) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images and the Keras model's probabilities for them."""
    from capsedge.export.run import load_run
    from capsedge.export.verify import load_evaluation_set
    from capsedge.workshop.dataset import ImageCache

    run = load_run(tiny_run)
    evaluation = load_evaluation_set(images, ImageCache(run.preprocessing), run.labels)
    return evaluation.images, np.asarray(run.classifier.predict(evaluation.images, verbose=0))


def run_file(path: Path, batch: np.ndarray) -> np.ndarray:
    classifier = Classifier.load(path, threads=1)
    return np.stack([classifier.predict_tensor(image) for image in batch])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ALL)
def test_artifact_has_no_loop_flex_or_custom_ops_and_a_static_batch1_input(exported: tuple, fmt: str) -> None:
    _, written, _ = exported
    path = written[fmt]
    counts = op_counts(path)
    assert counts, "no operations listed"
    if path.suffix == ".onnx":
        model = onnx.load(str(path))
        types = {n.op_type for n in onnx_nodes(model.graph)}
        assert not types & FORBIDDEN_ONNX, types
    else:
        ops, _, _ = tflite_graph(path)
        names = {op["op_name"] for op in ops}
        assert not names & FORBIDDEN_TFLITE, names
        assert not any(name.upper().startswith("FLEX") for name in names), names
    assert forbidden_ops(counts, path.suffix) == []
    assert input_shape(path) == [1, SIZE, SIZE, 1]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ALL)
def test_metadata_is_embedded_and_in_the_sidecar_and_classify_loads_it(exported: tuple, fmt: str) -> None:
    _, written, _ = exported
    path = written[fmt]
    embedded, sidecar = read_embedded(path), read_sidecar(path)
    assert embedded is not None and sidecar is not None
    assert embedded == sidecar
    assert embedded.labels == LABELS and embedded.preprocessing.input_size == SIZE
    assert embedded.provenance["format"] == fmt
    # The run's own version (name, day, weights' hash), never the package's.
    assert re.fullmatch(r"tiny_effcaps_ncp-\d{8}-[0-9a-f]{10}", embedded.version), embedded.version
    assert __version__ not in embedded.version
    # No blank warm-up image: see test_int8_tflite_survives_a_black_image.
    prediction = Classifier.load(path, warm_up=False).classify(synthetic_xray())
    assert prediction.label in LABELS


@pytest.mark.slow
def test_int8_tflite_survives_a_black_image(exported: tuple) -> None:
    """On a black image every capsule's vector is 0, whose norm quantizes to 0: the int8 file
    must still answer with probabilities near the float file's. Near, not within int8's step:
    a black image lies outside the calibration images' range (this one: 0.175 for each class
    where the float file says 0.25)."""
    _, written, _ = exported
    black = np.zeros((SIZE, SIZE, 1), np.float32)
    int8 = Classifier.load(written["tflite-int8"])  # warms up on this very image
    got = int8.predict_tensor(black)
    assert got.shape == (len(LABELS),) and np.isfinite(got).all()
    assert got.min() >= 0 and got.max() <= 1
    expected = Classifier.load(written["tflite-f32"]).predict_tensor(black)
    assert np.max(np.abs(got - expected)) <= 0.1, (got, expected)
    assert int8.classify(black).label in LABELS  # classify refuses non-finite outputs


@pytest.mark.slow
def test_onnx_metadata_is_in_metadata_props(exported: tuple) -> None:
    _, written, _ = exported
    for fmt in ("onnx", "onnx-int8"):
        session = ort.InferenceSession(str(written[fmt]), providers=["CPUExecutionProvider"])
        stored = dict(session.get_modelmeta().custom_metadata_map)
        assert stored == read_onnx_metadata_props(written[fmt])
        assert json.loads(stored["capsedge_metadata"])["labels"] == list(LABELS)


@pytest.mark.slow
def test_onnx_float_matches_keras_within_1e4(exported: tuple, reference: tuple) -> None:
    _, written, _ = exported
    batch, expected = reference
    assert np.max(np.abs(run_file(written["onnx"], batch) - expected)) <= 1e-4


@pytest.mark.slow
def test_onnx_int8_answers_as_the_tflite_int8_file_it_translates(exported: tuple, reference: tuple) -> None:
    _, written, _ = exported
    batch, _ = reference
    translated, tflite = run_file(written["onnx-int8"], batch), run_file(written["tflite-int8"], batch)
    difference = float(np.max(np.abs(translated - tflite)))
    assert difference <= 0.1, difference
    # Each translated answer is one of the int8 file's top answers within what the two files
    # differ by: the tiny test model's int8 outputs tie often, and a rounding step may pick
    # the other of two tied classes (it did once, under load).
    near_top = tflite >= tflite.max(axis=1, keepdims=True) - 2 * difference - 1e-6
    assert near_top[np.arange(len(batch)), translated.argmax(1)].all()


@pytest.mark.slow
def test_tflite_float_matches_keras(exported: tuple, reference: tuple) -> None:
    _, written, _ = exported
    batch, expected = reference
    got = run_file(written["tflite-f32"], batch)
    assert np.max(np.abs(got - expected)) <= 1e-5
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.slow
def test_int8_artifacts_are_integer_where_promised(exported: tuple) -> None:
    _, written, _ = exported
    from ai_edge_litert.interpreter import Interpreter

    for fmt in ("tflite-int8", "edgetpu"):
        interpreter = Interpreter(model_path=str(written[fmt]))
        assert interpreter.get_input_details()[0]["dtype"] == np.int8
        assert interpreter.get_output_details()[0]["dtype"] == np.int8
    model = onnx.load(str(written["onnx-int8"]))  # the TFLite int8 graph, translated
    assert model.graph.input[0].name == "image"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize and any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert any(initializers[n.input[1]].size > 1 for n in dequantize if n.input[1] in initializers)
    producers = {output: node for node in model.graph.node for output in node.output}
    convolutions = [node for node in model.graph.node if node.op_type == "Conv"]
    assert convolutions and all(getattr(producers.get(c.input[1]), "op_type", None) == "DequantizeLinear"
                                for c in convolutions)  # every convolution's weights are int8


@pytest.mark.slow
def test_report_json_and_markdown(exported: tuple) -> None:
    out, written, report = exported
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [a["format"] for a in data["artifacts"]] == list(ALL)
    assert data["evaluation"]["images"] == 12 and data["evaluation"]["labelled"] == 12
    for artifact in data["artifacts"]:
        assert artifact["bytes"] == Path(artifact["path"]).stat().st_size
        assert 0 < artifact["constant_bytes"] < artifact["bytes"]
        assert sum(artifact["ops"].values()) > 0 and artifact["forbidden_ops"] == []
        assert artifact["metadata_ok"]
        if artifact["error"] is None:
            assert 0.0 <= artifact["agreement"] <= 1.0 and artifact["latency_ms_median"] > 0
            assert artifact["accuracy"] is not None
    checks = {(c["artifact"], c["name"]): c for c in data["checks"]}
    assert checks[("onnx", "max abs diff vs Keras")]["passed"]
    assert checks[("tflite-f32", "top-1 agreement")]["passed"]
    assert checks[("tflite-int8", "constants vs tflite-f32")]["passed"]
    assert checks[("onnx-int8", "constants vs onnx")]["value"] < 0.4  # 0.27 at 512 px; here scales weigh
    constants = {a["format"]: a["constant_bytes"] for a in data["artifacts"]}
    assert constants["tflite-int8"] < 0.4 * constants["tflite-f32"]  # int8 weights: a quarter, + biases
    assert constants["tflite-f16"] < 0.6 * constants["tflite-f32"]
    assert ("onnx-int8", "accuracy vs Keras") in checks
    assert data["passed"] == all(c["passed"] for c in data["checks"]) == report.passed
    edgetpu = data["artifacts"][ALL.index("edgetpu")]["edgetpu"]
    # squash, routing, lengths and NCP head are written in Edge TPU operations only
    assert edgetpu["on_tpu"] == edgetpu["total_ops"] and edgetpu["on_cpu"] == 0
    assert edgetpu["first_unsupported"] is None and edgetpu["unsupported"] == {}
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "| format | file | size (KiB) |" in markdown and "## Edge TPU" in markdown


@pytest.mark.slow
def test_cli_failed_verification_exits_1_and_names_the_check(
    tiny_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsedge.export import verify

    strict = dataclasses.replace(verify.Goals(), float_agreement=1.01)  # unreachable on purpose
    monkeypatch.setattr(verify, "Goals", lambda: strict)
    args = ("--model", str(tiny_run), "--out", str(tmp_path / "o"), "--formats", "tflite-f32",
            "--eval", str(images), "--eval-limit", "4")
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "capsedge: error: verification failed: tflite-f32 top-1 agreement" in result.stderr
    assert json.loads((tmp_path / "o" / "report.json").read_text())["passed"] is False
    assert "tflite-f32:" in result.stdout and "report:" in result.stdout
    allowed = invoke(*args, "--allow-fail")
    assert allowed.exit_code == 0 and "capsedge: warning: verification failed" in allowed.stderr


def write_cv_summary(folder: Path, recipe: dict) -> Path:
    """A ``cv_summary.json`` as ``capsedge train --folds 2`` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    pooled = {"accuracy": 0.5, "macro_f1": 0.4, "balanced_accuracy": 0.45,
              "confusion_matrix": [[1, 1], [0, 2]], "classes": ["A", "B"], "per_class": {}}
    (folder / "cv_summary.json").write_text(json.dumps({
        "folds": 2, "accuracy_mean": 0.5, "accuracy_std": 0.1, "macro_f1_mean": 0.4, "macro_f1_std": 0.05,
        "per_fold": [{"fold": 0, "accuracy": 0.6, "macro_f1": 0.45},
                     {"fold": 1, "accuracy": 0.4, "macro_f1": 0.35}],
        "pooled": pooled, "train": recipe,
    }), encoding="utf-8")
    return folder


def test_cross_validation_summary_records_the_figures_of_the_same_recipe(tmp_path: Path) -> None:
    from capsedge.errors import CapsedgeError
    from capsedge.export.run import cross_validation_summary

    recipe = {"model": "m", "epochs": 60, "beta": 0.99, "holdout": 0.2}
    folder = write_cv_summary(tmp_path / "cv", recipe)
    summary = cross_validation_summary(folder, {**recipe, "holdout": 0.0})  # holdout may differ
    assert (summary["folds"], summary["accuracy_mean"], summary["macro_f1_std"]) == (2, 0.5, 0.05)
    assert summary["pooled"]["confusion_matrix"] == [[1, 1], [0, 2]] and "per_class" not in summary["pooled"]
    with pytest.raises(CapsedgeError, match=r"another recipe than the model's \(epochs 60 vs 80\)"):
        cross_validation_summary(folder, {**recipe, "epochs": 80})
    # an option newer than the summary matches only while it is off
    newer = cross_validation_summary(folder, {**recipe, "mixup": 0.0})
    assert cross_validation_summary(folder, {**recipe, "schedule": "cosine"})["train"] == recipe
    with pytest.raises(CapsedgeError, match="schedule"):
        cross_validation_summary(folder, {**recipe, "schedule": "one-cycle"})
    assert newer["accuracy_mean"] == summary["accuracy_mean"]
    with pytest.raises(CapsedgeError, match=r"mixup None vs 0.2"):
        cross_validation_summary(folder, {**recipe, "mixup": 0.2})
    with pytest.raises(CapsedgeError, match="no readable cross-validation summary"):
        cross_validation_summary(tmp_path / "nowhere", recipe)
    (folder / "cv_summary.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CapsedgeError, match="no readable cross-validation summary"):
        cross_validation_summary(folder, recipe)


@pytest.mark.slow
def test_cli_cross_validation_goes_into_the_exported_provenance(tiny_run: Path, tmp_path: Path) -> None:
    folder = write_cv_summary(tmp_path / "cv", {})  # tiny_run's config records no recipe
    result = invoke("--model", str(tiny_run), "--out", str(tmp_path / "o"), "--formats", "tflite-f32",
                    "--no-verify", "--cross-validation", str(folder))
    assert result.exit_code == 0, result.output
    assert ("capsedge: note: no calibration or outlier statistics: the run does not name its training "
            "images") in result.stderr
    model = tmp_path / "o" / "tiny_effcaps_ncp_tflite_f32.tflite"
    for metadata in (read_embedded(model), read_sidecar(model)):
        assert metadata is not None
        assert metadata.provenance["cross_validation"]["accuracy_mean"] == 0.5
    other = write_cv_summary(tmp_path / "cv2", {"epochs": 3})
    result = invoke("--model", str(tiny_run), "--out", str(tmp_path / "o2"), "--formats", "tflite-f32",
                    "--no-verify", "--cross-validation", str(other))
    assert_one_line_error(result, "cross-validated another recipe than the model's (epochs 3 vs None)")
    result = invoke("--model", str(tiny_run), "--out", str(tmp_path / "o3"), "--formats", "tflite-f32",
                    "--no-verify", "--train-data", str(tmp_path))
    assert_one_line_error(result, "--train-data needs --cross-validation DIR")


@pytest.mark.slow
def test_cli_calib_limit_is_honoured_without_verification(tiny_run: Path, images: Path,
                                                          tmp_path: Path) -> None:
    result = invoke("--model", str(tiny_run), "--out", str(tmp_path / "o"), "--formats", "tflite-int8",
                    "--calib", str(images), "--calib-limit", "3", "--no-verify")
    assert result.exit_code == 0, result.output
    model = tmp_path / "o" / "tiny_effcaps_ncp_tflite_int8.tflite"
    assert read_sidecar(model).provenance["calibration"] == {"folder": str(images), "images": 3}
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.slow
def test_every_backend_gives_the_same_answers_per_artifact_family(exported: tuple, reference: tuple) -> None:
    """Float family: the .tflite through LiteRT and the .onnx through ONNX Runtime (explicit
    backends, as ``--backend`` picks them); int8 family: the Edge TPU variant run on the CPU
    through LiteRT and the int8 .tflite."""
    _, written, _ = exported
    batch, _ = reference

    def answers(path: Path, backend: str) -> np.ndarray:
        classifier = Classifier.load(path, backend=backend, threads=1)
        return np.stack([classifier.predict_tensor(image) for image in batch])

    litert = answers(written["tflite-f32"], "litert")
    onnxruntime = answers(written["onnx"], "onnxruntime")
    assert np.max(np.abs(litert - onnxruntime)) <= 1e-4
    np.testing.assert_array_equal(litert.argmax(1), onnxruntime.argmax(1))
    edgetpu_on_cpu = answers(written["edgetpu"], "litert")
    np.testing.assert_array_equal(edgetpu_on_cpu, answers(written["tflite-int8"], "litert"))


@pytest.mark.slow
def test_edgetpu_prediction_ends_the_mapped_part_at_the_first_unsupported_op(tmp_path: Path) -> None:
    import keras

    from capsedge.export.edgetpu_format import predict_mapping
    from capsedge.export.quantization import Quantization
    from capsedge.export.tflite_format import convert_to_tflite

    image = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(image)
    x = keras.layers.Reshape((16, 16))(x)
    x = keras.layers.Softmax()(x)  # a 2-D softmax: not an Edge TPU SOFTMAX
    x = keras.layers.Dense(4)(keras.layers.Flatten()(x))
    x = keras.layers.Lambda(keras.ops.exp)(x)  # no EXP on the Edge TPU
    model = keras.Model(image, x)
    calibration = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
    path = tmp_path / "m.tflite"
    path.write_bytes(convert_to_tflite(model, Quantization.for_int8(lambda: iter(calibration))))
    mapping = predict_mapping(path)
    assert mapping.first_unsupported is not None and mapping.first_unsupported[1] == "SOFTMAX"
    assert mapping.on_tpu == mapping.first_unsupported[0] >= 1  # the convolution at least
    assert mapping.on_tpu + mapping.on_cpu == mapping.total_ops
    assert "1-D" in mapping.unsupported["SOFTMAX"]["reason"]
    assert "EXP" in mapping.unsupported


def test_a_run_saved_with_the_ncps_cfc_layer_is_exported_with_the_current_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capsedge.errors import ModelError
    from capsedge.export.run import load_run
    from capsedge.models import get_model_config

    config = get_model_config("effcaps_ncp_implant_lite")
    classifier_with_ncps_cfc(config, monkeypatch).save(tmp_path / "classifier.keras")

    def write_config(model: dict) -> None:
        (tmp_path / "config.json").write_text(json.dumps({
            "model": model,
            "preprocessing": Preprocessing(input_size=128).to_dict(),
            "classes": list(LABELS),
        }), encoding="utf-8")

    write_config(config.to_dict())
    layers = {type(layer).__name__ for layer in load_run(tmp_path).classifier.layers}
    assert "UnrolledCfC" in layers and "CfC" not in layers
    write_config({"name": config.name})  # not enough to rebuild from
    with pytest.raises(ModelError, match="cannot rebuild"):
        load_run(tmp_path)


FAKE_COMPILER = r'''#!{python}
"""Stands in for edgetpu_compiler: copies the model and writes an operation log like Coral's."""
import pathlib, sys
args = sys.argv[1:]
if "{fail}" == "yes":
    print("Internal compiler error. Aborting!")
    sys.exit(1)
out_dir = pathlib.Path(args[args.index("--out_dir") + 1])
model = pathlib.Path(args[-1])
compiled = out_dir / (model.stem + "_edgetpu.tflite")
compiled.write_bytes(model.read_bytes())
compiled.with_suffix(".log").write_text(
    "Edge TPU Compiler version 16.0.384591198\n"
    f"Input: {{model.name}}\nOutput: {{compiled.name}}\n\n"
    "Operator                       Count      Status\n\n"
    "CONV_2D                        2          Mapped to Edge TPU\n"
    "SOFTMAX                        9          Mapped to Edge TPU\n"
    "MUL                            3          More than one subgraph is not supported\n"
    "MUL                            1          Mapped to Edge TPU\n"
    "QUANTIZE                       2          Operation is otherwise supported, "
    "but not mapped due to some unspecified limitation\n"
)
print("Compilation succeeded!")
'''


def put_fake_compiler_on_path(folder: Path, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
    import os
    import sys

    folder.mkdir()
    script = folder / "edgetpu_compiler"
    script.write_text(FAKE_COMPILER.format(python=sys.executable, fail="yes" if fail else "no"))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slow
def test_edgetpu_compiler_on_the_path_is_run_and_its_log_reported(
    tiny_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_fake_compiler_on_path(tmp_path / "bin", monkeypatch)
    out = tmp_path / "out"
    result = export(tiny_run, out, ExportOptions(formats=("edgetpu",), calibration=images))
    written = result.files
    verify_export(result)
    compiled = out / f"{written['edgetpu'].stem}_edgetpu.tflite"
    assert compiled.is_file()
    assert read_embedded(compiled).labels == LABELS  # metadata stored again after compiling
    assert read_sidecar(compiled).labels == LABELS
    mapping = json.loads((out / "report.json").read_text(encoding="utf-8"))["artifacts"][0]["edgetpu"]
    assert mapping["source"] == "edgetpu_compiler" and mapping["compiled"] == str(compiled)
    assert (mapping["on_tpu"], mapping["on_cpu"], mapping["total_ops"]) == (12, 5, 17)
    assert mapping["unsupported"]["MUL"] == {"count": 3, "reason": "More than one subgraph is not supported"}
    assert "QUANTIZE" in mapping["unsupported"] and "CONV_2D" not in mapping["unsupported"]
    assert "12 of 17 operations on the Edge TPU" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_failing_edgetpu_compiler_is_a_one_line_error(
    tiny_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_fake_compiler_on_path(tmp_path / "bin", monkeypatch, fail=True)
    result = invoke("--model", str(tiny_run), "--out", str(tmp_path / "out"), "--formats", "edgetpu",
                    "--calib", str(images))
    assert_one_line_error(result, "edgetpu_compiler failed on")
    assert "Internal compiler error. Aborting!" in result.stderr


def test_metadata_must_fit_the_graph_input(tmp_path: Path) -> None:
    """A file whose stored preprocessing makes 256 px tensors for a 512 px graph fails the check."""
    import dataclasses
    import shutil

    from capsedge.classifier import default_model_path
    from capsedge.export.verify import metadata_fits
    from capsedge.metadata import embed_in_tflite, read_metadata

    model = tmp_path / "m.tflite"
    shutil.copy(default_model_path(), model)
    labels = ("Cofield", "Depuy", "Tornier", "Zimmer")
    assert metadata_fits(model, labels, input_shape(model))
    assert not metadata_fits(model, ("a", "b", "c", "d"), input_shape(model))
    metadata = read_metadata(model)
    smaller = dataclasses.replace(metadata.preprocessing, input_size=256)
    embed_in_tflite(model, dataclasses.replace(metadata, preprocessing=smaller))
    assert read_metadata(model).preprocessing.input_size == 256
    assert not metadata_fits(model, labels, input_shape(model))


def test_the_edgetpu_line_says_whether_the_file_was_compiled(tmp_path: Path) -> None:
    from capsedge.export.edgetpu_format import compiled_path, describe

    model = tmp_path / "m_edgetpu.tflite"
    model.write_bytes(b"x")
    assert describe(model).startswith("the full-integer int8 flatbuffer, NOT compiled for the Edge TPU")
    compiled_path(model).write_bytes(b"y")
    assert describe(model) == f"the int8 flatbuffer; compiled for the Edge TPU: {compiled_path(model)}"


@pytest.mark.slow
def test_export_shows_progress_and_nothing_from_tensorflow(tiny_run: Path, images: Path,
                                                           tmp_path: Path) -> None:
    """In a log (stderr not a terminal): plain progress lines, the note, and none of the converter's
    ``fully_quantize: 0, ...`` or LiteRT's ``INFO: Created TensorFlow Lite XNNPACK delegate``."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "capsedge.cli", "export", "--model", str(tiny_run), "--out",
               str(tmp_path / "o"), "--formats", "tflite-int8", "--calib", str(images), "--allow-fail"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith(("export: ", "capsedge: ")) for line in lines), lines
    assert any(line.startswith("export: 3/3 done") for line in lines), lines
    assert "fully_quantize" not in done.stderr + done.stdout and "INFO:" not in done.stderr
    verbose = subprocess.run([*command, "--verbose"], capture_output=True, text=True, timeout=600)
    assert "fully_quantize" in verbose.stderr  # shown when asked for
