"""Export a trained run to device artifacts: one options object in, one result out.

Each format (see ``capsedge.export.formats.FORMATS``) writes one model file with its metadata
embedded and a sidecar ``<stem>.json``. Verifying the files on real images is a separate step
(:func:`capsedge.export.verify.verify_export`). The command is :mod:`capsedge.export.cli`
(``capsedge export``, ``python export/quantize.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from capsedge import __version__
from capsedge.errors import CapsedgeError, ModelError
from capsedge.export.calibration import CALIBRATION_IMAGES, calibration_files, calibration_images
from capsedge.export.formats import ExportFormat, check_requirements, parse_formats
from capsedge.export.quantization import Quantization
from capsedge.export.run import TrainedRun, load_run
from capsedge.metadata import ModelMetadata
from capsedge.trust import Trust
from capsedge.views import RECIPE_VIEWS
from capsedge.workshop.dataset import ImageCache, read_dataset

#: Told the name of each step of an export as it starts (see :func:`steps`).
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """What ``capsedge export`` writes, and from what.

    Attributes:
        formats: names of ``capsedge.export.formats.FORMATS``.
        calibration: the folder of images int8 formats are calibrated on (any layout).
        calibration_limit: calibration images used at most.
        version: the model version to record (default: the run's own, see ``run_version``).
        cross_validation: a ``capsedge train --folds K`` folder of the same recipe; its figures
            go into the provenance, and with ``train_data`` its out-of-fold answers calibrate.
        train_data: the run's training images: with ``cross_validation``, every file carries a
            trust section (calibration and outlier statistics, see :func:`fit_run_trust`).
        test_time_views: orientations of each image the runtime averages (1, 4, 8 or 16); the
            calibration is fitted for that average.
        score_folds: first score each fold of ``cross_validation`` as an int8 file
            (:func:`capsedge.export.fold_scores.score_folds`), so that the int8 files'
            calibration is fitted on int8 answers.
    """

    formats: tuple[str, ...] = ("tflite-f32",)
    calibration: Path | None = None
    calibration_limit: int = CALIBRATION_IMAGES
    version: str | None = None
    cross_validation: Path | None = None
    train_data: Path | None = None
    test_time_views: int = RECIPE_VIEWS
    score_folds: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        for name in ("calibration", "cross_validation", "train_data"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote, and what verifying it needs.

    Attributes:
        files: format name to the file written.
        run: the run exported.
        out_dir: the folder written into.
        options: the options it was exported with.
        trust: the trust section of the float files (``None`` without ``train_data``).
        images: the images read so far, preprocessed once for every later step.
    """

    files: dict[str, Path]
    run: TrainedRun
    out_dir: Path
    options: ExportOptions
    trust: Trust | None = None
    images: ImageCache | None = field(default=None, repr=False, compare=False)


def steps(formats: Sequence[str], trust: bool, verify: bool, folds: int = 0) -> int:
    """How many times an export calls its ``progress``: each fold scored, the trust fit, each
    format, the end of writing, each verified format."""
    return folds + int(trust) + len(formats) + 1 + (len(formats) if verify else 0)


def check_arguments(formats: Iterable[str], calibration: str | Path | None,
                    model: str | Path) -> list[ExportFormat]:
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


def export(model: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
           progress: Progress | None = None) -> ExportResult:
    """Export a trained run (folder or ``classifier.keras``) to each of ``options.formats`` in
    ``out_dir`` (``progress``: see :func:`steps`).

    Raises:
        CapsedgeError: unknown format, missing tool, missing calibration data, a model that
            cannot load, ``train_data`` without ``cross_validation``.
    """
    options = options or ExportOptions()
    chosen = check_arguments(options.formats, options.calibration, model)
    run = load_run(model, options.cross_validation)
    images = ImageCache(run.preprocessing)
    if options.score_folds:
        _score_folds(options, progress)
    trust = fit_run_trust(run, options, out_dir, images, progress)
    files = write_files(run, out_dir, chosen, options, images, trust, progress)
    return ExportResult(files, run, Path(out_dir), options, trust, images)


def _score_folds(options: ExportOptions, progress: Progress | None) -> None:
    if options.cross_validation is None or options.train_data is None:
        raise CapsedgeError("--score-folds needs the cross-validation and its training images: "
                            "pass --cross-validation DIR --train-data DIR, or export its final run")
    from capsedge.export.fold_scores import score_folds

    score_folds(options.cross_validation, read_dataset(options.train_data), ("int8",), progress=progress)


def fit_run_trust(run: TrainedRun, options: ExportOptions, out_dir: str | Path, images: ImageCache,
                  progress: Progress | None = None) -> Trust | None:
    """The ``trust`` section when ``options.train_data`` is given (its figures also go to
    ``out_dir/trust.json``), calibrated for the average of ``options.test_time_views``;
    ``None`` without it.

    Raises:
        CapsedgeError: ``train_data`` without ``cross_validation``.
    """
    if options.train_data is None:
        return None
    if options.cross_validation is None:
        raise CapsedgeError("--train-data needs --cross-validation DIR: the calibration is fitted on "
                            "its out-of-fold predictions")
    from capsedge.export.trust_fit import fit_trust

    if progress is not None:
        progress("fitting the trust section")
    fitted = fit_trust(run.classifier, run.labels, options.cross_validation, options.train_data, images,
                       options.test_time_views)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "trust.json").write_text(json.dumps(fitted.report, indent=2) + "\n", encoding="utf-8")
    return fitted.trust


