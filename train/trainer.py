"""Train a capsule network on labelled X-rays and write a run folder.

A run folder holds ``config.json``, ``history.csv``, ``metrics.json`` and the
classifier as ``classifier.keras`` (``capsedge export`` reads it); while a run
is under way, ``backup/`` holds what ``--resume`` needs.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import UsageError
from capsedge.preprocess import Preprocessing

from .augment import get_augmentation
from .config import TrainConfig
from .data import Dataset, DatasetError, load_images, read_dataset
from .evaluation import (
    VIEWS_FILE,
    average_views,
    out_of_fold,
    predict_probabilities,
    predict_views,
    read_history,
    save_evaluation_pngs,
)
from .figures import save_learning_curves_png
from .metrics import classification_report, stratified_folds, stratified_split

#: The test-time averages a cross-validation reports beside one view: name -> views.
TEST_TIME_VIEWS = {"flips": 4, "dihedral": 8}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    classifier: Any
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    metrics: dict[str, Any]


def resumable_backup(folder: Path) -> Any:
    """Keras' ``BackupAndRestore`` into ``folder`` (weights, optimiser and epoch, every epoch),
    keeping the previous epoch's backup too: a run stopped while it was writing one (killed,
    out of memory) resumes from the epoch before."""
    import keras

    class Backup(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs: dict | None = None) -> None:
            try:
                super().on_train_begin(logs)
            except ValueError:  # a half-written weights file opens, but lacks variables
                previous = Path(self._prev_weights_path)
                if not previous.is_file():
                    raise UsageError(f"the backup in {folder} is unreadable (the run stopped while "
                                     "writing it): delete that folder to restart the run") from None
                Path(self._weights_path).write_bytes(previous.read_bytes())
                metadata = Path(self._prev_training_metadata_path)
                if metadata.is_file():
                    Path(self._training_metadata_path).write_bytes(metadata.read_bytes())
                self._load_model()

    return Backup(str(folder), double_checkpoint=True)


def _compile_trainer(model: Any, config: TrainConfig, counts: np.ndarray, steps: int) -> None:
    """Compile ``model`` (the trainer, or the part above a frozen trunk) with the losses of its
    outputs and the configured optimiser and schedule."""
    import keras

    from capsedge.models import losses

    class_weights = losses.class_balanced_weights(counts, config.beta).astype("float32")

    def cross_entropy(y: Any, p: Any) -> Any:
        return losses.weighted_categorical_crossentropy(
            y, p, class_weights=class_weights, label_smoothing=config.label_smoothing
        )

    outputs = set(model.output_names)
    loss: dict[str, Any] = {}
    weights: dict[str, float] = {}
    if "caps_length" in outputs:
        loss["caps_length"] = lambda y, p: losses.margin_loss(y, p, class_weights=class_weights)
        weights["caps_length"] = 1.0
    if "linear_probs" in outputs:
        loss["linear_probs"] = cross_entropy
        weights["linear_probs"] = 1.0
    if "ncp_probs" in outputs:
        loss["ncp_probs"] = cross_entropy
        weights["ncp_probs"] = config.ncp_weight
    if "reconstruction" in outputs:
        loss["reconstruction"] = losses.reconstruction_loss
        weights["reconstruction"] = config.reconstruction_weight
    total = max(1, config.epochs * steps)
    warmup = int(round(config.warmup * total))
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate / 100 if warmup else config.learning_rate,
        decay_steps=max(1, total - warmup),
        alpha=0.01,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    # Accuracy of each head on its own, per epoch in history.csv (val_* with a hold-out).
    metrics = {name: ["categorical_accuracy"] for name in ("caps_length", "ncp_probs", "linear_probs")
               if name in loss}
    average = {"use_ema": config.ema > 0, "ema_momentum": config.ema or 0.99}
    if config.weight_decay:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay, **average)
    else:
        optimizer = keras.optimizers.Adam(schedule, **average)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=weights, metrics=metrics)


def uses_frozen_views(model_config: Any, config: TrainConfig) -> bool:
    """Whether training runs above precomputed frozen-trunk maps (see :mod:`.frozen`)."""
    return (model_config.trunk is not None and config.freeze_stages > 0 and config.augment == "dihedral"
            and config.mixup == 0)


def _frozen_maps(model_config: Any, config: TrainConfig, images: np.ndarray,
                 progress: bool = False) -> np.ndarray:
    """The frozen trunk's maps of every image and dihedral view, for all folds at once."""
    import keras

    from capsedge.models import build_model

    from .frozen import frozen_split, frozen_views

    keras.utils.set_random_seed(config.seed)
    built = build_model(model_config)
    _initialise_trunk(built, config)
    with _progress("frozen trunk maps", progress) as bar:
        return frozen_views(frozen_split(built, config.freeze_stages)[0], images, progress=bar)


