"""Train a capsule network on labelled X-rays and write a run folder.

A run folder (:class:`capsedge.workshop.run.RunDir`, the contract export and the benches read
too) holds ``config.json``, ``history.csv``, ``metrics.json`` and the classifier as
``classifier.keras``; while a run is under way, ``backup/`` holds what ``--resume`` needs.

:func:`train` reads top to bottom: the plan (:mod:`.plan`: frozen-trunk or end-to-end, where the
trunk starts), the split, the images, the network (:mod:`.network`), its batches, the fit, the
held-out evaluation, the files.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import UsageError
from capsedge.preprocess import Preprocessing
from capsedge.views import VIEW_AVERAGES
from capsedge.workshop.dataset import Dataset, DatasetError, load_images
from capsedge.workshop.run import RunDir, average_views, read_json, write_json

from .config import TrainConfig
from .evaluation import predict_probabilities, predict_views, read_history, save_evaluation_pngs
from .figures import save_learning_curves_png
from .metrics import classification_report, stratified_split
from .plan import TrainingPlan, plan_training

__all__ = ["Part", "TrainResult", "evaluate_held_out", "holdout_split", "progress_bar", "save_run", "train"]



@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    classifier: Any
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Part:
    """A run that is one part of a cross-validation (see :mod:`.cross_validation`).

    Attributes:
        name: the fold's number, or ``"final"`` (under ``init="run:PATH"``, the same part of the
            stage-1 run gives the trunk it starts from).
        split: its (training, held-out) image indices.
        images: the preprocessed images of the whole data set, read once for every part.
        frozen_maps: the frozen trunk's maps of every image (see :mod:`.frozen`), when every part
            shares them; else ``None``.
    """

    name: int | str
    split: tuple[np.ndarray, np.ndarray]
    images: np.ndarray
    frozen_maps: np.ndarray | None = None


def train(
    data: str | Path | Dataset,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    devices: list[str] | None = None,
    workers: int = 1,
    part: Part | None = None,
) -> TrainResult:
    """Train a model on ``data`` and write the run folder.

    Args:
        data: a data folder or CSV (see :func:`capsedge.workshop.dataset.read_dataset`), or a Dataset.
        run_dir: where the run's files go (created).
        config: hyper-parameters; defaults to :class:`TrainConfig`.
        resume: continue an interrupted run from its last finished epoch.
        progress: print one line per epoch.
        devices: train data-parallel on these TensorFlow devices (``MirroredStrategy``);
            by default every GPU when TensorFlow sees more than one, else one device.
        workers: threads that augment batches (the results do not depend on it).
        part: this run is that part of a cross-validation; default: a single run, holding out a
            stratified ``config.holdout``.

    Raises:
        DatasetError: the data cannot be used.
        UsageError: ``resume`` without a run to resume, or a fresh run over an old one.
    """
    import keras

    from .batches import EpochSetter
    from .network import build_network, compile_network, distribution, resumable_backup

    keras.backend.clear_session()  # a cross-validation builds one network per fold
    dataset, plan = plan_training(data, config or TrainConfig())
    config = plan.config
    targets = dataset.targets
    train_idx, held_idx = part.split if part else holdout_split(targets, config)
    # Resolved before the run folder opens: a stage 1 (or read-out run) that held out other images
    # is refused first.
    part_name = part.name if part else None
    trunk_file, readout_file = plan.stage1_trunk(part_name, held_idx), plan.readout_trunk(part_name, held_idx)
    run = RunDir(Path(run_dir))
    _open_run(run, resume)
    keras.utils.set_random_seed(config.seed)
    if len(np.unique(targets[train_idx])) < 2:
        raise DatasetError("the training part has fewer than two classes")
    if part:
        images = part.images
    else:
        with progress_bar("reading images", progress) as bar:
            images = load_images(dataset, plan.preprocessing, progress=bar)
    onehot = np.eye(len(dataset.classes), dtype=np.float32)[targets]
    counts = np.bincount(targets[train_idx], minlength=len(dataset.classes))

    strategy = distribution(devices)
    with strategy.scope() if strategy else contextlib.nullcontext():
        network = build_network(plan, trunk_file, readout_file)
        if config.int8_aware_trunk:
            network.trunk["int8_aware"] = _int8_aware_trunk(plan, network, images, train_idx, run, progress)
        maps, int8_maps = _frozen_maps(plan, network, images, train_idx, part, progress)
        compile_network(network.fitted, config, counts, int(np.ceil(len(train_idx) / config.batch_size)))
    batches, validation = _batches(plan, network, images, onehot, (train_idx, held_idx), maps, int8_maps,
                                   workers)

    callbacks = [
        EpochSetter(batches),
        resumable_backup(run.backup),  # deleted when the run completes
        keras.callbacks.CSVLogger(str(run.history), append=resume),
    ]
    start = time.perf_counter()
    # A bar with time left within each epoch on a terminal; one line per epoch in a log.
    verbose = (1 if sys.stderr.isatty() else 2) if progress else 0
    with contextlib.redirect_stdout(sys.stderr):  # progress on stderr, results on stdout
        network.fitted.fit(batches, epochs=config.epochs, verbose=verbose, callbacks=callbacks,
                           validation_data=validation)
    metrics: dict[str, Any] = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_images": int(len(train_idx)),
        "train_counts": dict(zip(dataset.classes, counts.tolist(), strict=True)),
        "parameters": int(network.built.classifier.count_params()),
        "devices": strategy.num_replicas_in_sync if strategy else 1,
        **network.trunk,
    }
    if len(held_idx):
        metrics |= evaluate_held_out(network.built.classifier, images[held_idx], targets[held_idx],
                                      held_idx, dataset.classes, run)
    save_run(run, plan, network, dataset, metrics)
    return TrainResult(run.path, network.built.classifier, plan.preprocessing, dataset.classes, metrics)


@contextlib.contextmanager
def progress_bar(label: str, shown: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback for one long step (on stderr), or ``None`` when progress is off."""
    if not shown:
        yield None
        return
    from capsedge.progress import Progress

    with Progress(label) as bar:
        yield bar.update


