"""Capsule layers: squash, primary capsules, routing, length and mask.

References:
    [1] Sabour, Frosst, Hinton. "Dynamic Routing Between Capsules". NeurIPS 2017.
    [2] Mazzia, Salvetti, Chiaberge. "Efficient-CapsNet: capsule network with
        self-attention routing". Scientific Reports 11, 14634 (2021); reference code
        github.com/EscVM/Efficient-CapsNet (``utils/layers.py``).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

SQUASH_KINDS = ("efficient", "hinton")
ATTENTION_SCALES = ("d_out", "d_in")


def _check_positive_int(layer: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: `{name}` must be a positive integer, received {value!r}")


def _check_choice(layer: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{layer}: `{name}` must be one of {choices}, received {value!r}")


def _check_epsilon(layer: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 < value < 1e-2:
        raise ValueError(f"{layer}: `epsilon` must be a small positive float, received {value!r}")


def squash(s: Any, kind: str = "efficient", epsilon: float = 1e-7) -> Any:
    """Squash capsule vectors along the last axis.

    ``efficient`` ([2], eq. 5): ``v = (1 - exp(-|s|)) * s / |s|``.
    ``hinton`` ([1], eq. 1): ``v = |s|^2 / (1 + |s|^2) * s / |s|``.
    ``|s|`` is computed as ``sqrt(sum(s^2) + epsilon)`` so that the value and its
    gradient stay finite at ``s = 0``. Every operation is one the Edge TPU and
    int8 kernels have, with the same numbers in float:

    - ``s / |s|`` is ``s * rsqrt(...)`` (no DIV or SQRT; an int8 DIV also fails
      outright on a norm that rounds to 0), and ``|s|`` is ``|s|^2 * rsqrt(|s|^2)``;
    - ``1 - e^{-x}`` is ``2 - 1/sigmoid(x)`` (as ``1/sigmoid(x) = 1 + e^{-x}``), with
      ``1/sigmoid(x)`` written ``r * r``, ``r = rsqrt(sigmoid(x))``: LOGISTIC and RSQRT
      instead of EXP, which the Edge TPU lacks;
    - ``s * s`` stands for SQUARE, which has no int8 kernel (the converter would
      leave it in float between DEQUANTIZE and QUANTIZE).
    """
    squared = ops.sum(s * s, axis=-1, keepdims=True) + epsilon
    inverse_norm = ops.rsqrt(squared)
    if kind == "hinton":
        scale = squared / (1.0 + squared)
    else:
        r = ops.rsqrt(ops.sigmoid(squared * inverse_norm))
        scale = 2.0 - r * r
    return scale * s * inverse_norm


@keras.saving.register_keras_serializable(package="capsedge")
class Squash(keras.layers.Layer):
    """Capsule non-linearity that maps a vector's length into [0, 1), keeping its direction.

    Args:
        kind: ``"efficient"`` for ``(1 - e^{-|s|}) s/|s|`` (Efficient-CapsNet [2], eq. 5) or
            ``"hinton"`` for ``|s|^2/(1+|s|^2) s/|s|`` (CapsNet [1], eq. 1).
        epsilon: added under the square root of ``|s|``.
    """

    def __init__(self, kind: str = "efficient", epsilon: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_choice("Squash", "kind", kind, SQUASH_KINDS)
        _check_epsilon("Squash", epsilon)
        self.kind = kind
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        return squash(inputs, self.kind, self.epsilon)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind, "epsilon": self.epsilon}


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
        _check_positive_int("PrimaryCaps", "n_caps", n_caps)
        _check_positive_int("PrimaryCaps", "dim_caps", dim_caps)
        _check_positive_int("PrimaryCaps", "kernel_size", kernel_size)
        _check_choice("PrimaryCaps", "squash", squash, SQUASH_KINDS)
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
        _check_positive_int("PrimaryConvCaps", "n_channels", n_channels)
        _check_positive_int("PrimaryConvCaps", "dim_caps", dim_caps)
        _check_positive_int("PrimaryConvCaps", "kernel_size", kernel_size)
        _check_positive_int("PrimaryConvCaps", "strides", strides)
        _check_choice("PrimaryConvCaps", "squash", squash, SQUASH_KINDS)
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


def _predictions(inputs: Any, kernel: Any) -> Any:
    """``u_hat_{j|i} = W_ij u_i`` for every parent j and child i: (batch, N_out, N_in, D_out)."""
    return ops.einsum("...ji,kjiz->...kjz", inputs, kernel)


class _FullyConnectedCapsules(keras.layers.Layer):
    """What FCCaps and DigitCaps share: N_out capsules of D_out, a transform W, a squash.

    Input shape: ``(batch, N_in, D_in)``. Output shape: ``(batch, N_out, D_out)``.
    """

    def __init__(
        self,
        n_caps: int,
        dim_caps: int,
        squash: str,
        kernel_initializer: str | keras.initializers.Initializer,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        layer = type(self).__name__
        _check_positive_int(layer, "n_caps", n_caps)
        _check_positive_int(layer, "dim_caps", dim_caps)
        _check_choice(layer, "squash", squash, SQUASH_KINDS)
        self.n_caps = n_caps
        self.dim_caps = dim_caps
        self.squash = squash
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 3:
            raise ValueError(
                f"{type(self).__name__} expects (batch, N_in, D_in) inputs, received {input_shape}"
            )
        _, n_in, d_in = input_shape
        self.kernel = self.add_weight(
            shape=(self.n_caps, n_in, d_in, self.dim_caps),
            initializer=self.kernel_initializer,
            name="W",
        )

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.n_caps, self.dim_caps)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "n_caps": self.n_caps,
            "dim_caps": self.dim_caps,
            "squash": self.squash,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


@keras.saving.register_keras_serializable(package="capsedge")
class FCCaps(_FullyConnectedCapsules):
    """Fully-connected capsules with one-pass self-attention routing (Efficient-CapsNet [2]).

    With ``u`` the ``N_in`` input capsules of dimension ``D_in`` ([2], eqs. 2-4)::

        u_hat[j, i] = W[j, i] @ u[i]                          W: [N_out, N_in, D_in, D_out]
        A[j]        = u_hat[j] @ u_hat[j]^T / sqrt(d)          self-attention, [N_in, N_in]
        C[j, i]     = softmax_j( sum_k A[j, i, k] )            softmax over OUTPUT capsules
        s[j]        = sum_i (C[j, i] + b[j, i]) * u_hat[j, i]  b: [N_out, N_in, 1]
        v[j]        = squash(s[j])

    ``sum_k A[j, i, k] = u_hat[j, i] . sum_k u_hat[j, k] / sqrt(d)``, which this layer uses:
    the same number as the reference's ``N_in x N_in`` matrix, in O(N_in) instead of
    O(N_in^2), and with no product of two activation tensors (BATCH_MATMUL, which the
    Edge TPU lacks). ``u_hat`` is likewise a broadcast product with the constant ``W``
    and a sum, kept in ``(N_in, N_out, D_out)`` order so that the softmax over ``j`` is
    over the last axis and no activation is transposed. ``scale`` picks ``d``: the
    reference code divides by ``sqrt(D_out)`` (``"d_out"``, the default), the paper's
    eq. 3 writes ``sqrt(D_in)`` (``"d_in"``).

    Args:
        n_caps: number of output capsules N_out.
        dim_caps: output capsule dimension D_out.
        scale: ``"d_out"`` or ``"d_in"``, see above.
        squash: squash kind, see ``Squash``.
        kernel_initializer: initializer of W (``he_normal`` in [2]).

    Input shape: ``(batch, N_in, D_in)``. Output shape: ``(batch, N_out, D_out)``.
    """

    def __init__(
        self,
        n_caps: int,
        dim_caps: int,
        scale: str = "d_out",
        squash: str = "efficient",
        kernel_initializer: str | keras.initializers.Initializer = "he_normal",
        **kwargs: Any,
    ) -> None:
        super().__init__(n_caps, dim_caps, squash, kernel_initializer, **kwargs)
        _check_choice("FCCaps", "scale", scale, ATTENTION_SCALES)
        self.scale = scale

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        _, n_in, d_in = input_shape
        self.bias = self.add_weight(shape=(self.n_caps, n_in, 1), initializer="zeros", name="b")
        self._sqrt_d = math.sqrt(self.dim_caps if self.scale == "d_out" else d_in)

    def call(self, inputs: Any) -> Any:
        n_out, n_in, d_in, d_out = self.kernel.shape
        # W as (N_in, D_in, N_out*D_out): u_hat[i] = sum_d u[i, d] * W[i, d] for all j at once.
        kernel = ops.reshape(ops.transpose(self.kernel, (1, 2, 0, 3)), (n_in, d_in, n_out * d_out))
        u_hat = ops.sum(ops.expand_dims(inputs, -1) * kernel, axis=-2)
        u_hat = ops.reshape(u_hat, (-1, n_in, n_out, d_out))  # (batch, N_in, N_out, D_out)
        agreement = ops.sum(u_hat * ops.sum(u_hat, axis=1, keepdims=True), axis=-1)
        # Softmax over j, one input capsule at a time: the Edge TPU's SOFTMAX takes 1-D inputs.
        rows = ops.split(agreement * (1.0 / self._sqrt_d), n_in, axis=1)
        coupling = ops.concatenate([ops.softmax(row, axis=-1) for row in rows], axis=1)
        bias = ops.transpose(ops.reshape(self.bias, (n_out, n_in)))  # (N_in, N_out)
        s = ops.sum(ops.expand_dims(coupling + bias, -1) * u_hat, axis=1)
        return squash(s, self.squash)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="capsedge")
class DigitCaps(_FullyConnectedCapsules):
    """Fully-connected capsules with routing-by-agreement (CapsNet [1], Procedure 1).

    ::

        u_hat[j, i] = W[j, i] @ u[i]                  W: [N_out, N_in, D_in, D_out]
        b = 0
        repeat r times:
            c[:, i] = softmax_j(b[:, i])              over OUTPUT capsules
            v[j]    = squash(sum_i c[j, i] u_hat[j, i])
            b[j, i] += u_hat[j, i] . v[j]             (skipped after the last iteration)

    The loop is a Python ``for`` over a fixed count, so the traced graph is unrolled and
    holds no ``While`` op.

    Args:
        n_caps: number of output capsules N_out.
        dim_caps: output capsule dimension D_out.
        iterations: routing iterations r (3 in [1]).
        squash: squash kind (``"hinton"`` in [1]).
        kernel_initializer: initializer of W.

    Input shape: ``(batch, N_in, D_in)``. Output shape: ``(batch, N_out, D_out)``.
    """

    def __init__(
        self,
        n_caps: int,
        dim_caps: int,
        iterations: int = 3,
        squash: str = "hinton",
        kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        **kwargs: Any,
    ) -> None:
        super().__init__(n_caps, dim_caps, squash, kernel_initializer, **kwargs)
        _check_positive_int("DigitCaps", "iterations", iterations)
        self.iterations = iterations

    def call(self, inputs: Any) -> Any:
        u_hat = _predictions(inputs, self.kernel)
        logits = ops.zeros_like(u_hat[..., :1])
        for r in range(self.iterations):
            coupling = ops.softmax(logits, axis=-3)
            v = squash(ops.sum(coupling * u_hat, axis=-2), self.squash)
            if r < self.iterations - 1:
                logits = logits + ops.sum(u_hat * v[..., None, :], axis=-1, keepdims=True)
        return v

    def get_config(self) -> dict:
        return {**super().get_config(), "iterations": self.iterations}


@keras.saving.register_keras_serializable(package="capsedge")
class Length(keras.layers.Layer):
    """Capsule lengths ``|v| = sqrt(sum(v^2) + epsilon)``: the class scores of a capsule net.

    Computed as ``x * rsqrt(x)``, ``x = sum(v^2) + epsilon``: no SQRT, which the Edge TPU lacks.

    Input shape: ``(batch, N, D)``. Output shape: ``(batch, N)``.
    """

    def __init__(self, epsilon: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_epsilon("Length", epsilon)
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
