"""Export a trained run to device artifacts and verify them: ``python export/quantize.py --help``.

Also reachable as ``capsedge export``. Each format (see ``capsedge.export.formats.FORMATS``)
writes one model file with its metadata embedded and a sidecar ``<stem>.json``;
then every file is run on real images and compared with the Keras model, and
``report.json`` and ``report.md`` are written beside them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsedge import __version__
from capsedge.backends import is_readable_file
from capsedge.errors import CapsedgeError, ImageError, ModelError, missing_extra
from capsedge.export.formats import FORMATS, ExportFormat, check_requirements, parse_formats
from capsedge.export.quantization import Quantization
from capsedge.metadata import ModelMetadata
from capsedge.preprocess import Preprocessing, image_files, preprocess
from capsedge.trust import Trust

__all__ = ["FORMATS", "TrainedRun", "calibration_images", "command", "export", "export_and_verify",
           "export_run", "load_run", "cross_validation_summary"]


@dataclass(frozen=True)
class TrainedRun:
    """A trained classifier with what the run recorded about it."""

    classifier: Any
    name: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    provenance: dict[str, Any]


def load_run(path: str | Path, cross_validation: str | Path | None = None) -> TrainedRun:
    """Load a run folder written by ``capsedge train`` (or its ``classifier.keras``).

    ``cross_validation`` names a ``capsedge train --folds K`` folder whose summary is
    recorded in the provenance (``cross_validation``); it must have used the same
    recipe as the run (every training setting but ``holdout``).

    Raises:
        ModelError: the folder or model is missing or incomplete.
        CapsedgeError: the cross-validation folder is unreadable or used another recipe.
    """
    path = Path(path)
    try:
        is_folder = path.is_dir()
    except OSError:
        is_folder = False
    run_dir = path if is_folder else path.parent
    model_file = run_dir / "classifier.keras" if is_folder else path
    config_file = run_dir / "config.json"
    if not is_readable_file(model_file):
        raise ModelError(f"no trained model at {model_file}")
    if not is_readable_file(config_file):
        raise ModelError(f"no config.json beside {model_file.name} in {run_dir}")
    try:
        import keras

        import capsedge.models  # noqa: F401 - registers the custom layers for loading
    except ImportError as exc:
        raise missing_extra(exc.name or "tensorflow", "export") from None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
        labels = tuple(str(label) for label in config["classes"])
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{run_dir} is not a complete run ({type(exc).__name__}: {exc})") from None
    try:
        classifier = keras.models.load_model(model_file, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad file
        raise ModelError(f"cannot load {model_file} ({type(exc).__name__}: {exc})") from None
    if any(type(layer).__name__ == "CfC" for layer in classifier.layers):
        classifier = _rebuilt(classifier, config, model_file)
    provenance = {
        "data": config.get("data", {}),
        "attribution": config.get("data", {}).get("attribution", ""),
        "training": config.get("train", {}),
        "metrics": {k: v for k, v in metrics.items() if k != "holdout"}
        | ({"holdout": _summary(metrics["holdout"])} if "holdout" in metrics else {}),
    }
    if cross_validation is not None:
        provenance["cross_validation"] = cross_validation_summary(cross_validation, config.get("train", {}))
    return TrainedRun(
        classifier=classifier,
        name=config.get("model", {}).get("name", "unknown"),
        labels=labels,
        preprocessing=preprocessing,
        provenance=provenance,
    )


def _rebuilt(classifier: Any, config: dict[str, Any], model_file: Path) -> Any:
    """A model saved by an earlier capsedge (an ``ncps`` CfC layer), rebuilt: same weights, current graph."""
    from capsedge.models import ModelConfig, rebuild_classifier

    try:
        return rebuild_classifier(classifier, ModelConfig.from_dict(config.get("model", {})))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot rebuild {model_file} with this version of capsedge: {exc}") from None


_OFF = (None, 0, 0.0, False)


def cross_validation_summary(folder: str | Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """The figures of a cross-validation folder's ``cv_summary.json``, for provenance.

    Raises:
        CapsedgeError: no readable summary, or its training settings differ from ``recipe``
            in anything but ``holdout``. A setting that one side lacks (a summary written
            before the option existed) matches only when the other side has it off (0, None
            or False): new training options are added switched off.
    """
    summary_file = Path(folder) / "cv_summary.json"
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        settings = dict(summary["train"])
        figures = {key: summary[key] for key in
                   ("folds", "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "per_fold")}
        pooled = _summary(summary["pooled"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CapsedgeError(f"no readable cross-validation summary at {summary_file} "
                            f"({type(exc).__name__})") from None
    def same(key: str) -> bool:
        if key not in settings or key not in recipe:
            return settings.get(key, recipe.get(key)) in _OFF
        return settings[key] == recipe[key]

    differing = sorted(key for key in set(settings) | set(recipe) if key != "holdout" and not same(key))
    if differing:
        shown = ", ".join(f"{key} {settings.get(key)!r} vs {recipe.get(key)!r}" for key in differing)
        raise CapsedgeError(f"{folder} cross-validated another recipe than the model's ({shown})")
    return {**figures, "pooled": pooled, "train": settings}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "confusion_matrix", "classes")
    return {k: report[k] for k in keys if k in report}


def calibration_images(
    source: str | Path, preprocessing: Preprocessing, limit: int = 200, seed: int = 0
) -> Callable[[], Iterable[np.ndarray]]:
    """Up to ``limit`` preprocessed images from a folder (any layout), for int8 calibration.

    Raises:
        CapsedgeError: the folder is missing, has no images, or an image cannot be decoded.
    """
    files = _calibration_files(source)
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    images = []
    for path in chosen:
        try:
            images.append(preprocess(path, preprocessing))
        except ImageError as exc:
            raise CapsedgeError(f"calibration image {path}: {exc}") from None
    return lambda: iter(images)


def _calibration_files(source: str | Path) -> list[Path]:
    folder = Path(source)
    if not folder.is_dir():
        raise CapsedgeError(f"calibration folder not found: {folder}")
    files = image_files(folder)
    if not files:
        raise CapsedgeError(f"no calibration images found in {folder}")
    return files


def export_run(
    run: TrainedRun,
    out_dir: str | Path,
    formats: Sequence[ExportFormat],
    calibration: str | Path | None = None,
    version: str | None = None,
    calibration_limit: int = 200,
    trust: Trust | None = None,
) -> dict[str, Path]:
    """Write each format of a loaded run into ``out_dir``.

    With ``trust`` (see :func:`capsedge.export.trust_fit.fit_trust`), float and dynamic-range
    files also output the outlier features and carry the whole section; int8 files carry the
    calibration only.

    Returns:
        Format name to the file written.
    """
    metadata = ModelMetadata(
        name=run.name,
        version=version or f"{run.name}-{__version__}",
        labels=run.labels,
        preprocessing=run.preprocessing,
        provenance=run.provenance,
    )
    with_features = None
    if trust is not None and trust.outliers is not None:
        from capsedge.export.trust_fit import with_features as add_features

        with_features = add_features(run.classifier)
    images = None
    if any(fmt.needs_calibration for fmt in formats):
        if calibration is None:
            needing = ", ".join(f.name for f in formats if f.needs_calibration)
            raise CapsedgeError(f"{needing} need calibration images: pass --calib DIR")
        images = calibration_images(calibration, run.preprocessing, calibration_limit)
    out = Path(out_dir)
    written = {}
    for fmt in formats:
        if fmt.needs_calibration:
            quantization = Quantization.for_int8(images)
        else:
            quantization = Quantization(fmt.quantization)
        provenance = {**metadata.provenance, "format": fmt.name, "exporter": f"capsedge {__version__}"}
        if fmt.needs_calibration:
            provenance["calibration"] = {"folder": str(calibration), "images": len(list(images()))}
        model = run.classifier
        stamped = replace(metadata, provenance=provenance)
        if trust is not None and (fmt.needs_calibration or with_features is None):
            # One int8 scale cannot serve probabilities and features: calibration only.
            stamped = replace(stamped, trust=replace(trust, outliers=None))
        elif trust is not None:
            model, stamped = with_features, replace(stamped, trust=trust)
        path = out / f"{run.name}_{fmt.name.replace('-', '_')}{fmt.suffix}"
        written[fmt.name] = fmt.load_exporter()(model, path, stamped, quantization=quantization)
    return written


def _prepare(formats: Iterable[str], calibration: str | Path | None, model: str | Path) -> list[ExportFormat]:
    """Everything that can fail cheaply, before TensorFlow is imported."""
    chosen = parse_formats(formats)
    check_requirements(chosen)
    needs_calibration = [f.name for f in chosen if f.needs_calibration]
    if needs_calibration and calibration is None:
        verb = "needs" if len(needs_calibration) == 1 else "need"
        raise CapsedgeError(f"{', '.join(needs_calibration)} {verb} calibration images: pass --calib DIR")
    if not Path(model).exists():
        raise ModelError(f"no trained model at {model}")
    if needs_calibration:
        _calibration_files(calibration)
    return chosen


def export(
    model: str | Path,
    out_dir: str | Path,
    formats: Iterable[str] = ("tflite-f32",),
    calibration: str | Path | None = None,
    version: str | None = None,
    cross_validation: str | Path | None = None,
    train_data: str | Path | None = None,
) -> dict[str, Path]:
    """Export a trained run (folder or ``classifier.keras``) to each of ``formats`` in ``out_dir``.

    ``cross_validation``: see :func:`load_run`; with ``train_data`` (the run's training
    images) too, the files carry calibration and outlier statistics (:func:`fit_run_trust`).

    Returns:
        Format name to the file written.

    Raises:
        CapsedgeError: unknown format, missing tool, missing calibration data, or a model
            that cannot load.
    """
    chosen = _prepare(formats, calibration, model)
    run = load_run(model, cross_validation)
    trust = fit_run_trust(run, cross_validation, train_data, out_dir)
    return export_run(run, out_dir, chosen, calibration, version, trust=trust)


def fit_run_trust(run: TrainedRun, cross_validation: str | Path | None, train_data: str | Path | None,
                  out_dir: str | Path) -> Trust | None:
    """The ``trust`` section when ``train_data`` is given (its figures also go to
    ``out_dir/trust.json``); ``None`` without it.

    Raises:
        CapsedgeError: ``train_data`` without ``cross_validation``.
    """
    if train_data is None:
        return None
    if cross_validation is None:
        raise CapsedgeError("--train-data needs --cross-validation DIR: the calibration is fitted on "
                            "its out-of-fold predictions")
    from capsedge.export.trust_fit import fit_trust

    fitted = fit_trust(run.classifier, run.labels, cross_validation, train_data, run.preprocessing)
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
    calibration_limit: int = 200,
    version: str | None = None,
    cross_validation: str | Path | None = None,
    train_data: str | Path | None = None,
) -> tuple[dict[str, Path], Any]:
    """Export, then verify every file on ``evaluation`` (default: the calibration folder).

    ``cross_validation``, ``train_data``: see :func:`export`.

    Returns:
        The files written, and the :class:`~capsedge.export.verify.VerificationReport`
        (also written to ``report.json`` and ``report.md`` in ``out_dir``).
    """
    from capsedge.export import verify

    chosen = _prepare(formats, calibration, model)
    evaluation = evaluation if evaluation is not None else calibration
    if evaluation is None:
        raise CapsedgeError("verification needs images: pass --eval DIR (or --calib DIR), or --no-verify")
    if not image_files(evaluation):
        raise CapsedgeError(f"no evaluation images found in {evaluation}")
    run = load_run(model, cross_validation)
    eval_set = verify.load_evaluation_set(evaluation, run.preprocessing, run.labels, eval_limit)
    trust = fit_run_trust(run, cross_validation, train_data, out_dir)
    written = export_run(run, out_dir, chosen, calibration, version, calibration_limit, trust=trust)
    report = verify.verify_exports(run.classifier, written, eval_set, name=run.name, labels=run.labels)
    verify.write_report(report, out_dir)
    return written, report


def _cli() -> Any:
    import click

    @click.command(name="export", context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", "model", required=True, type=click.Path(path_type=Path),
                  help="A run folder from 'capsedge train', or its classifier.keras.")
    @click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
                  help="Folder for the exported files and report.json / report.md.")
    @click.option("--formats", default="tflite-f32", show_default=True,
                  help=f"Comma-separated: {', '.join(FORMATS)}.")
    @click.option("--calib", type=click.Path(path_type=Path), default=None,
                  help="Folder of images for int8 calibration (any layout).")
    @click.option("--calib-limit", type=click.IntRange(1), default=200, show_default=True,
                  help="Calibration images used at most.")
    @click.option("--eval", "eval_dir", type=click.Path(path_type=Path), default=None,
                  help="Folder of images to verify on (Maker.N.jpg or Maker/...). Default: --calib.")
    @click.option("--eval-limit", type=click.IntRange(1), default=None,
                  help="Verify on the first N evaluation images only.")
    @click.option("--version", "version", default=None, help="Model version to record.")
    @click.option("--cross-validation", "cv_dir", type=click.Path(path_type=Path), default=None,
                  help="A 'capsedge train --folds K' folder of the same recipe: its figures go "
                       "into the model's provenance.")
    @click.option("--train-data", "train_data", type=click.Path(path_type=Path), default=None,
                  help="The images the run was trained on: with --cross-validation, the files get "
                       "calibrated confidence, an 'uncertain' threshold and outlier statistics.")
    @click.option("--no-verify", is_flag=True, help="Write the files only; no report.")
    @click.option("--allow-fail", is_flag=True,
                  help="Exit 0 even when a verification check fails (the report still says which).")
    def command(model: Path, out_dir: Path, formats: str, calib: Path | None, calib_limit: int,
                eval_dir: Path | None, eval_limit: int | None, version: str | None, cv_dir: Path | None,
                train_data: Path | None, no_verify: bool, allow_fail: bool) -> None:
        """Export a trained model to TFLite / ONNX / Edge TPU files and verify them."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        names = [f.strip() for f in formats.split(",") if f.strip()]
        try:
            if no_verify:
                written, report = export(model, out_dir, names, calib, version, cv_dir, train_data), None
            else:
                written, report = export_and_verify(model, out_dir, names, calib, eval_dir,
                                                    eval_limit=eval_limit, calibration_limit=calib_limit,
                                                    version=version, cross_validation=cv_dir,
                                                    train_data=train_data)
        except CapsedgeError as exc:
            click.echo(f"capsedge: error: {exc}", err=True)
            raise SystemExit(1) from None
        except OSError as exc:
            click.echo(f"capsedge: error: {exc.filename or out_dir}: {exc.strerror or type(exc).__name__}",
                       err=True)
            raise SystemExit(1) from None
        for name, path in written.items():
            click.echo(f"{name}: {path} ({path.stat().st_size / 1024:.1f} KiB)")
        if report is None:
            return
        click.echo(f"report: {Path(out_dir) / 'report.md'}")
        if report.passed:
            click.echo(f"verification: all {len(report.checks)} checks passed")
            return
        failures = "; ".join(f"{c.artifact} {c.name} = {c.value} (goal {c.goal})" for c in report.failed)
        click.echo(f"capsedge: {'warning' if allow_fail else 'error'}: verification failed: {failures}",
                   err=True)
        if not allow_fail:
            raise SystemExit(1)

    return command


command = _cli()

if __name__ == "__main__":
    command()
