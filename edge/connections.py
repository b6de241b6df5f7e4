"""Connection limits for ``capsedge serve``: a header timeout and a cap on open connections.

uvicorn bounds the time between requests on a kept-alive connection (``timeout_keep_alive``)
and answers 503 over ``limit_concurrency``, but it waits for a request's headers without a
limit and accepts every connection: idle and slow-header clients (slowloris) pile up until
``accept`` fails with "Too many open files" and nobody is served. Its h11 protocol, extended
here, adds both:

- **header timeout**: a connection whose request headers are not complete within
  ``header_timeout`` seconds of its first byte (or of its opening) is closed;
- **connection cap**: when ``max_connections`` are open, a new connection first evicts the
  oldest one still waiting for its headers (a request in progress is never cut); if every
  connection is busy with a request, the new one is closed at once. File descriptors stay
  bounded, and a client that sends its request promptly is served while slow ones wait.

Imported only by :func:`capsedge.serve.run` (uvicorn is the ``serve`` extra).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds a client may take to send a request's headers.
DEFAULT_HEADER_TIMEOUT = 10.0
#: Open connections at most; the oldest waiting for headers makes room for a new one.
DEFAULT_MAX_CONNECTIONS = 64


def guarded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                     max_connections: int = DEFAULT_MAX_CONNECTIONS) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header timeout and a connection cap (``Config(http=...)``)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._waiting_since = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            others = [c for c in self.connections if isinstance(c, GuardedH11Protocol)]
            super().connection_made(transport)
            if len(others) >= max_connections:
                idle = [c for c in others if c._awaiting_headers() and not c.transport.is_closing()]
                if not idle:
                    transport.close()
                    return
                min(idle, key=lambda c: c._waiting_since)._close()
            self._start_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._awaiting_headers():
                self._start_header_timer()  # the first byte of a request on a kept-alive connection
            super().data_received(data)
            if not self._awaiting_headers():
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            # An answer given before the body was read (413, 401, 503, ...): close, so the client
            # cannot trickle the rest of that body into the connection for ever.
            unread = self.conn.their_state is h11.SEND_BODY
            super().on_response_complete()
            if unread:
                self._close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            """No request in progress: between requests, or part of a request line or headers."""
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self._waiting_since = self.loop.time()
            self._header_timer = self.loop.call_later(header_timeout, self._close)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _close(self) -> None:
            self._stop_header_timer()
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
