"""Quick ablations on one stratified 80/20 split of the development data.

Each variant trains from scratch and prints train and held-out accuracy every
10 epochs (and with --tta, the held-out accuracy averaged over the 8 flips and
quarter turns). One split is a noisy yardstick (95 held-out images: one image
is 1.05 points); cross-validation (`capsedge train --folds 5`) is the real one.

Usage:
    python bench/archive/holdout_ablation.py --model effcaps_implant_128 --augment d4 --epochs 80 [--tta]
    python bench/archive/holdout_ablation.py --model cnn --augment none --epochs 40
    python bench/archive/holdout_ablation.py --model effcaps_implant_128 --input bright --augment d4

Variants:
    --model   a registered model name, or "cnn": the same convolution stem with
              global average pooling and a softmax layer (a plain-CNN control).
    --augment none | d4 | d4-strong | full, as `capsedge train --augment` (see
              capsedge.train.augment).
    --input   plain | bright (keep only the brightest 15 % of grey levels: a
              crude "metal only" view).
    --pretrain-rotation N
              first train the convolution stem for N epochs to tell which quarter
              turn was applied to a training image (self-supervised, no labels),
              then train the whole network on the makers.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def bright_only(images: np.ndarray) -> np.ndarray:
    """Stretch the brightest 15 % of each image's non-black grey levels to [0, 1]."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        threshold = np.quantile(image[image > 0.02], 0.85)
        out[i] = np.clip((image - threshold) / max(1e-3, 1.0 - threshold), 0.0, 1.0)
    return out


def plain_cnn(config, class_weights: np.ndarray):  # noqa: ANN001, ANN201
    import keras

    from capsedge.models import losses

    layers = keras.layers
    image = keras.Input(config.input_shape)
    x = image
    for spec in config.stem:
        x = layers.Conv2D(spec.filters, spec.kernel_size, spec.strides, spec.padding, use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    pooled = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(image, layers.Dense(config.num_classes, activation="softmax")(pooled))

    def loss(y, p):  # noqa: ANN001, ANN202
        return losses.weighted_categorical_crossentropy(y, p, class_weights=class_weights)

    return model, model, loss


def image_only(batches):  # noqa: ANN001, ANN201
    """``TrainingBatches`` as (image, label) pairs, for a model with one input and one output."""
    import keras

    class ImageOnly(keras.utils.PyDataset):
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, index: int):  # noqa: ANN204
            (images, labels), _ = batches[index]
            return images, labels

    return ImageOnly()


def pretrain_rotation(classifier, stem_depth: int, images: np.ndarray, epochs: int, seed: int) -> None:  # noqa: ANN001
    """Self-supervised: teach the stem (shared with ``classifier``) which quarter turn was applied."""
    import keras
    import tensorflow as tf

    layers = keras.layers
    stem = classifier.get_layer(f"bn{stem_depth}").output
    head = layers.Dense(4, activation="softmax")(layers.GlobalAveragePooling2D()(stem))
    model = keras.Model(classifier.input, head)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    flip = layers.RandomFlip("horizontal", seed=seed)

    def turned(image):  # noqa: ANN001, ANN202
        k = tf.random.uniform([], 0, 4, tf.int32)
        return tf.image.rot90(image, k), k

    data = tf.data.Dataset.from_tensor_slices(images).shuffle(len(images), seed=seed)
    data = data.map(lambda x: flip(x, training=True)).map(turned).batch(16).prefetch(2)
    history = model.fit(data, epochs=epochs, verbose=0)
    print(f"rotation pretext: final training accuracy {history.history['accuracy'][-1]:.3f}", flush=True)


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--model", default="effcaps_implant_128")
    parser.add_argument("--augment", choices=["none", "d4", "d4-strong", "full"], default="d4")
    parser.add_argument("--input", choices=["plain", "bright"], default="plain")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.99)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--pretrain-rotation", type=int, default=0, metavar="EPOCHS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import keras

    from capsedge.models import build_model, get_model_config, losses
    from capsedge.preprocess import Preprocessing
    from capsedge.train.augment import get_augmentation
    from capsedge.train.batches import EpochSetter, TrainingBatches
    from capsedge.train.metrics import classification_report, stratified_split
    from capsedge.workshop.dataset import load_images, read_dataset

    keras.utils.set_random_seed(args.seed)
    dataset = read_dataset(common.data_folder(args))
    config = get_model_config("effcaps_implant_128" if args.model == "cnn" else args.model)
    images = load_images(dataset, Preprocessing(input_size=config.input_shape[0]))
    if args.input == "bright":
        images = bright_only(images)
    y = dataset.targets
    onehot = np.eye(len(dataset.classes), dtype=np.float32)[y]
    train_idx, held_idx = stratified_split(y, 0.2, args.seed)
    weights = losses.class_balanced_weights(np.bincount(y[train_idx]), args.beta).astype("float32")

    if args.model == "cnn":
        classifier, trainer, loss = plain_cnn(config, weights)
        trainer.compile(keras.optimizers.Adam(args.lr), loss=loss)
        outputs: set[str] = set()
    else:
        built = build_model(config)
        classifier, trainer = built.classifier, built.trainer
        outputs = set(trainer.output_names)
        loss = {"caps_length": lambda t, p: losses.margin_loss(t, p, class_weights=weights)}
        if "ncp_probs" in outputs:
            loss["ncp_probs"] = lambda t, p: losses.weighted_categorical_crossentropy(
                t, p, class_weights=weights
            )
        if "reconstruction" in outputs:
            loss["reconstruction"] = losses.reconstruction_loss
        trainer.compile(keras.optimizers.Adam(args.lr), loss=loss,
                        loss_weights={k: 0.5 if k == "reconstruction" else 1.0 for k in loss})

    if args.pretrain_rotation:
        pretrain_rotation(classifier, len(config.stem), images[train_idx], args.pretrain_rotation, args.seed)

    batches = TrainingBatches(images[train_idx], onehot[train_idx], outputs, 16,
                              get_augmentation(args.augment), args.seed)
    data = batches if outputs else image_only(batches)  # the plain CNN: image in, label as target

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        trainer.fit(data, initial_epoch=epoch - 1, epochs=epoch, verbose=0, callbacks=[EpochSetter(batches)])
        if epoch % 10 and epoch != args.epochs:
            continue
        p = classifier.predict(images, verbose=0)
        train_report = classification_report(y[train_idx], p[train_idx].argmax(1), dataset.classes)
        held_report = classification_report(y[held_idx], p[held_idx].argmax(1), dataset.classes)
        line = (f"{args.model} {args.input} {args.augment} epoch {epoch} {time.perf_counter() - start:.0f}s "
                f"train {train_report['accuracy']:.3f} held-out {held_report['accuracy']:.3f} "
                f"macro-F1 {held_report['macro_f1']:.3f}")
        if args.tta:
            views = [np.ascontiguousarray(np.rot90(images[held_idx], k, axes=(1, 2))[:, :, ::-1] if flip
                                          else np.rot90(images[held_idx], k, axes=(1, 2)))
                     for k, flip in itertools.product(range(4), (False, True))]
            mean = np.mean([classifier.predict(v, verbose=0) for v in views], axis=0)
            tta = classification_report(y[held_idx], mean.argmax(1), dataset.classes)
            line += f" | TTA held-out {tta['accuracy']:.3f} macro-F1 {tta['macro_f1']:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
