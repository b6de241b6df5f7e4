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
from ncps.keras import CfC
from ncps.wirings import AutoNCP


def ncp_head(primary_caps: Any, num_classes: int, units: int, name: str = "ncp") -> Any:
    """Class probabilities from a CfC network with an ``AutoNCP`` wiring.

    The sequence is the primary capsules, ``N_in`` steps of ``D_in`` features (16 x 8 for
    the implant config). Why those and not the class capsules: the primary capsules are the
    part-level evidence that routing sees, so the NCP reads the same evidence through a
    different mechanism and the fusion averages two partly independent classifiers; the
    class capsules (K steps ordered by class) would make the NCP a re-reading of the routing's
    own result. The length is static and the RNN is built with ``unroll=True``, so the
    graph is ``N_in`` copies of the cell and holds no ``While`` op.

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
    wiring = AutoNCP(units, output_size=num_classes)
    motor = CfC(wiring, unroll=True, return_sequences=False, name=f"{name}_cfc")(primary_caps)
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
    held-out data.

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
