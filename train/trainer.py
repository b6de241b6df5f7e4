"""Train a capsule network on labelled X-rays and write a run folder.

A run folder holds ``config.json``, ``history.json``, ``metrics.json`` and the
classifier as ``classifier.keras``; ``capsedge export`` reads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.preprocess import Preprocessing

from .data import Dataset, DatasetError, load_images, read_dataset
from .metrics import classification_report, stratified_split


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; model architecture lives in the model registry.

    Attributes:
        model: registry name of the model configuration.
        epochs: passes over the training images.
        batch_size: images per step.
        learning_rate: initial Adam learning rate (cosine-decayed to 1 % of it).
        beta: class-balanced loss beta (Cui et al. 2019); 0 disables reweighting.
        reconstruction_weight: weight of the decoder's reconstruction loss.
        ncp_weight: weight of the NCP head's cross-entropy.
        holdout: fraction of each class held out for evaluation (0: train on everything).
        augment: random rotations, flips, zoom, shifts and contrast on the fly.
        seed: makes splits, initialisation and augmentation repeatable on one machine.
    """

    model: str = "effcaps_ncp_implant_128"
    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 2e-3
    beta: float = 0.999
    reconstruction_weight: float = 0.5
    ncp_weight: float = 1.0
    holdout: float = 0.2
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    classifier: Any
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    metrics: dict[str, Any]


def build_augmenter(seed: int) -> Any:
    """Radiograph augmentation: any rotation, both flips, zoom, shift, contrast, brightness."""
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=seed + 1),
            layers.RandomZoom((-0.15, 0.15), fill_mode="constant", fill_value=0.0, seed=seed + 2),
            layers.RandomTranslation(0.08, 0.08, fill_mode="constant", fill_value=0.0, seed=seed + 3),
            layers.RandomContrast(0.3, value_range=(0.0, 1.0), seed=seed + 4),
            layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed + 5),
        ],
        name="augment",
    )


def _compile_trainer(built: Any, config: TrainConfig, counts: np.ndarray, steps: int) -> None:
    import keras

    from capsedge.models import losses

    class_weights = losses.class_balanced_weights(counts, config.beta).astype("float32")
    loss: dict[str, Any] = {
        "caps_length": lambda y, p: losses.margin_loss(y, p, class_weights=class_weights)
    }
    weights = {"caps_length": 1.0}
    outputs = set(built.trainer.output_names) if hasattr(built.trainer, "output_names") else set()
    if "ncp_probs" in outputs:
        loss["ncp_probs"] = lambda y, p: losses.weighted_categorical_crossentropy(
            y, p, class_weights=class_weights
        )
        weights["ncp_probs"] = config.ncp_weight
    if "reconstruction" in outputs:
        loss["reconstruction"] = losses.reconstruction_loss
        weights["reconstruction"] = config.reconstruction_weight
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, config.epochs * steps), alpha=0.01
    )
    built.trainer.compile(
        optimizer=keras.optimizers.Adam(schedule), loss=loss, loss_weights=weights
    )


def _batches(images: np.ndarray, onehot: np.ndarray, outputs: set[str], config: TrainConfig,
             augmenter: Any | None) -> Any:
    import tensorflow as tf

    def targets(image: Any, label: Any) -> Any:
        wanted = {"caps_length": label, "ncp_probs": label, "reconstruction": image}
        return (image, label), {k: v for k, v in wanted.items() if k in outputs}

    data = tf.data.Dataset.from_tensor_slices((images, onehot))
    data = data.shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True)
    data = data.batch(config.batch_size)
    if augmenter is not None:
        data = data.map(lambda x, y: (augmenter(x, training=True), y))
    return data.map(targets).prefetch(2)


def predict_probabilities(classifier: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of the Keras classifier for preprocessed images."""
    return np.asarray(classifier.predict(images, batch_size=batch_size, verbose=0))


def train(data: str | Path | Dataset, run_dir: str | Path, config: TrainConfig | None = None,
          *, progress: bool = True) -> TrainResult:
    """Train a model on ``data`` and write the run folder.

    Args:
        data: a data folder or CSV (see :func:`capsedge.train.data.read_dataset`), or a Dataset.
        run_dir: where the run's files go (created).
        config: hyper-parameters; defaults to :class:`TrainConfig`.
        progress: print one line per epoch.

    Raises:
        DatasetError: the data cannot be used.
    """
    import keras

    from capsedge.models import build_model, get_model_config

    config = config or TrainConfig()
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    model_config = get_model_config(config.model)
    if model_config.class_names and tuple(model_config.class_names) != dataset.classes:
        model_config = replace(model_config, class_names=dataset.classes,
                               num_classes=len(dataset.classes))
    preprocessing = Preprocessing(input_size=model_config.input_shape[0])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.seed)
    targets = dataset.targets
    if config.holdout > 0:
        train_idx, held_idx = stratified_split(targets, config.holdout, config.seed)
    else:
        train_idx, held_idx = np.arange(len(targets)), np.array([], dtype=np.int64)
    if len(np.unique(targets[train_idx])) < 2:
        raise DatasetError("the training part has fewer than two classes")

    images = load_images(dataset, preprocessing)
    onehot = np.eye(len(dataset.classes), dtype=np.float32)[targets]
    counts = np.bincount(targets[train_idx], minlength=len(dataset.classes))

    built = build_model(model_config)
    steps = int(np.ceil(len(train_idx) / config.batch_size))
    _compile_trainer(built, config, counts, steps)
    outputs = set(built.trainer.output_names)
    augmenter = build_augmenter(config.seed) if config.augment else None
    batches = _batches(images[train_idx], onehot[train_idx], outputs, config, augmenter)

    start = time.perf_counter()
    history = built.trainer.fit(batches, epochs=config.epochs, verbose=2 if progress else 0)
    seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "train_seconds": round(seconds, 1),
        "train_images": int(len(train_idx)),
        "train_counts": dict(zip(dataset.classes, counts.tolist(), strict=True)),
        "parameters": int(built.classifier.count_params()),
    }
    if len(held_idx):
        probabilities = predict_probabilities(built.classifier, images[held_idx])
        report = classification_report(targets[held_idx], probabilities.argmax(1), dataset.classes)
        metrics["holdout"] = report
    built.classifier.save(run_dir / "classifier.keras")
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
        },
    })
    _write_json(run_dir / "history.json", {k: [float(v) for v in vals]
                                            for k, vals in history.history.items()})
    _write_json(run_dir / "metrics.json", metrics)
    return TrainResult(run_dir, built.classifier, preprocessing, dataset.classes, metrics)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
