"""What int8 costs on images a model has not seen: cross-validation folds, float against TFLite.

A fold folder of `capsedge train --folds K` holds the fold's classifier, the indices
of its held-out images and the float probabilities on them (one view and the eight
test-time views). This converts each fold's classifier to full-integer int8
(calibrated on up to 200 of the fold's training images, drawn as `--int8-trunk`
draws them, never on the held-out ones), to dynamic range (int8 weights, float
activations) and, with `--formats`, to float16 weights; runs each with capsedge's LiteRT
backend on the held-out images, one view and the averages of the four flips and of all eight
flips and quarter turns, and prints
each one's accuracy and top-1 agreement with the float model, per fold and pooled. With
`--save`, each format's eight-view probabilities go into the fold folder as
`holdout_probabilities_views_<format>.npy` (beside the float model's
`holdout_probabilities_views.npy`, same images and order).

Usage:
    python bench/heldout_int8.py --cv runs/cv512f5 [--folds 0,1] [--data DIR] [--formats int8,dynamic,float16]
        [--save]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "shoulder-implants"
VIEW_COUNTS = (1, 4, 8)


def measure_fold(fold: Path, dataset: object, formats: list[str], save: bool = False) -> dict[str, object]:
    """Answers of the float model and of each format on the fold's held-out images."""
    from capsedge.backends import LiteRTBackend
    from capsedge.export.quantization import Quantization
    from capsedge.export.run import load_run
    from capsedge.export.tflite_format import convert_to_tflite
    from capsedge.preprocess import preprocess
    from capsedge.train.trainer import calibration_indices
    from capsedge.views import orientations

    trained = load_run(fold)
    held = np.load(fold / "holdout_indices.npy")
    training = np.setdiff1d(np.arange(len(dataset.paths)), held)
    calibration = [preprocess(dataset.paths[i], trained.preprocessing) for i in calibration_indices(training)]
    images = [preprocess(dataset.paths[i], trained.preprocessing) for i in held]
    float_views = np.load(fold / "holdout_probabilities_views.npy")
    answers = {("float", n): float_views[:, :n].mean(1).argmax(1) for n in VIEW_COUNTS}
    quantizations = {"int8": Quantization.for_int8(lambda: iter(calibration)),
                     "dynamic": Quantization("dynamic"), "float16": Quantization("float16")}
    with tempfile.TemporaryDirectory(prefix="capsedge-heldout-") as folder:
        for name in formats:
            path = Path(folder) / f"{name}.tflite"
            path.write_bytes(convert_to_tflite(trained.classifier, quantizations[name]))
            backend = LiteRTBackend(path)
            views = np.array([[backend.run(view[np.newaxis])[:float_views.shape[2]]
                               for view in orientations(image, max(VIEW_COUNTS))] for image in images])
            for n in VIEW_COUNTS:
                answers[name, n] = views[:, :n].mean(1).argmax(1)
            if save:
                np.save(fold / f"holdout_probabilities_views_{name}.npy", views.astype(np.float32))
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", type=Path, required=True, help="a `capsedge train --folds K` folder")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--formats", default="int8,dynamic", help="of int8, dynamic, float16")
    parser.add_argument("--save", action="store_true", help="keep each format's held-out probabilities")
    args = parser.parse_args()

    from capsedge.train.data import read_dataset

    dataset = read_dataset(args.data)
    formats = args.formats.split(",")
    folds = sorted(args.cv.glob("fold-*")) if args.folds is None else [
        args.cv / f"fold-{k}" for k in args.folds.split(",")]
    truth, pooled = [], {}
    report = {"cv": str(args.cv), "folds": {}}
    for fold in folds:
        measured = measure_fold(fold, dataset, formats, args.save)
        report["folds"][fold.name] = summary(measured["truth"], measured["answers"], formats)
        print(json.dumps({fold.name: report["folds"][fold.name]}), flush=True)
        truth.append(measured["truth"])
        for key, value in measured["answers"].items():
            pooled.setdefault(key, []).append(value)
    answers = {key: np.concatenate(value) for key, value in pooled.items()}
    report["pooled"] = summary(np.concatenate(truth), answers, formats)
    print(json.dumps(report["pooled"], indent=2))


if __name__ == "__main__":
    main()
