"""The capsule non-linearity (squash) and the argument checks every capsule layer shares.

References:
    [1] Sabour, Frosst, Hinton. "Dynamic Routing Between Capsules". NeurIPS 2017.
    [2] Mazzia, Salvetti, Chiaberge. "Efficient-CapsNet: capsule network with
        self-attention routing". Scientific Reports 11, 14634 (2021).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

SQUASH_KINDS = ("efficient", "hinton")


def check_positive_int(layer: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: `{name}` must be a positive integer, received {value!r}")


def check_choice(layer: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{layer}: `{name}` must be one of {choices}, received {value!r}")


def check_epsilon(layer: str, value: Any) -> None:
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
        check_choice("Squash", "kind", kind, SQUASH_KINDS)
        check_epsilon("Squash", epsilon)
        self.kind = kind
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        return squash(inputs, self.kind, self.epsilon)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind, "epsilon": self.epsilon}

