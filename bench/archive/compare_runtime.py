"""Side-by-side runtime figures for the README, measured in one run on one machine.

1. Steady-state int8 latency: our classifier against MobileNetV2 (alpha 0.35)
   at the same input size, both full-integer int8 TFLite, same LiteRT, same
   thread count.
2. Whole process, one image: `capsedge classify` against a Python process
   that imports TensorFlow, loads the Keras model and predicts.
3. Peak resident memory of the `capsedge classify` process.

Usage:
    python bench/archive/compare_runtime.py --run RUN_DIR [--data DIR] [--image X.jpg] [--threads 1]
        [--out DIR]

Needs the export extra (TensorFlow) to build the int8 models; writes nothing
outside a temporary folder but OUT/compare_runtime.json with --out.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def steady_latency_ms(
    models: list[Path], tensor: np.ndarray | list[np.ndarray], threads: int, runs: int, rounds: int = 10
) -> list[float]:
    """Median LiteRT invoke time of each full-int8 model, interleaved (one input, or one per model).

    After 50 warm-up runs each, the models take turns in ``rounds`` blocks of
    ``runs // rounds`` invocations, so that a slow spell of a shared machine falls on
    all of them alike instead of on whichever model happened to run then.
    """
    from capsedge.backends import LiteRTBackend

    backends = [LiteRTBackend(model, threads=threads) for model in models]
    tensors = tensor if isinstance(tensor, list) else [tensor] * len(models)
    batches = [t[np.newaxis] for t in tensors]
    for backend, batch in zip(backends, batches, strict=True):
        for _ in range(50):
            backend.run(batch)
    times: list[list[float]] = [[] for _ in backends]
    for _ in range(rounds):
        for backend, batch, samples in zip(backends, batches, times, strict=True):
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                backend.run(batch)
                samples.append((time.perf_counter() - start) * 1000)
    return [statistics.median(samples) for samples in times]


def process_seconds(command: list[str], runs: int) -> tuple[float, float]:
    """Median wall-clock seconds of a command, and the peak RSS (MiB) of its children so far."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return statistics.median(times), peak


def build_int8_models(run: Path, calib: Path, out: Path) -> tuple[Path, Path, int]:
    """Our classifier and MobileNetV2-0.35, both converted to full-int8 TFLite."""
    import keras

    from capsedge.export.calibration import calibration_images
    from capsedge.export.quantization import Quantization
    from capsedge.export.run import load_run
    from capsedge.export.tflite_format import convert_to_tflite
    from capsedge.workshop.dataset import ImageCache

    trained = load_run(run)
    calibration = calibration_images(calib, ImageCache(trained.preprocessing), limit=100)
    ours = out / "ours_int8.tflite"
    ours.write_bytes(convert_to_tflite(trained.classifier, Quantization.for_int8(calibration)))
    size = trained.preprocessing.input_size
    mobilenet = keras.applications.MobileNetV2(
        input_shape=(size, size, 1), alpha=0.35, weights=None, classes=len(trained.labels)
    )
    theirs = out / "mobilenetv2_035_int8.tflite"
    theirs.write_bytes(convert_to_tflite(mobilenet, Quantization.for_int8(calibration)))
    return ours, theirs, size


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--run", type=Path, required=True, help="run folder with classifier.keras")
    parser.add_argument("--image", type=Path, default=None, help="default: Depuy.5.jpg of --data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--process-runs", type=int, default=5)
    args = parser.parse_args()
    args.image = args.image or common.example_image(args)

    from capsedge.bench import machine_summary
    from capsedge.preprocess import Preprocessing, preprocess

    capsedge = shutil.which("capsedge") or sys.exit("capsedge is not installed")
    # The light process first, so that the children's peak RSS is its own.
    classify_s, classify_rss = process_seconds([capsedge, "classify", str(args.image)], args.process_runs)
    keras_script = (
        "import sys, numpy as np, keras, capsedge.models\n"
        "from capsedge.preprocess import Preprocessing, preprocess\n"
        f"m = keras.models.load_model({str(args.run / 'classifier.keras')!r}, compile=False)\n"
        "size = m.inputs[0].shape[1]\n"
        f"x = preprocess({str(args.image)!r}, Preprocessing(input_size=size))[None]\n"
        "print(m.predict(x, verbose=0).argmax())\n"
    )
    keras_s, _ = process_seconds([sys.executable, "-c", keras_script], args.process_runs)

    with tempfile.TemporaryDirectory(prefix="capsedge-bench-") as folder:
        ours, theirs, size = build_int8_models(args.run, common.data_folder(args), Path(folder))
        tensor = preprocess(args.image, Preprocessing(input_size=size))
        ours_ms, theirs_ms = steady_latency_ms([ours, theirs], tensor, args.threads, args.runs)
        ours_kib, theirs_kib = ours.stat().st_size / 1024, theirs.stat().st_size / 1024

    result = {
        "machine": machine_summary(),
        "threads": args.threads,
        "input_size": size,
        "int8_latency_ms": {"capsedge": round(ours_ms, 3), "mobilenetv2_035": round(theirs_ms, 3)},
        "int8_speedup_vs_mobilenetv2_035": round(theirs_ms / ours_ms, 2),
        "int8_size_kib": {"capsedge": round(ours_kib, 1), "mobilenetv2_035": round(theirs_kib, 1)},
        "process_seconds": {"capsedge_classify": round(classify_s, 3), "keras_tensorflow": round(keras_s, 3)},
        "process_speedup_vs_keras": round(keras_s / classify_s, 1),
        "capsedge_classify_peak_rss_mib": round(classify_rss, 1),
    }
    print(json.dumps(result, indent=2))
    common.save_json(args, "compare_runtime.json", result)


if __name__ == "__main__":
    main()
