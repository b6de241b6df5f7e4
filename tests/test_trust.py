"""Calibrated confidence, "uncertain" and out of distribution: the maths, the metadata, the bundled model."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import numpy as np
import pytest

from capsedge import Classifier, ModelError
from capsedge.cli import format_text
from capsedge.metadata import ModelMetadata
from capsedge.preprocess import preprocess
from capsedge.trust import (
    Calibration,
    Trust,
    calibrate,
    expected_calibration_error,
    reliability_bins,
)
from capsedge.views import orientations

from conftest import MNIST, implant_data

fit = pytest.importorskip("capsedge.export.trust_fit", reason="the export extra fits trust sections")


def test_calibrate_is_temperature_scaling_of_log_probabilities() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert np.allclose(calibrate(p, 1.0), p)
    sharp = calibrate(p, 0.5)  # p**2, renormalised
    assert np.allclose(sharp, p**2 / (p**2).sum(1, keepdims=True))
    assert (sharp.argmax(1) == p.argmax(1)).all() and (sharp.max(1) > p.max(1)).all()
    assert (calibrate(p, 3.0).max(1) < p.max(1)).all()


def test_expected_calibration_error_by_hand() -> None:
    # Ten answers at confidence 0.8, 6 right: one bin, gap 0.2.
    p = np.tile([0.8, 0.2], (10, 1))
    targets = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(p, targets) == pytest.approx(0.2)
    bins = reliability_bins(p, targets)
    full = [b for b in bins if b["count"]]
    assert len(full) == 1 and full[0]["count"] == 10 and full[0]["accuracy"] == pytest.approx(0.6)
    assert full[0]["low"] == pytest.approx(0.7) and full[0]["high"] == pytest.approx(0.8)
    assert expected_calibration_error(p, np.zeros(10, int)) == pytest.approx(0.2)  # 100 % right at 0.8


def test_fit_temperature_recovers_the_temperature_that_made_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 4))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(4, p=row) for row in true])
    reported = calibrate(true, 2.0)  # a model twice as sharp as the truth...
    assert fit.fit_temperature(reported, targets) == pytest.approx(0.5, rel=0.1)  # ...is undone
    assert expected_calibration_error(calibrate(reported, 0.5), targets) < expected_calibration_error(
        reported, targets)


def test_choose_threshold_is_the_lowest_confidence_with_the_target_accuracy() -> None:
    confidence = np.linspace(0.99, 0.60, 100)
    p = np.stack([confidence, 1 - confidence], axis=1)
    targets = np.zeros(100, int)
    targets[[5, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]] = 1  # wrong answers
    threshold = fit.choose_threshold(p, targets, target_accuracy=0.95, min_count=20)
    kept = confidence >= threshold
    assert (targets[kept] == 0).mean() >= 0.95
    # 62 answers hold 3 wrong ones (95.2 %); the 63rd is wrong too (93.7 %).
    assert threshold == pytest.approx(confidence[61])
    assert fit.choose_threshold(p, np.ones(100, int)) == 1.0  # never right: everything uncertain
    table = fit.coverage_table(p, targets, (0.0, 0.995))
    assert table[0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.88, "answers": 100}
    assert table[1]["answers"] == 0 and table[1]["accuracy"] is None  # JSON-safe, not NaN


def test_outlier_model_flags_far_points_and_few_inliers() -> None:
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(3, 20))
    train = rng.normal(size=(2000, 3)) @ basis + 0.1 * rng.normal(size=(2000, 20))
    model = fit.fit_outliers(train, components=3, quantile=0.99)
    fresh = rng.normal(size=(2000, 3)) @ basis + 0.1 * rng.normal(size=(2000, 20))
    assert (model.distance(fresh) > model.threshold).mean() < 0.03
    shifted = fresh + 3.0  # off the training distribution in every feature
    assert (model.distance(shifted) > model.threshold).all()
    off_plane = fresh + rng.normal(size=(2000, 20))  # right mean, off the subspace
    assert (model.distance(off_plane) > model.threshold).mean() > 0.95
    assert fit.outlier_false_alarms(train) < 0.03


def test_outlier_model_of_few_images_keeps_fewer_axes_than_images() -> None:
    """Twelve images span eleven centred axes: of twenty asked, ten are kept, each with a variance
    (a null axis would divide distances by nothing), and a residual variance is left."""
    rng = np.random.default_rng(2)
    train = rng.normal(size=(13, 30))
    model = fit.fit_outliers(train[:12], components=20)
    assert len(model.variances) == 10
    assert model.variances.min() > 0.1 and model.residual_variance > 0.1
    assert np.isfinite(model.distance(train[12:])).all()
    assert fit.fit_outliers(train, components=5).variances.shape == (5,)


def test_unit_range_features_keep_every_distance_and_fit_an_int8_step() -> None:
    """Int8 files output the features mapped onto [0, 1]: the statistics that go with them give the
    same distances, and the training features land well inside the range of one int8 scale."""
    rng = np.random.default_rng(3)
    train = rng.normal(rng.uniform(-5, 5, 30), rng.uniform(0.01, 2.0, 30), size=(500, 30))  # unequal spreads
    model = fit.fit_outliers(train, components=4)
    mapped_model = fit.unit_range_outliers(model)
    points = np.concatenate([train[:50], train[:50] * 3.0])
    mapped = fit.unit_range_features(points, model)
    np.testing.assert_allclose(mapped_model.distance(mapped), model.distance(points), rtol=1e-9)
    inside = fit.unit_range_features(train, model)
    assert inside.min() > 0.0 and inside.max() < 1.0
    assert abs(inside.mean() - 0.5) < 1e-9
    step = 1.0 / 255  # rounding the mapped features to an int8 step moves few verdicts
    rounded = np.round(mapped / step) * step
    flagged = mapped_model.distance(mapped) > model.threshold
    assert (flagged == (mapped_model.distance(rounded) > model.threshold)).mean() > 0.95
    assert flagged[50:].all() and flagged[:50].mean() < 0.1


def test_trust_round_trips_through_metadata_json() -> None:
    rng = np.random.default_rng(2)
    outliers = fit.fit_outliers(rng.normal(size=(100, 6)), components=2)
    trust = Trust(Calibration(0.75, 0.9), outliers, {"note": "test"})
    metadata = ModelMetadata("m", "v", ("a", "b"), Classifier.load().metadata.preprocessing, trust=trust)
    back = ModelMetadata.from_dict(json.loads(metadata.to_json()))
    assert back.trust.calibration == trust.calibration
    assert np.allclose(back.trust.outliers.components, outliers.components)
    points = rng.normal(size=(5, 6))
    assert np.allclose(back.trust.outliers.distance(points), outliers.distance(points))


@pytest.mark.parametrize("change", [
    {"calibration": {"temperature": -1.0, "uncertain_below": 0.9}},
    {"calibration": {"temperature": 1.0, "uncertain_below": 1.5}},
    {"calibration": {"temperature": "1", "uncertain_below": 0.5}},
    {"outliers": {"mean": [0.0, 1.0], "scale": [1.0], "components": [[1.0, 0.0]], "variances": [1.0],
                  "residual_variance": 1.0, "threshold": 1.0}},
    {"outliers": {"mean": [0.0], "scale": [1.0], "components": [[1.0]], "variances": [1.0],
                  "residual_variance": 1.0, "threshold": float("nan")}},
])
def test_invalid_trust_sections_are_model_errors(change: dict) -> None:
    data = json.loads(Classifier.load().metadata.to_json())
    data["trust"] = change
    with pytest.raises(ModelError, match="invalid model metadata"):
        ModelMetadata.from_dict(data)


@pytest.fixture(scope="module")
def bundled() -> Classifier:
    return Classifier.load()


def test_bundled_model_carries_a_fitted_trust_section(bundled: Classifier) -> None:
    trust = bundled.metadata.trust
    assert bundled.test_time_views == trust.provenance["test_time_views"] == 16
    assert 0.3 < trust.calibration.temperature < 1.0  # the fused probabilities are under-confident
    assert 0.5 < trust.calibration.uncertain_below < 1.0
    assert trust.outliers.feature_dim == 192  # stage-6 channels of EfficientNet-Lite0
    assert bundled.backend.num_outputs == 4 + 192
    assert trust.provenance["ece_after"] < trust.provenance["ece_before"]
    assert trust.provenance["outlier_false_alarms_cv"] < 0.05


def test_prediction_applies_the_calibration_and_the_threshold(bundled: Classifier) -> None:
    folder = implant_data()
    files = sorted(folder.glob("*.jpg"))[::24]
    calibration = bundled.metadata.trust.calibration
    for path in files:
        prediction = bundled.classify(path)
        views = orientations(bundled_tensor(bundled, path), bundled.test_time_views)
        raw = np.mean([bundled.predict_tensor(view)[:4] for view in views], axis=0)
        expected = calibrate(raw, calibration.temperature)
        assert np.allclose(list(prediction.probabilities.values()), expected, atol=1e-5)
        assert prediction.threshold == calibration.uncertain_below
        assert prediction.uncertain == (prediction.confidence < calibration.uncertain_below)


def bundled_tensor(classifier: Classifier, path: object) -> np.ndarray:
    from capsedge.preprocess import preprocess

    return preprocess(path, classifier.metadata.preprocessing)


def test_development_xrays_are_in_distribution(bundled: Classifier) -> None:
    files = sorted(implant_data().glob("*.jpg"))[::12]
    flagged = [p.name for p in files if bundled.classify(p).out_of_distribution]
    assert len(flagged) <= 1, flagged


def test_non_xrays_are_flagged_out_of_distribution(bundled: Classifier) -> None:
    if not MNIST.is_dir():
        pytest.skip(f"MNIST not found at {MNIST}")
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as handle:
        digits = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)[::500]
    rng = np.random.default_rng(0)
    generated = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),  # colour noise
                 np.full((200, 200), 128, np.uint8),  # blank
                 np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))]  # gradient
    for image in [*digits, *generated]:
        prediction = bundled.classify(image)
        assert prediction.out_of_distribution is True
        assert prediction.ood_reason.startswith("not like the shoulder-implant X-rays")
        assert "\n" not in prediction.ood_reason


def test_an_out_of_distribution_image_names_no_maker(bundled: Classifier) -> None:
    """Text leads with "not a shoulder-implant X-ray" and gives no maker; JSON keeps its keys,
    with ``answer`` null and ``label`` still the top class."""
    prediction = bundled.classify(np.full((200, 200), 128, np.uint8))
    assert prediction.out_of_distribution is True
    line = format_text("blank.png", prediction)
    assert line.startswith("blank.png: not a shoulder-implant X-ray, no answer: not like")
    assert not any(label in line for label in bundled.labels)
    record = prediction.to_dict()
    assert record["answer"] is None and record["label"] in bundled.labels
    assert record["uncertain"] in (True, False) and record["calibrated"] is True


def test_a_model_without_trust_flags_nothing(bundled: Classifier) -> None:
    """Older models (no trust section, probabilities only) still load; the flags are absent and the
    output says the confidence is uncalibrated (``uncertain`` is null, not a reassuring false)."""
    plain = replace(bundled.metadata, trust=None)

    class ProbabilitiesOnly:
        name = "stub"
        input_shape = bundled.backend.input_shape
        num_outputs = 4

        def run(self, batch: np.ndarray) -> np.ndarray:
            return bundled.backend.run(batch)[:4]

    classifier = Classifier(ProbabilitiesOnly(), plain, bundled.model_path)
    prediction = classifier.classify(np.full((64, 64), 7, np.uint8))
    assert prediction.uncertain is None and prediction.threshold is None
    assert prediction.calibrated is False and prediction.to_dict()["uncertain"] is None
    assert "uncalibrated" in format_text("x.png", prediction)
    # the network's own answers, only renormalised: an int8 file's need not sum to 1
    raw = bundled.predict_views(preprocess(np.full((64, 64), 7, np.uint8), plain.preprocessing))[:4]
    assert abs(raw.sum() - 1) > 1e-3
    np.testing.assert_allclose(list(prediction.probabilities.values()), raw / raw.sum(), rtol=1e-5)
    assert prediction.out_of_distribution is None and prediction.ood_reason is None
    with pytest.raises(ModelError, match="192 features"):
        Classifier(ProbabilitiesOnly(), bundled.metadata, bundled.model_path)


def test_outlier_statistics_give_scikit_learns_pca_distances() -> None:
    """numpy's SVD is kept (the stored numbers must not change), and it is the standard PCA: the
    same axes up to sign, the same variances and so the same distances."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    from capsedge.export.trust_fit import OUTLIER_COMPONENTS, fit_outliers

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40)) * 0.1 + 1
    model = fit_outliers(features)
    pca = decomposition.PCA(n_components=OUTLIER_COMPONENTS, svd_solver="full")
    pca.fit((features - model.mean) / model.scale)
    np.testing.assert_allclose(np.abs(pca.components_), np.abs(model.components), atol=1e-10)
    np.testing.assert_allclose(pca.explained_variance_, model.variances, rtol=1e-12)
    theirs = replace(model, components=pca.components_, variances=pca.explained_variance_)
    probes = rng.normal(size=(20, 40)) * 2
    np.testing.assert_allclose(theirs.distance(probes), model.distance(probes), rtol=1e-9)
