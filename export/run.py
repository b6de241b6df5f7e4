"""A training run as export reads it: the model, its recipe and provenance, and images
for int8 calibration."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.backends import first_line, is_readable_file
from capsedge.errors import CapsedgeError, ImageError, ModelError, missing_extra, reason
from capsedge.export.quantization import CALIBRATION_IMAGES
from capsedge.folders import image_files
from capsedge.preprocess import Preprocessing, preprocess


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


def run_folder(path: str | Path) -> Path:
    """The run folder of a run folder or of its ``classifier.keras``."""
    path = Path(path)
    try:
        return path if path.is_dir() else path.parent
    except OSError:
        return path.parent


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
    run_dir = run_folder(model)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        recipe, source = config.get("train", {}), config.get("data", {}).get("source")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        recipe, source = {}, None
    reason = None
    if cross_validation is None and (run_dir.parent / "cv_summary.json").is_file():
        try:
            cross_validation_summary(run_dir.parent, recipe)
            cross_validation = run_dir.parent
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
        raise ModelError(f"{run_dir} is not a complete run ({reason(exc)})") from None
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


def calibration_images(
    source: str | Path, preprocessing: Preprocessing, limit: int = CALIBRATION_IMAGES, seed: int = 0
) -> Callable[[], Iterable[np.ndarray]]:
    """Up to ``limit`` preprocessed images from a folder (any layout), for int8 calibration.

    Raises:
        CapsedgeError: the folder is missing, has no images, or an image cannot be decoded.
    """
    files = calibration_files(source)
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    images = []
    for path in chosen:
        try:
            images.append(preprocess(path, preprocessing))
        except ImageError as exc:
            raise CapsedgeError(f"calibration image {path}: {exc}") from None
    return lambda: iter(images)


def calibration_files(source: str | Path) -> list[Path]:
    folder = Path(source)
    if not folder.is_dir():
        raise CapsedgeError(f"calibration folder not found: {folder}")
    files = image_files(folder)
    if not files:
        raise CapsedgeError(f"no calibration images found in {folder}")
    return files
