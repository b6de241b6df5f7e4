"""Whole-process time of `capsedge classify` on one X-ray, and of one classification in-process.

Usage: python bench/classify_process.py [IMAGE] [--model FILE] [--data DIR] [--runs N] [--json] [--out DIR]

IMAGE defaults to Depuy.5.jpg of the data folder; the model to the bundled one (--model: an
exported file, e.g. a candidate before it is bundled). Prints a small table (or --json; with
--out, also OUT/classify_process.json); run on the machine you want to describe and
name that machine when you quote the figures.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common


def time_process(command: list[str], runs: int) -> list[float]:
    """Wall-clock seconds of ``command``, ``runs`` times, after one untimed warm-up run."""
    subprocess.run(command, check=True, capture_output=True)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("image", nargs="?", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--model", type=Path, default=None, help="an exported model (default: bundled)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.image = args.image or common.example_image(args)

    capsedge = shutil.which("capsedge") or sys.exit("capsedge is not installed (pip install .)")
    chosen = ["--model", str(args.model)] if args.model is not None else []
    process = time_process([capsedge, "classify", *chosen, str(args.image)], args.runs)

    from capsedge import Classifier

    start = time.perf_counter()
    classifier = Classifier.load(args.model)
    load_ms = (time.perf_counter() - start) * 1000
    latencies = [classifier.classify(args.image).latency_ms for _ in range(50)]
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "image": args.image.name,
        "model": classifier.metadata.version,
        "test_time_views": classifier.test_time_views,
        "process_seconds_median": round(statistics.median(process), 3),
        "process_seconds_max": round(max(process), 3),
        "runs": args.runs,
        "in_process_load_ms": round(load_ms, 1),
        "in_process_classify_ms_median": round(statistics.median(latencies), 2),
    }
    common.save_json(args, "classify_process.json", result)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
