"""Sanity check of the Efficient-CapsNet implementation: train on 8,000 MNIST test images.

Trains ``effcaps_mnist`` on the first 8,000 images of the MNIST t10k set and reports the
accuracy of its classifier on the last 2,000. Setup of Mazzia et al. 2021 (MNIST): margin
loss + 0.392 x reconstruction MSE, Adam (lr 5e-4) with an exponential decay of 0.97 per
epoch, small random shifts and rotations.

    python bench/mnist_sanity.py --mnist DIR --out runs   # also runs/mnist_sanity.json

DIR holds MNIST's t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import common
import numpy as np

N_TRAIN = 8000
RECONSTRUCTION_WEIGHT = 0.392


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (LeCun's MNIST format) into an array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def load(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 28, 28, 1) in [0, 1] and integer labels."""
    images = read_idx(data_dir / "t10k-images-idx3-ubyte.gz").astype("float32")[..., None] / 255.0
    labels = read_idx(data_dir / "t10k-labels-idx1-ubyte.gz").astype("int64")
    return images, labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.parser(__doc__, data=False, mnist=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--decay", type=float, default=0.97, help="lr factor per epoch")
    parser.add_argument("--shift", type=float, default=2.0, help="max random shift, pixels")
    parser.add_argument("--rotation", type=float, default=10.0, help="max random rotation, deg")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import keras
    import tensorflow as tf

    from capsedge.models import build_model, get_model_config
    from capsedge.models.losses import MarginLoss, ReconstructionLoss

    keras.utils.set_random_seed(args.seed)
    images, labels = load(common.mnist_folder(args))
    x_train, y_train = images[:N_TRAIN], labels[:N_TRAIN]
    x_test, y_test = images[N_TRAIN:], labels[N_TRAIN:]
    onehot = np.eye(10, dtype="float32")[y_train]

    augment = keras.Sequential(
        [
            keras.layers.RandomRotation(args.rotation / 360.0, fill_mode="constant"),
            keras.layers.RandomTranslation(args.shift / 28.0, args.shift / 28.0, fill_mode="constant"),
        ]
    )

    def to_example(x: tf.Tensor, y: tf.Tensor) -> tuple:
        x = augment(x, training=True)
        return (x, y), {"caps_length": y, "reconstruction": x}

    train = (
        tf.data.Dataset.from_tensor_slices((x_train, onehot))
        .shuffle(N_TRAIN, seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size)
        .map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    steps = int(np.ceil(N_TRAIN / args.batch_size))

    cfg = get_model_config("effcaps_mnist")
    built = build_model(cfg)
    schedule = keras.optimizers.schedules.ExponentialDecay(args.lr, decay_steps=steps, decay_rate=args.decay)
    built.trainer.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss={"caps_length": MarginLoss(), "reconstruction": ReconstructionLoss()},
        loss_weights={"caps_length": 1.0, "reconstruction": RECONSTRUCTION_WEIGHT},
    )

    def test_accuracy() -> float:
        probs = built.classifier.predict(x_test, batch_size=500, verbose=0)
        return float(np.mean(probs.argmax(axis=1) == y_test))

    start = time.perf_counter()
    history = []
    for epoch in range(1, args.epochs + 1):
        fit = built.trainer.fit(train, epochs=1, verbose=0, shuffle=False)
        acc = test_accuracy()
        history.append({"epoch": epoch, "loss": float(fit.history["loss"][-1]), "acc": acc})
        print(
            f"epoch {epoch:3d}  loss {history[-1]['loss']:.4f}  test acc {acc:.4f}  "
            f"{time.perf_counter() - start:7.1f} s",
            flush=True,
        )
    wall = time.perf_counter() - start

    trainable = int(sum(np.prod(w.shape) for w in built.classifier.trainable_weights))
    result = {
        "model": cfg.name,
        "train_images": N_TRAIN,
        "test_images": int(len(y_test)),
        "accuracy": history[-1]["acc"],
        "best_accuracy": max(h["acc"] for h in history),
        "epochs": args.epochs,
        "wall_time_s": round(wall, 1),
        "params_trainable": trainable,
        "params_total": int(built.classifier.count_params()),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "decay_per_epoch": args.decay,
        "shift_px": args.shift,
        "rotation_deg": args.rotation,
        "seed": args.seed,
        "history": history,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    common.save_json(args, "mnist_sanity.json", result)
    return result


if __name__ == "__main__":
    common.quietly(main)
