"""What moving a cross-validation's answers away from the class priors does to accuracy and recall.

Each fold's stored held-out answers (``holdout_probabilities_views.npy``, or with ``--format int8``
the int8 files' answers that ``capsedge export --score-folds`` saved), averaged over ``--views``
test-time views, are ranked again by ``log p - tau * log prior``, the prior being the class
frequencies of the data. ``tau = 0`` is the model as trained; ``tau = 1`` divides the prior out
entirely, the decision a fully class-balanced training aims at. The script prints pooled accuracy,
macro-F1 and per-class recall for each ``tau``, then the accuracy when each fold's ``tau`` is
chosen on the other folds only (the honest figure of tuning it). Several ``--cv`` folders are
scored side by side, e.g. a capsule head and the stage-1 linear head under it.

Usage:
    python bench/prior_shift.py --cv runs/stage2 --cv runs/stage1 [--data DIR] [--views 16] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np

from capsedge.trust import MIN_PROBABILITY

#: The ``tau`` values scored, and the grid a fold's ``tau`` is chosen from on the other folds.
TAUS = tuple(round(float(t), 2) for t in np.linspace(0.0, 1.0, 21))
PRINTED_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)


def shifted(probabilities: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Class scores ``log p - tau * log prior`` (their argmax is the shifted answer)."""
    return np.log(np.clip(probabilities, MIN_PROBABILITY, 1.0)) - tau * np.log(prior)


def nested_accuracy(folds: list[tuple[np.ndarray, np.ndarray]],
                    prior: np.ndarray) -> tuple[float, list[float]]:
    """Pooled accuracy when each fold's answers are shifted by the ``tau`` that scores best on the
    other folds (ties: the smallest ``tau``), and the ``tau`` chosen for each fold."""
    right, total, chosen = 0, 0, []
    for k, (probabilities, truth) in enumerate(folds):
        others = [f for j, f in enumerate(folds) if j != k]
        other_p = np.concatenate([p for p, _ in others])
        other_t = np.concatenate([t for _, t in others])
        tau = max(TAUS, key=lambda t: ((shifted(other_p, prior, t).argmax(1) == other_t).mean(), -t))
        right += int((shifted(probabilities, prior, tau).argmax(1) == truth).sum())
        total += len(truth)
        chosen.append(tau)
    return right / total, chosen


def score(cv: Path, targets: np.ndarray, prior: np.ndarray, classes: tuple[str, ...], views: int,
          fmt: str | None) -> dict:
    """The figures of one cross-validation folder."""
    from capsedge.train.metrics import classification_report

    folds = [(common.averaged_answers(fold, views, fmt), targets[fold.read_holdout_indices()])
             for fold in common.finished_folds(cv)]
    probabilities = np.concatenate([p for p, _ in folds])
    truth = np.concatenate([t for _, t in folds])
    rows = {}
    for tau in TAUS:
        report = classification_report(truth, shifted(probabilities, prior, tau).argmax(1), classes)
        rows[str(tau)] = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                          "recall": {name: report["per_class"][name]["recall"] for name in classes}}
    nested, chosen = nested_accuracy(folds, prior)
    return {"folds": len(folds), "images": int(len(truth)), "by_tau": rows,
            "nested_accuracy": nested, "nested_taus": chosen}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, action="append", required=True,
                        help="a capsedge train --folds K folder (repeat to compare)")
    common.add_stored_answer_options(parser)
    args = parser.parse_args()

    from capsedge.workshop.dataset import read_dataset

    dataset = read_dataset(common.folder(args.data))
    targets = np.asarray(dataset.targets)
    prior = np.bincount(targets, minlength=len(dataset.classes)) / len(targets)
    fmt = None if args.format == "float" else args.format
    result = {"views": args.views, "format": args.format,
              "prior": dict(zip(dataset.classes, prior.round(4).tolist(), strict=True)), "runs": {}}
    for cv in args.cv:
        figures = score(cv, targets, prior, dataset.classes, args.views, fmt)
        result["runs"][str(cv)] = figures
        print(f"{cv}: {figures['folds']} folds, {figures['images']} held-out images, {args.views} views")
        print(f"  {'tau':>5s} {'accuracy':>9s} {'macro-F1':>9s}  recall " + " / ".join(dataset.classes))
        for tau in PRINTED_TAUS:
            row = figures["by_tau"][str(tau)]
            recall = " / ".join(f"{100 * r:.1f}" for r in row["recall"].values())
            print(f"  {tau:5.2f} {100 * row['accuracy']:8.1f}% {row['macro_f1']:9.3f}  {recall}")
        print(f"  tau chosen on the other folds: {100 * figures['nested_accuracy']:.1f}% "
              f"(taus {', '.join(str(t) for t in figures['nested_taus'])})")
    common.save_json(args, "prior_shift.json", result)


if __name__ == "__main__":
    main()
