"""Training batches as a ``keras.utils.PyDataset``: numpy in, numpy out, any Keras backend."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from .augment import Augmentation, augment_batch
from .distillation import LABEL_FED_OUTPUTS


class TrainingBatches(keras.utils.PyDataset):
    """Shuffled, augmented ``((image, onehot), targets)`` batches of the training images.

    The order and the augmentation of epoch ``e`` come from ``(seed, e)`` alone
    (:class:`EpochSetter` tells the dataset which epoch is running), so runs repeat and a
    resumed run continues with the batches it would have had.

    Args:
        images: ``(N, H, W, 1)`` preprocessed training images.
        onehot: ``(N, K)`` labels.
        outputs: the trainer's output names; ``"reconstruction"`` targets the augmented image.
        batch_size: images per batch (the last batch of an epoch may be smaller).
        augmentation: what to do to each image, or ``None``.
        seed: the run's seed.
        mixup: Beta(``mixup``, ``mixup``) weight for mixing each batch with a shuffled copy of
            itself, images and labels alike (Zhang et al. 2018, "mixup"); 0: no mixing.
        reconstruction_size: side of the reconstruction target, the augmented image
            average-pooled to it (``None``: the image itself).
        workers: threads that make batches (Keras ``PyDataset``); the batches do not depend on it.
    """

    def __init__(self, images: np.ndarray, onehot: np.ndarray, outputs: set[str], batch_size: int,
                 augmentation: Augmentation | None, seed: int, mixup: float = 0.0,
                 reconstruction_size: int | None = None, workers: int = 1) -> None:
        super().__init__(workers=workers, use_multiprocessing=False)
        self.reconstruction_size = reconstruction_size
        if mixup < 0:
            raise ValueError(f"mixup must be >= 0, got {mixup!r}")
        self.mixup = mixup
        self.images, self.onehot = images, onehot
        self.outputs, self.batch_size = outputs, batch_size
        self.augmentation, self.seed = augmentation, seed
        self.epoch = 0

    def __len__(self) -> int:
        return int(np.ceil(len(self.images) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        images = augment_batch(self.images[chosen], self.augmentation, rng)
        labels = self.onehot[chosen]
        if self.mixup > 0:
            weight = np.float32(rng.beta(self.mixup, self.mixup))
            partner = rng.permutation(len(chosen))
            images = weight * images + (1 - weight) * images[partner]
            labels = weight * labels + (1 - weight) * labels[partner]
        wanted = dict.fromkeys(LABEL_FED_OUTPUTS, labels)
        if "reconstruction" in self.outputs:
            wanted["reconstruction"] = average_pool(images, self.reconstruction_size)
        return (images, labels), {k: v for k, v in wanted.items() if k in self.outputs}


def average_pool(images: np.ndarray, size: int | None) -> np.ndarray:
    """``(B, H, W, C)`` images average-pooled to ``size`` rows (``H`` a multiple of it); ``None``:
    unchanged."""
    if size is None or size == images.shape[1]:
        return images
    factor = images.shape[1] // size
    batch, height, width, channels = images.shape
    blocks = images.reshape(batch, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


class EpochSetter(keras.callbacks.Callback):
    """Tells a :class:`TrainingBatches` which epoch starts (also the first one after a resume)."""

    def __init__(self, batches: TrainingBatches) -> None:
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.batches.epoch = epoch
