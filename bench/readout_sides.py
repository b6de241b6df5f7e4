"""How often each side of a network with a read-out is right on its own: the capsule + NCP head
and the linear read-out beside it (``capsedge train --stage1-readout``), per fold and pooled.

Each finished fold of ``--cv`` is split into two networks on its trunk, each checked to answer as
its side of the fused network does: the capsule + NCP network (``readout_weight`` 0) and the
read-out alone (a linear network: the trunk, the read-out's head convolution, pooling and dense
layer). Each is saved as a fold folder, ``OUT/caps/fold-K`` and ``OUT/readout/fold-K``, with its
float answers on the fold's held-out images in every test-time view, then scored as a
full-integer int8 file as ``capsedge export --score-folds`` scores folds (a side already written
is not split or scored again). The script prints, per fold and pooled, the accuracy of each side
and of the fused network (int8 where the fold holds the answers ``--score-folds`` saved) with one
view and sixteen, and writes ``OUT/readout_sides.json``. ``python bench/head_average.py --cv
OUT/caps --cv OUT/readout --format int8`` then mixes the two sides at every share.

Usage:
    python bench/readout_sides.py --cv runs/stage2-rl --data DIR --out OUT [--folds 0,1]
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import common
import numpy as np

from capsedge.views import ALL_VIEWS
from capsedge.workshop.run import CrossValidation, RunDir

#: The two sides, as the sub-folders of ``--out`` they are written into.
SIDES = ("caps", "readout")


def split_sides(fold: RunDir) -> dict[str, tuple[Any, Any]]:
    """``{"caps": (network, config), "readout": (network, config)}``: the two sides of the fold's
    fused classifier as networks of their own, sharing its weights.

    Raises:
        SystemExit: the fold's network has no read-out, or a side answers otherwise than in the
            fused network.
    """
    import keras

    from capsedge.models.build import READOUT_PREFIX, build_model, copy_weights
    from capsedge.models.config import ModelConfig
    from capsedge.train.network import READOUT_LAYERS

    model = ModelConfig.from_dict(fold.read_config()["model"])
    if not model.readout_weight:
        raise SystemExit(f"bench: {fold.path} has no read-out (trained without --stage1-readout)")
    fused = keras.models.load_model(fold.classifier, compile=False)
    fusion = fused.get_layer(f"{READOUT_PREFIX}_fusion")
    sides = keras.Model(fused.input, [fusion.input[0], fusion.input[1]])
    caps_config = replace(model, readout_weight=0.0)
    caps = build_model(caps_config).classifier
    copy_weights(fused, caps)
    linear_name = model.name.replace("effcaps_ncp_", "").replace("lite0h_", "lite0h_linear_")
    linear_config = replace(model, name=linear_name, head="linear", use_ncp=False, decoder=None,
                            readout_weight=0.0, dropout=0.2, reconstruction_size=None)
    linear = build_model(linear_config).classifier
    source = {theirs: ours for ours, theirs in READOUT_LAYERS.items()}
    for layer in linear.layers:
        if layer.weights:
            layer.set_weights(fused.get_layer(source.get(layer.name, layer.name)).get_weights())
    probe = np.random.default_rng(0).random((2, *model.input_shape), dtype=np.float32)
    want_caps, want_readout = (np.asarray(answer) for answer in sides(probe))
    for name, network, want in (("capsule + NCP", caps, want_caps), ("read-out", linear, want_readout)):
        if not np.allclose(network(probe), want, atol=1e-5):
            raise SystemExit(f"bench: the {name} side of {fold.path} answers otherwise than in the "
                             "fused network")
    return {"caps": (caps, caps_config), "readout": (linear, linear_config)}


def write_side(target: RunDir, fold: RunDir, network: Any, model: Any, images: np.ndarray,
               dataset: Any) -> None:
    """Save ``network`` as a fold folder ``target``: the fold's recipe with ``model`` as its
    network, its held-out indices, and its float answers on them in every view."""
    from capsedge.train.trainer import evaluate_held_out

    target.path.mkdir(parents=True, exist_ok=True)
    config = fold.read_config() | {"model": json.loads(json.dumps(asdict(model), default=list))}
    target.write_config(config)
    network.save(target.classifier)
    held = fold.read_holdout_indices()
    metrics = evaluate_held_out(network, images[held], dataset.targets[held], held, dataset.classes, target)
    target.write_metrics(metrics | {"split_from": str(fold.path)})


def accuracies(views: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy with one view and with all sixteen averaged."""
    def accuracy(count: int) -> float:
        return round(float(np.mean(views[:, :count].mean(1).argmax(1) == truth)), 4)

    return {"1 view": accuracy(1), f"{ALL_VIEWS} views": accuracy(ALL_VIEWS)}


