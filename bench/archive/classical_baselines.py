"""Classical baselines under the same 5-fold split as ``capsedge train --folds 5``.

A yardstick for the networks: if a linear model or an SVM on raw pixels or on
HOG features did as well, a network would not be earning its keep. Images go
through capsedge's own preprocessing (128x128 letterbox, min-max), then:

- ``raw16`` / ``raw32``: the image shrunk to 16x16 or 32x32, pixels as features;
- ``hog``: histograms of oriented gradients (9 orientations, 16x16 cells,
  2x2 blocks) of the 128x128 image.

Each feature set is classified by a class-balanced logistic regression and a
class-balanced RBF SVM (standardised features, default C). Needs scikit-learn and
scikit-image, which capsedge itself does not: ``pip install scikit-learn scikit-image``.

Usage:
    python bench/archive/classical_baselines.py [--data DIR] [--folds 5]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def features(images: np.ndarray, kind: str) -> np.ndarray:
    """One feature row per ``(N, H, W, 1)`` image."""
    from skimage.feature import hog
    from skimage.transform import resize

    if kind.startswith("raw"):
        side = int(kind[3:])
        return np.stack([resize(image[..., 0], (side, side), anti_aliasing=True).ravel() for image in images])
    if kind == "hog":
        return np.stack([hog(image[..., 0], orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2))
                         for image in images])
    raise ValueError(f"unknown features {kind!r}")


def classifier(kind: str):  # noqa: ANN201 - a scikit-learn pipeline
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    return make_pipeline(StandardScaler(), SVC(class_weight="balanced"))


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from capsedge.preprocess import Preprocessing
    from capsedge.train.metrics import classification_report, stratified_folds
    from capsedge.workshop.dataset import load_images, read_dataset

    dataset = read_dataset(common.data_folder(args))
    images = load_images(dataset, Preprocessing(input_size=128))
    targets = dataset.targets
    folds = stratified_folds(targets, args.folds, args.seed)
    print(f"{len(targets)} images, {args.folds}-fold CV (seed {args.seed}); mean ± std over folds\n")
    print("| features | classifier | accuracy | macro-F1 | seconds |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind in ("raw16", "raw32", "hog"):
        x = features(images, kind)
        for model in ("logreg", "svm"):
            start = time.perf_counter()
            accuracy, macro_f1 = [], []
            for train_idx, val_idx in folds:
                fitted = classifier(model).fit(x[train_idx], targets[train_idx])
                report = classification_report(targets[val_idx], fitted.predict(x[val_idx]), dataset.classes)
                accuracy.append(report["accuracy"])
                macro_f1.append(report["macro_f1"])
            acc = f"{100 * np.mean(accuracy):.1f} % ± {100 * np.std(accuracy, ddof=1):.1f}"
            f1 = f"{np.mean(macro_f1):.3f} ± {np.std(macro_f1, ddof=1):.3f}"
            print(f"| {kind} ({x.shape[1]}) | {model} | {acc} | {f1} | {time.perf_counter() - start:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
