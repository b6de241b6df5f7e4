"""What a run measures and draws on held-out images: predictions (one view and every
test-time view), the confusion/per-class/reliability pictures, and the learning curves' history."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import CapsedgeError, reason
from capsedge.views import orientations

from .figures import TRAIN_COLOUR, save_confusion_png, save_per_class_png, save_reliability_png
from .metrics import classification_report

#: A fold's held-out probabilities in every test-time view, ``(images, 8, classes)``.
VIEWS_FILE = "holdout_probabilities_views.npy"


def views_file(quantized: str | None = None) -> str:
    """The file of a fold's held-out probabilities per view: the float model's, or those of the
    fold's ``quantized`` file (``int8``: written by ``python bench/heldout_int8.py --save``)."""
    return VIEWS_FILE if quantized is None else VIEWS_FILE.replace(".npy", f"_{quantized}.npy")


def predict_probabilities(classifier: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities of the Keras classifier for preprocessed images."""
    return np.asarray(classifier.predict(images, batch_size=batch_size, verbose=0))


def predict_views(classifier: Any, images: np.ndarray, count: int = 8, batch_size: int = 32) -> np.ndarray:
    """``(N, count, classes)`` probabilities of each image in its first ``count`` test-time views
    (:func:`capsedge.views.orientations`; all eight by default)."""
    return np.stack([predict_probabilities(classifier, view, batch_size)
                     for view in orientations(images, count)], axis=1)


def average_views(views: np.ndarray, count: int) -> np.ndarray:
    """What a runtime averaging the first ``count`` views answers: their mean probabilities."""
    if views.ndim != 3 or not 1 <= count <= views.shape[1]:
        raise ValueError(f"cannot average {count} views of predictions shaped {views.shape}")
    return views[:, :count].mean(axis=1)


def save_evaluation_pngs(probabilities: np.ndarray, targets: np.ndarray, classes: tuple[str, ...],
                         run_dir: Path) -> None:
    """``confusion.png``, ``per_class.png`` and ``reliability.png`` for held-out predictions."""
    from capsedge.trust import reliability_bins

    report = classification_report(targets, probabilities.argmax(1), classes)
    save_confusion_png(np.array(report["confusion_matrix"]), classes, run_dir / "confusion.png")
    save_per_class_png(report, run_dir / "per_class.png")
    save_reliability_png([("held-out", reliability_bins(probabilities, targets), TRAIN_COLOUR)],
                         run_dir / "reliability.png")


def read_history(path: Path) -> dict[str, list[float]]:
    """The ``CSVLogger`` file as columns (empty when there is none)."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "epoch":
                columns.setdefault(key, []).append(_number_or_nan(value))
    return columns


def _number_or_nan(text: str | None) -> float:
    """A CSVLogger cell: a number, or NaN for what it writes when there is none (``NA``)."""
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def out_of_fold(cross_validation: str | Path, images: int, views: int = 1,
                quantized: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, probabilities)`` of every image from a ``--folds K`` folder's held-out folds,
    averaged over ``views`` test-time views (``holdout_probabilities_views.npy``) when more than one;
    with ``quantized``, those of the folds' quantized files (see :func:`views_file`).

    Raises:
        CapsedgeError: a fold is missing its held-out predictions (or those views), or they do
            not cover ``images`` images exactly once.
    """
    folds = sorted(Path(cross_validation).glob("fold-*"))
    if not folds:
        raise CapsedgeError(f"no fold-* folders in {cross_validation}")
    name = views_file(quantized)
    missing = [f.name for f in folds if (views > 1 or quantized) and not (f / name).is_file()]
    if missing and quantized:
        raise CapsedgeError(f"{cross_validation}/{missing[0]} has no {name} (python bench/heldout_int8.py "
                            f"--cv DIR --formats {quantized} --save writes it)")
    if missing:
        raise CapsedgeError(f"{cross_validation}/{missing[0]} has no {VIEWS_FILE} for {views} test-time "
                            "views (runs of capsedge before 0.4 did not write it: python "
                            "bench/test_time_views.py --cv DIR adds it)")
    try:
        indices = np.concatenate([np.load(f / "holdout_indices.npy") for f in folds])
        probabilities = np.concatenate([
            np.load(f / "holdout_probabilities.npy") if views == 1 and not quantized
            else average_views(np.load(f / name), views) for f in folds])
    except (OSError, ValueError) as exc:
        raise CapsedgeError(f"cannot read the held-out predictions in {cross_validation} "
                            f"({reason(exc)})") from None
    if sorted(indices.tolist()) != list(range(images)):
        raise CapsedgeError(f"the folds of {cross_validation} do not cover the {images} training images "
                            "exactly once: was it trained on other data?")
    return indices, probabilities
