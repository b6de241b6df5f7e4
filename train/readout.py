"""A finished run given the stage-1 read-out without training again (``capsedge train --reuse``).

The read-out of ``--stage1-readout`` (stage 1's linear head beside the capsule head, see
:func:`capsedge.train.network.load_stage1_readout`) takes no part in training: it is no output
of the trainer and its weights are copied, never fitted. So a run of a recipe with it is a run of
the same recipe without it, plus the read-out. :func:`reuse_trained` makes that run from a
finished one: the network of the recipe with the read-out, every other weight copied from the
finished run (checked: the copy answers as the finished run does), the held-out images scored
again, and a complete run folder written; seconds a fold instead of the training's minutes or hours.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import UsageError
from capsedge.workshop.dataset import Dataset, load_images
from capsedge.workshop.run import RunDir

from .config import TrainConfig, with_defaults
from .plan import plan_training
from .trainer import Part, TrainResult, evaluate_held_out, holdout_split, progress_bar, save_run

#: How far the copied network's answer (before the read-out) may differ from the finished run's.
COPY_TOLERANCE = 1e-5


def reuse_trained(data: str | Path | Dataset, run_dir: str | Path, config: TrainConfig, source: str | Path, *,
                  progress: bool = True, part: Part | None = None) -> TrainResult:
    """Write the run of ``config`` (whose ``stage1_readout`` is set) into ``run_dir`` from
    ``source``, a finished run of the same recipe without the read-out (for ``part``, the same
    part of a cross-validation, holding out the same images).

    Raises:
        UsageError: no read-out asked, ``source`` unfinished or of another recipe or split, or
            ``run_dir`` holds a run already.
    """
    import keras

    keras.backend.clear_session()
    dataset, plan = plan_training(data, config)
    if not config.stage1_readout:
        raise UsageError("--reuse adds the stage-1 read-out to a trained run: give --stage1-readout too")
    if config.readout_loss or config.distill_readout:
        raise UsageError("--reuse copies the read-out without training: drop --readout-loss and "
                         "--distill-readout")
    origin = RunDir(Path(source))
    if not origin.is_finished():
        raise UsageError(f"{origin.path} is not a finished run to reuse")
    check_same_recipe(origin, config)
    targets = dataset.targets
    _, held_idx = part.split if part else holdout_split(targets, config)
    if len(held_idx) and (not origin.holdout_indices.is_file()
                          or not np.array_equal(origin.read_holdout_indices(), held_idx)):
        raise UsageError(f"{origin.path} held out other images than this run would")
    run = RunDir(Path(run_dir))
    if run.metrics.is_file() or run.backup.is_dir():
        raise UsageError(f"{run.path} holds a run already; choose another --out")
    name = part.name if part else None
    # Checked before the folder opens. The read-out's head must have been fitted on the trunk it
    # reads: the reused run's.
    trunk_file = plan.stage1_trunk(name, held_idx)
    readout_file = plan.readout_trunk(name, held_idx, trunk=origin.trunk)
    run.path.mkdir(parents=True, exist_ok=True)

    from .network import build_network

    network = build_network(plan, trunk_file, readout_file)
    copied = copy_trained_weights(origin, network.built)
    if part:
        images = part.images
    else:
        with progress_bar("reading images", progress) as bar:
            images = load_images(dataset, plan.preprocessing, progress=bar)
    metrics = {key: value for key, value in origin.read_metrics().items() if not key.startswith("holdout")}
    metrics |= {"parameters": int(network.built.classifier.count_params()),
                "readout_from": network.trunk["readout_from"],
                "reused": {"run": str(origin.path), "layers_copied": copied}}
    if len(held_idx):
        metrics |= evaluate_held_out(network.built.classifier, images[held_idx], targets[held_idx], held_idx,
                                     dataset.classes, run)
    if origin.history.is_file():
        shutil.copyfile(origin.history, run.history)
    save_run(run, plan, network, dataset, metrics)
    return TrainResult(run.path, network.built.classifier, plan.preprocessing, dataset.classes, metrics)


def check_same_recipe(origin: RunDir, config: TrainConfig) -> None:
    """Refuse a finished run whose training settings are not ``config``'s without the read-out
    (a setting it lacks, added since, counts at its default, which is what it trained with)."""
    recorded = with_defaults(origin.read_config().get("train", {}))
    wanted = asdict(replace(config, stage1_readout=0.0, readout_run=""))
    differing = sorted(key for key in wanted if recorded.get(key) != wanted[key])
    if differing:
        shown = ", ".join(f"{key} {recorded.get(key)!r} vs {wanted[key]!r}" for key in differing)
        raise UsageError(f"{origin.path} trained another recipe ({shown}); --reuse needs the same one "
                         "without --stage1-readout")


def copy_trained_weights(origin: RunDir, built: Any) -> int:
    """Copy every trained weight of the finished run ``origin`` (its classifier and decoder) into
    ``built``, all but the read-out, by layer name; check that the copy answers as ``origin``'s
    classifier does. Returns the layers copied.

    Raises:
        UsageError: a layer is missing or does not fit, or the answers differ.
    """
    import keras

    from capsedge.models.build import READOUT_PREFIX, copy_weights

    classifier = keras.models.load_model(origin.classifier, compile=False)
    pairs = [(classifier, built.classifier, origin.classifier)]
    if built.decoder is not None and origin.decoder.is_file():
        pairs.append((keras.models.load_model(origin.decoder, compile=False), built.decoder, origin.decoder))
    copied = 0
    for source, target, source_file in pairs:
        try:
            copied += copy_weights(source, target, skip_prefix=f"{READOUT_PREFIX}_")
        except ValueError as exc:
            raise UsageError(f"{source_file} does not fit this recipe's network ({exc})") from None
    head = built.classifier.get_layer(f"{READOUT_PREFIX}_fusion").input[0]
    without_readout = keras.Model(built.classifier.input, head)
    images = np.random.default_rng(0).random((2, *built.config.input_shape), dtype=np.float32)
    difference = float(np.max(np.abs(np.asarray(classifier(images)) - np.asarray(without_readout(images)))))
    if difference > COPY_TOLERANCE:
        raise UsageError(f"the network built from {origin.path} answers otherwise than its classifier "
                         f"(by {difference:.3g}): another model configuration?")
    return copied
