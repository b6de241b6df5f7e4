"""What averaging two cross-validations' answers image by image does to accuracy.

Both folders must be cross-validations of the same data and folds (e.g. stage 2's capsule + NCP
head and stage 1's linear head under it, ``--cv runs/stage2 --cv runs/stage1``). Each fold's
stored held-out answers (``holdout_probabilities_views.npy``, or with ``--format int8`` the int8
files' answers that ``capsedge export --score-folds`` saved), averaged over ``--views`` test-time
views, are mixed as ``(1 - w) * first + w * second``. The script prints pooled accuracy and
macro-F1 for each ``w``, then the accuracy when each fold's ``w`` is chosen on the other folds
only (the honest figure of tuning it; ties go to the ``w`` nearest 0.5, the plain average).

Usage:
    python bench/head_average.py --cv runs/stage2 --cv runs/stage1 [--data DIR] [--views 16] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np

#: The weights ``w`` of the second folder scored, and the grid a fold's ``w`` is chosen from.
WEIGHTS = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 11))
#: A fold's answers: the first folder's probabilities, the second's, and the true classes.
Fold = tuple[np.ndarray, np.ndarray, np.ndarray]


def mixed(fold: Fold, weight: float) -> np.ndarray:
    """The answers ``(1 - weight) * first + weight * second`` of one fold, as class indices."""
    first, second, _ = fold
    return ((1.0 - weight) * first + weight * second).argmax(1)


def right(folds: list[Fold], weight: float) -> int:
    """How many of the folds' images the mixture answers right."""
    return int(sum((mixed(fold, weight) == fold[2]).sum() for fold in folds))


def nested_accuracy(folds: list[Fold]) -> tuple[float, list[float]]:
    """Pooled accuracy when each fold is mixed with the ``w`` that scores best on the other folds
    (ties: the ``w`` nearest 0.5), and the ``w`` chosen for each fold."""
    total, chosen = 0, []
    for k, fold in enumerate(folds):
        others = folds[:k] + folds[k + 1:]
        weight = max(WEIGHTS, key=lambda w: (right(others, w), -abs(w - 0.5)))
        total += right([fold], weight)
        chosen.append(weight)
    return total / sum(len(fold[2]) for fold in folds), chosen


def read_folds(first: Path, second: Path, targets: np.ndarray, views: int, fmt: str | None) -> list[Fold]:
    """Each fold's averaged answers in both folders; the folds must hold the same images."""
    folds = []
    for a, b in zip(common.finished_folds(first), common.finished_folds(second), strict=False):
        held = a.read_holdout_indices()
        if a.path.name != b.path.name or not np.array_equal(held, b.read_holdout_indices()):
            raise SystemExit(f"{a.path} and {b.path} hold out different images")
        folds.append((common.averaged_answers(a, views, fmt), common.averaged_answers(b, views, fmt),
                      targets[held]))
    if not folds:
        raise SystemExit(f"no finished folds common to {first} and {second}")
    return folds


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, action="append", required=True,
                        help="a capsedge train --folds K folder (exactly two)")
    common.add_stored_answer_options(parser)
    args = parser.parse_args()
    if len(args.cv) != 2:
        parser.error("give --cv exactly twice: the first folder and the second")

    from capsedge.train.metrics import classification_report
    from capsedge.workshop.dataset import read_dataset

    dataset = read_dataset(common.folder(args.data))
    targets = np.asarray(dataset.targets)
    folds = read_folds(args.cv[0], args.cv[1], targets, args.views,
                       None if args.format == "float" else args.format)
    truth = np.concatenate([fold[2] for fold in folds])
    rows = {}
    print(f"(1 - w) * {args.cv[0]} + w * {args.cv[1]}: {len(folds)} folds, {len(truth)} held-out images, "
          f"{args.views} views, {args.format}")
    print(f"  {'w':>4s} {'right':>6s} {'accuracy':>9s} {'macro-F1':>9s}")
    for weight in WEIGHTS:
        answers = np.concatenate([mixed(fold, weight) for fold in folds])
        report = classification_report(truth, answers, dataset.classes)
        rows[str(weight)] = {"right": int((answers == truth).sum()), "accuracy": report["accuracy"],
                             "macro_f1": report["macro_f1"]}
        print(f"  {weight:4.1f} {rows[str(weight)]['right']:6d} {100 * report['accuracy']:8.1f}% "
              f"{report['macro_f1']:9.3f}")
    nested, chosen = nested_accuracy(folds)
    print(f"  w chosen on the other folds: {100 * nested:.1f}% (w {', '.join(str(w) for w in chosen)})")
    common.save_json(args, "head_average.json", {
        "first": str(args.cv[0]), "second": str(args.cv[1]), "views": args.views, "format": args.format,
        "folds": len(folds), "images": int(len(truth)), "by_weight": rows,
        "nested_accuracy": nested, "nested_weights": chosen})


if __name__ == "__main__":
    main()