@contextlib.contextmanager
def _progress(label: str, shown: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback for one long step (on stderr), or ``None`` when progress is off."""
    if not shown:
        yield None
        return
    from capsedge.progress import Progress

    with Progress(label) as bar:
        yield bar.update


def calibration_indices(train_idx: np.ndarray) -> np.ndarray:
    """The training images that calibrate the int8 trunk of ``--int8-trunk``: up to
    :data:`~capsedge.models.tflite.CALIBRATION_IMAGES` of them, drawn with seed 0 as the
    export draws its calibration images from a folder."""
    from capsedge.models.tflite import CALIBRATION_IMAGES

    return np.sort(np.random.default_rng(0).permutation(train_idx)[:CALIBRATION_IMAGES])


def _initialise_trunk(built: Any, config: TrainConfig, trunk_file: Path | None = None) -> dict[str, Any]:
    """Load the starting weights into a pretrained trunk (ImageNet's, or those of the stage-1
    run of ``init="run:PATH"``: ``trunk_file``, by default that run's own) and freeze its first
    stages.

    Returns what was done, for ``metrics.json``.
    """
    from capsedge.model_guard import file_digest
    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import (
        LITE0_PROVENANCE,
        load_lite0_weights,
        load_trunk_weights,
        trunk_layers,
    )

    cfg = built.config
    if cfg.trunk is None:
        return {}
    done: dict[str, Any] = {"init": config.init}
    if config.init == "imagenet":
        done["layers_loaded"] = load_lite0_weights(built.classifier, name=TRUNK_PREFIX)
        done["pretrained"] = LITE0_PROVENANCE
    elif config.init_run is not None:
        trunk_file = trunk_file or stage1_trunk_file(config.init_run)
        done["layers_loaded"] = load_trunk_weights(built.classifier, trunk_file, name=TRUNK_PREFIX)
        done["trunk_from"] = {"file": str(trunk_file), "sha256": file_digest(trunk_file)}
        done["pretrained"] = LITE0_PROVENANCE
    if config.freeze_stages:
        frozen = trunk_layers(built.classifier, config.freeze_stages, name=TRUNK_PREFIX)
        for layer in frozen:
            layer.trainable = False
        done["layers_frozen"] = len(frozen)
    return done


def stage1_trunk_file(run: Path, part: str | None = None) -> Path:
    """The trunk weights a stage-1 ``run`` hands on: ``run/trunk.npz`` for a single run;
    for a cross-validation, ``run/PART/trunk.npz`` (``part`` ``"fold-K"``, or ``"final"`` by
    default).

    Raises:
        UsageError: no such file.
    """
    from capsedge.models.efficientnet_lite import TRUNK_WEIGHTS_FILE

    candidates = [run / part / TRUNK_WEIGHTS_FILE] if part else [run / TRUNK_WEIGHTS_FILE,
                                                                   run / "final" / TRUNK_WEIGHTS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(f"no stage-1 trunk in {run} (looked for {', '.join(str(c) for c in candidates)})")


def _distribution(devices: list[str] | None) -> Any | None:
    """A ``MirroredStrategy`` over ``devices`` or over several GPUs; ``None`` for one device.

    Only the TensorFlow backend distributes this way; with JAX or PyTorch one GPU is used.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        if devices:
            raise UsageError("devices need the TensorFlow backend (KERAS_BACKEND=tensorflow)")
        return None
    import tensorflow as tf

    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [gpu.name for gpu in gpus] if len(gpus) > 1 else None
    return tf.distribute.MirroredStrategy(devices) if devices else None


def _prepare(data: str | Path | Dataset, config: TrainConfig) -> tuple[Dataset, Any, Preprocessing]:
    from capsedge.models import get_model_config

    model_config = get_model_config(config.model)  # a wrong name fails before any data is read
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    if tuple(model_config.class_names) != dataset.classes:
        model_config = replace(model_config, class_names=dataset.classes, num_classes=len(dataset.classes))
    return dataset, model_config, Preprocessing(input_size=model_config.input_shape[0])


def train(
    data: str | Path | Dataset,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    images: np.ndarray | None = None,
    resume: bool = False,
    progress: bool = True,
    devices: list[str] | None = None,
    workers: int = 1,
    frozen_maps: np.ndarray | None = None,
    trunk_file: Path | None = None,
) -> TrainResult:
    """Train a model on ``data`` and write the run folder.

    Args:
        data: a data folder or CSV (see :func:`capsedge.train.data.read_dataset`), or a Dataset.
        run_dir: where the run's files go (created).
        config: hyper-parameters; defaults to :class:`TrainConfig`.
        split: explicit (train, held-out) indices; default: a stratified ``config.holdout``.
        images: the preprocessed images of ``data``, if already loaded.
        resume: continue an interrupted run from its last finished epoch.
        progress: print one line per epoch.
        devices: train data-parallel on these TensorFlow devices (``MirroredStrategy``);
            by default every GPU when TensorFlow sees more than one, else one device.
        workers: threads that augment batches (the results do not depend on it).
        frozen_maps: the frozen trunk's maps of every image of ``data`` (see :mod:`.frozen`),
            if already computed.
        trunk_file: with ``init="run:PATH"``, the trunk weights to start from (a cross-validation
            passes each fold its own); default: that run's (see :func:`stage1_trunk_file`).

    Raises:
        DatasetError: the data cannot be used.
        UsageError: ``resume`` without a run to resume, or a fresh run over an old one.
    """
    import keras

    from capsedge.models import build_model

    from .batches import EpochSetter, TrainingBatches
    from .frozen import FrozenViewBatches, frozen_split, frozen_views, int8_frozen_views

    keras.backend.clear_session()  # a cross-validation builds one network per fold

    config = config or TrainConfig()
    dataset, model_config, preprocessing = _prepare(data, config)
    run_dir = Path(run_dir)
    backup = run_dir / "backup"
    if resume and not backup.is_dir():
        raise UsageError(f"nothing to resume in {run_dir} (no backup/ folder)")
    if not resume and backup.is_dir():
        raise UsageError(f"{run_dir} holds an interrupted run: pass --resume, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.seed)
    targets = dataset.targets
    if split is not None:
        train_idx, held_idx = split
    elif config.holdout > 0:
        train_idx, held_idx = stratified_split(targets, config.holdout, config.seed)
    else:
        train_idx, held_idx = np.arange(len(targets)), np.array([], dtype=np.int64)
    if len(np.unique(targets[train_idx])) < 2:
        raise DatasetError("the training part has fewer than two classes")

    if images is None:
        with _progress("reading images", progress) as bar:
            images = load_images(dataset, preprocessing, progress=bar)
    onehot = np.eye(len(dataset.classes), dtype=np.float32)[targets]
    counts = np.bincount(targets[train_idx], minlength=len(dataset.classes))

    strategy = _distribution(devices)
    with strategy.scope() if strategy else contextlib.nullcontext():
        built = build_model(model_config)
        trunk = _initialise_trunk(built, config, trunk_file)
        steps = int(np.ceil(len(train_idx) / config.batch_size))
        fitted = built.trainer
        int8_maps = None
        if config.int8_trunk and not uses_frozen_views(model_config, config):
            raise UsageError(f"--int8-trunk needs a model with a pretrained trunk; {config.model} has none")
        if uses_frozen_views(model_config, config):
            frozen, fitted = frozen_split(built, config.freeze_stages)
            if frozen_maps is None:
                with _progress("frozen trunk maps", progress) as bar:
                    frozen_maps = frozen_views(frozen, images, progress=bar)
            if config.int8_trunk:
                calibration = images[calibration_indices(train_idx)]
                with _progress("int8 trunk maps", progress) as bar:
                    int8_maps = int8_frozen_views(frozen, images[train_idx], calibration, progress=bar)
        _compile_trainer(fitted, config, counts, steps)
    outputs = set(fitted.output_names)
    reconstruction_size = model_config.reconstruction_size
    if fitted is built.trainer:
        batches = TrainingBatches(images[train_idx], onehot[train_idx], outputs, config.batch_size,
                                  get_augmentation(config.augment), config.seed, config.mixup,
                                  reconstruction_size=reconstruction_size, workers=workers)
    else:
        batches = FrozenViewBatches(frozen_maps[train_idx], images[train_idx], onehot[train_idx], outputs,
                                    config.batch_size, config.seed, reconstruction_size,
                                    int8_maps=int8_maps,
                                    int8_fraction=config.int8_trunk)

    callbacks = [
        EpochSetter(batches),
        resumable_backup(backup),  # deleted when the run completes
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
    ]
    start = time.perf_counter()
    validation = None
    if len(held_idx) and fitted is built.trainer:
        validation = TrainingBatches(images[held_idx], onehot[held_idx], outputs, 32, None, config.seed,
                                     reconstruction_size=reconstruction_size)
    elif len(held_idx):
        validation = FrozenViewBatches(frozen_maps[held_idx], images[held_idx], onehot[held_idx], outputs,
                                       32, config.seed, reconstruction_size, random_views=False)
    # A bar with time left within each epoch on a terminal; one line per epoch in a log.
    verbose = (1 if sys.stderr.isatty() else 2) if progress else 0
    with contextlib.redirect_stdout(sys.stderr):  # progress on stderr, results on stdout
        fitted.fit(batches, epochs=config.epochs, verbose=verbose, callbacks=callbacks,
                   validation_data=validation)
    seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "train_seconds": round(seconds, 1),
        "train_images": int(len(train_idx)),
        "train_counts": dict(zip(dataset.classes, counts.tolist(), strict=True)),
        "parameters": int(built.classifier.count_params()),
        "devices": strategy.num_replicas_in_sync if strategy else 1,
        **trunk,
    }
    if len(held_idx):
        probabilities = predict_probabilities(built.classifier, images[held_idx])
        predicted = probabilities.argmax(1)
        metrics["holdout"] = classification_report(targets[held_idx], predicted, dataset.classes)
        views = predict_views(built.classifier, images[held_idx])
        for name, count in TEST_TIME_VIEWS.items():
            answers = average_views(views, count).argmax(1)
            metrics[f"holdout_{name}"] = classification_report(targets[held_idx], answers, dataset.classes)
        np.save(run_dir / "holdout_probabilities.npy", probabilities)
        np.save(run_dir / VIEWS_FILE, views)
        np.save(run_dir / "holdout_indices.npy", np.asarray(held_idx))
        save_evaluation_pngs(probabilities, targets[held_idx], dataset.classes, run_dir)
    save_learning_curves_png(read_history(run_dir / "history.csv"), run_dir / "learning_curves.png")
    built.classifier.save(run_dir / "classifier.keras")
    if model_config.trunk is not None:  # what a later stage starts from (init="run:PATH")
        from capsedge.models.build import TRUNK_PREFIX
        from capsedge.models.efficientnet_lite import TRUNK_WEIGHTS_FILE, save_trunk_weights

        save_trunk_weights(built.classifier, run_dir / TRUNK_WEIGHTS_FILE, name=TRUNK_PREFIX)
    if built.decoder is not None:
        built.decoder.save(run_dir / "decoder.keras")
    _write_json(run_dir / "config.json", {
        "train": asdict(config),
        "model": _jsonable(asdict(model_config)),
        "preprocessing": preprocessing.to_dict(),
        "classes": list(dataset.classes),
        "data": {
            "layout": dataset.layout,
            "images": len(dataset.paths),
            "counts": dataset.counts(),
            "attribution": dataset.attribution(),
            "source": str(dataset.source) if dataset.source else None,
        },
    })
    _write_json(run_dir / "metrics.json", metrics)
    return TrainResult(run_dir, built.classifier, preprocessing, dataset.classes, metrics)


def cross_validate(
    data: str | Path | Dataset,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    folds: int = 5,
    resume: bool = False,
    progress: bool = True,
    workers: int = 1,
    final: bool = False,
    parts: Collection[int | str] | None = None,
) -> dict[str, Any] | None:
    """Stratified K-fold cross-validation; each fold is a run in ``run_dir/fold-K``.

    With ``resume``, a fold whose run is complete is not trained again, so an
    interrupted cross-validation picks up where it stopped (with the same
    settings: they are checked). Without it, ``run_dir`` must not hold folds. Writes ``cv_summary.json``
    (mean and standard deviation of accuracy and macro-F1, per-fold figures,
    pooled per-class report and confusion matrix) and ``confusion.png``. With ``final``, the
    recipe is then trained on every image into ``run_dir/final`` (the weights to ship, beside
    their figures; frozen-trunk maps are computed once for both).

    ``parts`` (fold numbers and/or ``"final"``) trains only those parts, resuming each, so that
    several processes can share one cross-validation (one part each, e.g. on a GPU machine);
    the summary is written by the call that finds every fold done, else ``None`` is returned.
    With ``init="run:PATH"``, fold K starts from the trunk of ``PATH/fold-K``, which must have
    held out the same images (else the cross-validation would not be honest), and the final run
    from ``PATH/final``.
    """
    config = config or TrainConfig()
    dataset, model_config, preprocessing = _prepare(data, config)
    run_dir = Path(run_dir)
    settings = {"train": asdict(config), "folds": folds, "images": len(dataset.paths)}
    settings_file = run_dir / "cv_settings.json"
    if parts is not None:
        unknown = [p for p in parts if p != "final" and not (isinstance(p, int) and 0 <= p < folds)]
        if unknown:
            raise UsageError(f"no part {unknown[0]!r} in a {folds}-fold cross-validation "
                             f"(0-{folds - 1} or final)")
        if "final" in parts and not final:
            raise UsageError("the final part needs --final")
    if resume or (parts is not None and settings_file.is_file()):
        if not settings_file.is_file():
            raise UsageError(f"nothing to resume in {run_dir} (no cv_settings.json)")
        if json.loads(settings_file.read_text()) != settings:
            raise UsageError(f"{run_dir} holds a cross-validation with other settings; choose another --out")
    elif parts is None and run_dir.is_dir() and any(run_dir.glob("fold-*")):
        raise UsageError(f"{run_dir} already holds a cross-validation: pass --resume or another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(settings_file, settings)
    resume = resume or parts is not None
    wanted = set(range(folds)) | ({"final"} if final else set()) if parts is None else set(parts)
    with _progress("reading images", progress) as bar:
        images = load_images(dataset, preprocessing, progress=bar)
    targets = dataset.targets
    maps = None
    if uses_frozen_views(model_config, config) and config.init == "imagenet":
        # The same frozen weights in every fold.
        maps = _frozen_maps(model_config, config, images, progress)
    pooled_true, pooled_pred, per_fold = [], [], []
    for k, (train_idx, val_idx) in enumerate(stratified_folds(targets, folds, config.seed)):
        fold_dir = run_dir / f"fold-{k}"
        done = resume and _finished(fold_dir)
        if not done and k in wanted:
            if progress:
                print(f"fold {k + 1}/{folds}: {len(train_idx)} training, {len(val_idx)} validation images",
                      file=sys.stderr)
            train(dataset, fold_dir, config, split=(train_idx, val_idx), images=images,
                  resume=resume and (fold_dir / "backup").is_dir(), progress=progress, workers=workers,
                  frozen_maps=maps, trunk_file=_fold_trunk(config, k, val_idx))
        if not _finished(fold_dir):
            continue
        probabilities = np.load(fold_dir / "holdout_probabilities.npy")
        pooled_true.append(targets[val_idx])
        pooled_pred.append(probabilities.argmax(1))
        fold_metrics = json.loads((fold_dir / "metrics.json").read_text())
        report = fold_metrics["holdout"]
        row = {"fold": k, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
        for name in TEST_TIME_VIEWS:
            averaged = fold_metrics.get(f"holdout_{name}", {})
            row |= {f"accuracy_{name}": averaged.get("accuracy"),
                    f"macro_f1_{name}": averaged.get("macro_f1")}
        per_fold.append(row)
    final_dir = run_dir / "final"
    if "final" in wanted and not (resume and _finished(final_dir)):
        if progress:
            print(f"final: all {len(targets)} images", file=sys.stderr)
        trunk_file = stage1_trunk_file(config.init_run, "final") if config.init_run else None
        train(dataset, final_dir, replace(config, holdout=0.0), images=images, progress=progress,
              resume=resume and (final_dir / "backup").is_dir(), workers=workers, frozen_maps=maps,
              trunk_file=trunk_file)
    if len(per_fold) < folds:
        return None
    accuracy = np.array([f["accuracy"] for f in per_fold])
    macro_f1 = np.array([f["macro_f1"] for f in per_fold])
    pooled = classification_report(np.concatenate(pooled_true), np.concatenate(pooled_pred), dataset.classes)
    summary = {
        "folds": folds,
        "accuracy_mean": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std(ddof=1)) if folds > 1 else 0.0,
        "macro_f1_mean": float(macro_f1.mean()),
        "macro_f1_std": float(macro_f1.std(ddof=1)) if folds > 1 else 0.0,
        "per_fold": per_fold,
        "pooled": pooled,
        "train": asdict(config),
    }
    for name in TEST_TIME_VIEWS:
        # What a runtime averaging 4 (flips) or 8 (dihedral) test-time views would score.
        if all(f[f"accuracy_{name}"] is not None for f in per_fold):
            averaged_accuracy = np.array([f[f"accuracy_{name}"] for f in per_fold])
            averaged_f1 = np.array([f[f"macro_f1_{name}"] for f in per_fold])
            summary[name] = {
                "accuracy_mean": float(averaged_accuracy.mean()),
                "accuracy_std": float(averaged_accuracy.std(ddof=1)) if folds > 1 else 0.0,
                "macro_f1_mean": float(averaged_f1.mean()),
                "macro_f1_std": float(averaged_f1.std(ddof=1)) if folds > 1 else 0.0,
            }
    _write_json(run_dir / "cv_summary.json", summary)
    indices, probabilities = out_of_fold(run_dir, len(targets))
    save_evaluation_pngs(probabilities, targets[indices], dataset.classes, run_dir)
    return summary


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a completed run (metrics written, no backup left)."""
    return (run_dir / "metrics.json").is_file() and not (run_dir / "backup").is_dir()


def _fold_trunk(config: TrainConfig, fold: int, val_idx: np.ndarray) -> Path | None:
    """Fold ``fold``'s stage-1 trunk under ``init="run:PATH"``, checked to have held out ``val_idx``."""
    if config.init_run is None:
        return None
    trunk_file = stage1_trunk_file(config.init_run, f"fold-{fold}")
    held = trunk_file.parent / "holdout_indices.npy"
    if not held.is_file() or not np.array_equal(np.sort(np.load(held)), np.sort(val_idx)):
        raise UsageError(f"{trunk_file.parent} did not hold out fold {fold}'s images: the stage-1 run "
                         "must be a cross-validation of the same data, folds and seed")
    return trunk_file


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (processes training parts of one cross-validation
    may write the same file at once; a reader never sees half of it)."""
    import os

    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
