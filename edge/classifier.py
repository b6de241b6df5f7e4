"""The Python API for device integration: load a model once, classify images."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundled
from .backends import Backend, open_backend
from .bundled import DEFAULT_MODEL_NAME, default_model_path  # noqa: F401 - capsedge.classifier's names
from .errors import ModelError, UsageError
from .limits import MAX_THREADS
from .metadata import ModelMetadata, read_metadata
from .preprocess import ImageSource, load_grey, not_a_radiograph, to_model_input
from .trust import calibrate
from .views import VIEW_COUNTS, orientations

#: Why an image whose file says it is no radiograph (a DICOM's Modality) gets no answer; the
#: Modality's value is never quoted (nothing from a header reaches the output).
NOT_A_RADIOGRAPH_REASON = "its DICOM header says it is not an X-ray radiograph (CT, MR, ultrasound or such)"

#: At most this many threads by default: the 4 cores of the usual edge board (Raspberry Pi,
#: Jetson Nano); more were not measured.
DEFAULT_THREADS_CAP = 4


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads a model gets unless told: the usable cores, at most :data:`DEFAULT_THREADS_CAP`.

    LiteRT's own choice (``num_threads=None``) is one thread: 109 ms per classification against
    60 ms for two on the 2-core development machine (``bench/default_threads.py``, docs/runtime.md).
    """
    return max(1, min(usable_cores(), DEFAULT_THREADS_CAP))


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        label: the most probable manufacturer.
        probabilities: probability of each class, in the model's label order.
        latency_ms: preprocessing plus inference time for this image.
        model_version: the version of the model that made it.
        uncertain: the label's probability is below ``threshold``: do not rely on it
            (``None``: the model carries no calibration, so nobody can tell).
        threshold: the confidence below which answers are uncertain (``None``: the model
            carries no calibration; its probabilities are the network's own, uncalibrated,
            renormalised to sum to 1).
        out_of_distribution: the image does not look like the X-rays the model was trained
            on (``None``: the model carries no feature statistics to tell).
        ood_reason: one line saying why, when ``out_of_distribution``.
    """

    label: str
    probabilities: dict[str, float]
    latency_ms: float
    model_version: str
    uncertain: bool | None = None
    threshold: float | None = None
    out_of_distribution: bool | None = None
    ood_reason: str | None = None

    @property
    def confidence(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label]

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities are calibrated (the model carries a threshold)."""
        return self.threshold is not None

    @property
    def answer(self) -> str | None:
        """The maker to report: the label, or ``None`` when the image is out of distribution
        (not a shoulder-implant X-ray: no maker is an answer)."""
        return None if self.out_of_distribution else self.label

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready record that ``classify --json`` prints (without the path): the same keys
        for every image; ``label`` is always the top class, ``answer`` is ``None`` out of
        distribution."""
        return {
            "answer": self.answer,
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "latency_ms": round(self.latency_ms, 3),
            "model_version": self.model_version,
            "uncertain": self.uncertain,
            "calibrated": self.calibrated,
            "threshold": self.threshold,
            "out_of_distribution": self.out_of_distribution,
            "ood_reason": self.ood_reason,
        }


class Classifier:
    """A loaded model with its metadata.

    A ``Classifier`` may be shared between threads: inference is serialised by
    a lock (the interpreter is not re-entrant), preprocessing runs in parallel.
    For parallel inference, load one ``Classifier`` per thread.
    """

    def __init__(self, backend: Backend, metadata: ModelMetadata, model_path: Path) -> None:
        """Wrap an open backend; prefer :meth:`load`.

        Raises:
            ModelError: the metadata does not match the model's input or output.
        """
        expected = (1, *metadata.preprocessing.input_shape)
        if tuple(backend.input_shape) != expected:
            raise ModelError(
                f"model input shape {tuple(backend.input_shape)} does not match its metadata "
                f"(expected {expected})"
            )
        trust = metadata.trust
        self._calibration = trust.calibration if trust is not None else None
        self._outliers = trust.outliers if trust is not None else None
        features = self._outliers.feature_dim if self._outliers is not None else 0
        if backend.num_outputs != len(metadata.labels) + features:
            raise ModelError(
                f"model has {backend.num_outputs} outputs but its metadata names "
                f"{len(metadata.labels)} labels" + (f" and {features} features" if features else "")
            )
        self.backend = backend
        self.metadata = metadata
        self.model_path = model_path
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        backend: str = "auto",
        threads: int | None = None,
        warm_up: bool = True,
    ) -> Classifier:
        """Load a model file and its metadata, and run one warm-up inference.

        Args:
            path: an exported model; ``None`` for the bundled default model.
            backend: ``"auto"`` (from the file type) or a backend name.
            threads: CPU threads for the runtime; ``None``: :func:`default_threads`.
            warm_up: run one inference on a blank image so the first real call is fast.

        Raises:
            ModelError: the model or its metadata is missing, corrupt or inconsistent.
            RuntimeMissingError: the runtime for this model is not installed.
        """
        model_path = Path(path) if path is not None else bundled.default_model_path()
        if threads is not None and (not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS):
            raise UsageError(f"threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}")
        runtime = open_backend(model_path, backend, default_threads() if threads is None else threads)
        # An ONNX session has read the file's metadata already: no second session for it.
        metadata = read_metadata(model_path, getattr(runtime, "metadata_props", None))
        classifier = cls(runtime, metadata, model_path)
        if warm_up:
            classifier.predict_tensor(np.zeros(classifier.metadata.preprocessing.input_shape, np.float32))
        return classifier

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in output order."""
        return self.metadata.labels

    @property
    def test_time_views(self) -> int:
        """How many orientations of each image are run and averaged (the model's metadata)."""
        return self.metadata.test_time_views

    def predict_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """The model's raw output for one preprocessed ``(H, W, C)`` tensor, one view only: its
        class probabilities, then (for a model with outlier statistics) its feature vector."""
        batch = np.ascontiguousarray(tensor[np.newaxis], dtype=np.float32)
        with self._lock:
            return self.backend.run(batch)

    def predict_views(self, tensor: np.ndarray, views: int | None = None) -> np.ndarray:
        """The raw output with its class probabilities averaged over ``views`` orientations
        (default: the model's :attr:`test_time_views`); the features are the image's own."""
        count = self.test_time_views if views is None else views
        if type(count) is not int or count not in VIEW_COUNTS:
            raise UsageError(f"views must be one of {VIEW_COUNTS}, got {count!r}")
        outputs = [self.predict_tensor(view) for view in orientations(tensor, count)]
        raw = outputs[0].copy()
        classes = len(self.labels)
        raw[:classes] = np.mean([output[:classes] for output in outputs], axis=0)
        return raw

    def probabilities(self, tensor: np.ndarray, views: int | None = None) -> np.ndarray:
        """Calibrated class probabilities for one preprocessed tensor, averaged over ``views``
        orientations (default: the model's; the calibration was fitted for that many)."""
        return self._calibrated(self.predict_views(tensor, views)[: len(self.labels)])

    def _calibrated(self, raw: np.ndarray) -> np.ndarray:
        # Without a calibration the network's own answers, renormalised (temperature 1): an int8
        # file's rounded, clipped outputs need not sum to 1, and a displayed answer should.
        temperature = 1.0 if self._calibration is None else self._calibration.temperature
        return calibrate(raw, temperature).astype(np.float32)

    def _outlier(self, features: np.ndarray) -> tuple[bool | None, str | None]:
        if self._outliers is None:
            return None, None
        ratio = float(self._outliers.distance(features)) / self._outliers.threshold
        if ratio <= 1.0:
            return False, None
        return True, (f"not like the shoulder-implant X-rays the model was trained on "
                      f"(feature distance {ratio:.1f}x the limit)")

    def classify(self, image: ImageSource) -> Prediction:
        """Classify one image: a path, encoded bytes, a binary file, a PIL image or a numpy array.

        Raises:
            ImageError: the image cannot be read or decoded, is too large, or is not an image
                (any other type, ``None`` included).
            ModelError: the runtime failed on this input or returned non-finite values.
            RuntimeMissingError: a DICOM file and no ``pydicom``.
        """
        start = time.perf_counter()
        config = self.metadata.preprocessing
        grey = load_grey(image, config.input_size)
        return self.classify_tensor(to_model_input(grey, config), start, not_a_radiograph(grey))

    def classify_tensor(self, tensor: np.ndarray, start: float | None = None,
                        not_radiograph: bool = False) -> Prediction:
        """Classify one preprocessed ``(H, W, C)`` tensor over the model's test-time views, with
        every flag; ``start`` (a ``time.perf_counter()`` value) begins the latency;
        ``not_radiograph`` (its file says it is no radiograph) makes it out of distribution.

        Raises:
            ModelError: the runtime failed on this input or returned non-finite values.
        """
        start = time.perf_counter() if start is None else start
        raw = self.predict_views(tensor)
        if not np.isfinite(raw).all():  # never NaN in a result (nor invalid JSON downstream)
            raise ModelError("the model returned non-finite outputs for this image")
        scores = self._calibrated(raw[: len(self.labels)])
        out_of_distribution, reason = self._outlier(raw[len(self.labels):])
        if not_radiograph:
            out_of_distribution, reason = True, NOT_A_RADIOGRAPH_REASON
        latency_ms = (time.perf_counter() - start) * 1000.0
        probabilities = {label: float(p) for label, p in zip(self.labels, scores, strict=True)}
        threshold = self._calibration.uncertain_below if self._calibration is not None else None
        return Prediction(
            label=self.labels[int(np.argmax(scores))],
            probabilities=probabilities,
            latency_ms=latency_ms,
            model_version=self.metadata.version,
            uncertain=None if threshold is None else float(np.max(scores)) < threshold,
            threshold=threshold,
            out_of_distribution=out_of_distribution,
            ood_reason=reason,
        )