def disagreements(answers: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, int]:
    """On the images where the two sides answer differently: how many, how often each side is
    right, how often the fused answer is the capsule side's, and how often it is right."""
    differ = answers["caps"] != answers["readout"]
    return {"images": int(differ.sum()), "caps right": int((answers["caps"] == truth)[differ].sum()),
            "readout right": int((answers["readout"] == truth)[differ].sum()),
            "fused is caps": int((answers["fused"] == answers["caps"])[differ].sum()),
            "fused right": int((answers["fused"] == truth)[differ].sum())}


def main() -> None:
    parser = common.parser(__doc__, out_required=True)
    parser.add_argument("--cv", type=Path, required=True,
                        help="a `capsedge train --folds K` folder of a network with a read-out")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: all finished)")
    args = parser.parse_args()

    from capsedge.export.fold_scores import score_folds
    from capsedge.preprocess import Preprocessing
    from capsedge.train.metrics import classification_report
    from capsedge.workshop.dataset import load_images, read_dataset

    dataset = read_dataset(common.data_folder(args))
    folds = common.finished_folds(args.cv, args.folds)
    images = None
    for fold in folds:
        targets = {side: RunDir(args.out / side / fold.path.name) for side in SIDES}
        if all(target.metrics.is_file() for target in targets.values()):
            continue
        if images is None:
            images = load_images(dataset, Preprocessing.from_dict(fold.read_config()["preprocessing"]))
        for side, (network, model) in split_sides(fold).items():
            write_side(targets[side], fold, network, model, images, dataset)
        print(f"split {fold.path.name}", flush=True)
    numbers = [int(fold.path.name.split("-")[1]) for fold in folds]
    for side in SIDES:
        cv = CrossValidation(args.out / side)
        todo = [k for k in numbers if not cv.fold(k).views_file("int8").is_file()]
        if todo:
            score_folds(cv.path, dataset, ["int8"], folds=todo, progress=lambda step: print(step, flush=True))

    report: dict[str, Any] = {"cv": str(args.cv), "folds": {}, "pooled": {}}
    runs = {"caps": CrossValidation(args.out / "caps"), "readout": CrossValidation(args.out / "readout"),
            "fused": CrossValidation(args.cv)}
    pooled: dict[str, list[np.ndarray]] = {}
    truth_all = []
    for k, fold in zip(numbers, folds, strict=True):
        truth = dataset.targets[fold.read_holdout_indices()]
        truth_all.append(truth)
        row: dict[str, Any] = {"images": len(truth)}
        for name, cv in runs.items():
            for fmt in (None, "int8"):
                part = cv.fold(k)
                if not part.views_file(fmt).is_file():
                    continue
                key = f"{name} {fmt or 'float'}"
                views = part.read_views(fmt)
                row[key] = accuracies(views, truth)
                pooled.setdefault(key, []).append(views)
        report["folds"][fold.path.name] = row
        print(json.dumps({fold.path.name: row}), flush=True)
    truth = np.concatenate(truth_all)
    for key, parts in pooled.items():
        if len(parts) == len(folds):
            views = np.concatenate(parts)
            macro = classification_report(truth, views.mean(1).argmax(1), dataset.classes)["macro_f1"]
            report["pooled"][key] = accuracies(views, truth) | {"macro_f1 16 views": round(float(macro), 4)}
    report["pooled"]["images"] = len(truth)
    if all(len(pooled.get(f"{name} int8", [])) == len(folds) for name in runs):
        answers = {name: np.concatenate(pooled[f"{name} int8"]).mean(1).argmax(1) for name in runs}
        report["pooled"]["int8 disagreements"] = disagreements(answers, truth)
    print(json.dumps(report["pooled"], indent=2))
    common.save_json(args, "readout_sides.json", report)


if __name__ == "__main__":
    common.quietly(main)
