"""The options several ``capsedge`` commands share, defined once (pip-tools' ``scripts/options.py``).

``--model``, ``--backend`` and ``--threads`` mean the same wherever they appear: ``classify``,
``explain`` and ``serve`` take one value each; ``bench`` takes comma-separated lists of backends
and thread counts (``many=True``) and times every pair. A command of another floor adds one
with the decorator, e.g.::

    from capsedge.cli_options import model_option, threads_option

    @click.command()
    @model_option()
    @threads_option()
    def command(model_path: Path | None, threads: int | None) -> None: ...

Only click and the limits are imported here: ``capsedge --help`` loads no runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .boundary import fail_and_exit
from .limits import MAX_THREADS

F = TypeVar("F", bound=Callable[..., Any])

#: The names ``--backend`` accepts (checked when the model is opened: :func:`capsedge.backends.open_backend`).
BACKEND_NAMES = "auto (from the model file), litert, onnxruntime or edgetpu"
MODEL_HELP = "An exported model (.tflite or .onnx). Default: the bundled model."
THREADS_HELP = "CPU threads for inference. Default: the usable cores, at most 4."


def model_option(help: str = MODEL_HELP) -> Callable[[F], F]:
    """``--model PATH`` -> ``model_path`` (``None``: the bundled model)."""
    return click.option("--model", "model_path", type=click.Path(path_type=Path), default=None, help=help)


def backend_option(*, many: bool = False) -> Callable[[F], F]:
    """``--backend NAME`` -> ``backend`` (a string); with ``many``, comma-separated names ->
    ``backends`` (a non-empty list)."""
    if not many:
        return click.option("--backend", default="auto", show_default=True, help=f"{BACKEND_NAMES}.")
    return click.option("--backend", "backends", default="auto", show_default=True, callback=_backend_list,
                        help=f"Comma-separated: {BACKEND_NAMES}.")


def threads_option(*, many: bool = False, help: str = THREADS_HELP) -> Callable[[F], F]:
    """``--threads N`` -> ``threads`` (``None``: the default); with ``many``, comma-separated
    counts -> ``thread_counts`` (a non-empty list, default ``[1]``)."""
    if not many:
        return click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help=help)
    return click.option("--threads", "thread_counts", default="1", show_default=True, callback=_thread_list,
                        help="Comma-separated thread counts, e.g. 1,2,4.")


def _backend_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        fail_and_exit(f"--backend must name at least one backend, got {value!r}")
    return names


def _thread_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        counts = [int(count) for count in value.split(",") if count.strip()]
    except ValueError:
        counts = []
    if not counts or not all(1 <= count <= MAX_THREADS for count in counts):
        fail_and_exit(f"--threads must be comma-separated integers from 1 to {MAX_THREADS}, got {value!r}")
    return counts
