"""Learning-rate schedules: the one-cycle shape PyTorch's OneCycleLR draws, and the cosine one
runs have always followed."""

from __future__ import annotations

import numpy as np
import pytest

from capsedge.errors import UsageError

pytest.importorskip("keras")

from capsedge.train.config import TrainConfig  # noqa: E402
from capsedge.train.schedule import learning_rate_schedule  # noqa: E402


def rates(name: str, warmup: float, total: int = 600, peak: float = 1e-3) -> np.ndarray:
    schedule = learning_rate_schedule(name, peak, warmup, total)
    return np.array([float(schedule(step)) for step in range(total + 1)])


def test_one_cycle_rises_from_a_25th_to_the_peak_then_falls_to_a_10000th_of_that() -> None:
    lr = rates("one-cycle", 0.3)
    top = int(np.argmax(lr))
    assert top == 180
    assert lr[0] == pytest.approx(1e-3 / 25, rel=1e-4) and lr[top] == pytest.approx(1e-3, rel=1e-6)
    assert lr[-1] == pytest.approx(1e-3 / 25 / 1e4, rel=1e-3)
    assert np.all(np.diff(lr[: top + 1]) > 0) and np.all(np.diff(lr[top:]) < 0)
    # Cosine both ways: half-way up and half-way down sit at the midpoints.
    assert lr[90] == pytest.approx((1e-3 + 1e-3 / 25) / 2, rel=1e-4)
    assert lr[390] == pytest.approx((1e-3 + 4e-9) / 2, rel=1e-4)


def test_cosine_keeps_its_linear_warm_up_and_ends_at_one_percent() -> None:
    lr = rates("cosine", 0.1)
    assert lr[0] == pytest.approx(1e-5, rel=1e-4) and lr[60] == pytest.approx(1e-3, rel=1e-6)
    assert lr[30] == pytest.approx((1e-5 + 1e-3) / 2, rel=1e-4)
    assert lr[-1] == pytest.approx(1e-5, rel=1e-4)
    assert rates("cosine", 0.0)[0] == pytest.approx(1e-3, rel=1e-6)


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="one-cycle"):
        learning_rate_schedule("step", 1e-3, 0.1, 10)
    with pytest.raises(UsageError, match="schedule must be one of cosine, one-cycle"):
        TrainConfig(schedule="step")
