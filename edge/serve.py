"""``capsedge serve``: the bedside service, an HTTP API and one page over :class:`Classifier`.

Starlette on uvicorn rather than FastAPI: the service has three routes and one
multipart field, so FastAPI's validation layer (pydantic and its compiled
core, more to install on a device than this whole extra) buys nothing here;
Starlette, uvicorn, python-multipart, anyio and h11 are pure Python, 3.8 MB
installed.

Uploads are read into memory, never to disk (:mod:`capsedge.serve_request`); every
request passes the ``Host`` check and gets the security headers (:mod:`capsedge.serve_guards`).
Nothing here logs; uvicorn's access log carries the method, path and
status, never a file name, a header value or the image.

Hostile clients meet fixed bounds (README, "Reliability"): at most ``max_uploads``
requests hold a body in memory at once (reading it, waiting for a classifier or being
classified; the next one gets 503), a body must arrive within ``body_timeout`` seconds
(408), a client that hangs up loses its place before inference and between explain's
steps, and only the expected ``Host`` names are answered (DNS rebinding). Header
timeouts and the connection cap live in :mod:`capsedge.connections`.
"""

from __future__ import annotations

import base64
import hmac
import io
import queue
import socket
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .classifier import Classifier
from .errors import CapsedgeError
from .serve_guards import (
    LOOPBACK_HOSTS,
    ClientGone,
    HostCheck,
    SecurityHeaders,
    client_gone,
    http_error,
    image_error,
    internal_error,
)
from .serve_request import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_UPLOAD_BYTES,
    MIB,
    MULTIPART_OVERHEAD,
    explain_grid,
    read_upload,
)

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_UPLOADS", "DEFAULT_MAX_UPLOAD_BYTES", "LOOPBACK_HOSTS", "MIB",
           "MULTIPART_OVERHEAD", "ClassifierPool", "create_app", "listen", "run"]

#: Requests holding a body in memory at once (reading, queued or classified); more get 503.
DEFAULT_MAX_UPLOADS = 8

#: The page: (package resource, media type), served from memory.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


class ClassifierPool:
    """One or more loaded classifiers; each request borrows a free one.

    One classifier is already thread-safe (its lock serialises inference);
    several let inferences run in parallel.
    """

    def __init__(self, classifiers: Sequence[Classifier]) -> None:
        if not classifiers:
            raise ValueError("at least one classifier is needed")
        self.first = classifiers[0]
        self.size = len(classifiers)
        self._free: queue.SimpleQueue[Classifier] = queue.SimpleQueue()
        for classifier in classifiers:
            self._free.put(classifier)

    def classify(self, data: bytes, explain_grid: int = 0,
                 gone: threading.Event | None = None) -> dict[str, Any]:
        """Classify encoded image bytes with the next free classifier (blocks until one is): the
        prediction's record, with ``explanation`` (an occlusion overlay as a PNG data URL) when
        ``explain_grid`` squares per side are asked for.

        Raises:
            ClientGone: ``gone`` was set before the inference or between explain's steps.
        """
        def check(*_: int) -> None:
            if gone is not None and gone.is_set():
                raise ClientGone

        classifier = self._free.get()
        try:
            check()
            record = classifier.classify(data).to_dict()
            if explain_grid:
                from .explain import occlusion_map, render_overlay

                check()
                explanation = occlusion_map(classifier, data, explain_grid, progress=check)
                png = io.BytesIO()
                render_overlay(explanation).save(png, format="PNG")
                record["explanation"] = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
                record["explanation_seconds"] = round(explanation.seconds, 3)
            return record
        finally:
            self._free.put(classifier)


async def watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set ``gone`` when the client hangs up (after its body was read, the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def create_app(
    classifier: Classifier | Sequence[Classifier],
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_uploads: int = DEFAULT_MAX_UPLOADS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
) -> Starlette:
    """The ASGI application: ``GET /api/health``, ``POST /api/classify``, the page at ``/``.

    Args:
        classifier: a loaded classifier, or several to run inferences in parallel.
        token: if given, every ``/api/`` call needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest accepted image file; larger uploads get 413.
        max_uploads: requests holding a body at once (reading, queued, classified); the next
            gets 503, so bodies never take more than ``max_uploads * max_upload_bytes``.
        body_timeout: seconds a request body may take to arrive (then 408).
        allowed_hosts: the ``Host`` names answered (others get 400); ``None`` answers any.
    """
    pool = ClassifierPool([classifier] if isinstance(classifier, Classifier) else list(classifier))
    slots = anyio.Semaphore(pool.size)
    uploads = anyio.Semaphore(max_uploads)
    expected = token.encode() if token is not None else None
    page = {
        path: (resources.files("capsedge").joinpath("static", name).read_bytes(), media_type)
        for path, (name, media_type) in PAGE_FILES.items()
    }

    def check_token(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of the token was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    async def health(request: Request) -> JSONResponse:
        check_token(request)
        return JSONResponse({
            "status": "ok",
            "model_version": pool.first.metadata.version,
            "labels": list(pool.first.labels),
        })

    async def classify(request: Request) -> JSONResponse:
        check_token(request)
        grid = explain_grid(request)
        if uploads.value == 0:  # the queue is bounded: answer now rather than hold another body
            raise HTTPException(503, "busy: too many uploads at once, try again",
                                headers={"Retry-After": "1"})
        async with uploads:
            data = await read_upload(request, max_upload_bytes, body_timeout)
            gone = threading.Event()
            failure: Exception | None = None
            async with anyio.create_task_group() as group:
                group.start_soon(watch_disconnect, request, gone)
                try:
                    # Queue on the event loop, first come first served (a thread lock is not
                    # fair), and hand a thread only as many requests as there are classifiers.
                    async with slots:
                        if gone.is_set():
                            raise ClientGone
                        record = await run_in_threadpool(pool.classify, data, grid, gone)
                except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                    failure = exc
                group.cancel_scope.cancel()
            del data
        if failure is not None:
            raise failure
        return JSONResponse(record)

    async def static(request: Request) -> Response:
        body, media_type = page[request.url.path]
        return Response(body, media_type=media_type)

    routes = [
        Route("/api/health", health, methods=["GET"]),
        Route("/api/classify", classify, methods=["POST"]),
        *(Route(path, static, methods=["GET"]) for path in page),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(HostCheck, allowed_hosts=allowed_hosts))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: http_error,
            CapsedgeError: image_error,
            ClientDisconnect: client_gone,
            ClientGone: client_gone,
            Exception: internal_error,
        },
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port).

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


#: Seconds a kept-alive connection may stay idle between requests (uvicorn's own timer).
KEEP_ALIVE_TIMEOUT = 5


def run(app: Starlette, sock: socket.socket, *, header_timeout: float | None = None,
        max_connections: int | None = None) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until interrupted (Ctrl-C or SIGTERM), with a
    header timeout, a keep-alive timeout and a cap on open connections
    (:mod:`capsedge.connections`)."""
    import uvicorn

    from .connections import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, guarded_protocol

    connections = max_connections or DEFAULT_MAX_CONNECTIONS
    config = uvicorn.Config(
        app, log_level="info", server_header=False, date_header=False,
        http=guarded_protocol(header_timeout or DEFAULT_HEADER_TIMEOUT, connections),
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT, limit_concurrency=connections + 1,
        # asyncio accepts up to ``backlog`` connections per wake-up before any is handled: more
        # than the cap at once would run the process out of file descriptors.
        backlog=connections,
    )
    uvicorn.Server(config).run(sockets=[sock])