def _open_run(run: RunDir, resume: bool) -> None:
    """Create the run folder, refusing to resume where there is no backup, or to start afresh over
    an interrupted run."""
    if resume and not run.backup.is_dir():
        raise UsageError(f"nothing to resume in {run.path} (no {RunDir.BACKUP}/ folder)")
    if not resume and run.backup.is_dir():
        raise UsageError(f"{run.path} holds an interrupted run: pass --resume, or choose another --out")
    run.path.mkdir(parents=True, exist_ok=True)


def holdout_split(targets: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices of a single run: a stratified ``config.holdout``, or none."""
    if config.holdout > 0:
        return stratified_split(targets, config.holdout, config.seed)
    return np.arange(len(targets)), np.array([], dtype=np.int64)


def _int8_aware_trunk(plan: TrainingPlan, network: Any, images: np.ndarray, train_idx: np.ndarray,
                      run: RunDir, progress: bool) -> dict[str, Any]:
    """Distil the frozen trunk for int8 on the training images (``--int8-aware-trunk``), once per
    run: the result waits in the backup for a resumed run, rounded to float16 as ``trunk.npz``
    rounds it, so a resumed run reads the trunk that the run it resumes read. Returns the report."""
    from capsedge.export.calibration import calibration_indices
    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import load_trunk_weights, save_trunk_weights

    from .quantization_aware import distil_for_int8

    config = plan.config
    if not run.int8_aware_trunk.is_file():
        calibration = images[calibration_indices(train_idx)]
        with progress_bar("int8-aware trunk", progress) as bar:
            report = distil_for_int8(network.frozen, images[train_idx], calibration, config.int8_aware_trunk,
                                     seed=config.seed, views=config.training_views, progress=bar)
        run.backup.mkdir(exist_ok=True)
        write_json(run.int8_aware_report, report)
        partial = run.int8_aware_trunk.with_name(f".{RunDir.INT8_AWARE_TRUNK}")
        save_trunk_weights(network.built.classifier, partial, name=TRUNK_PREFIX)
        partial.replace(run.int8_aware_trunk)  # written last: the backup holds both or neither
    load_trunk_weights(network.built.classifier, run.int8_aware_trunk, name=TRUNK_PREFIX)
    return read_json(run.int8_aware_report)


def _frozen_maps(plan: TrainingPlan, network: Any, images: np.ndarray, train_idx: np.ndarray,
                 part: Part | None, progress: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The frozen trunk's maps of every image (those of ``part`` when it has them) and, with
    ``--int8-trunk``, its int8 maps of the training images; ``(None, None)`` end to end."""
    if not plan.frozen_trunk:
        return None, None
    from .frozen import frozen_views, int8_frozen_views

    maps = part.frozen_maps if part else None
    if maps is None:
        with progress_bar("frozen trunk maps", progress) as bar:
            maps = frozen_views(network.frozen, images, progress=bar, views=plan.config.training_views)
    int8_maps = None
    if plan.config.int8_trunk:  # the only part of training that needs export (TFLite, LiteRT)
        from capsedge.export.calibration import calibration_indices

        calibration = images[calibration_indices(train_idx)]
        with progress_bar("int8 trunk maps", progress) as bar:
            int8_maps = int8_frozen_views(network.frozen, images[train_idx], calibration, progress=bar,
                                          views=plan.config.training_views)
    return maps, int8_maps


def _batches(plan: TrainingPlan, network: Any, images: np.ndarray, onehot: np.ndarray,
             split: tuple[np.ndarray, np.ndarray], maps: np.ndarray | None, int8_maps: np.ndarray | None,
             workers: int) -> tuple[Any, Any | None]:
    """The training batches and, with held-out images, the validation batches: augmented images
    end to end, or frozen-trunk maps of random dihedral views."""
    from .augment import get_augmentation
    from .batches import TrainingBatches
    from .frozen import FrozenViewBatches

    config, (train_idx, held_idx) = plan.config, split
    outputs = set(network.fitted.output_names)
    size = plan.model.reconstruction_size
    if plan.frozen_trunk:
        batches = FrozenViewBatches(maps[train_idx], images[train_idx], onehot[train_idx], outputs,
                                    config.batch_size, config.seed, size, int8_maps=int8_maps,
                                    int8_fraction=config.int8_trunk)
    else:
        batches = TrainingBatches(images[train_idx], onehot[train_idx], outputs, config.batch_size,
                                  get_augmentation(config.augment), config.seed, config.mixup,
                                  reconstruction_size=size, workers=workers)
    if not len(held_idx):
        return batches, None
    if plan.frozen_trunk:
        return batches, FrozenViewBatches(maps[held_idx], images[held_idx], onehot[held_idx], outputs, 32,
                                          config.seed, size, random_views=False)
    return batches, TrainingBatches(images[held_idx], onehot[held_idx], outputs, 32, None, config.seed,
                                    reconstruction_size=size)


def evaluate_held_out(classifier: Any, images: np.ndarray, targets: np.ndarray, indices: np.ndarray,
                       classes: tuple[str, ...], run: RunDir) -> dict[str, Any]:
    """Score the held-out images in one view and averaged over
    :data:`capsedge.views.VIEW_AVERAGES`, save their answers, indices and pictures in ``run``;
    returns the reports for ``metrics.json``."""
    probabilities = predict_probabilities(classifier, images)
    reports = {"holdout": classification_report(targets, probabilities.argmax(1), classes)}
    views = predict_views(classifier, images)
    for name, count in VIEW_AVERAGES.items():
        answers = average_views(views, count).argmax(1)
        reports[f"holdout_{name}"] = classification_report(targets, answers, classes)
    run.save_holdout(indices, probabilities, views)
    save_evaluation_pngs(probabilities, targets, classes, run.path)
    return reports


def save_run(run: RunDir, plan: TrainingPlan, network: Any, dataset: Dataset,
              metrics: dict[str, Any]) -> None:
    """Write the learning curves, the classifier (and the trunk and decoder it has), ``config.json``
    and, last, ``metrics.json`` (a run with metrics is complete)."""
    built = network.built
    save_learning_curves_png(read_history(run.history), run.learning_curves)
    built.classifier.save(run.classifier)
    if plan.model.trunk is not None:  # what a later stage starts from (init="run:PATH")
        from capsedge.models.build import LINEAR_HEAD, TRUNK_PREFIX
        from capsedge.models.efficientnet_lite import save_trunk_weights

        # A linear head goes with its trunk: a stage 2 may keep it (--stage1-readout), and a GPU
        # machine's run travels back without classifier.keras (train/gpu_stage1.sh).
        head = (LINEAR_HEAD,) if plan.model.head == "linear" else ()
        save_trunk_weights(built.classifier, run.trunk, name=TRUNK_PREFIX, also=head)
    if built.decoder is not None:
        built.decoder.save(run.decoder)
    run.write_config({
        "train": asdict(plan.config),
        "model": _jsonable(asdict(plan.model)),
        "preprocessing": plan.preprocessing.to_dict(),
        "classes": list(dataset.classes),
        "data": {
            "layout": dataset.layout,
            "images": len(dataset.paths),
            "counts": dataset.counts(),
            "attribution": dataset.attribution(),
            "source": str(dataset.source) if dataset.source else None,
        },
    })
    run.write_metrics(metrics)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value

