"""What int8 costs on images a model has not seen: cross-validation folds, float against TFLite.

A fold folder of `capsedge train --folds K` holds the fold's classifier, the indices
of its held-out images and the float probabilities on them (one view and the eight
test-time views). This converts each fold's classifier to full-integer int8
(calibrated on up to 200 of the fold's training images, drawn as `--int8-trunk`
draws them, never on the held-out ones), to dynamic range (int8 weights, float
activations) and, with `--formats`, to float16 weights; runs each with capsedge's LiteRT
backend on the held-out images, one view and the averages of the four flips and of all eight
flips and quarter turns, and prints
each one's accuracy and top-1 agreement with the float model, per fold and pooled (with
`--out`, also as OUT/heldout_int8.json). It writes nothing into the folds: the int8 answers
the export's calibration is fitted on (`holdout_probabilities_views_int8.npy` in each fold)
are saved by the same scoring run as a release step, `capsedge export --score-folds`.

Usage:
    python bench/heldout_int8.py --cv runs/cv512f5 --data DIR [--folds 0,1] [--formats int8,dynamic,float16]
        [--out OUT]
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import numpy as np

from capsedge.views import VIEW_COUNTS


def measure_fold(fold: Path, dataset: object, formats: list[str]) -> dict[str, object]:
    """Answers of the float model and of each format on the fold's held-out images (the scoring
    is :func:`capsedge.export.fold_scores.fold_views`, which ``capsedge export --score-folds`` runs)."""
    from capsedge.export.fold_scores import fold_views
    from capsedge.workshop.run import RunDir

    run = RunDir(fold)
    held = run.read_holdout_indices()
    float_views = run.read_views()
    answers = {("float", n): float_views[:, :n].mean(1).argmax(1) for n in VIEW_COUNTS}
    for name, views in fold_views(run, dataset, formats).items():
        for n in VIEW_COUNTS:
            answers[name, n] = views[:, :n].mean(1).argmax(1)
    return {"truth": dataset.targets[held], "answers": answers}


def summary(truth: np.ndarray, answers: dict, formats: list[str]) -> dict[str, float]:
    result: dict[str, float] = {"images": len(truth)}
    for n in VIEW_COUNTS:
        reference = answers["float", n]
        result[f"float_accuracy_{n}_views"] = round(float(np.mean(reference == truth)), 4)
        for name in formats:
            result[f"{name}_accuracy_{n}_views"] = round(float(np.mean(answers[name, n] == truth)), 4)
            result[f"{name}_agreement_{n}_views"] = round(float(np.mean(answers[name, n] == reference)), 4)
    return result


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, required=True, help="a `capsedge train --folds K` folder")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all)")
    parser.add_argument("--formats", default="int8,dynamic", help="of int8, dynamic, float16")
    args = parser.parse_args()

    from capsedge.workshop.dataset import read_dataset
    dataset = read_dataset(common.data_folder(args))
    formats = args.formats.split(",")
    folds = [fold.path for fold in common.finished_folds(args.cv, args.folds)]
    truth, pooled = [], {}
    report = {"cv": str(args.cv), "folds": {}}
    for fold in folds:
        measured = measure_fold(fold, dataset, formats)
        report["folds"][fold.name] = summary(measured["truth"], measured["answers"], formats)
        print(json.dumps({fold.name: report["folds"][fold.name]}), flush=True)
        truth.append(measured["truth"])
        for key, value in measured["answers"].items():
            pooled.setdefault(key, []).append(value)
    answers = {key: np.concatenate(value) for key, value in pooled.items()}
    report["pooled"] = summary(np.concatenate(truth), answers, formats)
    print(json.dumps(report["pooled"], indent=2))
    common.save_json(args, "heldout_int8.json", report)


if __name__ == "__main__":
    main()
