"""Progress of a long step on stderr: a tqdm bar on a terminal, plain lines in a log.

tqdm (a dependency of ``ai-edge-litert``, so already on every device) draws the bar; it
redraws with carriage returns, which a log file keeps as one garbled line, so when stderr is
not a terminal this module writes a plain line now and then instead. Work that ends sooner
than ``show_after`` seconds shows nothing.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

#: Work expected to finish sooner than this shows no bar.
SHOW_AFTER_SECONDS = 1.0
#: In a log, at most one line per this many seconds (and the last).
LOG_EVERY_SECONDS = 30.0


class Progress:
    """Call :meth:`update` with ``(done, total)``, then :meth:`close` (or use ``with``)."""

    def __init__(self, label: str, total: int = 0, stream: TextIO | None = None,
                 show_after: float | None = None, log_every: float | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.show_after = SHOW_AFTER_SECONDS if show_after is None else show_after
        self.log_every = LOG_EVERY_SECONDS if log_every is None else log_every
        self.start = time.perf_counter()
        self.done = 0
        self.note = ""
        self.logged_at: float | None = None
        self.last: tuple[int, str] | None = None
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=self.stream, delay=self.show_after, leave=True,
                            dynamic_ncols=True, unit="step")

    def line(self) -> str:
        """The plain line a log gets: ``label: done/total (note), elapsed``."""
        elapsed = time.perf_counter() - self.start
        note = f" {self.note}" if self.note else ""
        return f"{self.label}: {self.done}/{self.total}{note} ({elapsed:.1f} s)"

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """Record that ``done`` of ``total`` steps are finished; ``note`` names the current one."""
        self.done, self.note = done, note
        if total is not None:
            self.total = total
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.start < self.show_after:
            return
        if self.logged_at is None or now - self.logged_at >= self.log_every:
            self._log(now)

    def close(self) -> None:
        """End the bar (in a log: write the last line, if the work was slow enough to show)."""
        if self.bar is not None:
            self.bar.close()
            return
        now = time.perf_counter()
        slow = self.logged_at is not None or now - self.start >= self.show_after
        if slow and self.done and self.last != (self.done, self.note):  # nothing done: nothing to say
            self._log(now)

    def _log(self, now: float) -> None:
        self.logged_at, self.last = now, (self.done, self.note)
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
