"""Reconstruction decoders fed with masked class capsules, and the capsule perturbation view."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

LEAN_BASE_FILTERS = 32
LEAN_UPSAMPLINGS = 4


def dense_decoder(
    num_classes: int, class_dim: int, input_shape: tuple[int, int, int], name: str = "decoder"
) -> keras.Model:
    """The papers' decoder: Dense 512 -> Dense 1024 -> Dense H*W*C (sigmoid) -> image.

    Sabour et al. 2017, Fig. 2; Efficient-CapsNet keeps it (``generator_graph``), 1.41M
    parameters for MNIST.
    """
    inputs = keras.Input((num_classes * class_dim,), name="masked_caps")
    x = keras.layers.Dense(512, activation="relu", kernel_initializer="he_normal")(inputs)
    x = keras.layers.Dense(1024, activation="relu", kernel_initializer="he_normal")(x)
    x = keras.layers.Dense(
        int(np.prod(input_shape)), activation="sigmoid", kernel_initializer="glorot_normal"
    )(x)
    outputs = keras.layers.Reshape(input_shape, name="image")(x)
    return keras.Model(inputs, outputs, name=name)


def lean_decoder(
    num_classes: int, class_dim: int, input_shape: tuple[int, int, int], name: str = "decoder"
) -> keras.Model:
    """A small decoder for large images: Dense to an (H/16, W/16, 32) map, four stride-2
    transposed convolutions (32, 32, 16, 16 filters), then a 3x3 sigmoid convolution.

    About 178k parameters for 128x128x1 with 4 classes of 16D, against the dense decoder's
    ~17.4M at that size.

    Raises:
        ValueError: if H or W is not a multiple of 16.
    """
    height, width, channels = input_shape
    factor = 2**LEAN_UPSAMPLINGS
    if height % factor or width % factor:
        raise ValueError(
            f"lean_decoder needs H and W divisible by {factor}, received input_shape {input_shape}"
        )
    start = (height // factor, width // factor, LEAN_BASE_FILTERS)
    inputs = keras.Input((num_classes * class_dim,), name="masked_caps")
    x = keras.layers.Dense(int(np.prod(start)), activation="relu", kernel_initializer="he_normal")(inputs)
    x = keras.layers.Reshape(start)(x)
    for filters in (LEAN_BASE_FILTERS, LEAN_BASE_FILTERS, LEAN_BASE_FILTERS // 2, LEAN_BASE_FILTERS // 2):
        x = keras.layers.Conv2DTranspose(
            filters, 4, strides=2, padding="same", activation="relu", kernel_initializer="he_normal"
        )(x)
    outputs = keras.layers.Conv2D(channels, 3, padding="same", activation="sigmoid", name="image")(x)
    return keras.Model(inputs, outputs, name=name)


DECODERS = {"dense": dense_decoder, "lean": lean_decoder}


def perturb_capsule(
    decoder: keras.Model,
    class_caps: np.ndarray,
    label: int,
    dim: int,
    deltas: Sequence[float] = tuple(np.round(np.arange(-0.25, 0.26, 0.05), 2)),
) -> np.ndarray:
    """Decode one class capsule with one dimension shifted: what that dimension encodes.

    Sabour et al. 2017, Sec. 5.1 / Fig. 4: add each of ``deltas`` (default -0.25..0.25 in
    steps of 0.05) to dimension ``dim`` of capsule ``label``, mask the other capsules and
    decode.

    Args:
        decoder: model from ``(batch, K*D)`` masked capsules to images.
        class_caps: ``(K, D)`` class capsules of one image.
        label: capsule (class) to keep and perturb.
        dim: dimension of that capsule to shift.
        deltas: values added to that dimension.

    Returns:
        ``(len(deltas), H, W, C)`` float32 images.
    """
    caps = np.asarray(class_caps, dtype=np.float32)
    if caps.ndim != 2:
        raise ValueError(f"class_caps must be (K, D), received shape {caps.shape}")
    n_caps, n_dims = caps.shape
    if not 0 <= label < n_caps:
        raise ValueError(f"label must be in [0, {n_caps}), received {label!r}")
    if not 0 <= dim < n_dims:
        raise ValueError(f"dim must be in [0, {n_dims}), received {dim!r}")
    batch = np.zeros((len(deltas), n_caps, n_dims), dtype=np.float32)
    batch[:, label] = caps[label]
    batch[:, label, dim] += np.asarray(deltas, dtype=np.float32)
    return np.asarray(decoder.predict(batch.reshape(len(deltas), -1), verbose=0))
