"""Fit the ``trust`` section of a model's metadata (see :mod:`capsedge.trust`).

- The temperature and the "uncertain" threshold come from the out-of-fold predictions of a
  ``capsedge train --folds K`` folder: every image is scored by a model that never saw it.
- The outlier statistics come from the training images' features: the mean of the map after
  stage ``OUTLIER_STAGE`` of the EfficientNet-Lite0 trunk. The two-stage recipe adapts every
  stage to X-rays, on these same images; how often a development X-ray is flagged is measured
  by K-fold cross-validation of the statistics themselves, and how often a new one is, with
  each fold's model and its held-out images, in docs/trust.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import CapsedgeError
from capsedge.trust import (
    Calibration,
    OutlierModel,
    Trust,
    calibrate,
    confidence_and_correct,
    expected_calibration_error,
    reliability_bins,
)
from capsedge.views import RECIPE_VIEWS
from capsedge.workshop.dataset import ImageCache, read_dataset
from capsedge.workshop.run import CrossValidation

#: The format whose folds' held-out answers recalibrate an int8 file (see :func:`fit_file_trust`).
INT8 = "int8"

#: The trunk stage whose mean map is the outlier feature. Stage 5 served while the recipe kept
#: it at ImageNet's weights; on the adapted trunk it flags 39 % of MNIST digits (float model,
#: 5 axes), stage 6 with 20 axes all of them, at the same 1-2 % of new X-rays (docs/trust.md).
OUTLIER_STAGE = 6
#: Principal axes kept for the Mahalanobis part of the outlier distance.
OUTLIER_COMPONENTS = 20
#: Training images' distances above this quantile are out of distribution.
OUTLIER_QUANTILE = 0.99
#: The "uncertain" threshold is the lowest confidence at which answers are this often right.
TARGET_ACCURACY = 0.97
#: ...counting at least this many answers at or above it (no threshold from a handful).
MIN_CONFIDENT = 20
#: Int8 files output the features mapped onto [0, 1] around the training mean, this many
#: training standard deviations wide (one int8 scale then serves them and the probabilities;
#: the bundled model's training features lie within 4.5 deviations of their means).
INT8_FEATURE_SPAN = 12.0
#: Confidence thresholds reported in the coverage table.
TABLE_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def fit_temperature(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``calibrate(p, T)``.

    A one-dimensional search over log T (0.05 to 20, then refined around the best point).
    """
    targets = np.asarray(targets)

    def nll(temperature: float) -> float:
        p = calibrate(probabilities, temperature)[np.arange(len(targets)), targets]
        return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = best * np.exp(np.linspace(-0.05, 0.05, 101))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


def choose_threshold(probabilities: np.ndarray, targets: np.ndarray, target_accuracy: float = TARGET_ACCURACY,
                     min_count: int = MIN_CONFIDENT) -> float:
    """The lowest confidence ``t`` whose answers at or above it are at least ``target_accuracy``
    right (at least ``min_count`` of them); 1.0 (every answer uncertain) when none is."""
    confidence, correct = confidence_and_correct(probabilities, targets)
    order = np.argsort(-confidence)
    right = np.cumsum(correct[order])
    count = np.arange(1, len(order) + 1)
    good = (right / count >= target_accuracy) & (count >= min_count)
    if not good.any():
        return 1.0
    return float(confidence[order][np.flatnonzero(good).max()])


def coverage_table(probabilities: np.ndarray, targets: np.ndarray,
                   thresholds: tuple[float, ...] = TABLE_THRESHOLDS) -> list[dict[str, float]]:
    """For each threshold: the share of answers at or above it, and how often those are right."""
    confidence, correct = confidence_and_correct(probabilities, targets)
    rows = []
    for threshold in thresholds:
        kept = confidence >= threshold
        rows.append({"threshold": float(threshold), "coverage": float(kept.mean()),
                     "accuracy": float(correct[kept].mean()) if kept.any() else None,
                     "answers": int(kept.sum())})
    return rows


