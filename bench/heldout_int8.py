"""What int8 costs on images a model has not seen: cross-validation folds, float against TFLite.

A fold folder of `capsedge train --folds K` holds the fold's classifier, the indices
of its held-out images and the float probabilities on them (one view and every test-time
view: sixteen since 0.7, eight before). This converts each fold's classifier to full-integer
int8 (calibrated on up to 200 of the fold's training images, drawn as `--int8-trunk`
draws them, never on the held-out ones), to dynamic range (int8 weights, float
activations) and, with `--formats`, to float16 weights; runs each with capsedge's LiteRT
backend on the held-out images, one view and the averages of the four flips, of all eight
flips and quarter turns and (where the fold saved them) of all sixteen views, and prints
each one's accuracy and top-1 agreement with the float model, per fold and pooled (with
`--out`, also as OUT/heldout_int8.json; the pooled figures hold the averages every fold has).

Two more formats split the int8 file at the end of its frozen trunk (the run's
`--freeze-stages`, the part `--int8-trunk` converts; the whole trunk when nothing was frozen),
to say which half loses the agreement: `int8-trunk` runs the trunk as full-integer int8
(calibrated as above) and the rest of the network in float on its maps; `int8-head` runs the
trunk in float and the rest as full-integer int8 (calibrated on the float trunk's maps of the
same calibration images).

It writes nothing into the folds: the int8 answers
the export's calibration is fitted on (`holdout_probabilities_views_int8.npy` in each fold)
are saved by the same scoring run as a release step, `capsedge export --score-folds`. With
`--saved`, a fold that holds those answers is read, not converted again (a release's figures
in seconds); the others are scored.

Usage:
    python bench/heldout_int8.py --cv runs/cv512f5 --data DIR [--folds 0,1]
        [--formats int8,dynamic,float16,int8-trunk,int8-head] [--saved] [--out OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import common
import numpy as np

from capsedge.export.fold_scores import FOLD_FORMATS
from capsedge.views import DIHEDRAL_VIEWS, VIEW_COUNTS

if TYPE_CHECKING:
    from capsedge.workshop.run import RunDir

#: The formats that quantize one side of the frozen trunk's end and keep the other in float.
SPLIT_FORMATS = ("int8-trunk", "int8-head")


def measure_fold(fold: Path, dataset: object, formats: list[str], saved: bool = False) -> dict[str, object]:
    """Answers of the float model and of each format on the fold's held-out images (the scoring
    is :func:`capsedge.export.fold_scores.fold_views`, which ``capsedge export --score-folds`` runs;
    :data:`SPLIT_FORMATS` are :func:`split_views`); with ``saved``, the int8 answers that run
    saved in the fold, where it did."""
    from capsedge.export.fold_scores import fold_views
    from capsedge.workshop.run import RunDir

    run = RunDir(fold)
    held = run.read_holdout_indices()
    float_views = run.read_views()
    split = [name for name in formats if name in SPLIT_FORMATS]
    whole = [name for name in formats if name not in SPLIT_FORMATS]
    stored = {name: run.read_views(name) for name in whole
              if saved and name == "int8" and run.views_file(name).is_file()}
    whole = [name for name in whole if name not in stored]
    measured, maps = stored | (fold_views(run, dataset, whole) if whole else {}), {}
    if split:
        halves, maps = split_views(run, dataset, split, float_views)
        measured |= halves
    # every average both hold: sixteen views where the fold saved sixteen (trained since 0.7, or
    # completed by bench/test_time_views.py), eight for the split formats
    answers = {("float", n): float_views[:, :n].mean(1).argmax(1) for n in VIEW_COUNTS
               if n <= float_views.shape[1]}
    for name, views in measured.items():
        for n in (n for n in VIEW_COUNTS if n <= views.shape[1] and ("float", n) in answers):
            answers[name, n] = views[:, :n].mean(1).argmax(1)
    return {"truth": dataset.targets[held], "answers": answers, "maps": maps}


def split_views(run: RunDir, dataset: object, formats: list[str],
                float_views: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``(held-out images, 8, classes)`` probabilities of the fold's classifier cut at the end of
    its frozen trunk, one side full-integer int8 and the other float (:data:`SPLIT_FORMATS`); and,
    with ``int8-trunk``, how far the int8 trunk's maps are from the float ones over every view
    (root-mean-square error over the float maps' standard deviation, mean cosine).

    Raises:
        SystemExit: the fold's network has no pretrained trunk, or the two float halves do not
            compose to the saved float answers (the cut is not where the network splits).
    """
    import tempfile

    import keras

    from capsedge.backends import LiteRTBackend
    from capsedge.export.converter import keras_to_tflite
    from capsedge.export.fold_scores import fold_images
    from capsedge.export.run import load_run
    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import trunk_output_layer
    from capsedge.train.frozen import frozen_views, int8_frozen_views
    from capsedge.workshop.dataset import ImageCache

    config = run.read_config()
    if config["model"].get("trunk") is None:
        sys.exit(f"bench: {run.path} has no pretrained trunk to split its int8 file at")
    stages = config["train"].get("freeze_stages") or config["model"]["trunk_stages"]
    trained = load_run(run.path)
    cut = trunk_output_layer(trained.classifier, stages, name=TRUNK_PREFIX).output
    trunk = keras.Model(trained.classifier.input, cut, name="trunk")
    rest = keras.Model(cut, trained.classifier.output, name="rest")
    calibration, images = map(np.stack, fold_images(run, dataset, ImageCache(trained.preprocessing)))

    def rest_float(maps: np.ndarray) -> np.ndarray:
        flat = maps.reshape(-1, *maps.shape[2:]).astype(np.float32)
        return np.asarray(rest.predict(flat, batch_size=32, verbose=0)).reshape(*maps.shape[:2], -1)

    float_maps = frozen_views(trunk, images)
    composed = rest_float(float_maps)  # the frozen maps hold the eight dihedral views
    if not np.allclose(composed, float_views[:, :DIHEDRAL_VIEWS], atol=2e-3):
        sys.exit(f"bench: {run.path}'s two float halves do not give its saved answers")
    answers, maps = {}, {}
    if "int8-trunk" in formats:
        int8_maps = int8_frozen_views(trunk, images, calibration)
        answers["int8-trunk"] = rest_float(int8_maps)
        exact = float_maps.reshape(-1, float_maps[0, 0].size).astype(np.float64)
        rounded = int8_maps.reshape(exact.shape).astype(np.float64)
        cosines = np.sum(exact * rounded, 1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(rounded, axis=1)
        rmse = float(np.sqrt(np.mean((rounded - exact) ** 2)))
        maps = {"int8_trunk_map_relative_rmse": round(rmse / float(exact.std()), 4),
                "int8_trunk_map_cosine": round(float(np.mean(cosines)), 4)}
    if "int8-head" in formats:
        calibration_maps = list(np.asarray(trunk.predict(calibration, batch_size=16, verbose=0)))
        with tempfile.TemporaryDirectory(prefix="capsedge-int8-head-") as folder:
            path = Path(folder) / "head.tflite"
            path.write_bytes(keras_to_tflite(rest, "int8", lambda: iter(calibration_maps)))
            backend = LiteRTBackend(path)
            classes = float_views.shape[-1]
            answers["int8-head"] = np.array([[backend.run(view[np.newaxis].astype(np.float32))[:classes]
                                              for view in image] for image in float_maps])
    return {name: answers[name].astype(np.float32) for name in formats}, maps


def summary(truth: np.ndarray, answers: dict, formats: list[str],
            classes: tuple[str, ...]) -> dict[str, float]:
    """Accuracy and macro-F1 of the float model and each format, and each format's agreement with
    the float model, for every average of views they have."""
    from capsedge.train.metrics import classification_report

    def macro_f1(answer: np.ndarray) -> float:
        return round(float(classification_report(truth, answer, classes)["macro_f1"]), 4)

    result: dict[str, float] = {"images": len(truth)}
    for n in (n for n in VIEW_COUNTS if ("float", n) in answers):
        reference = answers["float", n]
        result[f"float_accuracy_{n}_views"] = round(float(np.mean(reference == truth)), 4)
        result[f"float_macro_f1_{n}_views"] = macro_f1(reference)
        for name in (name for name in formats if (name, n) in answers):
            result[f"{name}_accuracy_{n}_views"] = round(float(np.mean(answers[name, n] == truth)), 4)
            result[f"{name}_macro_f1_{n}_views"] = macro_f1(answers[name, n])
            result[f"{name}_agreement_{n}_views"] = round(float(np.mean(answers[name, n] == reference)), 4)
    return result


def mean_over_folds(per_fold: list[dict[str, float]], pooled: dict[str, float]) -> dict[str, float]:
    """Each pooled accuracy and macro-F1, as the mean over the folds and its sample standard
    deviation (``<name>_std``; the cross-validation's headline form)."""
    result: dict[str, float] = {}
    for key in (key for key in pooled if "_accuracy_" in key or "_macro_f1_" in key):
        values = [fold[key] for fold in per_fold]
        result[key] = round(float(np.mean(values)), 4)
        result[f"{key}_std"] = round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0
    return result


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--cv", type=Path, required=True, help="a `capsedge train --folds K` folder")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all)")
    parser.add_argument("--formats", default="int8,dynamic",
                        help="of int8, dynamic, float16, int8-trunk, int8-head")
    parser.add_argument("--saved", action="store_true",
                        help="read the int8 answers `capsedge export --score-folds` saved in a fold")
    args = parser.parse_args()
    formats = args.formats.split(",")
    known = (*FOLD_FORMATS, *SPLIT_FORMATS)
    unknown = [name for name in formats if name not in known]
    if unknown:
        parser.error(f"--formats: {unknown[0]!r} is not one of {', '.join(known)}")

    from capsedge.workshop.dataset import read_dataset
    dataset = read_dataset(common.data_folder(args))
    folds = [fold.path for fold in common.finished_folds(args.cv, args.folds)]
    truth, pooled = [], {}
    report = {"cv": str(args.cv), "folds": {}}
    for fold in folds:
        measured = measure_fold(fold, dataset, formats, args.saved)
        scores = summary(measured["truth"], measured["answers"], formats, dataset.classes)
        report["folds"][fold.name] = scores | measured["maps"]
        print(json.dumps({fold.name: report["folds"][fold.name]}), flush=True)
        truth.append(measured["truth"])
        for key, value in measured["answers"].items():
            pooled.setdefault(key, []).append(value)
    # pooled: the averages every fold has (sixteen views only if every fold saved sixteen)
    answers = {key: np.concatenate(value) for key, value in pooled.items() if len(value) == len(folds)}
    report["pooled"] = summary(np.concatenate(truth), answers, formats, dataset.classes)
    report["mean_over_folds"] = mean_over_folds(list(report["folds"].values()), report["pooled"])
    print(json.dumps(report["pooled"], indent=2))
    common.save_json(args, "heldout_int8.json", report)


if __name__ == "__main__":
    common.quietly(main)  # TensorFlow's converter and LiteRT write to descriptor 2
