"""What averaging over several views at test time adds, measured on a cross-validation's folds.

Each fold's classifier scores its held-out images in all sixteen test-time views (the four
flips and their quarter turns, the dihedral views it was trained on, and the same eight of
the image turned 45 degrees; :mod:`capsedge.views`). The script prints the pooled and per-fold
accuracy and macro-F1 of one view, of the four flips' average, of the eight dihedral views and
of all sixteen, averaging probabilities (arithmetic) or log-probabilities (geometric).
A fold without all sixteen in ``holdout_probabilities_views.npy`` (images x 16 views x classes;
runs trained before 0.4 have no such file, before 0.7 eight views) is scored afresh; with
``--out``, those views go into ``OUT/fold-K/`` (``--out`` the cross-validation folder itself
completes an old run) and the figures into ``OUT/test_time_views.json``.

Usage:
    python bench/test_time_views.py --cv runs/cv512f5 [--data DIR] [--out DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import numpy as np


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, required=True, help="a capsedge train --folds K folder")
    args = parser.parse_args()

    from capsedge.export.run import load_run
    from capsedge.preprocess import preprocess
    from capsedge.train.evaluation import predict_views
    from capsedge.views import ALL_VIEWS
    from capsedge.workshop.dataset import read_dataset
    from capsedge.workshop.run import views_name
    dataset = read_dataset(common.data_folder(args))
    targets = np.asarray(dataset.targets)
    folds = common.finished_folds(args.cv)
    pooled_views, pooled_targets, per_fold = [], [], []
    for fold in folds:
        held = fold.read_holdout_indices()
        views = fold.read_views() if fold.views_file().is_file() else None
        if views is None or views.shape[1] < ALL_VIEWS:
            trained = load_run(fold.path)
            images = np.stack([preprocess(dataset.paths[i], trained.preprocessing) for i in held])
            views = predict_views(trained.classifier, images)
            target = common.out_path(args, f"{fold.path.name}/{views_name()}")
            if target is not None:
                target.parent.mkdir(exist_ok=True)
                np.save(target, views)
        if not np.allclose(views[:, 0], fold.read_holdout_probabilities(), atol=1e-4):
            raise SystemExit(f"{fold.path}: view 0 does not reproduce {fold.holdout_probabilities.name}")
        pooled_views.append(views)
        pooled_targets.append(targets[held])
        per_fold.append(_scores(views, targets[held], dataset.classes))
        accuracies = {name: round(row["accuracy"], 4) for name, row in per_fold[-1].items()}
        print(fold.path.name, json.dumps(accuracies), flush=True)

    views = np.concatenate(pooled_views)
    truth = np.concatenate(pooled_targets)
    result = {
        "folds": len(folds),
        "images": len(truth),
        "pooled": _scores(views, truth, dataset.classes),
        "mean_over_folds": {
            name: {
                "accuracy": float(np.mean([f[name]["accuracy"] for f in per_fold])),
                "accuracy_std": float(np.std([f[name]["accuracy"] for f in per_fold], ddof=1))
                if len(per_fold) > 1 else None,
                "macro_f1": float(np.mean([f[name]["macro_f1"] for f in per_fold])),
            }
            for name in per_fold[0]
        },
    }
    print(json.dumps(result, indent=2))
    common.save_json(args, "test_time_views.json", result)


def _scores(views: np.ndarray, truth: np.ndarray, classes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    from capsedge.train.metrics import classification_report

    rows = {}
    choices = (("1 view", 1, False), ("4 flips", 4, False), ("4 flips, geometric", 4, True),
               ("8 views", 8, False), ("8 views, geometric", 8, True), ("16 views", 16, False))
    for name, count, geometric in choices:
        report = classification_report(truth, _averaged(views, count, geometric).argmax(1), classes)
        rows[name] = {"accuracy": float(report["accuracy"]), "macro_f1": float(report["macro_f1"])}
    return rows


def _averaged(views: np.ndarray, count: int, geometric: bool) -> np.ndarray:
    """The runtime's arithmetic mean of the first ``count`` views, or their geometric mean."""
    from capsedge.workshop.run import average_views

    if not geometric:
        return average_views(views, count)
    logs = np.log(np.clip(views[:, :count], 1e-7, 1.0)).mean(axis=1)
    weights = np.exp(logs - logs.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


if __name__ == "__main__":
    common.quietly(main)
