"""Which trunk stage and how many principal axes the outlier statistics should read.

    python bench/outlier_choice.py --cv runs/stage2-qa --data DIR --mnist DIR \
        [--stages 5 6] [--components 5 10 15 20 30] [--out DIR]

For each stage and number of axes (the statistics of export/trust_fit.py, 99th percentile):

- new X-rays flagged: each fold's float model (FOLD/classifier.keras) computes the mean of the
  stage's map for every development X-ray; statistics fitted on the fold's training images
  flag its held-out ones, which it never saw (pooled over the folds). The rate the model's
  metadata carries (``outlier_false_alarms_cv``) refits the statistics only, on features of a
  trunk that trained on every image, and is lower.
- non-implant images flagged (bench/trust_report.py's sets): the final model's (CV/final)
  statistics fitted on every development X-ray.

Float models, one view per image (the runtime's features are the image's own); an int8 file's
figures, on its own features, are bench/trust_report.py's. Needs the dev extras.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import numpy as np
from trust_report import non_implant_sets

from capsedge.export.trust_fit import OUTLIER_COMPONENTS, OUTLIER_STAGE, fit_outliers
from capsedge.workshop.dataset import read_dataset
from capsedge.workshop.run import CrossValidation, RunDir


def stage_features(run: RunDir, images: list, stages: list[int]) -> dict[int, np.ndarray]:
    """The mean of each of ``stages``' maps of ``run``'s float classifier, for every image (paths
    or arrays), by stage."""
    import keras

    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import trunk_output_layer
    from capsedge.preprocess import Preprocessing, preprocess

    model = keras.models.load_model(run.classifier, compile=False)
    preprocessing = Preprocessing.from_dict(json.loads(run.config.read_text())["preprocessing"])
    pooled = [keras.layers.GlobalAveragePooling2D()(trunk_output_layer(model, s, TRUNK_PREFIX).output)
              for s in stages]
    features = keras.Model(model.input, pooled)
    batch = np.stack([preprocess(image, preprocessing) for image in images])
    outputs = features.predict(batch, batch_size=16, verbose=0)
    return {s: np.asarray(f, np.float64) for s, f in zip(stages, outputs if len(stages) > 1 else [outputs],
                                                          strict=True)}


def held_out_flagged(folds: list[tuple[np.ndarray, np.ndarray]], components: int) -> float:
    """Share of the held-out images flagged, pooled over ``folds`` (each: every image's features
    under that fold's model, the indices it held out), statistics fitted on the rest."""
    flagged = total = 0
    for features, held in folds:
        training = np.setdiff1d(np.arange(len(features)), held)
        model = fit_outliers(features[training], components=components)
        flagged += int((model.distance(features[held]) > model.threshold).sum())
        total += len(held)
    return flagged / total


def flagged_share(training: np.ndarray, others: np.ndarray, components: int) -> float:
    """Share of ``others`` flagged by statistics fitted on ``training``."""
    model = fit_outliers(training, components=components)
    return float(np.mean(model.distance(others) > model.threshold))


def main() -> None:
    parser = common.parser(__doc__, mnist=True)
    parser.add_argument("--cv", type=Path, required=True, help="a capsedge train --folds K --final folder")
    parser.add_argument("--stages", type=int, nargs="+", default=[5, OUTLIER_STAGE])
    parser.add_argument("--components", type=int, nargs="+", default=[5, 10, 15, OUTLIER_COMPONENTS, 30])
    args = parser.parse_args()
    data, mnist = common.data_folder(args), common.mnist_folder(args)
    cv = CrossValidation(args.cv)
    if not cv.final.classifier.is_file():
        raise SystemExit(f"bench: {cv.path} has no final model ({cv.final.classifier})")
    paths = [str(p) for p in read_dataset(data).paths]
    folds = []
    for fold in cv.folds():
        print(f"{fold.path.name}: features of {len(paths)} X-rays", flush=True)
        folds.append((stage_features(fold, paths, args.stages), fold.read_holdout_indices()))
    print(f"final: features of {len(paths)} X-rays and the non-implant images", flush=True)
    final = stage_features(cv.final, paths, args.stages)
    sets = {name: stage_features(cv.final, images, args.stages)
            for name, images in non_implant_sets(mnist).items()}
    rows = []
    for stage in args.stages:
        for components in args.components:
            row = {"stage": stage, "components": components,
                   "new_xrays": held_out_flagged([(f[stage], held) for f, held in folds], components)}
            row |= {name: flagged_share(final[stage], features[stage], components)
                    for name, features in sets.items()}
            rows.append(row)
    common.save_json(args, "outlier_choice.json", {"cv": str(cv.path), "rows": rows})
    names = list(sets)
    print("\n| stage | axes | new X-rays flagged | " + " | ".join(names) + " |\n"
          "| ---: | ---: | ---: |" + " ---: |" * len(names))
    for row in rows:
        print(f"| {row['stage']} | {row['components']} | {100 * row['new_xrays']:.1f} % | "
              + " | ".join(f"{100 * row[name]:.1f} %" for name in names) + " |")


if __name__ == "__main__":
    common.quietly(main)