def fit_outliers(features: np.ndarray, components: int = OUTLIER_COMPONENTS,
                 quantile: float = OUTLIER_QUANTILE) -> OutlierModel:
    """Standardise, keep ``components`` principal axes (at most two fewer than the images: the
    centred features span one fewer, and the residual must keep a variance), and set the
    threshold at the ``quantile`` of the training features' own distances."""
    features = np.asarray(features, np.float64)
    components = max(1, min(components, len(features) - 2))
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    standard = (features - mean) / scale
    # numpy's SVD rather than scikit-learn's PCA, which gives the same distances (tested) but
    # stores other numbers, and the device reads these: it flips some axes' signs (3 of 16 for
    # random features of the development set's shape, 477 x 112) and its variances differ in
    # the last bit (scipy's LAPACK).
    _, singular, axes = np.linalg.svd(standard, full_matrices=False)
    kept = axes[:components]
    variances = singular[:components] ** 2 / (len(features) - 1)
    residual = standard - standard @ kept.T @ kept
    residual_variance = float((residual**2).sum(axis=1).mean())
    model = OutlierModel(mean, scale, kept, variances, residual_variance, threshold=1.0)
    threshold = float(np.quantile(model.distance(features), quantile))
    return OutlierModel(mean, scale, kept, variances, residual_variance, threshold)


