"""Verify exported models against the Keras model they came from, and write the report.

Every artifact is run through the same backends ``capsedge classify`` uses
(``capsedge.backends``), single-threaded, on an evaluation set of real images
that went through the shared preprocessing. For each artifact the report gives
its size, its operations, accuracy, top-1 agreement with the Keras model, the
largest absolute difference of probabilities and the median latency; the
checks below decide whether the export passed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.backends import Backend, first_line, native_stderr_silenced, open_backend
from capsedge.errors import CapsedgeError, ImageError
from capsedge.export.formats import FORMATS, ExportFormat
from capsedge.metadata import read_metadata
from capsedge.preprocess import Preprocessing, image_files, preprocess

#: Operations no artifact may contain: loops and control flow, and TensorFlow ops
#: that need the Flex (select-TF) delegate or a custom kernel.
FORBIDDEN_TFLITE = frozenset({"WHILE", "IF", "CALL_ONCE", "CUSTOM", "DELEGATE"})
FORBIDDEN_ONNX = frozenset({"Loop", "Scan", "If", "SequenceMap"})

WARM_UP_RUNS = 5
MIN_TIMED_RUNS = 20


@dataclass(frozen=True)
class Goals:
    """What an export must achieve.

    Attributes:
        onnx_max_abs_diff: float ONNX vs Keras, largest probability difference.
        float_agreement: top-1 agreement of the float32 TFLite model with Keras.
        reduced_agreement: top-1 agreement of float16, dynamic-range and int8 models.
        int8_accuracy_points: how far int8 accuracy may move from Keras', in points of 1.
        int8_size_ratio: int8 file size over its float32 counterpart's, at most.
    """

    onnx_max_abs_diff: float = 1e-4
    float_agreement: float = 1.0
    reduced_agreement: float = 0.99
    int8_accuracy_points: float = 0.01
    int8_size_ratio: float = 1 / 3


@dataclass(frozen=True)
class EvaluationSet:
    """Preprocessed images with their class ids (-1 where the label is unknown)."""

    folder: str
    images: np.ndarray
    targets: np.ndarray

    @property
    def labelled(self) -> int:
        """How many images have a known label."""
        return int(np.sum(self.targets >= 0))


def label_of(path: Path, labels: tuple[str, ...]) -> int:
    """Class id from a folder-per-class parent or a ``Label.N.jpg`` name; -1 when neither."""
    for candidate in (path.parent.name, path.name.split(".")[0]):
        if candidate in labels:
            return labels.index(candidate)
    return -1


def load_evaluation_set(
    folder: str | Path, preprocessing: Preprocessing, labels: tuple[str, ...], limit: int | None = None
) -> EvaluationSet:
    """Preprocess the images of ``folder`` (the first ``limit`` in sorted order).

    Raises:
        CapsedgeError: the folder has no images, or one cannot be decoded.
    """
    files = image_files(folder)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise CapsedgeError(f"no evaluation images found in {folder}")
    images = np.empty((len(files), *preprocessing.input_shape), np.float32)
    for i, path in enumerate(files):
        try:
            images[i] = preprocess(path, preprocessing)
        except ImageError as exc:
            raise CapsedgeError(f"evaluation image {path}: {exc}") from None
    targets = np.array([label_of(p, labels) for p in files], np.int64)
    return EvaluationSet(str(folder), images, targets)


def tflite_graph(path: str | Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], list[int]]:
    """The operations (in execution order), tensors and input indices of a ``.tflite`` file.

    The interpreter is built without its default delegate, which would otherwise
    replace most operations by one ``DELEGATE`` node.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with native_stderr_silenced():
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    ops = interpreter._get_ops_details()  # the only API that lists a model's operations
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return ops, tensors, [d["index"] for d in interpreter.get_input_details()]


