"""Timing a model on this machine: load time, steady-state latency, throughput, peak memory."""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .classifier import Classifier, usable_cores
from .errors import UsageError
from .preprocess import ImageSource, preprocess


@dataclass(frozen=True)
class BenchResult:
    """One backend at one thread count.

    Attributes:
        backend: runtime name.
        threads: CPU threads given to the runtime.
        load_ms: model load, metadata and one warm-up inference.
        preprocess_ms: median time to make the input tensor from the image.
        views: inferences per classification (the model's test-time views).
        median_ms: median latency of one classification's inferences, every view
            (preprocessed input, after warm-up).
        p90_ms: 90th percentile latency.
        p99_ms: 99th percentile latency.
        throughput: classifications per second, one after another.
        peak_rss_mb: the process's peak resident memory so far (it only grows:
            later rows include what earlier rows used).
        runs: timed inferences.
    """

    backend: str
    threads: int
    load_ms: float
    preprocess_ms: float
    views: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    peak_rss_mb: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, rounded."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def machine_summary() -> str:
    """A one-line description of this machine, to quote with the figures."""
    return (f"{platform.machine()}, {usable_cores()} cores, {platform.system()}, "
            f"Python {platform.python_version()}")


def benchmark(
    model_path: str | Path | None,
    image: ImageSource | None = None,
    *,
    backend: str = "auto",
    threads: int = 1,
    runs: int = 200,
    warmup: int = 20,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time one backend at one thread count.

    Args:
        model_path: an exported model, ``None`` for the bundled one.
        image: the input; ``None`` uses a generated picture.
        backend: runtime name or ``"auto"``.
        threads: CPU threads for the runtime.
        runs: timed classifications after the warm-up.
        warmup: untimed classifications first.
        progress: told ``(done, total)`` after each classification, warm-up included.

    Raises:
        CapsedgeError: the model or image cannot be used.
    """
    if runs < 1 or warmup < 0:
        raise UsageError(f"runs must be >= 1 and warmup >= 0, got {runs!r} and {warmup!r}")
    start = time.perf_counter()
    classifier = Classifier.load(model_path, backend=backend, threads=threads)
    load_ms = (time.perf_counter() - start) * 1000
    config = classifier.metadata.preprocessing
    if image is None:
        rng = np.random.default_rng(0)
        image = (rng.random((256, 256)) * 255).astype(np.uint8)
    preprocess_times = []
    for _ in range(10):
        t0 = time.perf_counter()
        tensor = preprocess(image, config)
        preprocess_times.append((time.perf_counter() - t0) * 1000)
    for i in range(warmup):
        classifier.predict_views(tensor)
        if progress is not None:
            progress(i + 1, warmup + runs)
    latencies = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        classifier.predict_views(tensor)
        latencies[i] = (time.perf_counter() - t0) * 1000
        if progress is not None:  # outside the timed part
            progress(warmup + i + 1, warmup + runs)
    return BenchResult(
        backend=classifier.backend.name,
        threads=threads,
        load_ms=load_ms,
        preprocess_ms=statistics.median(preprocess_times),
        views=classifier.test_time_views,
        median_ms=float(np.median(latencies)),
        p90_ms=float(np.percentile(latencies, 90)),
        p99_ms=float(np.percentile(latencies, 99)),
        throughput=float(1000.0 / latencies.mean()),
        peak_rss_mb=peak_rss_mb(),
        runs=runs,
    )
