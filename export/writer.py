"""Export a trained run to device artifacts and verify them.

Each format (see ``capsedge.export.formats.FORMATS``) writes one model file with its
metadata embedded and a sidecar ``<stem>.json``; then every file is run on real images and
compared with the Keras model, and ``report.json`` and ``report.md`` are written beside them.
The command is :mod:`capsedge.export.cli` (``capsedge export``, ``python export/quantize.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from capsedge import __version__
from capsedge.errors import CapsedgeError, ModelError
from capsedge.export.formats import ExportFormat, check_requirements, parse_formats
from capsedge.export.quantization import CALIBRATION_IMAGES, Quantization
from capsedge.export.run import TrainedRun, calibration_files, calibration_images, load_run
from capsedge.folders import image_files
from capsedge.metadata import ModelMetadata
from capsedge.trust import Trust
from capsedge.views import RECIPE_VIEWS

#: Told the name of each step of an export as it starts (see :func:`steps`).
Progress = Callable[[str], None]


def steps(formats: Sequence[str], trust: bool, verify: bool) -> int:
    """How many times an export calls its ``progress``: the trust fit, each format, the end of
    writing, each verified format."""
    return int(trust) + len(formats) + 1 + (len(formats) if verify else 0)


def export_run(
    run: TrainedRun,
    out_dir: str | Path,
    formats: Sequence[ExportFormat],
    calibration: str | Path | None = None,
    version: str | None = None,
    calibration_limit: int = CALIBRATION_IMAGES,
    trust: Trust | None = None,
    test_time_views: int = RECIPE_VIEWS,
    train_data: str | Path | None = None,
    cross_validation: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Write each format of a loaded run into ``out_dir``; ``progress(step)`` is called as each
    format is started and when the last is written.

    With ``trust`` (see :func:`capsedge.export.trust_fit.fit_trust`), every file also outputs
    the outlier features and carries the whole section; int8 files output them mapped onto the
    probabilities' range (:func:`capsedge.export.trust_fit.unit_range_features`), and their
    section is refitted on their own outputs (:func:`capsedge.export.trust_fit.fit_file_trust`:
    features of the ``train_data`` images; the ``cross_validation`` folds' int8 answers).
    ``test_time_views`` (1, 4 or 8) is recorded for the runtime, which averages that many
    orientations of each image (the calibration must be fitted for it).

    Returns:
        Format name to the file written.
    """
    metadata = ModelMetadata(
        name=run.name,
        version=version or run.version,
        labels=run.labels,
        preprocessing=run.preprocessing,
        provenance=run.provenance,
        test_time_views=test_time_views,
    )
    images = None
    if any(fmt.needs_calibration for fmt in formats):
        if calibration is None:
            needing = ", ".join(f.name for f in formats if f.needs_calibration)
            raise CapsedgeError(f"{needing} need calibration images: pass --calib DIR")
        images = calibration_images(calibration, run.preprocessing, calibration_limit)
    out = Path(out_dir)
    written = {}
    training = None
    for fmt in formats:
        if progress is not None:
            progress(f"writing {fmt.name}")
        if fmt.needs_calibration:
            quantization = Quantization.for_int8(images)
        else:
            quantization = Quantization(fmt.quantization)
        provenance = {**metadata.provenance, "format": fmt.name, "exporter": f"capsedge {__version__}"}
        if fmt.needs_calibration:
            provenance["calibration"] = {"folder": str(calibration), "images": len(list(images()))}
        model, file_trust = run.classifier, trust
        if trust is not None and trust.outliers is not None:
            model, file_trust = _with_features(run.classifier, trust, int8=fmt.needs_calibration)
        stamped = replace(metadata, provenance=provenance, trust=file_trust)
        path = out / f"{run.name}_{fmt.name.replace('-', '_')}{fmt.suffix}"
        written[fmt.name] = fmt.load_exporter()(model, path, stamped, quantization=quantization)
        if fmt.needs_calibration and file_trust is not None:
            if train_data is None or cross_validation is None:
                raise ValueError("an int8 file's trust section needs the training images and the folds")
            if training is None:
                from capsedge.train.data import load_images, read_dataset

                dataset = read_dataset(train_data)
                training = load_images(dataset, run.preprocessing), dataset.targets
            from capsedge.export.trust_fit import fit_file_trust

            own = fit_file_trust(written[fmt.name], *training, file_trust, cross_validation, test_time_views)
            restamp(written[fmt.name], replace(stamped, trust=own))
    if progress is not None:
        progress("written")
    return written


def restamp(path: Path, metadata: ModelMetadata) -> None:
    """Replace the metadata of a written file (and of its Edge TPU compilation, if any)."""
    if path.suffix == ".onnx":
        import onnx

        from capsedge.export.onnx_format import save_onnx

        save_onnx(onnx.load(str(path)), path, metadata)
        return
    from capsedge.export.edgetpu_format import compiled_path
    from capsedge.export.tflite_format import stamp_tflite

    stamp_tflite(path, metadata)
    if compiled_path(path).is_file():
        stamp_tflite(compiled_path(path), metadata)


def _with_features(classifier: Any, trust: Trust, int8: bool) -> tuple[Any, Trust]:
    """The classifier that also outputs the outlier features, and the statistics that match them."""
    from capsedge.export.trust_fit import unit_range_outliers, with_features

    if not int8:
        return with_features(classifier), trust
    return (with_features(classifier, unit_range=trust.outliers),
            replace(trust, outliers=unit_range_outliers(trust.outliers)))