def tflite_input(path: str | Path) -> list[int]:
    """The input's shape signature (-1 for a dynamic dimension)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with native_stderr_silenced():
        interpreter = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    (detail,) = interpreter.get_input_details()
    return [int(d) for d in detail.get("shape_signature", detail["shape"])]


def onnx_nodes(graph: Any) -> list[Any]:
    """Every node of an ONNX graph, those in subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes.extend(onnx_nodes(attribute.g))
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    nodes.extend(onnx_nodes(subgraph))
    return nodes


def onnx_input(path: str | Path) -> list[int]:
    """The input's shape (-1 for a symbolic or unknown dimension)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def op_counts(path: str | Path) -> Counter[str]:
    """How many of each operation a ``.tflite`` or ``.onnx`` model holds (ONNX: subgraphs too)."""
    if Path(path).suffix.lower() == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return Counter(
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            for n in onnx_nodes(model.graph)
        )
    ops, _, _ = tflite_graph(path)
    return Counter(op["op_name"] for op in ops)


def forbidden_ops(counts: Counter[str], suffix: str) -> list[str]:
    """The operations of ``counts`` that no artifact may hold."""
    if suffix == ".onnx":
        return sorted(op for op in counts if op in FORBIDDEN_ONNX or "." in op)
    return sorted(op for op in counts if op in FORBIDDEN_TFLITE or op.upper().startswith("FLEX"))


def input_shape(path: str | Path) -> list[int]:
    """The model input's shape, -1 where it is not fixed."""
    return onnx_input(path) if Path(path).suffix.lower() == ".onnx" else tflite_input(path)


