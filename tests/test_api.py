"""The Python API: one loaded model, any input kind, several threads."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsedge import Classifier, ImageError, ModelError, Prediction, read_metadata
from capsedge.classifier import default_model_path

from conftest import implant_data, synthetic_xray


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier.load()


def test_bundled_model_metadata(classifier: Classifier) -> None:
    metadata = read_metadata(default_model_path())
    assert classifier.labels == ("Cofield", "Depuy", "Tornier", "Zimmer")
    assert metadata.name == "effcaps_ncp_lite0h_512"
    assert metadata.preprocessing.input_shape == (512, 512, 1)
    assert "CC BY 4.0" in metadata.provenance["attribution"]
    assert metadata.provenance["metrics"]["pretrained"]["licence"] == "Apache-2.0"
    assert metadata.provenance["metrics"]["init"] == "run:runs/stage1"
    assert metadata.provenance["cross_validation"]["folds"] == 5
    assert metadata.provenance["format"] == "tflite-int8"  # full integer; see README, "The bundled model"
    assert default_model_path().stat().st_size <= 6 * 1024 * 1024


def test_bundled_model_tells_the_makers_apart(classifier: Classifier) -> None:
    """On development images (which it was trained on) it must find every maker, not one class."""
    folder = implant_data()
    files = sorted(folder.glob("*.jpg"))[::12]  # 40 images, every maker
    truth = [path.name.split(".")[0] for path in files]
    answers = [classifier.classify(path).label for path in files]
    accuracy = np.mean([a == t for a, t in zip(answers, truth, strict=True)])
    assert accuracy >= 0.85, (accuracy, answers)
    assert set(answers) == set(classifier.labels)


def test_every_input_kind_gives_the_same_prediction(classifier: Classifier, tmp_path: Path) -> None:
    pixels = synthetic_xray()
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    sources = (path, str(path), buffer.getvalue(), Image.fromarray(pixels), pixels)
    results = [classifier.classify(source) for source in sources]
    for result in results:
        assert isinstance(result, Prediction)
        assert result.probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
        assert result.label == results[0].label and result.confidence == max(result.probabilities.values())
        assert result.model_version == classifier.metadata.version and result.latency_ms > 0
    assert sum(results[0].probabilities.values()) == pytest.approx(1.0, abs=1e-4)


def test_shared_between_threads(classifier: Classifier) -> None:
    images = [synthetic_xray(seed=i) for i in range(16)]
    serial = [classifier.classify(image).probabilities for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda image: classifier.classify(image).probabilities, images * 3))
    for i, probabilities in enumerate(parallel):
        assert probabilities == pytest.approx(serial[i % 16], abs=1e-6)


def test_errors_are_capsedge_errors(classifier: Classifier, tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        classifier.classify(b"not an image")
    with pytest.raises(ModelError, match="not found"):
        Classifier.load(tmp_path / "missing.tflite")


def test_dequantization_casts_before_subtracting() -> None:
    from capsedge.backends import dequantize, quantize

    values = np.array([-128, 0, 127], dtype=np.int8)
    np.testing.assert_allclose(dequantize(values, 0.5, -10), [-59.0, 5.0, 68.5])
    np.testing.assert_array_equal(quantize(np.array([-100.0, 0.0, 0.26, 100.0]), 0.5, -10, np.int8),
                                  [-128, -10, -9, 127])


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_without_threads_the_model_gets_the_usable_cores_up_to_four(
        cores: int, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteRT's own choice is one thread (109 against 60 ms for two on the 2-core development
    machine, docs/runtime.md); the classifier asks for the cores it may use instead, at most 4."""
    import capsedge.classifier as module

    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    asked: list[int | None] = []
    real_open = module.open_backend

    def spy(path: Path, backend: str, threads: int | None) -> object:
        asked.append(threads)
        return real_open(path, backend, threads)

    monkeypatch.setattr(module, "open_backend", spy)
    Classifier.load(warm_up=False)
    Classifier.load(threads=1, warm_up=False)
    assert asked == [expected, 1]
