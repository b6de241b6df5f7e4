"""Verify exported models against the Keras model they came from.

Every artifact is run through the same backends ``capsedge classify`` uses
(``capsedge.backends``), single-threaded, on an evaluation set of real images
that went through the shared preprocessing. For each artifact the report gives
its size, its operations, accuracy, top-1 agreement with the Keras model, the
largest absolute difference of probabilities and the median latency; the
checks below decide whether the export passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capsedge.backends import Backend, first_line, open_backend
from capsedge.errors import CapsedgeError
from capsedge.export.formats import FORMATS, ExportFormat
from capsedge.export.graph import (
    FORBIDDEN_ONNX,
    FORBIDDEN_TFLITE,
    constant_bytes,
    forbidden_ops,
    input_shape,
    op_counts,
)
from capsedge.export.report import WARM_UP_RUNS, ArtifactReport, Check, Goals, VerificationReport
from capsedge.folders import image_files
from capsedge.metadata import read_metadata
from capsedge.workshop.dataset import ImageCache, label_of

if TYPE_CHECKING:
    from capsedge.export.writer import ExportResult

MIN_TIMED_RUNS = 20


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


def check_evaluation(evaluation: str | Path | None) -> Path:
    """The evaluation folder, checked before anything heavy is loaded.

    Raises:
        CapsedgeError: none given, or it has no images.
    """
    if evaluation is None:
        raise CapsedgeError("verification needs images: pass --eval DIR (or --calib DIR), or --no-verify")
    if not image_files(evaluation):
        raise CapsedgeError(f"no evaluation images found in {evaluation}")
    return Path(evaluation)


def load_evaluation_set(folder: str | Path, images: ImageCache, labels: tuple[str, ...],
                        limit: int | None = None) -> EvaluationSet:
    """The images of ``folder`` (the first ``limit`` in sorted order, any layout, labelled by
    :func:`~capsedge.workshop.dataset.label_of`), preprocessed by ``images``.

    Raises:
        CapsedgeError: the folder has no images, or one cannot be decoded.
    """
    files = image_files(folder)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise CapsedgeError(f"no evaluation images found in {folder}")
    targets = np.array([label_of(p, labels) for p in files], np.int64)
    return EvaluationSet(str(folder), images.images(files, "evaluation image"), targets)


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


def accuracy(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """Top-1 accuracy over the labelled images; ``None`` when none is labelled."""
    known = targets >= 0
    if not known.any():
        return None
    return float(np.mean(probabilities[known].argmax(1) == targets[known]))


def metadata_fits(path: Path, labels: tuple[str, ...], graph_input: list[int]) -> bool:
    """The file's metadata is readable, names ``labels``, and its preprocessing makes tensors of
    the shape the graph takes (the input size is stated in the metadata and in the graph:
    here the two are compared)."""
    try:
        metadata = read_metadata(path)
    except CapsedgeError:
        return False
    return metadata.labels == labels and graph_input == [1, *metadata.preprocessing.input_shape]


def measure(fmt: ExportFormat, path: Path, reference: np.ndarray, evaluation: EvaluationSet,
            labels: tuple[str, ...]) -> ArtifactReport:
    """Run one artifact over the evaluation set and collect its figures."""
    counts = op_counts(path)
    graph_input = input_shape(path)
    metadata_ok = metadata_fits(path, labels, graph_input)
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
        "input_shape": graph_input,
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
              "embedded or sidecar; labels match; its preprocessing fits the graph's input"),
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
            # The constants (weights, biases, scales), which int8 shrinks; a QDQ graph's many
            # small nodes add file bytes that are not weights (the sizes are in the table).
            ratio = report.constant_bytes / reference.constant_bytes
            result.append(Check(f"constants vs {reference.format}", name, ratio <= goals.int8_size_ratio,
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
    progress: Callable[[str], None] | None = None,
) -> VerificationReport:
    """Measure every written artifact against the Keras ``classifier`` and apply the goals;
    ``progress(format)`` is called after each artifact is measured."""
    goals = goals or Goals()
    reference = np.asarray(classifier.predict(evaluation.images, batch_size=32, verbose=0))
    keras_accuracy = accuracy(reference, evaluation.targets)
    reports = {}
    for fmt, path in written.items():
        reports[fmt] = measure(FORMATS[fmt], Path(path), reference, evaluation, labels)
        if progress is not None:
            progress(fmt)
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


def verify_export(result: ExportResult, evaluation: str | Path | None = None, limit: int | None = None,
                  progress: Callable[[str], None] | None = None) -> VerificationReport:
    """Verify the files of an export on the images of ``evaluation`` (default: its calibration
    folder; the first ``limit`` only) against the Keras model, and write ``report.json`` and
    ``report.md`` beside them; ``progress(step)`` is told each format verified. The images the
    export read already are not decoded again.

    Raises:
        CapsedgeError: no evaluation images, or one cannot be decoded.
    """
    from capsedge.export.report import write_report

    folder = check_evaluation(evaluation if evaluation is not None else result.options.calibration)
    run = result.run
    images = result.images if result.images is not None else ImageCache(run.preprocessing)
    evaluation_set = load_evaluation_set(folder, images, run.labels, limit)
    verified = (lambda fmt: progress(f"verified {fmt}")) if progress is not None else None
    report = verify_exports(run.classifier, result.files, evaluation_set, name=run.name, labels=run.labels,
                            progress=verified)
    write_report(report, result.out_dir)
    return report
