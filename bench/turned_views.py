"""Whether more test-time views help: the views of each image turned by an angle.

Each finished fold's classifier (float, or ``--format int8``: converted and run with LiteRT as
``capsedge export --score-folds`` scores folds) scores its held-out images turned by ``--angle``
degrees about the centre (:func:`capsedge.views.turned`: bilinear, black outside the image, as
the training's rotations fill) in its first ``--views`` test-time views, and the script prints,
per fold and pooled, the accuracy of the same number of views of the image as it is (the fold's
saved answers; int8: those ``capsedge export --score-folds`` saved, else the int8 file's), of the
turned ones, and of both averaged. With eight views at 45 degrees the sixteen averaged are the
runtime's ``test_time_views: 16``; sixteen views at 22.5 degrees average thirty-two, every
22.5-degree turn of the image and of its mirror image.

Usage:
    python bench/turned_views.py --cv runs/stage2-och --data DIR [--folds 0,1] [--angle 45]
        [--views 8] [--format int8] [--out OUT]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import common
import numpy as np

from capsedge.views import ALL_VIEWS, DIHEDRAL_VIEWS, TURN_DEGREES, turned

if TYPE_CHECKING:
    from capsedge.workshop.run import RunDir


def fold_int8_views(fold: RunDir, dataset: object, degrees: float,
                    views: int = DIHEDRAL_VIEWS) -> tuple[np.ndarray, np.ndarray]:
    """``(upright, turned)``, each ``(held-out images, views, classes)``: the fold's full-integer
    int8 file (:func:`capsedge.export.fold_scores.fold_views`) on its held-out images as they are
    (the answers the fold saved, where it did) and turned by ``degrees``, in the first ``views``
    test-time views."""
    from capsedge.export.fold_scores import fold_views

    saved = fold.views_file("int8").is_file()
    upright = fold.read_views("int8") if saved else fold_views(fold, dataset, ["int8"])["int8"]
    if degrees == TURN_DEGREES and views == DIHEDRAL_VIEWS:  # the runtime's sixteen views
        return upright[:, :DIHEDRAL_VIEWS], upright[:, DIHEDRAL_VIEWS:]
    tilted = fold_views(fold, dataset, ["int8"], transform=lambda image: turned(image, degrees))["int8"]
    return upright[:, :views], tilted[:, :views]


def fold_turned_views(fold: RunDir, dataset: object, degrees: float,
                      views: int = DIHEDRAL_VIEWS) -> np.ndarray:
    """``(held-out images, views, classes)``: the fold's float classifier on its held-out images
    turned by ``degrees``, in the first ``views`` test-time views."""
    from capsedge.export.run import load_run
    from capsedge.train.evaluation import predict_views
    from capsedge.workshop.dataset import ImageCache

    trained = load_run(fold.path)
    cache = ImageCache(trained.preprocessing)
    images = np.stack([turned(cache.image(dataset.paths[i]), degrees) for i in fold.read_holdout_indices()])
    return predict_views(trained.classifier, images, views)


def accuracies(saved: np.ndarray, extra: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy of the upright views, of the turned ones and of both averaged."""
    def accuracy(probabilities: np.ndarray) -> float:
        return round(float(np.mean(probabilities.argmax(1) == truth)), 4)

    upright, tilted = saved.shape[1], extra.shape[1]
    return {f"{upright} views": accuracy(saved.mean(1)), f"{tilted} turned views": accuracy(extra.mean(1)),
            f"{upright + tilted} views": accuracy(np.concatenate([saved, extra], axis=1).mean(1))}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, required=True, help="a `capsedge train --folds K` folder")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all finished)")
    parser.add_argument("--angle", type=float, default=45.0, help="degrees to turn (default: 45)")
    parser.add_argument("--views", type=int, choices=(DIHEDRAL_VIEWS, ALL_VIEWS), default=DIHEDRAL_VIEWS,
                        help="test-time views of the image as it is and of the turned one (default: 8)")
    parser.add_argument("--format", choices=("float", "int8"), default="float",
                        help="the float classifier or its full-integer int8 file (default: float)")
    args = parser.parse_args()

    from capsedge.workshop.dataset import read_dataset
    dataset = read_dataset(common.data_folder(args))
    report: dict[str, object] = {"cv": str(args.cv), "angle": args.angle, "views": args.views,
                                 "format": args.format, "folds": {}}
    saved_all, extra_all, truth_all = [], [], []
    for fold in common.finished_folds(args.cv, args.folds):
        truth = dataset.targets[fold.read_holdout_indices()]
        if args.format == "int8":
            saved, extra = fold_int8_views(fold, dataset, args.angle, args.views)
        else:
            saved = fold.read_views()[:, :args.views]
            extra = fold_turned_views(fold, dataset, args.angle, args.views)
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
    common.quietly(main)
