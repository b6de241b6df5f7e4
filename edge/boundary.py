"""The one error boundary of every ``capsedge`` command: a user's mistake becomes one line
on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

import click

from .errors import CapsedgeError, missing_extra, reason
from .extras import missing_package

EXIT_FAILED = 1


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\n``, ``\\x1b``):
    a file name cannot forge a line of output or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def fail(message: str) -> None:
    """Print a one-line error on stderr (the command goes on)."""
    click.echo(f"capsedge: error: {printable(message)}", err=True)


def fail_and_exit(message: str) -> NoReturn:
    """Print a one-line error on stderr and end the command with status 1."""
    fail(message)
    sys.exit(EXIT_FAILED)


@contextlib.contextmanager
def error_boundary(extra: str | None = None) -> Iterator[None]:
    """Turn what a user can cause into one line and exit status 1.

    ``CapsedgeError`` (its message), ``OSError`` (the file and the system's reason) and, for
    commands of an optional ``extra``, ``ImportError`` (what to install).
    """
    try:
        yield
    except CapsedgeError as exc:
        fail_and_exit(str(exc))
    except OSError as exc:
        why = reason(exc)
        fail_and_exit(f"{exc.filename}: {why}" if exc.filename else why)
    except ImportError as exc:
        package = missing_package(exc)
        if extra is None or package is None:
            raise
        fail_and_exit(str(missing_extra(package, extra)))


@contextlib.contextmanager
def quiet_native_logs(verbose: bool = False) -> Iterator[None]:
    """Around native libraries' work (TensorFlow's import, conversion, training; LiteRT): no
    chatter from their C++ on the user's terminal.

    TensorFlow's C++ lines (oneDNN notes, "Could not find cuda drivers", the converter's
    ``fully_quantize: 0, ...``, LiteRT's "Created TensorFlow Lite XNNPACK delegate") go to file
    descriptor 2 whatever the log level, so that descriptor points at the null device inside
    the block; Python's ``sys.stderr`` (capsedge's own progress and messages) keeps writing to
    the real one through a copy. ``TF_CPP_MIN_LOG_LEVEL=3`` keeps later C++ logging to errors.
    With ``verbose`` nothing is hidden.
    """
    if verbose:
        yield
        return
    import os

    from .quiet import native_stderr_silenced

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        sys.stderr.flush()
        on_descriptor_2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # captured (tests) or no stderr: nothing to keep
        on_descriptor_2 = False
    if not on_descriptor_2:
        with native_stderr_silenced():
            yield
        return
    python_stderr = sys.stderr
    copy = os.fdopen(os.dup(2), "w", buffering=1, encoding=python_stderr.encoding,
                     errors=python_stderr.errors)
    sys.stderr = copy
    try:
        with native_stderr_silenced():
            yield
    finally:
        sys.stderr = python_stderr
        copy.close()


def import_tensorflow_quietly(verbose: bool = False) -> None:
    """Import TensorFlow and Keras now, under :func:`quiet_native_logs`, and keep their Python
    loggers to errors (unless ``verbose``). With another Keras backend (``KERAS_BACKEND=jax``
    on a GPU machine without TensorFlow), Keras alone."""
    import logging

    with quiet_native_logs(verbose):
        import keras
        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf
    if not verbose:
        tf.get_logger().setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)
