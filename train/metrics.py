"""Classification metrics in plain numpy: accuracy, per-class precision/recall/F1, confusion.

Kept by hand rather than taken from scikit-learn for measured reasons (tests/test_data.py
checks them against it): its F1 (``2tp / (2tp + fp + fn)``) differs from this ``2pr / (p + r)``
in the last bit for most reports, which would change every recorded metric file, and its
``StratifiedKFold`` assigns other folds than :func:`stratified_folds`, which every recorded
cross-validation (and the bundled model's calibration) was made with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from capsedge.errors import UsageError


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets), np.asarray(predictions)), 1)
    return matrix


def classification_report(
    targets: np.ndarray, predictions: np.ndarray, classes: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    A class never predicted has precision 0; a class with no support has recall 0
    (and is left out of nothing: macro averages are over all classes).
    """
    matrix = confusion_matrix(targets, predictions, len(classes))
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return {
        "accuracy": float(true_positive.sum() / max(1, matrix.sum())),
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall.mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
    }


def stratified_split(
    targets: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified (train, held-out) split; ``fraction`` of each class is held out."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    held_out = []
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        held_out.extend(members[: max(1, round(fraction * len(members)))])
    held = np.zeros(len(targets), dtype=bool)
    held[held_out] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` stratified (train, validation) index pairs covering every sample once."""
    if folds < 2:
        raise UsageError(f"folds must be >= 2, got {folds!r}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(targets), dtype=np.int64)
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        fold_of[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(folds)]
