"""Which thread count should `capsedge classify` use when not told? Side by side in one run.

Times `Classifier.classify` on one X-ray (preprocessing and every test-time view) for
LiteRT's own choice (`num_threads=None`, the default before 0.7), each thread count up to
the usable cores, and capsedge's default (`capsedge.classifier.default_threads`). The
configurations take turns in `--rounds` blocks, so a slow spell of a shared machine falls on
all of them alike.

Usage: python bench/default_threads.py [IMAGE] [--data DIR] [--model M] [--runs 60] [--rounds 6] [--json]
    [--out DIR]

IMAGE defaults to Depuy.5.jpg of the data folder. Writes nothing but OUT/default_threads.json
with --out; name the machine (printed first) when you quote the figures.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import common

if TYPE_CHECKING:
    from capsedge.classifier import Classifier



def cpu_name() -> str:
    """The processor's model name (Linux), or "unknown"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def open_classifier(model: Path | None, threads: int | None) -> Classifier:
    """A classifier whose runtime gets exactly ``threads`` (``None``: the runtime's own choice)."""
    from capsedge.backends import open_backend
    from capsedge.classifier import Classifier, default_model_path
    from capsedge.metadata import read_metadata

    path = model if model is not None else default_model_path()
    runtime = open_backend(path, "auto", threads)
    return Classifier(runtime, read_metadata(path, getattr(runtime, "metadata_props", None)), path)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("image", nargs="?", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="Default: the bundled model.")
    parser.add_argument("--runs", type=int, default=60, help="Timed classifications per configuration.")
    parser.add_argument("--rounds", type=int, default=6, help="Blocks the runs are split into.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.image = args.image or common.example_image(args)

    from capsedge.bench import machine_summary
    from capsedge.classifier import default_threads, usable_cores

    image = args.image.read_bytes()
    configs: dict[str, int | None] = {"LiteRT's choice (None)": None}
    configs |= {f"{n} thread{'s' if n > 1 else ''}": n for n in range(1, usable_cores() + 1)}
    configs[f"capsedge default ({default_threads()})"] = default_threads()
    classifiers = {name: open_classifier(args.model, threads) for name, threads in configs.items()}
    for classifier in classifiers.values():
        for _ in range(5):  # warm-up, untimed
            classifier.classify(image)
    times: dict[str, list[float]] = {name: [] for name in classifiers}
    for _ in range(args.rounds):
        for name, classifier in classifiers.items():
            for _ in range(max(1, args.runs // args.rounds)):
                start = time.perf_counter()
                classifier.classify(image)
                times[name].append((time.perf_counter() - start) * 1000)
    rows = {name: {"median_ms": round(statistics.median(t), 1),
                   "p90_ms": round(sorted(t)[int(0.9 * len(t))], 1), "runs": len(t)}
            for name, t in times.items()}
    machine = f"{cpu_name()}, {machine_summary()}"
    result = {"machine": machine, "image": args.image.name, "rows": rows}
    common.save_json(args, "default_threads.json", result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{machine}; {args.image.name}; one classification (preprocessing + every view)")
    for name, row in rows.items():
        print(f"{name:26s} median {row['median_ms']:7.1f} ms   p90 {row['p90_ms']:7.1f} ms   "
              f"({row['runs']} runs)")


if __name__ == "__main__":
    main()
