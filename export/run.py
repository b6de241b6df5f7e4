"""A training run as export reads it (through :mod:`capsedge.workshop.run`): the model, its
recipe and provenance, and where its trust section is fitted from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from capsedge.backends import first_line, is_readable_file
from capsedge.errors import CapsedgeError, ModelError, reason
from capsedge.extras import require
from capsedge.preprocess import Preprocessing
from capsedge.workshop.run import CrossValidation, RunDir


@dataclass(frozen=True)
class TrainedRun:
    """A trained classifier with what the run recorded about it."""

    classifier: Any
    name: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    provenance: dict[str, Any]
    version: str = "unknown"


def run_version(name: str, model_file: Path) -> str:
    """The run's own version: its network's name, the day its weights were saved (UTC) and the
    first 10 hex digits of their SHA-256 (``effcaps_ncp_lite0_512-20261204-3f2a9c1d0e``); never
    the package's version, which says nothing about a user's weights."""
    from capsedge.model_guard import file_digest

    day = datetime.fromtimestamp(model_file.stat().st_mtime, tz=timezone.utc).strftime("%Y%m%d")
    return f"{name}-{day}-{file_digest(model_file)[:10]}"


def trust_sources(model: str | Path, cross_validation: str | Path | None,
                  train_data: str | Path | None) -> tuple[Path | None, Path | None, str | None]:
    """The cross-validation and training images to fit the trust section on: those given, else
    the run's own (the ``--folds K --final`` folder above a ``final`` run, the data folder its
    ``config.json`` names). Reads JSON only (no TensorFlow).

    Returns:
        The folder of folds, the training data, and a one-line note when either was found here
        or when no trust section can be fitted (``None`` when both were given).
    """
    if cross_validation is not None and train_data is not None:
        return Path(cross_validation), Path(train_data), None
    given_data = train_data is not None
    run = RunDir.of(model)
    try:
        config = run.read_config()
        recipe, source = config.get("train", {}), config.get("data", {}).get("source")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        recipe, source = {}, None
    reason = None
    above = CrossValidation.above(run)
    if cross_validation is None and above is not None:
        try:
            cross_validation_summary(above.path, recipe)
            cross_validation = above.path
        except CapsedgeError as exc:
            reason = str(exc)
    if train_data is None and isinstance(source, str) and Path(source).exists():
        train_data = Path(source)
    if cross_validation is None and given_data:
        return None, Path(train_data), None  # the fit says what is missing
    if cross_validation is None or train_data is None:
        reason = reason or ("the run has no cross-validation of its recipe (train with --folds K --final "
                            "and export OUT/final)" if cross_validation is None
                            else "the run does not name its training images")
        cv = Path(cross_validation) if cross_validation is not None else None
        return cv, None, (f"no calibration or outlier statistics: {reason}; the files will report "
                          "uncalibrated confidence (pass --cross-validation DIR --train-data DIR)")
    return (Path(cross_validation), Path(train_data),
            f"trust section fitted on the folds in {cross_validation} and the images in {train_data}")


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
    run = RunDir.of(path)
    model_file = run.classifier if run.path == path else path
    if not is_readable_file(model_file):
        raise ModelError(f"no trained model at {model_file}")
    if not is_readable_file(run.config):
        raise ModelError(f"no {run.CONFIG} beside {model_file.name} in {run.path}")
    keras = require("keras", extra="export", needed_by="loading a trained run")
    require("capsedge.models", extra="export", needed_by="loading a trained run")  # its custom layers
    try:
        config = run.read_config()
        metrics = run.read_metrics()
        labels = tuple(str(label) for label in config["classes"])
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{run.path} is not a complete run ({reason(exc)})") from None
    try:
        classifier = keras.models.load_model(model_file, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad file
        raise ModelError(f"cannot load {model_file} ({first_line(exc)})") from None
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
        version=run_version(config.get("model", {}).get("name", "unknown"), model_file),
    )


def _rebuilt(classifier: Any, config: dict[str, Any], model_file: Path) -> Any:
    """A model saved by an earlier capsedge (an ``ncps`` CfC layer), rebuilt: same weights, current graph."""
    from capsedge.models import ModelConfig, rebuild_classifier

    try:
        return rebuild_classifier(classifier, ModelConfig.from_dict(config.get("model", {})))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot rebuild {model_file} with this version of capsedge: {exc}") from None


# Switched off, or what every run did before its option existed ("cosine": --schedule).
_OFF = (None, 0, 0.0, False, "cosine")


def cross_validation_summary(folder: str | Path, recipe: dict[str, Any]) -> dict[str, Any]:
    """The figures of a cross-validation folder's ``cv_summary.json``, for provenance.

    Raises:
        CapsedgeError: no readable summary, or its training settings differ from ``recipe``
            in anything but ``holdout``. A setting that one side lacks (a summary written
            before the option existed) matches only when the other side has it off (0, None
            or False): new training options are added switched off.
    """
    summary_file = CrossValidation(Path(folder)).summary
    try:
        summary = CrossValidation(Path(folder)).read_summary()
        settings = dict(summary["train"])
        figures = {key: summary[key] for key in
                   ("folds", "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std", "per_fold")}
        pooled = _summary(summary["pooled"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CapsedgeError(f"no readable cross-validation summary at {summary_file} "
                            f"({reason(exc)})") from None
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
