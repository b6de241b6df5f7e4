"""One-byte mutants of a .tflite file: how often one changed byte brings LiteRT down, and whether
capsedge's model guard turns each such file into a one-line error.

Usage: python bench/model_fuzz.py [--model FILE] [--mutants 400] [--seed 0] [--workers 1] [--out DIR]

Each mutant is the file (the bundled model by default) with one byte replaced: an offset and
another value drawn with ``--seed``. Each is tried as the guard tries a file that is not the
bundled one (``capsedge.model_guard.trial``: loaded, allocated and run once on zeros in a child
process) and counted by how the child ended: it runs, the runtime raised an error (which the
in-process load words as a ``ModelError``), it crashed (a signal or an abort: what the guard is
for) or it hung. Every mutant that does not run is then loaded in this process with
``Classifier.load``, which must fail with a ``ModelError`` (capsedge's one-line error), never
another exception and never bring this process down; the script exits 1 otherwise. Prints
the counts and the crashing ``(offset, value)`` pairs; ``tests/test_hardening.py`` records one
of those for the bundled file as ``CRASHING_BYTE`` (a new bundled file needs a new one). With
``--out``, also OUT/model_fuzz.json.
"""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import common
import numpy as np

from capsedge.model_guard import TrialOutcome, trial
from capsedge.progress import Progress

#: How a trial can end, in the order the counts are printed.
OUTCOMES = get_args(TrialOutcome)


def draw_mutants(size: int, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` (offset, value) pairs at distinct offsets of a ``size``-byte file; each value is
    applied as ``(old + value) % 256`` by :func:`mutate`, so ``value`` in 1..255 always changes it."""
    rng = np.random.default_rng(seed)
    offsets = rng.choice(size, size=min(count, size), replace=False)
    shifts = rng.integers(1, 256, size=len(offsets))
    return [(int(o), int(s)) for o, s in zip(offsets, shifts, strict=True)]


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with the byte at ``offset`` set to ``value``."""
    changed = bytearray(data)
    changed[offset] = value
    return bytes(changed)


def mutate(data: bytes, offset: int, shift: int) -> tuple[bytes, int]:
    """``data`` with the byte at ``offset`` shifted by ``shift`` (mod 256); the bytes and the new value."""
    value = (data[offset] + shift) % 256
    return with_byte(data, offset, value), value


def try_mutant(data: bytes, offset: int, shift: int, folder: Path) -> tuple[int, int, str]:
    """The mutant's offset, new byte value and how its trial ended."""
    changed, value = mutate(data, offset, shift)
    path = folder / f"mutant-{offset}.tflite"
    path.write_bytes(changed)
    try:
        outcome = trial(path) or "no child"
    finally:
        path.unlink()
    return offset, value, outcome


def load_outcome(data: bytes, offset: int, value: int, folder: Path) -> str:
    """What ``Classifier.load`` of the file with byte ``offset`` set to ``value`` does: ``"ModelError"``
    (the one-line error capsedge promises for a corrupt file), another exception's name, or
    ``"loaded"``."""
    from capsedge import Classifier
    from capsedge.errors import ModelError

    path = folder / f"load-{offset}.tflite"
    path.write_bytes(with_byte(data, offset, value))
    try:
        Classifier.load(path)
    except ModelError:
        return "ModelError"
    except Exception as error:  # noqa: BLE001 - any other exception is what this looks for
        return type(error).__name__
    finally:
        path.unlink()
    return "loaded"


def main() -> None:
    parser = common.parser(__doc__, data=False)
    parser.add_argument("--model", type=Path, default=None, help="a .tflite file (default: the bundled one)")
    parser.add_argument("--mutants", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="trials at once (a child process each)")
    args = parser.parse_args()
    from capsedge.classifier import default_model_path

    model = args.model or default_model_path()
    data = model.read_bytes()
    mutants = draw_mutants(len(data), args.mutants, args.seed)
    results: list[tuple[int, int, str]] = []
    with tempfile.TemporaryDirectory() as scratch, Progress("trials", len(mutants)) as progress, \
            ThreadPoolExecutor(max(1, args.workers)) as pool:
        folder = Path(scratch)
        for result in pool.map(lambda m: try_mutant(data, *m, folder), mutants):
            results.append(result)
            progress.update(len(results))
        failing = [(offset, value, outcome) for offset, value, outcome in results if outcome != "runs"]
        loads = [load_outcome(data, offset, value, folder) for offset, value, _ in failing]
    counts = {outcome: sum(r[2] == outcome for r in results) for outcome in OUTCOMES}
    crashes = sorted((offset, value) for offset, value, outcome in failing if outcome == "crash")
    unguarded = [f"{offset}={value} ({outcome}): {load}"
                 for (offset, value, outcome), load in zip(failing, loads, strict=True)
                 if load != "ModelError"]
    print(f"{model.name}: {len(data):,} bytes, {len(results)} one-byte mutants (seed {args.seed})")
    for outcome, count in counts.items():
        print(f"  {outcome:>5}: {count:4d}  ({100 * count / len(results):.1f} %)")
    print(f"crashing (offset, value): {crashes}")
    print(f"mutants that do not run, refused by Classifier.load with a ModelError: "
          f"{len(failing) - len(unguarded)}/{len(failing)}")
    for line in unguarded:
        print(f"  not a ModelError: {line}")
    common.save_json(args, "model_fuzz.json", {
        "model": str(model), "bytes": len(data), "mutants": len(results), "seed": args.seed, "counts": counts,
        "crashing": crashes, "not_model_error": unguarded})
    if unguarded:
        sys.exit(1)


if __name__ == "__main__":
    main()
