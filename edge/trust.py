"""How far to trust one answer: calibrated probabilities, "uncertain", "not an implant X-ray".

numpy only. The numbers come from the model's metadata (section ``trust``), fitted at
export time (see :mod:`capsedge.export.trust_fit`):

- **calibration**: a temperature ``T`` fitted on out-of-fold cross-validation
  predictions; the runtime reports ``softmax(log p / T)`` instead of the model's ``p``
  (``T < 1`` sharpens under-confident probabilities). An answer whose calibrated
  probability is below ``uncertain_below`` is flagged uncertain.
- **outliers**: the model also outputs a feature vector (the mean of a frozen, ImageNet-
  trained trunk stage's map); its distance from the training images' features (PCA
  Mahalanobis distance plus the residual off the PCA subspace) above ``threshold``
  flags the image as out of distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Calibrated probabilities are clipped here before the logarithm.
MIN_PROBABILITY = 1e-7


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` along the last axis (``T = 1`` returns ``p`` renormalised)."""
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), MIN_PROBABILITY, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """ECE: the bin-weighted gap between confidence and accuracy, equal-width bins over (0, 1]."""
    confidence, correct = confidence_and_correct(probabilities, targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def reliability_bins(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = 10
) -> list[dict[str, float | None]]:
    """Per confidence bin: its range, how many answers, their mean confidence and accuracy
    (``None`` for an empty bin)."""
    confidence, correct = confidence_and_correct(probabilities, targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        members = (confidence > low) & (confidence <= high)
        rows.append({
            "low": float(low), "high": float(high), "count": int(members.sum()),
            "confidence": float(confidence[members].mean()) if members.any() else None,
            "accuracy": float(correct[members].mean()) if members.any() else None,
        })
    return rows


def confidence_and_correct(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's top probability, and whether its top class is the target."""
    probabilities = np.asarray(probabilities, np.float64)
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(targets)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling and the confidence below which an answer is "uncertain"."""

    temperature: float
    uncertain_below: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.01 <= self.temperature <= 100):
            raise ValueError(f"calibration temperature must be in [0.01, 100], got {self.temperature!r}")
        if not (math.isfinite(self.uncertain_below) and 0.0 <= self.uncertain_below <= 1.0):
            raise ValueError(f"uncertain_below must be in [0, 1], got {self.uncertain_below!r}")


@dataclass(frozen=True, eq=False)
class OutlierModel:
    """The training images' feature statistics: standardisation, PCA and a distance threshold.

    Attributes:
        mean, scale: per-feature standardisation, ``(F,)``.
        components: ``(k, F)`` principal axes of the standardised features.
        variances: ``(k,)`` variance along each axis.
        residual_variance: mean squared distance of the training features from the subspace.
        threshold: distances above it are out of distribution (a high quantile of the
            training images' own distances).
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    threshold: float

    def __post_init__(self) -> None:
        dims = self.mean.shape
        if (len(dims) != 1 or self.scale.shape != dims or self.components.ndim != 2
                or self.components.shape[1] != dims[0] or self.variances.shape != self.components.shape[:1]):
            raise ValueError("outlier statistics have inconsistent shapes")
        arrays = (self.mean, self.scale, self.components, self.variances)
        positive = (self.scale > 0).all() and (self.variances > 0).all()
        if not all(np.isfinite(a).all() for a in arrays) or not positive:
            raise ValueError("outlier statistics must be finite, with positive scales and variances")
        if not (self.residual_variance > 0 and self.threshold > 0):
            raise ValueError("outlier residual variance and threshold must be positive")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutlierModel):
            return NotImplemented
        arrays = ("mean", "scale", "components", "variances")
        return all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays) and (
            self.residual_variance, self.threshold) == (other.residual_variance, other.threshold)

    __hash__ = None  # type: ignore[assignment]

    @property
    def feature_dim(self) -> int:
        """Length of the feature vector the model outputs after its probabilities."""
        return int(self.mean.shape[0])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Distance of each ``(..., F)`` feature vector from the training images (same units as
        ``threshold``): squared Mahalanobis distance in the PCA subspace plus the squared residual
        off it, weighted as ``k`` more dimensions."""
        standard = (np.asarray(features, np.float64) - self.mean) / self.scale
        projected = standard @ self.components.T
        inside = (projected**2 / self.variances).sum(axis=-1)
        residual = ((standard - projected @ self.components) ** 2).sum(axis=-1)
        return inside + residual / self.residual_variance * len(self.variances)


@dataclass(frozen=True)
class Trust:
    """The ``trust`` section of a model's metadata; each part is optional."""

    calibration: Calibration | None = None
    outliers: OutlierModel | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        data: dict[str, Any] = {"provenance": self.provenance}
        if self.calibration is not None:
            data["calibration"] = {"temperature": self.calibration.temperature,
                                   "uncertain_below": self.calibration.uncertain_below}
        if self.outliers is not None:
            o = self.outliers
            data["outliers"] = {
                "mean": o.mean.tolist(), "scale": o.scale.tolist(), "components": o.components.tolist(),
                "variances": o.variances.tolist(), "residual_variance": o.residual_variance,
                "threshold": o.threshold,
            }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trust:
        """Parse the JSON form.

        Raises:
            ValueError, TypeError, KeyError: a field is missing or invalid.
        """
        if not isinstance(data, dict):
            raise TypeError("the trust section must be an object")
        calibration = outliers = None
        if "calibration" in data:
            c = data["calibration"]
            calibration = Calibration(_number(c["temperature"]), _number(c["uncertain_below"]))
        if "outliers" in data:
            o = data["outliers"]
            outliers = OutlierModel(
                mean=_array(o["mean"], 1), scale=_array(o["scale"], 1), components=_array(o["components"], 2),
                variances=_array(o["variances"], 1), residual_variance=_number(o["residual_variance"]),
                threshold=_number(o["threshold"]),
            )
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise TypeError("trust provenance must be an object")
        return cls(calibration, outliers, provenance)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _array(value: Any, ndim: int) -> np.ndarray:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"expected a non-empty {ndim}-d array")
    return array
