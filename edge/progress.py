"""A one-line progress bar on stderr with time left; quiet until the work looks slow.

On a terminal it redraws one line in place; in a log (stderr not a terminal) it writes
only the final line, so logs get one line per task.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Work expected to finish sooner than this shows no bar.
SHOW_AFTER_SECONDS = 1.0


class ProgressBar:
    """Call :meth:`update` with ``(done, total)``; :meth:`close` when finished."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 24,
                 show_after: float = SHOW_AFTER_SECONDS) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.show_after = show_after
        self.start = time.perf_counter()
        self.shown = False
        self.last = ""
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, done: int, total: int) -> str:
        """The bar's text for ``done`` of ``total``."""
        elapsed = time.perf_counter() - self.start
        fraction = min(1.0, done / total) if total else 1.0
        filled = round(fraction * self.width)
        left = elapsed / fraction - elapsed if fraction > 0 else 0.0
        tail = f"{elapsed:.1f} s" if done >= total else f"{left:.1f} s left"
        return f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {tail}"

    def update(self, done: int, total: int) -> None:
        """Record progress; draw when the whole job is expected to take over ``show_after``."""
        elapsed = time.perf_counter() - self.start
        expected = elapsed * total / done if done else 0.0
        self.last = self.line(done, total)
        if not self.shown and expected < self.show_after:
            return
        self.shown = True
        if self.interactive:
            self.stream.write("\r" + self.last)
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (or, in a log, write its final state once)."""
        if not self.shown:
            return
        self.stream.write(("\r" + self.last + "\n") if self.interactive else self.last + "\n")
        self.stream.flush()
