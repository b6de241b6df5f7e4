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
