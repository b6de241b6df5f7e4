"""How an exported model stores its numbers, chosen through named constructors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

MODES = ("float32", "float16", "dynamic", "int8")


@dataclass(frozen=True)
class Quantization:
    """How weights and activations are stored: ``Quantization(mode)`` for ``"float32"``,
    ``"float16"`` (float16 weights) and ``"dynamic"`` (int8 weights, float activations);
    :meth:`for_int8` for full integer, which needs calibration images."""

    mode: str
    calibration: Callable[[], Iterable[np.ndarray]] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"quantization mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "int8" and self.calibration is None:
            raise ValueError("int8 quantization needs calibration images")

    @classmethod
    def for_float32(cls) -> Quantization:
        """No quantization."""
        return cls("float32")

    @classmethod
    def for_int8(cls, calibration: Callable[[], Iterable[np.ndarray]]) -> Quantization:
        """int8 weights and activations.

        Args:
            calibration: returns an iterable of preprocessed ``(H, W, C)`` images.
        """
        return cls("int8", calibration)
