"""Cross-validate several training recipes side by side and print one table.

Each recipe is the option string of ``capsedge train`` (without ``--data`` and
``--out``), run as ``capsedge train --folds K`` in its own process; ``--jobs``
of them at a time (on a GPU machine several small runs share the GPU well).
Results are read back from each run's ``cv_summary.json``, so a recipe that
already finished in ``--out`` is not trained again.

    python bench/cv_sweep.py --data DIR --out runs/sweep --jobs 4 \\
        "--epochs 60" "--epochs 300" "--epochs 300 --augment d4-strong"

With ``KERAS_BACKEND=jax`` (or ``torch``) the runs use that Keras backend.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common


def slug(recipe: str) -> str:
    """A folder name for a recipe's option string."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", recipe).strip("_") or "defaults"


def run_recipe(recipe: str, data: Path, out: Path, folds: int) -> tuple[str, dict | str]:
    """Cross-validate one recipe (unless done); its summary, or the tail of its log on failure."""
    run_dir = out / slug(recipe)
    summary = run_dir / "cv_summary.json"
    if not summary.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", "from capsedge.cli import main; main()", "train",
                   "--data", str(data), "--out", str(run_dir), "--folds", str(folds), *recipe.split()]
        if (run_dir / "cv_settings.json").is_file():
            command.append("--resume")
        start = time.perf_counter()
        with open(run_dir / "log.txt", "a", encoding="utf-8") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        (run_dir / "seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
        if done.returncode != 0:
            lines = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()
            return recipe, "failed: " + " | ".join(lines[-3:])
    return recipe, json.loads(summary.read_text())


def main() -> None:
    parser = common.parser(__doc__, out_required=True)
    parser.add_argument("recipes", nargs="+", help="capsedge train options, one string per recipe")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    data = common.data_folder(args)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda r: run_recipe(r, data, args.out, args.folds), args.recipes))
    print("| recipe | accuracy | macro-F1 | with test-time flips | per-class recall (pooled) | seconds |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for recipe, summary in results:
        seconds = (args.out / slug(recipe) / "seconds.txt")
        took = seconds.read_text().strip() if seconds.is_file() else ""
        if isinstance(summary, str):
            print(f"| `{recipe}` | {summary} | | | | {took} |")
            continue
        flips = summary.get("flips")
        flipped = (f"{100 * flips['accuracy_mean']:.1f} % ± {100 * flips['accuracy_std']:.1f}, "
                   f"F1 {flips['macro_f1_mean']:.3f}") if flips else ""
        per_class = summary["pooled"]["per_class"].items()
        recall = ", ".join(f"{name} {100 * c['recall']:.0f}" for name, c in per_class)
        print(f"| `{recipe}` | {100 * summary['accuracy_mean']:.1f} % ± {100 * summary['accuracy_std']:.1f} "
              f"| {summary['macro_f1_mean']:.3f} ± {summary['macro_f1_std']:.3f} | {flipped} | {recall} "
              f"| {took} |")


if __name__ == "__main__":
    main()