def run_timed(backend: Backend, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for every image, and per-run latencies in ms after explicit warm-up runs."""
    for _ in range(WARM_UP_RUNS):
        backend.run(images[:1])
    probabilities, latencies = [], []
    runs = max(len(images), MIN_TIMED_RUNS)
    for i in range(runs):
        batch = images[i % len(images)][np.newaxis]
        start = time.perf_counter()
        result = backend.run(batch)
        latencies.append((time.perf_counter() - start) * 1000.0)
        if i < len(images):
            probabilities.append(result)
    return np.stack(probabilities), np.asarray(latencies)


def constant_bytes(path: str | Path) -> int:
    """Bytes of a model's stored constants (weights, biases, folded tensors), graph excluded.

    Beside the file size this shows where an int8 file's bytes go: a small network with an
    unrolled recurrent head is mostly graph (operators, tensors, quantization parameters).
    """
    if Path(path).suffix.lower() == ".onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        return int(sum(numpy_helper.to_array(t).nbytes for t in graph.initializer))
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    return int(sum(len(b.data) for b in model.buffers if b.data is not None))


def accuracy(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """Top-1 accuracy over the labelled images; ``None`` when none is labelled."""
    known = targets >= 0
    if not known.any():
        return None
    return float(np.mean(probabilities[known].argmax(1) == targets[known]))


@dataclass(frozen=True)
class ArtifactReport:
    """What was measured for one exported file."""

    format: str
    path: str
    bytes: int
    constant_bytes: int
    ops: dict[str, int]
    input_shape: list[int]
    forbidden_ops: list[str]
    metadata_ok: bool
    accuracy: float | None
    agreement: float | None
    max_abs_diff: float | None
    latency_ms_median: float | None
    edgetpu: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Check:
    """One goal applied to one artifact."""

    name: str
    artifact: str
    passed: bool
    value: Any
    goal: str


@dataclass(frozen=True)
class VerificationReport:
    """The whole verification: reference figures, artifacts, checks."""

    model: dict[str, Any]
    evaluation: dict[str, Any]
    artifacts: list[ArtifactReport]
    checks: list[Check]
    goals: Goals = field(default_factory=Goals)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``report.json``."""
        return {
            "passed": self.passed,
            "model": self.model,
            "evaluation": self.evaluation,
            "goals": asdict(self.goals),
            "artifacts": [asdict(a) for a in self.artifacts],
            "checks": [asdict(c) for c in self.checks],
        }

    def to_markdown(self) -> str:
        """A readable table of the artifacts and the checks."""
        model, evaluation = self.model, self.evaluation
        keras_acc = _percent(model.get("keras_accuracy"))
        lines = [
            f"# Export report: {model['name']}",
            "",
            f"Evaluation: {evaluation['images']} images from `{evaluation['folder']}` "
            f"({evaluation['labelled']} labelled); Keras float accuracy {keras_acc}. "
            f"Latency: median of {evaluation['timed_runs']} single-threaded runs after "
            f"{WARM_UP_RUNS} warm-up runs, inference only.",
            "",
            "| format | file | size (KiB) | constants (KiB) | ops | accuracy | agreement | max abs diff "
            "| latency (ms) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for a in self.artifacts:
            diff = "n/a" if a.max_abs_diff is None else f"{a.max_abs_diff:.2e}"
            latency = "n/a" if a.latency_ms_median is None else f"{a.latency_ms_median:.3f}"
            lines.append(
                f"| {a.format} | `{Path(a.path).name}` | {a.bytes / 1024:.1f} "
                f"| {a.constant_bytes / 1024:.1f} | {sum(a.ops.values())} "
                f"| {_percent(a.accuracy)} | {_percent(a.agreement)} | {diff} | {latency} |"
            )
        lines += ["", f"## Checks: {'all passed' if self.passed else f'{len(self.failed)} FAILED'}", "",
                  "| check | artifact | value | goal | result |", "| --- | --- | --- | --- | --- |"]
        for c in self.checks:
            lines.append(f"| {c.name} | {c.artifact} | {_value(c.value)} | {c.goal} | "
                         f"{'pass' if c.passed else '**FAIL**'} |")
        lines += ["", "## Operations", ""]
        for a in self.artifacts:
            ops = ", ".join(f"{name} {n}" for name, n in sorted(a.ops.items(), key=lambda kv: -kv[1]))
            lines.append(f"- **{a.format}** (input {a.input_shape}): {ops}")
        for a in self.artifacts:
            if a.edgetpu:
                lines += ["", f"## Edge TPU ({a.format}, from the {a.edgetpu['source']})", "",
                          f"{a.edgetpu['on_tpu']} of {a.edgetpu['total_ops']} operations on the Edge TPU, "
                          f"{a.edgetpu['on_cpu']} on the CPU."]
                first = a.edgetpu.get("first_unsupported")
                if first:
                    lines.append(f"The first operation it cannot run is #{first['index']} "
                                 f"({first['op']}); the compiler maps one part of the graph, so "
                                 "every operation after it runs on the CPU.")
                for name, info in a.edgetpu.get("unsupported", {}).items():
                    lines.append(f"- {name} x{info['count']}: {info['reason']}")
        return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def measure(fmt: ExportFormat, path: Path, reference: np.ndarray, evaluation: EvaluationSet,
            labels: tuple[str, ...]) -> ArtifactReport:
    """Run one artifact over the evaluation set and collect its figures."""
    counts = op_counts(path)
    try:
        metadata_ok = read_metadata(path).labels == labels
    except CapsedgeError:
        metadata_ok = False
    edgetpu = None
    if fmt.name == "edgetpu":
        from capsedge.export.edgetpu_format import edgetpu_mapping

        edgetpu = edgetpu_mapping(path).to_dict()
    common = {
        "format": fmt.name,
        "path": str(path),
        "bytes": path.stat().st_size,
        "constant_bytes": constant_bytes(path),
        "ops": dict(counts.most_common()),
        "input_shape": input_shape(path),
        "forbidden_ops": forbidden_ops(counts, path.suffix.lower()),
        "metadata_ok": metadata_ok,
        "edgetpu": edgetpu,
    }
    try:
        probabilities, latencies = run_timed(open_backend(path, threads=1), evaluation.images)
        probabilities = probabilities[:, : len(labels)]  # a model with outlier features outputs them after
    except (RuntimeError, ValueError, CapsedgeError) as exc:  # a kernel failing on some input
        reason = first_line(exc)
        return ArtifactReport(**common, accuracy=None, agreement=None, max_abs_diff=None,
                              latency_ms_median=None, error=reason)
    return ArtifactReport(
        **common,
        accuracy=accuracy(probabilities, evaluation.targets),
        agreement=float(np.mean(probabilities.argmax(1) == reference.argmax(1))),
        max_abs_diff=float(np.max(np.abs(probabilities - reference))),
        latency_ms_median=float(np.median(latencies)),
    )


def checks_for(report: ArtifactReport, others: dict[str, ArtifactReport], keras_accuracy: float | None,
               goals: Goals) -> list[Check]:
    """The goals that apply to one artifact."""
    fmt = FORMATS[report.format]
    name = report.format
    static = len(report.input_shape) == 4 and report.input_shape[0] == 1 and min(report.input_shape) > 0
    result = [
        Check("no loop/flex/custom ops", name, not report.forbidden_ops, report.forbidden_ops or "none",
              "none of " + ", ".join(sorted(FORBIDDEN_ONNX if fmt.suffix == ".onnx" else FORBIDDEN_TFLITE))),
        Check("static batch-1 input", name, static, report.input_shape, "[1, H, W, C], all fixed"),
        Check("metadata readable", name, report.metadata_ok, report.metadata_ok,
              "embedded or sidecar labels match"),
        Check("runs on every evaluation image", name, report.error is None, report.error or "yes",
              "no runtime error"),
    ]
    if report.error is not None:
        return result
    if name == "onnx":
        result.append(Check("max abs diff vs Keras", name, report.max_abs_diff <= goals.onnx_max_abs_diff,
                            report.max_abs_diff, f"<= {goals.onnx_max_abs_diff:g}"))
    elif fmt.quantization == "float32":
        result.append(Check("top-1 agreement", name, report.agreement >= goals.float_agreement,
                            report.agreement, f">= {goals.float_agreement:.0%}"))
    else:
        result.append(Check("top-1 agreement", name, report.agreement >= goals.reduced_agreement,
                            report.agreement, f">= {goals.reduced_agreement:.0%}"))
    if fmt.quantization == "int8":
        if report.accuracy is not None and keras_accuracy is not None:
            moved = abs(report.accuracy - keras_accuracy)
            result.append(Check("accuracy vs Keras", name, moved <= goals.int8_accuracy_points + 1e-12,
                                round(100 * moved, 2), f"within {100 * goals.int8_accuracy_points:g} points"))
        reference = others.get(fmt.float_reference or "")
        if reference is not None:
            ratio = report.bytes / reference.bytes
            result.append(Check(f"size vs {reference.format}", name, ratio <= goals.int8_size_ratio,
                                round(ratio, 3), f"<= {goals.int8_size_ratio:.3f}"))
    return result


def verify_exports(
    classifier: Any,
    written: dict[str, Path],
    evaluation: EvaluationSet,
    *,
    name: str,
    labels: tuple[str, ...],
    goals: Goals | None = None,
) -> VerificationReport:
    """Measure every written artifact against the Keras ``classifier`` and apply the goals."""
    goals = goals or Goals()
    reference = np.asarray(classifier.predict(evaluation.images, batch_size=32, verbose=0))
    keras_accuracy = accuracy(reference, evaluation.targets)
    reports = {fmt: measure(FORMATS[fmt], Path(path), reference, evaluation, labels)
               for fmt, path in written.items()}
    checks = [c for r in reports.values() for c in checks_for(r, reports, keras_accuracy, goals)]
    return VerificationReport(
        model={"name": name, "labels": list(labels), "keras_accuracy": keras_accuracy},
        evaluation={
            "folder": evaluation.folder,
            "images": int(len(evaluation.images)),
            "labelled": evaluation.labelled,
            "timed_runs": max(len(evaluation.images), MIN_TIMED_RUNS),
        },
        artifacts=list(reports.values()),
        checks=checks,
        goals=goals,
    )


def write_report(report: VerificationReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report.to_markdown(), encoding="utf-8")
    return json_path, md_path
