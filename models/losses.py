"""Losses: margin loss for capsule lengths, reconstruction, (focal) cross-entropy, class weights.

The functions return one value per sample so that Keras applies its reduction (and any
``sample_weight``); the ``keras.losses.Loss`` classes wrap them with serialisable options
for ``trainer.compile(loss={...})``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops


def _class_weight_per_sample(y_true: Any, class_weights: Any) -> Any:
    """``w[argmax(y)]`` for one-hot ``y`` (a soft label gets the label-weighted mean)."""
    weights = ops.convert_to_tensor(np.asarray(class_weights, dtype="float32"), dtype=y_true.dtype)
    return ops.sum(y_true * weights, axis=-1)


def margin_loss(
    y_true: Any,
    lengths: Any,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lam: float = 0.5,
    class_weights: Sequence[float] | np.ndarray | None = None,
) -> Any:
    """Margin loss of capsule lengths (Sabour et al. 2017, eq. 4), one value per sample.

    ``L = sum_k T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2``,
    multiplied by ``class_weights[true class]`` when given.

    Args:
        y_true: ``(batch, K)`` one-hot labels.
        lengths: ``(batch, K)`` capsule lengths.
        m_plus: target length of the true class.
        m_minus: ceiling on the length of the other classes.
        lam: down-weighting of the absent classes.
        class_weights: ``K`` weights, e.g. from ``class_balanced_weights``.

    Returns:
        ``(batch,)`` losses.
    """
    lengths = ops.convert_to_tensor(lengths)
    y_true = ops.cast(y_true, lengths.dtype)
    present = y_true * ops.square(ops.relu(m_plus - lengths))
    absent = lam * (1.0 - y_true) * ops.square(ops.relu(lengths - m_minus))
    loss = ops.sum(present + absent, axis=-1)
    if class_weights is not None:
        loss = loss * _class_weight_per_sample(y_true, class_weights)
    return loss


def reconstruction_loss(images: Any, reconstructions: Any) -> Any:
    """Mean squared pixel error per sample.

    Sabour et al. use the sum of squared errors scaled by 0.0005; on 28x28 images that is
    this mean times a loss weight of 0.0005 * 784 = 0.392 (Efficient-CapsNet's ``lmd_gen``).

    Returns:
        ``(batch,)`` losses.
    """
    reconstructions = ops.convert_to_tensor(reconstructions)
    images = ops.cast(images, reconstructions.dtype)
    diff = ops.reshape(images - reconstructions, (ops.shape(images)[0], -1))
    return ops.mean(ops.square(diff), axis=-1)


def weighted_categorical_crossentropy(
    y_true: Any,
    probs: Any,
    class_weights: Sequence[float] | np.ndarray | None = None,
    gamma: float = 0.0,
    epsilon: float = 1e-7,
    label_smoothing: float = 0.0,
) -> Any:
    """Class-weighted cross-entropy on probabilities; focal when ``gamma > 0``.

    ``L = -w_y (1 - p_y)^gamma log p_y`` (Lin et al. 2017, "Focal loss for dense object
    detection", eq. 5, with per-class ``alpha = w``); ``gamma = 0`` is plain weighted
    cross-entropy.

    Args:
        y_true: ``(batch, K)`` one-hot labels.
        probs: ``(batch, K)`` probabilities.
        class_weights: ``K`` weights, or ``None`` for 1.
        gamma: focusing parameter (>= 0).
        epsilon: probabilities are clipped to ``[epsilon, 1 - epsilon]``.
        label_smoothing: the target is ``(1 - s) y + s / K`` (Szegedy et al. 2016); the class
            weight is still that of the true class.

    Returns:
        ``(batch,)`` losses.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, received {gamma!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), received {label_smoothing!r}")
    probs = ops.clip(ops.convert_to_tensor(probs), epsilon, 1.0 - epsilon)
    y_true = ops.cast(y_true, probs.dtype)
    target = y_true
    if label_smoothing:
        target = y_true * (1.0 - label_smoothing) + label_smoothing / probs.shape[-1]
    per_class = -target * ops.log(probs)
    if gamma:
        per_class = per_class * ops.power(1.0 - probs, gamma)
    loss = ops.sum(per_class, axis=-1)
    if class_weights is not None:
        loss = loss * _class_weight_per_sample(y_true, class_weights)
    return loss


def class_balanced_weights(counts: Sequence[int] | np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced weights from the effective number of samples (Cui et al. 2019, eq. 3).

    ``w_c = (1 - beta) / (1 - beta^n_c)``, rescaled so that the ``K`` weights sum to ``K``.
    ``beta = 0`` gives all ones; ``beta -> 1`` tends to inverse class frequency.

    Args:
        counts: number of training samples of each class (all > 0).
        beta: in ``[0, 1)``.

    Returns:
        ``(K,)`` float64 weights.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or np.any(n <= 0):
        raise ValueError(f"counts must be a non-empty list of positive numbers, received {counts!r}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), received {beta!r}")
    # The common factor (1 - beta) cancels in the rescaling; 1 - beta^n = -expm1(n log beta)
    # stays accurate as beta -> 1, where it tends to 0.
    weights = np.ones_like(n) if beta == 0.0 else 1.0 / -np.expm1(n * np.log(beta))
    return weights * n.size / weights.sum()


@keras.saving.register_keras_serializable(package="capsedge")
class MarginLoss(keras.losses.Loss):
    """``margin_loss`` as a Keras loss; see there for the arguments."""

    def __init__(
        self,
        m_plus: float = 0.9,
        m_minus: float = 0.1,
        lam: float = 0.5,
        class_weights: Sequence[float] | None = None,
        name: str = "margin_loss",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.m_plus, self.m_minus, self.lam = float(m_plus), float(m_minus), float(lam)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return margin_loss(y_true, y_pred, self.m_plus, self.m_minus, self.lam, self.class_weights)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "m_plus": self.m_plus,
            "m_minus": self.m_minus,
            "lam": self.lam,
            "class_weights": self.class_weights,
        }


@keras.saving.register_keras_serializable(package="capsedge")
class WeightedCrossEntropy(keras.losses.Loss):
    """``weighted_categorical_crossentropy`` as a Keras loss (focal when ``gamma > 0``)."""

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        gamma: float = 0.0,
        name: str = "weighted_crossentropy",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if gamma < 0:
            raise ValueError(f"WeightedCrossEntropy: gamma must be >= 0, received {gamma!r}")
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.gamma = float(gamma)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return weighted_categorical_crossentropy(y_true, y_pred, self.class_weights, self.gamma)

    def get_config(self) -> dict:
        return {**super().get_config(), "class_weights": self.class_weights, "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="capsedge")
class ReconstructionLoss(keras.losses.Loss):
    """``reconstruction_loss`` (per-sample mean squared error) as a Keras loss."""

    def __init__(self, name: str = "reconstruction_loss", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return reconstruction_loss(y_true, y_pred)