def check_arguments(
    formats: Iterable[str], calibration: str | Path | None, model: str | Path
) -> list[ExportFormat]:
    """Everything that can fail cheaply, before TensorFlow is imported: the formats and their
    tools, the calibration folder, the model path. Returns the formats chosen."""
    chosen = parse_formats(formats)
    check_requirements(chosen)
    needs_calibration = [f.name for f in chosen if f.needs_calibration]
    if needs_calibration and calibration is None:
        verb = "needs" if len(needs_calibration) == 1 else "need"
        raise CapsedgeError(f"{', '.join(needs_calibration)} {verb} calibration images: pass --calib DIR")
    if not Path(model).exists():
        raise ModelError(f"no trained model at {model}")
    if needs_calibration:
        calibration_files(calibration)
    return chosen


def export(
    model: str | Path,
    out_dir: str | Path,
    formats: Iterable[str] = ("tflite-f32",),
    calibration: str | Path | None = None,
    version: str | None = None,
    cross_validation: str | Path | None = None,
    train_data: str | Path | None = None,
    test_time_views: int = RECIPE_VIEWS,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Export a trained run (folder or ``classifier.keras``) to each of ``formats`` in ``out_dir``
    (``progress``: see :func:`steps`).

    ``cross_validation``: see :func:`load_run`; with ``train_data`` (the run's training
    images) too, the files carry calibration and outlier statistics (:func:`fit_run_trust`),
    fitted for the ``test_time_views`` the runtime will average (see :func:`export_run`).

    Returns:
        Format name to the file written.

    Raises:
        CapsedgeError: unknown format, missing tool, missing calibration data, or a model
            that cannot load.
    """
    chosen = check_arguments(formats, calibration, model)
    run = load_run(model, cross_validation)
    trust = fit_run_trust(run, cross_validation, train_data, out_dir, test_time_views, progress)
    return export_run(run, out_dir, chosen, calibration, version, trust=trust,
                      test_time_views=test_time_views, train_data=train_data,
                      cross_validation=cross_validation, progress=progress)


def fit_run_trust(run: TrainedRun, cross_validation: str | Path | None, train_data: str | Path | None,
                  out_dir: str | Path, test_time_views: int = RECIPE_VIEWS,
                  progress: Progress | None = None) -> Trust | None:
    """The ``trust`` section when ``train_data`` is given (its figures also go to
    ``out_dir/trust.json``), calibrated for the average of ``test_time_views``; ``None``
    without it.

    Raises:
        CapsedgeError: ``train_data`` without ``cross_validation``.
    """
    if train_data is None:
        return None
    if cross_validation is None:
        raise CapsedgeError("--train-data needs --cross-validation DIR: the calibration is fitted on "
                            "its out-of-fold predictions")
    from capsedge.export.trust_fit import fit_trust

    if progress is not None:
        progress("fitting the trust section")
    fitted = fit_trust(run.classifier, run.labels, cross_validation, train_data, run.preprocessing,
                       test_time_views)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "trust.json").write_text(json.dumps(fitted.report, indent=2) + "\n", encoding="utf-8")
    return fitted.trust


def export_and_verify(
    model: str | Path,
    out_dir: str | Path,
    formats: Iterable[str],
    calibration: str | Path | None = None,
    evaluation: str | Path | None = None,
    *,
    eval_limit: int | None = None,
    calibration_limit: int = CALIBRATION_IMAGES,
    version: str | None = None,
    cross_validation: str | Path | None = None,
    train_data: str | Path | None = None,
    test_time_views: int = RECIPE_VIEWS,
    progress: Progress | None = None,
) -> tuple[dict[str, Path], Any]:
    """Export, then verify every file on ``evaluation`` (default: the calibration folder).

    ``cross_validation``, ``train_data``, ``test_time_views``: see :func:`export`. The checks
    compare each file's single-view outputs with the Keras model's.

    Returns:
        The files written, and the :class:`~capsedge.export.report.VerificationReport`
        (also written to ``report.json`` and ``report.md`` in ``out_dir``).
    """
    from capsedge.export import verify
    from capsedge.export.report import write_report

    chosen = check_arguments(formats, calibration, model)
    evaluation = evaluation if evaluation is not None else calibration
    if evaluation is None:
        raise CapsedgeError("verification needs images: pass --eval DIR (or --calib DIR), or --no-verify")
    if not image_files(evaluation):
        raise CapsedgeError(f"no evaluation images found in {evaluation}")
    run = load_run(model, cross_validation)
    eval_set = verify.load_evaluation_set(evaluation, run.preprocessing, run.labels, eval_limit)
    trust = fit_run_trust(run, cross_validation, train_data, out_dir, test_time_views, progress)
    written = export_run(run, out_dir, chosen, calibration, version, calibration_limit, trust=trust,
                         test_time_views=test_time_views, train_data=train_data,
                         cross_validation=cross_validation, progress=progress)
    verified = (lambda fmt: progress(f"verified {fmt}")) if progress is not None else None
    report = verify.verify_exports(run.classifier, written, eval_set, name=run.name, labels=run.labels,
                                   progress=verified)
    write_report(report, out_dir)
    return written, report
