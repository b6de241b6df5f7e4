"""What every bench script shares: the options ``--data`` and ``--out``, and where the data is.

``--data`` is the folder of labelled X-rays (default: ``$CAPSEDGE_DATA``); ``--out`` the folder
a script writes its results into. Without ``--out`` a script prints its figures and writes
nothing (a script whose whole result is a file requires it). No script writes anywhere else:
not into a run folder, not into the working directory, unless that folder is its ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from capsedge.workshop.run import RunDir

#: Environment variables naming the data folders when ``--data`` (``--mnist``) is not given.
DATA_ENV = "CAPSEDGE_DATA"
MNIST_ENV = "CAPSEDGE_MNIST"
#: The README's example X-ray, the one image the timing scripts classify.
EXAMPLE_IMAGE = "Depuy.5.jpg"


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def parser(doc: str | None, *, data: bool = True, out: bool = True, out_required: bool = False,
           mnist: bool = False) -> argparse.ArgumentParser:
    """An argument parser described by ``doc`` with the shared options a script asks for."""
    lines = (doc or "").strip().splitlines()
    result = argparse.ArgumentParser(description=lines[0] if lines else None,
                                     epilog="\n".join(lines[1:]).strip() or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if data:
        result.add_argument("--data", type=Path, default=_from_env(DATA_ENV),
                            help=f"folder of labelled X-rays (default: ${DATA_ENV})")
    if mnist:
        result.add_argument("--mnist", type=Path, default=_from_env(MNIST_ENV),
                            help=f"folder of MNIST's t10k-*.gz files (default: ${MNIST_ENV})")
    if out:
        result.add_argument("--out", type=Path, required=out_required, default=None,
                            help="folder to write the results into" + ("" if out_required
                                                                       else " (default: print only)"))
    return result


def folder(path: Path | None, option: str = "--data", env: str = DATA_ENV) -> Path:
    """``path`` when it is a folder; otherwise exit with one line saying what to give."""
    if path is None:
        sys.exit(f"bench: no data folder: give {option} DIR or set {env}")
    if not path.is_dir():
        sys.exit(f"bench: {option} {path} is not a folder")
    return path


def data_folder(args: argparse.Namespace) -> Path:
    """The X-ray folder of ``--data`` (or ``$CAPSEDGE_DATA``), or exit saying it is missing."""
    return folder(args.data)


def mnist_folder(args: argparse.Namespace) -> Path:
    """The MNIST folder of ``--mnist`` (or ``$CAPSEDGE_MNIST``), or exit saying it is missing."""
    return folder(args.mnist, "--mnist", MNIST_ENV)


def example_image(args: argparse.Namespace) -> Path:
    """The README's example X-ray in the data folder."""
    image = data_folder(args) / EXAMPLE_IMAGE
    if not image.is_file():
        sys.exit(f"bench: no {EXAMPLE_IMAGE} in {args.data}; name an image")
    return image


def out_path(args: argparse.Namespace, name: str) -> Path | None:
    """Where to write the result file ``name``: in ``--out`` (created), or None without it."""
    if args.out is None:
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out / name


def save_json(args: argparse.Namespace, name: str, result: Any) -> Path | None:
    """Write ``result`` as ``--out``/``name`` (indented JSON); the path, or None without ``--out``."""
    path = out_path(args, name)
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def finished_folds(cv: Path, numbers: str | None = None) -> list[RunDir]:
    """The finished fold runs of a ``capsedge train --folds K`` folder, all or the
    comma-separated ``numbers``; names each one left out (a cross-validation still training, or
    stopped mid-way, is scored on what it has), and exits with a message when none is finished."""
    from capsedge.workshop.run import CrossValidation

    runs = CrossValidation(cv)
    folds = runs.folds() if numbers is None else [runs.fold(int(k)) for k in numbers.split(",")]
    finished = []
    for fold in folds:
        if fold.is_finished():
            finished.append(fold)
        else:
            print(f"{fold.path.name}: not finished, left out", flush=True)
    if not finished:
        raise SystemExit(f"{cv}: no finished fold")
    return finished


def add_stored_answer_options(parser: argparse.ArgumentParser) -> None:
    """``--views`` and ``--format``: which of a cross-validation's stored answers a script reads
    (see :func:`averaged_answers`)."""
    from capsedge.views import VIEW_COUNTS

    parser.add_argument("--views", type=int, default=16, choices=VIEW_COUNTS,
                        help="test-time views averaged (default 16)")
    parser.add_argument("--format", choices=("float", "int8"), default="float",
                        help="the float models' answers or the int8 files' (default float)")


def averaged_answers(fold: RunDir, views: int, fmt: str | None) -> np.ndarray:
    """A fold's stored held-out answers (the float model's, or with ``fmt`` those ``capsedge export
    --score-folds`` saved) averaged over their first ``views`` test-time views; exits with a
    message when they are missing or hold fewer views."""
    from capsedge.workshop.run import average_views

    if not fold.views_file(fmt).is_file():
        raise SystemExit(f"{fold.path}: no {fold.views_file(fmt).name} (score the folds first)")
    stored = fold.read_views(fmt)
    if stored.shape[1] < views:
        raise SystemExit(f"{fold.path}: {stored.shape[1]} views stored, {views} asked for")
    return average_views(stored, views)


def quietly(main: Callable[[], object]) -> None:
    """Run a script's ``main`` that loads TensorFlow or LiteRT with their C++ start-up and
    conversion lines kept off the terminal (``capsedge.boundary.quiet_native_logs``; the script's
    own printing still shows), and a capsedge error (a folder that is no run, a missing model)
    as one line and exit status 1, as the other ``bench:`` messages."""
    from capsedge.boundary import printable, quiet_native_logs
    from capsedge.errors import CapsedgeError

    try:
        with quiet_native_logs():
            main()
    except CapsedgeError as exc:
        sys.exit(f"bench: {printable(str(exc))}")
