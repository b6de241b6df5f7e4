"""What a run measures and draws on held-out images: predictions (plain and four-flip
averaged), the confusion/per-class/reliability pictures, and the learning curves' history."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import CapsedgeError

from .figures import TRAIN_COLOUR, save_confusion_png, save_per_class_png, save_reliability_png
from .metrics import classification_report


def predict_probabilities(classifier: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities of the Keras classifier for preprocessed images."""
    return np.asarray(classifier.predict(images, batch_size=batch_size, verbose=0))


def predict_flip_average(classifier: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Test-time augmentation: the probabilities averaged over the four flips of each image."""
    views = (images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1])
    return np.mean([predict_probabilities(classifier, np.ascontiguousarray(v), batch_size) for v in views],
                   axis=0)


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


def out_of_fold(cross_validation: str | Path, images: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, probabilities)`` of every image from a ``--folds K`` folder's held-out folds.

    Raises:
        CapsedgeError: a fold is missing its held-out predictions, or they do not cover
            ``images`` images exactly once.
    """
    folds = sorted(Path(cross_validation).glob("fold-*"))
    if not folds:
        raise CapsedgeError(f"no fold-* folders in {cross_validation}")
    try:
        indices = np.concatenate([np.load(f / "holdout_indices.npy") for f in folds])
        probabilities = np.concatenate([np.load(f / "holdout_probabilities.npy") for f in folds])
    except (OSError, ValueError) as exc:
        raise CapsedgeError(f"cannot read the held-out predictions in {cross_validation} "
                            f"({type(exc).__name__})") from None
    if sorted(indices.tolist()) != list(range(images)):
        raise CapsedgeError(f"the folds of {cross_validation} do not cover the {images} training images "
                            "exactly once: was it trained on other data?")
    return indices, probabilities
