"""What a run measures and draws on held-out images: predictions (one view and every
test-time view), the confusion/per-class/reliability pictures, and the learning curves' history."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.views import ALL_VIEWS, orientations
from capsedge.workshop.run import RunDir

from .figures import TRAIN_COLOUR, save_confusion_png, save_per_class_png, save_reliability_png
from .metrics import classification_report

__all__ = ["predict_probabilities", "predict_views", "read_history", "save_evaluation_pngs"]


def predict_probabilities(classifier: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities of the Keras classifier for preprocessed images."""
    return np.asarray(classifier.predict(images, batch_size=batch_size, verbose=0))


def predict_views(classifier: Any, images: np.ndarray, count: int = ALL_VIEWS,
                  batch_size: int = 32) -> np.ndarray:
    """``(N, count, classes)`` probabilities of each image in its first ``count`` test-time views
    (:func:`capsedge.views.orientations`; all sixteen by default)."""
    return np.stack([predict_probabilities(classifier, view, batch_size)
                     for view in orientations(images, count)], axis=1)


def save_evaluation_pngs(probabilities: np.ndarray, targets: np.ndarray, classes: tuple[str, ...],
                         run_dir: Path) -> None:
    """``confusion.png``, ``per_class.png`` and ``reliability.png`` for held-out predictions."""
    from capsedge.trust import reliability_bins

    report = classification_report(targets, probabilities.argmax(1), classes)
    run = RunDir(run_dir)
    save_confusion_png(np.array(report["confusion_matrix"]), classes, run.confusion)
    save_per_class_png(report, run.per_class)
    save_reliability_png([("held-out", reliability_bins(probabilities, targets), TRAIN_COLOUR)],
                         run.reliability)


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
