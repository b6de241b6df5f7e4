"""Does re-estimating a stage-1 trunk's batch-norm statistics help? A linear probe says.

Loads fold K's stage-1 trunk (`trunk.npz` of a `capsedge train --folds 5` run of
`lite0_linear_512`), computes its pooled features of every development image (one view),
fits a class-balanced ridge classifier on the fold's training images for several penalties
and scores it on the fold's held-out images; then re-estimates every batch-norm layer's
moving statistics as the average of its batch statistics over the training images (one
random dihedral view each, batches of 32; "precise BN") and probes again.

Usage:
    python bench/archive/bn_recalibration_probe.py --stage1 runs/stage1-gpu [--fold 0] [--data DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PENALTIES = (1, 10, 100, 1000)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def probe(features: np.ndarray, targets: np.ndarray, train: np.ndarray, held: np.ndarray) -> dict[int, float]:
    """Held-out accuracy of a class-balanced ridge classifier per penalty."""
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = np.hstack([(features - mean) / std, np.ones((len(features), 1))])
    y = np.eye(targets.max() + 1)[targets]
    weight = (1 / np.bincount(targets[train]))[targets[train]][:, None]
    scores = {}
    for penalty in PENALTIES:
        w = np.linalg.solve(x[train].T @ (weight * x[train]) + penalty * np.eye(x.shape[1]) / len(train),
                            x[train].T @ (weight * y[train]))
        scores[penalty] = round(float(((x[held] @ w).argmax(1) == targets[held]).mean()), 4)
    return scores


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--stage1", type=Path, required=True, help="a stage-1 cross-validation folder")
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args()

    import keras

    from capsedge.models import build_model, get_model_config
    from capsedge.models.efficientnet_lite import load_trunk_weights
    from capsedge.preprocess import Preprocessing
    from capsedge.train.augment import dihedral_view
    from capsedge.train.metrics import stratified_folds
    from capsedge.workshop.dataset import load_images, read_dataset

    dataset = read_dataset(common.data_folder(args))
    images = load_images(dataset, Preprocessing(input_size=512))
    targets = dataset.targets
    train, held = list(stratified_folds(targets, 5, 0))[args.fold]
    built = build_model(get_model_config("lite0_linear_512"))
    load_trunk_weights(built.classifier, args.stage1 / f"fold-{args.fold}" / "trunk.npz")
    pooled = keras.Model(built.classifier.input, built.classifier.get_layer("pool").output)

    def features() -> np.ndarray:
        return np.asarray(pooled.predict(images, batch_size=32, verbose=0))

    report = {"before": probe(features(), targets, train, held)}
    norms = [layer for layer in built.classifier.layers if isinstance(layer, keras.layers.BatchNormalization)]
    rng = np.random.default_rng(0)
    order = rng.permutation(train)
    for i, start in enumerate(range(0, len(order), 32)):
        for layer in norms:  # the i-th batch gets weight 1/(i+1): the running mean of batch statistics
            layer.momentum = i / (i + 1)
        batch = np.stack([dihedral_view(images[j], int(rng.integers(8))) for j in order[start:start + 32]])
        built.classifier(batch, training=True)
    report["after"] = probe(features(), targets, train, held)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