def outlier_false_alarms(features: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Share of training images flagged by statistics fitted without them (K-fold)."""
    fold_of = np.arange(len(features)) % folds
    np.random.default_rng(seed).shuffle(fold_of)
    flagged = 0
    for fold in range(folds):
        model = fit_outliers(features[fold_of != fold])
        flagged += int((model.distance(features[fold_of == fold]) > model.threshold).sum())
    return flagged / len(features)


def with_features(classifier: Any, stage: int = OUTLIER_STAGE, unit_range: OutlierModel | None = None) -> Any:
    """A Keras model ``image -> [probabilities, mean of the trunk's stage-``stage`` map]``,
    concatenated into one vector (the runtime splits it by the metadata's label count).

    With ``unit_range`` (the outlier statistics), the features come out as
    :func:`unit_range_features` maps them, for an int8 file; pair it with
    :func:`unit_range_outliers`."""
    import keras

    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import trunk_output_layer

    stage_map = trunk_output_layer(classifier, stage, name=TRUNK_PREFIX).output
    pooled = keras.layers.GlobalAveragePooling2D(name="outlier_features")(stage_map)
    if unit_range is not None:
        gain, offset = _unit_range_affine(unit_range)
        pooled = keras.layers.Rescaling(gain.astype(np.float32), offset.astype(np.float32),
                                        name="outlier_features_unit_range")(pooled)
    joined = keras.layers.Concatenate(name="probabilities_and_features")([classifier.output, pooled])
    return keras.Model(classifier.input, joined, name=f"{classifier.name}_with_features")


def _unit_range_affine(outliers: OutlierModel) -> tuple[np.ndarray, np.ndarray]:
    gain = 1.0 / (INT8_FEATURE_SPAN * outliers.scale)
    return gain, 0.5 - outliers.mean * gain


def unit_range_features(features: np.ndarray, outliers: OutlierModel) -> np.ndarray:
    """``features`` mapped so the training images' lie around 0.5, ``INT8_FEATURE_SPAN``
    standard deviations per unit: the probabilities' range, so one int8 scale serves both."""
    gain, offset = _unit_range_affine(outliers)
    return np.asarray(features, np.float64) * gain + offset


def unit_range_outliers(outliers: OutlierModel) -> OutlierModel:
    """The same statistics for features mapped by :func:`unit_range_features`: every distance
    is unchanged (the standardisation absorbs the per-feature affine map)."""
    dims = outliers.mean.shape
    return replace(outliers, mean=np.full(dims, 0.5), scale=np.full(dims, 1.0 / INT8_FEATURE_SPAN))


def fit_file_trust(path: str | Path, images: np.ndarray, targets: np.ndarray, trust: Trust,
                   cross_validation: str | Path, test_time_views: int = RECIPE_VIEWS) -> Trust:
    """``trust`` refitted for the int8 file at ``path`` from that file's own outputs.

    - Outlier statistics: from the features the file computes for the training ``images``
      (after its probabilities). Int8 rounding moves them about four times the float spread.
    - Calibration: from the held-out answers of the folds' int8 files when the
      cross-validation has them (:func:`capsedge.export.fold_scores.score_folds`); otherwise the float
      folds' calibration is kept, and the provenance says so.
    """
    from capsedge.backends import open_backend

    provenance = dict(trust.provenance)
    outliers = trust.outliers
    if outliers is not None:
        backend = open_backend(path)
        features = np.array([backend.run(image[np.newaxis])[-outliers.feature_dim:] for image in images])
        outliers = fit_outliers(features)
        provenance |= {"outlier_statistics": "fitted on this file's own features of the training images",
                       "outlier_false_alarms_cv": outlier_false_alarms(features)}
    calibration = trust.calibration
    folds = CrossValidation(Path(cross_validation))
    if folds.has_views(INT8):
        indices, raw = folds.out_of_fold(len(targets), test_time_views, fmt=INT8)
        fitted, report = fit_calibration(raw, targets[indices])
        calibration = fitted
        provenance |= report | {"calibrated_on": "the held-out answers of the folds' int8 files"}
    else:
        provenance["calibrated_on"] = "the held-out answers of the float folds"
    return replace(trust, calibration=calibration, outliers=outliers, provenance=provenance)


def fit_calibration(raw: np.ndarray, targets: np.ndarray) -> tuple[Calibration, dict[str, Any]]:
    """Temperature and "uncertain" threshold for out-of-fold probabilities ``raw``, and the
    figures behind them."""
    temperature = fit_temperature(raw, targets)
    calibrated = calibrate(raw, temperature)
    threshold = choose_threshold(calibrated, targets)
    report = {
        "out_of_fold_images": int(len(targets)),
        "out_of_fold_accuracy": float((raw.argmax(1) == targets).mean()),
        "temperature": temperature,
        "ece_before": expected_calibration_error(raw, targets),
        "ece_after": expected_calibration_error(calibrated, targets),
        "uncertain_below": threshold,
        "target_accuracy": TARGET_ACCURACY,
        "coverage": coverage_table(calibrated, targets),
    }
    return Calibration(temperature, threshold), report


@dataclass(frozen=True)
class TrustFit:
    """The fitted section and the figures that justify it."""

    trust: Trust
    report: dict[str, Any]
    calibrated: np.ndarray
    raw: np.ndarray
    targets: np.ndarray


def fit_trust(classifier: Any, labels: tuple[str, ...], cross_validation: str | Path,
              train_data: str | Path, images: ImageCache, test_time_views: int = RECIPE_VIEWS) -> TrustFit:
    """Fit calibration (from ``cross_validation``'s out-of-fold predictions, averaged over
    ``test_time_views`` views as the runtime will) and outlier statistics (from the features of
    ``train_data``'s images, preprocessed by ``images``, under ``classifier``; none for a model
    without an EfficientNet-Lite0 trunk).

    Raises:
        CapsedgeError: the data's classes differ from the model's, or the folds do not match it.
    """
    dataset = read_dataset(train_data)
    if tuple(dataset.classes) != tuple(labels):
        raise CapsedgeError(f"{train_data} has classes {list(dataset.classes)}, the model {list(labels)}")
    targets = dataset.targets
    indices, raw = CrossValidation(Path(cross_validation)).out_of_fold(len(targets), test_time_views)
    targets_oof = targets[indices]
    calibration, fitted = fit_calibration(raw, targets_oof)
    calibrated = calibrate(raw, calibration.temperature)

    try:
        feature_model = with_features(classifier)
    except CapsedgeError:  # no EfficientNet-Lite0 trunk: calibration only
        feature_model = None
    outliers, features = None, np.zeros((0, 0))
    if feature_model is not None:
        batch = images.images(dataset.paths)
        features = np.asarray(feature_model.predict(batch, batch_size=16, verbose=0))[:, len(labels):]
        outliers = fit_outliers(features)
    report = {
        **fitted,
        "test_time_views": test_time_views,
        "reliability_before": reliability_bins(raw, targets_oof),
        "reliability_after": reliability_bins(calibrated, targets_oof),
    }
    if outliers is not None:
        report |= {
            "outlier_feature": f"mean of the EfficientNet-Lite0 stage-{OUTLIER_STAGE} map",
            "outlier_components": len(outliers.variances),
            "outlier_quantile": OUTLIER_QUANTILE,
            "outlier_false_alarms_cv": outlier_false_alarms(features),
            "feature_images": int(len(features)),
        }
    provenance = {k: v for k, v in report.items() if k not in ("coverage", "reliability_before",
                                                               "reliability_after")}
    provenance["coverage"] = report["coverage"]
    trust = Trust(calibration, outliers, provenance)
    return TrustFit(trust, report, calibrated, raw, targets_oof)
