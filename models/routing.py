"""Routing between capsule layers: fully-connected capsules with self-attention routing
(Efficient-CapsNet, ``FCCaps``) or dynamic routing by agreement (CapsNet, ``DigitCaps``).

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

from capsedge.models.squash import SQUASH_KINDS, check_choice, check_positive_int, squash

ATTENTION_SCALES = ("d_out", "d_in")


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
        check_positive_int(layer, "n_caps", n_caps)
        check_positive_int(layer, "dim_caps", dim_caps)
        check_choice(layer, "squash", squash, SQUASH_KINDS)
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
        check_choice("FCCaps", "scale", scale, ATTENTION_SCALES)
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
        check_positive_int("DigitCaps", "iterations", iterations)
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


