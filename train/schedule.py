"""The learning-rate schedules a run can follow (``TrainConfig.schedule``).

``cosine`` is Keras' ``CosineDecay`` with a linear warm-up from 1 % of the peak. ``one-cycle``
is Smith & Topin's one-cycle policy as PyTorch's ``OneCycleLR`` draws it by default (cosine
annealing both ways, from the peak / 25 up to the peak, then down to the peak / 25 / 10**4);
Keras has none, hence the class here. Its momentum cycling is left out (Keras' Adam takes a
fixed ``beta_1``).

References:
    [1] Smith, Topin. "Super-convergence: very fast training of neural networks using large
        learning rates". 2019.
"""

from __future__ import annotations

import math
from typing import Any

#: The schedules ``TrainConfig.schedule`` names.
SCHEDULES = ("cosine", "one-cycle")
#: One-cycle's start (peak / 25) and end (start / 10**4), PyTorch's ``OneCycleLR`` defaults.
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_FINAL_DIV = 1e4


def learning_rate_schedule(name: str, peak: float, warmup: float, total_steps: int) -> Any:
    """The Keras schedule ``name`` over ``total_steps``, rising to ``peak`` over the first
    ``warmup`` fraction of them.

    Raises:
        ValueError: an unknown name.
    """
    import keras

    total = max(1, total_steps)
    rise = int(round(warmup * total))
    if name == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            peak / 100 if rise else peak,
            decay_steps=max(1, total - rise),
            alpha=0.01,
            warmup_target=peak if rise else None,
            warmup_steps=rise,
        )
    if name == "one-cycle":
        return one_cycle(peak, rise, total)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def one_cycle(peak: float, rise_steps: int, total_steps: int) -> Any:
    """A one-cycle schedule: cosine from ``peak / 25`` up to ``peak`` over ``rise_steps``, then
    cosine down to ``peak / 25 / 10**4`` at ``total_steps``."""
    import keras  # here, not at the top: `capsedge train --help` must not load Keras

    @keras.saving.register_keras_serializable(package="capsedge")
    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak: float, rise_steps: int, total_steps: int) -> None:
            self.peak, self.rise_steps, self.total_steps = float(peak), int(rise_steps), int(total_steps)

        def __call__(self, step: Any) -> Any:
            ops = keras.ops
            start = self.peak / ONE_CYCLE_DIV
            end = start / ONE_CYCLE_FINAL_DIV
            step = ops.cast(step, "float32")
            rise = ops.clip(step / max(1, self.rise_steps), 0.0, 1.0)
            fall = ops.clip((step - self.rise_steps) / max(1, self.total_steps - self.rise_steps), 0.0, 1.0)
            up = self.peak + (start - self.peak) * 0.5 * (1 + ops.cos(math.pi * rise))
            down = end + (self.peak - end) * 0.5 * (1 + ops.cos(math.pi * fall))
            return ops.where(step < self.rise_steps, up, down)

        def get_config(self) -> dict[str, Any]:
            return {"peak": self.peak, "rise_steps": self.rise_steps, "total_steps": self.total_steps}

    return OneCycle(peak, rise_steps, total_steps)