def write_files(run: TrainedRun, out_dir: str | Path, formats: Sequence[ExportFormat], options: ExportOptions,
                images: ImageCache, trust: Trust | None = None,
                progress: Progress | None = None) -> dict[str, Path]:
    """Write each format of a loaded run into ``out_dir``; ``progress(step)`` is called as each
    format is started and when the last is written.

    With ``trust`` (see :func:`capsedge.export.trust_fit.fit_trust`), every file also outputs
    the outlier features and carries the whole section; int8 files output them mapped onto the
    probabilities' range (:func:`capsedge.export.trust_fit.unit_range_features`), and their
    section is refitted on their own outputs (:func:`capsedge.export.trust_fit.fit_file_trust`:
    features of the ``train_data`` images; the ``cross_validation`` folds' int8 answers).
    ``test_time_views`` (1, 4, 8 or 16) is recorded for the runtime, which averages that many
    orientations of each image (the calibration must be fitted for it).

    Returns:
        Format name to the file written.
    """
    metadata = ModelMetadata(
        name=run.name,
        version=options.version or run.version,
        labels=run.labels,
        preprocessing=run.preprocessing,
        provenance=run.provenance,
        test_time_views=options.test_time_views,
    )
    calibration = None  # check_arguments saw to it that int8 formats have a calibration folder
    if any(fmt.needs_calibration for fmt in formats):
        calibration = calibration_images(options.calibration, images, options.calibration_limit)
    out = Path(out_dir)
    written = {}
    training = None
    for fmt in formats:
        if progress is not None:
            progress(f"writing {fmt.name}")
        provenance = {**metadata.provenance, "format": fmt.name, "exporter": f"capsedge {__version__}"}
        if fmt.needs_calibration:
            quantization = Quantization.for_int8(calibration)
            provenance["calibration"] = {"folder": str(options.calibration),
                                         "images": len(list(calibration()))}
        else:
            quantization = Quantization(fmt.quantization)
        model, file_trust = run.classifier, trust
        if trust is not None and trust.outliers is not None:
            model, file_trust = _with_features(run.classifier, trust, int8=fmt.needs_calibration)
        stamped = replace(metadata, provenance=provenance, trust=file_trust)
        path = out / f"{run.name}_{fmt.name.replace('-', '_')}{fmt.suffix}"
        written[fmt.name] = fmt.load_exporter()(model, path, stamped, quantization=quantization)
        if fmt.needs_calibration and file_trust is not None:
            if options.train_data is None or options.cross_validation is None:
                raise ValueError("an int8 file's trust section needs the training images and the folds")
            if training is None:
                dataset = read_dataset(options.train_data)
                training = images.images(dataset.paths), dataset.targets
            from capsedge.export.trust_fit import fit_file_trust

            own = fit_file_trust(written[fmt.name], *training, file_trust, options.cross_validation,
                                 options.test_time_views)
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


def _with_features(classifier: object, trust: Trust, int8: bool) -> tuple[object, Trust]:
    """The classifier that also outputs the outlier features, and the statistics that match them."""
    from capsedge.export.trust_fit import unit_range_outliers, with_features

    if not int8:
        return with_features(classifier), trust
    return (with_features(classifier, unit_range=trust.outliers),
            replace(trust, outliers=unit_range_outliers(trust.outliers)))
