"""Capsule layers: primary capsules, lengths, mask; with squash (:mod:`.squash`) and routing
(:mod:`.routing`), re-exported here so that every capsule layer imports from one place.

References:
    [1] Sabour, Frosst, Hinton. "Dynamic Routing Between Capsules". NeurIPS 2017.
    [2] Mazzia, Salvetti, Chiaberge. "Efficient-CapsNet: capsule network with
        self-attention routing". Scientific Reports 11, 14634 (2021); reference code
        github.com/EscVM/Efficient-CapsNet (``utils/layers.py``).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from capsedge.models.routing import ATTENTION_SCALES, DigitCaps, FCCaps
from capsedge.models.squash import (
    SQUASH_KINDS,
    Squash,
    check_choice,
    check_epsilon,
    check_positive_int,
    squash,
)

__all__ = [
    "ATTENTION_SCALES",
    "SQUASH_KINDS",
    "DigitCaps",
    "FCCaps",
    "Length",
    "Mask",
    "NormalizeLengths",
    "PrimaryCaps",
    "PrimaryConvCaps",
    "Squash",
    "squash",
]


@keras.saving.register_keras_serializable(package="capsedge")
class PrimaryCaps(keras.layers.Layer):
    """Efficient-CapsNet primary capsules: one depthwise kernel per channel over the whole map.

    ``s_n = DWConv_{k x k}(F)``, reshaped to ``(n_caps, dim_caps)`` and squashed ([2], Sec.
    "Primary capsules"). The reference code uses ``Conv2D(F, k, groups=F)``, i.e. a depthwise
    convolution with depth multiplier 1; grouped ``Conv2D`` has no CPU kernel in TensorFlow,
    so this layer uses ``DepthwiseConv2D``, which computes the same function with the same
    ``k*k*F + F`` parameters.

    Args:
        n_caps: number of primary capsules N.
        dim_caps: capsule dimension D; the input must have ``N*D`` channels.
        kernel_size: depthwise kernel size k; the input map must be ``k x k`` (valid padding
            gives a 1x1 output).
        squash: squash kind, see ``Squash``.

    Input shape: ``(batch, k, k, N*D)``. Output shape: ``(batch, N, D)``.
    """

    def __init__(
        self,
        n_caps: int,
        dim_caps: int,
        kernel_size: int,
        squash: str = "efficient",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int("PrimaryCaps", "n_caps", n_caps)
        check_positive_int("PrimaryCaps", "dim_caps", dim_caps)
        check_positive_int("PrimaryCaps", "kernel_size", kernel_size)
        check_choice("PrimaryCaps", "squash", squash, SQUASH_KINDS)
        self.n_caps = n_caps
        self.dim_caps = dim_caps
        self.kernel_size = kernel_size
        self.squash = squash
        self.depthwise = keras.layers.DepthwiseConv2D(kernel_size, padding="valid", name="dw")

    def build(self, input_shape: tuple) -> None:
        _, height, width, channels = input_shape
        if (height, width) != (self.kernel_size, self.kernel_size):
            raise ValueError(
                f"PrimaryCaps: the depthwise kernel ({self.kernel_size}x{self.kernel_size}) must "
                f"cover the whole feature map, received a {height}x{width} map"
            )
        if channels != self.n_caps * self.dim_caps:
            raise ValueError(
                f"PrimaryCaps: the feature map needs n_caps*dim_caps = "
                f"{self.n_caps}*{self.dim_caps} = {self.n_caps * self.dim_caps} channels, "
                f"received {channels}"
            )
        self.depthwise.build(input_shape)

    def call(self, inputs: Any) -> Any:
        s = ops.reshape(self.depthwise(inputs), (-1, self.n_caps, self.dim_caps))
        return squash(s, self.squash)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.n_caps, self.dim_caps)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "n_caps": self.n_caps,
            "dim_caps": self.dim_caps,
            "kernel_size": self.kernel_size,
            "squash": self.squash,
        }


@keras.saving.register_keras_serializable(package="capsedge")
class PrimaryConvCaps(keras.layers.Layer):
    """CapsNet primary capsules: a strided convolution cut into capsule vectors.

    ``u = squash(reshape(Conv_{k x k, stride}(F)))`` ([1], Sec. 4): ``n_channels`` capsule
    channels of ``dim_caps`` units at each output position, i.e. ``H'*W'*n_channels``
    capsules (32x6x6 = 1152 of 8D on MNIST).

    Args:
        n_channels: number of capsule channels.
        dim_caps: capsule dimension.
        kernel_size: convolution kernel size.
        strides: convolution stride.
        squash: squash kind, see ``Squash`` (``"hinton"`` in [1]).

    Input shape: ``(batch, H, W, C)``. Output shape: ``(batch, H'*W'*n_channels, dim_caps)``.
    """

    def __init__(
        self,
        n_channels: int,
        dim_caps: int,
        kernel_size: int,
        strides: int = 2,
        squash: str = "hinton",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int("PrimaryConvCaps", "n_channels", n_channels)
        check_positive_int("PrimaryConvCaps", "dim_caps", dim_caps)
        check_positive_int("PrimaryConvCaps", "kernel_size", kernel_size)
        check_positive_int("PrimaryConvCaps", "strides", strides)
        check_choice("PrimaryConvCaps", "squash", squash, SQUASH_KINDS)
        self.n_channels = n_channels
        self.dim_caps = dim_caps
        self.kernel_size = kernel_size
        self.strides = strides
        self.squash = squash
        self.conv = keras.layers.Conv2D(
            n_channels * dim_caps, kernel_size, strides=strides, padding="valid", name="conv"
        )

    def _n_caps(self, input_shape: tuple) -> int:
        _, height, width, _ = input_shape
        size = [(n - self.kernel_size) // self.strides + 1 for n in (height, width)]
        return size[0] * size[1] * self.n_channels

    def build(self, input_shape: tuple) -> None:
        if min(input_shape[1:3]) < self.kernel_size:
            raise ValueError(
                f"PrimaryConvCaps: a {self.kernel_size}x{self.kernel_size} kernel does not fit "
                f"the input map, received shape {input_shape}"
            )
        self.conv.build(input_shape)
        self.n_caps = self._n_caps(input_shape)

    def call(self, inputs: Any) -> Any:
        capsules = ops.reshape(self.conv(inputs), (-1, self.n_caps, self.dim_caps))
        return squash(capsules, self.squash)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self._n_caps(input_shape), self.dim_caps)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "n_channels": self.n_channels,
            "dim_caps": self.dim_caps,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "squash": self.squash,
        }


@keras.saving.register_keras_serializable(package="capsedge")
class Length(keras.layers.Layer):
    """Capsule lengths ``|v| = sqrt(sum(v^2) + epsilon)``: the class scores of a capsule net.

    Computed as ``x * rsqrt(x)``, ``x = sum(v^2) + epsilon``: no SQRT, which the Edge TPU lacks.

    Input shape: ``(batch, N, D)``. Output shape: ``(batch, N)``.
    """

    def __init__(self, epsilon: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_epsilon("Length", epsilon)
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        squared = ops.sum(inputs * inputs, axis=-1) + self.epsilon  # no SQUARE: see squash
        return squared * ops.rsqrt(squared)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="capsedge")
class Mask(keras.layers.Layer):
    """Zero every capsule but one and flatten: the decoder's input ([1], Sec. 4.1).

    Called on ``[capsules, y_onehot]`` it keeps the capsule of the given (true) label, as
    in training; called on ``capsules`` alone it keeps the longest capsule.

    Input shape: ``(batch, K, D)`` (and ``(batch, K)``). Output shape: ``(batch, K*D)``.
    """

    def call(self, inputs: Any) -> Any:
        if isinstance(inputs, (list, tuple)):
            capsules, labels = inputs
        else:
            capsules = inputs
            lengths = ops.sum(capsules * capsules, axis=-1)
            labels = ops.one_hot(ops.argmax(lengths, axis=-1), capsules.shape[-2])
        masked = capsules * ops.expand_dims(ops.cast(labels, capsules.dtype), -1)
        return ops.reshape(masked, (-1, capsules.shape[-2] * capsules.shape[-1]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        shape = input_shape[0] if isinstance(input_shape, list) else input_shape
        return (shape[0], shape[-2] * shape[-1])


@keras.saving.register_keras_serializable(package="capsedge")
class NormalizeLengths(keras.layers.Layer):
    """Turn capsule lengths into a probability distribution, with additive smoothing.

    ``p_k = (|v_k| + c) / (sum_j |v_j| + K c)``, ``c = SMOOTHING`` (0.0125): rows sum to 1,
    the order of the classes (and so the argmax) is that of the lengths, and the
    divisor is never below ``K c``. A bare ``|v_k| / sum_j |v_j|`` divides by a
    sum that, for an image with no evidence, int8 quantization rounds to zero,
    which LiteRT's int8 DIV refuses. The division is a product with ``r * r``,
    ``r = rsqrt(sum)``: the Edge TPU has no DIV at all.
    """

    SMOOTHING = 0.0125

    def call(self, inputs: Any) -> Any:
        r = ops.rsqrt(ops.sum(inputs, axis=-1, keepdims=True) + self.SMOOTHING * inputs.shape[-1])
        return (inputs + self.SMOOTHING) * (r * r)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape
