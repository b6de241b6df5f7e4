"""Silencing warnings and library loggers around a decoder without leaving global state changed.

``warnings.catch_warnings`` swaps the process-wide filter list and puts it back on exit,
and a logger's level is process-wide too: two threads doing either at once restore each
other's state in the wrong order (a host program was left with every warning ignored, and
pydicom's logger silenced for good). Every such change in capsedge goes through the one
re-entrant lock here (also taken around silencing native stderr while a model loads), so
changes nest and are undone in order, whichever threads decode.
While a thread holds it, other threads' warnings are filtered the same way (the list is
the process's): decoding is short, and this is what Python before 3.14 allows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

#: Held while process-wide state (warnings filters, a logger, file descriptor 2) is swapped.
LOCK = threading.RLock()


@contextlib.contextmanager
def silenced(*loggers: str) -> Iterator[None]:
    """No warnings, and no records from the named loggers, inside."""
    with LOCK:
        saved = [(logging.getLogger(name), logging.getLogger(name).disabled) for name in loggers]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for logger, _ in saved:
                    logger.disabled = True
                yield
        finally:
            for logger, disabled in saved:
                logger.disabled = disabled


@contextlib.contextmanager
def warnings_raised(category: type[Warning]) -> Iterator[None]:
    """Warnings of ``category`` raised as exceptions inside (e.g. Pillow's decompression bomb)."""
    with LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", category)
        yield


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Hide what native code writes to file descriptor 2 (LiteRT's "INFO: Created ... delegate",
    GDCM's libjpeg notes).

    Python-level errors still surface as exceptions; only the C++ runtime's
    chatter on stderr, which would break the CLI's one-line error contract, is dropped.
    File descriptor 2 is the process's: threads loading models at once take turns (under
    :data:`LOCK`), so none restores another's silenced descriptor.
    """
    with LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
            yield
            return
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
