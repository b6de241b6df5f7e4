"""What int8 costs on images a model has not seen: a cross-validation fold, float against TFLite.

A fold folder of `capsedge train --folds K` holds the fold's classifier, the indices
of its held-out images and the float probabilities on them. This converts the
classifier to full-integer int8 (calibrated on up to 200 of the fold's training
images, never on the held-out ones) and to dynamic range (int8 weights, float
activations), runs both with capsedge's LiteRT backend on the held-out images and
prints each one's accuracy and top-1 agreement with the float model.

Usage:
    python bench/heldout_int8.py --fold runs/cv512f5/fold-0 [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "shoulder-implants"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=Path, required=True, help="a fold-N folder of a cross-validation")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--calib-limit", type=int, default=200)
    args = parser.parse_args()

    from capsedge.backends import LiteRTBackend
    from capsedge.export.quantization import Quantization
    from capsedge.export.run import load_run
    from capsedge.export.tflite_format import convert_to_tflite
    from capsedge.preprocess import preprocess
    from capsedge.train.data import read_dataset

    trained = load_run(args.fold)
    dataset = read_dataset(args.data)
    targets = dataset.targets
    held = np.load(args.fold / "holdout_indices.npy")
    training = np.setdiff1d(np.arange(len(dataset.paths)), held)
    chosen = np.random.default_rng(0).permutation(training)[: args.calib_limit]
    calibration = [preprocess(dataset.paths[i], trained.preprocessing) for i in chosen]
    images = [preprocess(dataset.paths[i], trained.preprocessing) for i in held]
    truth = targets[held]
    float_answers = np.load(args.fold / "holdout_probabilities.npy").argmax(1)

    result = {"images": len(held), "float_accuracy": float(np.mean(float_answers == truth))}
    quantizations = {"int8": Quantization.for_int8(lambda: iter(calibration)),
                     "dynamic": Quantization("dynamic")}
    with tempfile.TemporaryDirectory(prefix="capsedge-heldout-") as folder:
        for name, quantization in quantizations.items():
            path = Path(folder) / f"{name}.tflite"
            path.write_bytes(convert_to_tflite(trained.classifier, quantization))
            backend = LiteRTBackend(path)
            answers = np.array([backend.run(image[np.newaxis]).argmax() for image in images])
            result[f"{name}_accuracy"] = float(np.mean(answers == truth))
            result[f"{name}_agreement_with_float"] = float(np.mean(answers == float_answers))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
