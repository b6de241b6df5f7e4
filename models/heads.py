"""Neural-circuit-policy head on the primary capsules, and its fusion with the capsule head.

References:
    Lechner, Hasani et al. "Neural circuit policies enabling auditable autonomy", Nature
    Machine Intelligence 2 (2020) -- the NCP wiring. Hasani et al. "Closed-form continuous-time
    neural networks", Nature Machine Intelligence 4 (2022) -- the CfC cell. Library: ``ncps``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops
from ncps.keras import WiredCfCCell
from ncps.wirings import AutoNCP


@keras.saving.register_keras_serializable(package="capsedge")
class UnrolledCfC(keras.layers.Layer):
    """``ncps.keras.CfC(AutoNCP(units, output_size), unroll=True)``, unrolled by hand and fused.

    The weights are those of an ``ncps`` ``WiredCfCCell`` (same names, shapes, order and
    initialisation as the ``CfC`` layer's), and the function is the same: for each
    wiring layer (inter, command, motor neurons) and each step, with ``x = [input, h]``,
    elapsed time 1 and the wiring's sparsity mask ``m``::

        ff1 = x (W1 m) + b1,  ff2 = x (W2 m) + b2,  g = sigmoid(x (Wb - Wa) + bb - ba)
        h'  = ff1 (1 - g) + g ff2  =  ff1 + g (ff2 - ff1)

    Computed that way, each wiring layer takes one product with a constant kernel
    ``[W1 m | (W2 - W1) m | Wb - Wa]`` (one FULLY_CONNECTED), a SPLIT, a LOGISTIC, a MUL
    and an ADD, where ``ncps`` builds four products, two slices of the state and six
    element-wise ops; the first step skips the zero state. The steps are sliced
    (STRIDED_SLICE) rather than unstacked (UNPACK, which the Edge TPU lacks). The
    sequence length is static and the graph holds no loop.

    Args:
        units: neurons of the AutoNCP wiring (inter + command + motor).
        output_size: motor neurons, the layer's output width.

    Input shape: ``(batch, T, D)``. Output shape: ``(batch, output_size)``, the motor
    neurons after the last step (``return_sequences=False``).
    """

    def __init__(self, units: int, output_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = int(units)
        self.output_size = int(output_size)
        self.cell = WiredCfCCell(AutoNCP(self.units, self.output_size), mode="default", name="cell")

    def build(self, input_shape: tuple) -> None:
        self.cell.build((None, input_shape[-1]))

    def _fused(self, layer: Any) -> tuple[Any, Any]:
        mask = layer.sparsity_mask
        kernel = ops.concatenate(
            [
                layer.ff1_kernel * mask,
                (layer.ff2_kernel - layer.ff1_kernel) * mask,
                layer.time_b.kernel - layer.time_a.kernel,
            ],
            axis=-1,
        )
        bias = ops.concatenate(
            [layer.ff1_bias, layer.ff2_bias - layer.ff1_bias, layer.time_b.bias - layer.time_a.bias], axis=-1
        )
        return kernel, bias

    def call(self, inputs: Any) -> Any:
        fused = [self._fused(layer) for layer in self.cell._cfc_layers]
        states: list[Any] = [None] * len(fused)
        for t in range(inputs.shape[1]):
            x = inputs[:, t, :]
            for i, (kernel, bias) in enumerate(fused):
                if states[i] is None:  # the zero initial state adds nothing
                    z = ops.matmul(x, kernel[: x.shape[-1]]) + bias
                else:
                    z = ops.matmul(ops.concatenate([x, states[i]], axis=-1), kernel) + bias
                ff1, delta, gate = ops.split(z, 3, axis=-1)
                states[i] = x = ff1 + ops.sigmoid(gate) * delta
        return x[:, : self.output_size]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.output_size)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "output_size": self.output_size}


def ncp_head(primary_caps: Any, num_classes: int, units: int, name: str = "ncp") -> Any:
    """Class probabilities from a CfC network with an ``AutoNCP`` wiring.

    The sequence is the primary capsules, ``N_in`` steps of ``D_in`` features (16 x 8 for
    the implant config). Why those and not the class capsules: the primary capsules are the
    part-level evidence that routing sees, so the NCP reads the same evidence through a
    different mechanism and the fusion averages two partly independent classifiers; the
    class capsules (K steps ordered by class) would make the NCP a re-reading of the routing's
    own result. The length is static and the RNN is unrolled, so the graph is ``N_in``
    copies of the cell and holds no ``While`` op.

    The ``K`` motor neurons are ``tanh``-bounded (|h| <= 1), which caps softmax confidence
    (at most ~0.71 for K=4), so a ``Dense(K)`` read-out maps them to logits.

    Args:
        primary_caps: ``(batch, N_in, D_in)`` tensor.
        num_classes: K; also the number of motor neurons.
        units: neurons of the wiring (inter + command + motor).
        name: prefix of the layer names.

    Returns:
        ``(batch, K)`` probabilities, from a layer named ``ncp_probs``.
    """
    motor = UnrolledCfC(units, num_classes, name=f"{name}_cfc")(primary_caps)
    logits = keras.layers.Dense(num_classes, name=f"{name}_logits")(motor)
    return keras.layers.Softmax(name="ncp_probs")(logits)


@keras.saving.register_keras_serializable(package="capsedge")
class ProbabilityFusion(keras.layers.Layer):
    """Convex combination of two class distributions: ``p = w * p_caps + (1 - w) * p_ncp``.

    ``w`` is fixed, not learned: each head is trained by its own loss on its own output,
    so a learned ``w`` in the (untrained) fused output would never receive a gradient.
    The two inputs are not equally sharp: normalised capsule lengths stay flat (margin-loss
    targets 0.9 vs 0.1 give ``p = 0.75`` for K=4) while a softmax trained with cross-entropy
    approaches 1, so at ``w = 0.5`` the NCP decides most disagreements; choose ``w`` on
    held-out data. The same layer mixes a linear read-out into that answer
    (``ModelConfig.readout_weight``).

    Args:
        weight: ``w`` in [0, 1].
    """

    def __init__(self, weight: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"ProbabilityFusion: `weight` must be in [0, 1], received {weight!r}")
        self.weight = float(weight)

    def call(self, inputs: list) -> Any:
        caps_probs, ncp_probs = inputs
        return self.weight * caps_probs + (1.0 - self.weight) * ops.cast(ncp_probs, caps_probs.dtype)

    def compute_output_shape(self, input_shape: list) -> tuple:
        return input_shape[0]

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight}
