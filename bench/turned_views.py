"""Whether more test-time views help: the eight dihedral views of each image turned by an angle.

Each finished fold's classifier (float, or ``--format int8``: converted and run with LiteRT as
``capsedge export --score-folds`` scores folds) scores its held-out images turned by ``--angle``
degrees about the centre (:func:`capsedge.views.turned`: bilinear, black outside the image, as
the training's rotations fill) in all eight dihedral views, and the script prints, per fold and
pooled, the accuracy of the usual eight views (the fold's saved answers, or the int8 file's),
of the eight turned ones, and of all sixteen averaged. At 45 degrees the sixteen are the
runtime's ``test_time_views: 16``; other angles say whether another turn would do better.

Usage:
    python bench/turned_views.py --cv runs/stage2-och --data DIR [--folds 0,1] [--angle 45]
        [--format int8] [--out OUT]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import common
import numpy as np

from capsedge.views import DIHEDRAL_VIEWS, TURN_DEGREES, turned

if TYPE_CHECKING:
    from capsedge.workshop.run import RunDir


def fold_int8_views(fold: RunDir, dataset: object, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """``(upright, turned)``, each ``(held-out images, 8, classes)``: the fold's full-integer int8
    file (:func:`capsedge.export.fold_scores.fold_views`) on its held-out images as they are and
    turned by ``degrees``, in the eight dihedral views."""
    from capsedge.export.fold_scores import fold_views

    views = fold_views(fold, dataset, ["int8"])["int8"]
    if degrees == TURN_DEGREES:  # the runtime's sixteen views: the eight upright, the eight turned
        return views[:, :DIHEDRAL_VIEWS], views[:, DIHEDRAL_VIEWS:]
    turned_views = fold_views(fold, dataset, ["int8"], transform=lambda image: turned(image, degrees))
    return views[:, :DIHEDRAL_VIEWS], turned_views["int8"][:, :DIHEDRAL_VIEWS]


def fold_turned_views(fold: RunDir, dataset: object, degrees: float) -> np.ndarray:
    """``(held-out images, 8, classes)``: the fold's float classifier on its held-out images turned
    by ``degrees``, in the eight dihedral views."""
    from capsedge.export.run import load_run
    from capsedge.train.evaluation import predict_views
    from capsedge.workshop.dataset import ImageCache

    trained = load_run(fold.path)
    cache = ImageCache(trained.preprocessing)
    images = np.stack([turned(cache.image(dataset.paths[i]), degrees) for i in fold.read_holdout_indices()])
    return predict_views(trained.classifier, images)


def accuracies(saved: np.ndarray, extra: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy of the saved eight views, of the eight turned ones and of all sixteen."""
    def accuracy(probabilities: np.ndarray) -> float:
        return round(float(np.mean(probabilities.argmax(1) == truth)), 4)

    return {"8 views": accuracy(saved.mean(1)), "8 turned views": accuracy(extra.mean(1)),
            "16 views": accuracy(np.concatenate([saved, extra], axis=1).mean(1))}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, required=True, help="a `capsedge train --folds K` folder")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all finished)")
    parser.add_argument("--angle", type=float, default=45.0, help="degrees to turn (default: 45)")
    parser.add_argument("--format", choices=("float", "int8"), default="float",
                        help="the float classifier or its full-integer int8 file (default: float)")
    args = parser.parse_args()

    from capsedge.workshop.dataset import read_dataset
    dataset = read_dataset(common.data_folder(args))
    report: dict[str, object] = {"cv": str(args.cv), "angle": args.angle, "format": args.format, "folds": {}}
    saved_all, extra_all, truth_all = [], [], []
    for fold in common.finished_folds(args.cv, args.folds):
        truth = dataset.targets[fold.read_holdout_indices()]
        if args.format == "int8":
            saved, extra = fold_int8_views(fold, dataset, args.angle)
        else:
            saved, extra = fold.read_views()[:, :DIHEDRAL_VIEWS], fold_turned_views(fold, dataset, args.angle)
        report["folds"][fold.path.name] = accuracies(saved, extra, truth) | {"images": len(truth)}
        print(json.dumps({fold.path.name: report["folds"][fold.path.name]}), flush=True)
        saved_all.append(saved)
        extra_all.append(extra)
        truth_all.append(truth)
    truth = np.concatenate(truth_all)
    report["pooled"] = accuracies(np.concatenate(saved_all), np.concatenate(extra_all), truth)
    report["pooled"]["images"] = len(truth)
    print(json.dumps(report["pooled"], indent=2))
    name = "turned_views.json" if args.format == "float" else "turned_views_int8.json"
    common.save_json(args, name, report)


if __name__ == "__main__":
    main()
