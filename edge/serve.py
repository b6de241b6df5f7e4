"""``capsedge serve``: the bedside service, an HTTP API and one page over :class:`Classifier`.

Starlette on uvicorn rather than FastAPI: the service has three routes and one
multipart field, so FastAPI's validation layer (pydantic and its compiled
core, more to install on a device than this whole extra) buys nothing here;
Starlette, uvicorn, python-multipart, anyio and h11 are pure Python, 3.8 MB
installed.

Uploads are read from the request stream under a byte bound and parsed by
python-multipart's streaming parser into memory: Starlette's ``request.form()``
would spool files over 1 MB to a temporary file, and an X-ray must never touch
the disk. Nothing here logs; uvicorn's access log carries the method, path and
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
import logging
import queue
import re
import socket
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .classifier import Classifier
from .errors import CapsedgeError

MIB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 50 * MIB
#: Requests holding a body in memory at once (reading, queued or classified); more get 503.
DEFAULT_MAX_UPLOADS = 8
#: Seconds a request body may take to arrive; slower ones get 408.
DEFAULT_BODY_TIMEOUT = 60.0
#: Host names the loopback service answers to (a page elsewhere reaching it by DNS rebinding
#: sends its own name).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: Room for the multipart framing (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
FILE_FIELD = "file"

#: Every response: no caching of patient images or results, no sniffing, nothing from elsewhere.
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
}

#: The page: (package resource, media type), served from memory.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


class UploadTooLarge(Exception):
    """The request body or the file in it is over the limit."""


class ClientGone(Exception):
    """The client hung up: the work for it is dropped."""


#: python-multipart logs parse errors (one quotes a raw body byte) on its module logger; each
#: parser gets this detached, disabled logger instead, so nothing reaches stderr and no global
#: logger is touched.
_SILENT = logging.Logger("capsedge.serve.multipart")
_SILENT.disabled = True


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


class FileField:
    """Streaming multipart callbacks that keep the first ``file`` part in memory, bounded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.data: bytearray | None = None
        self._in_file = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._in_file = self.data is None and params.get(b"name") == FILE_FIELD.encode()
        if self._in_file:
            self.data = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file and self.data is not None:
            if len(self.data) + (end - start) > self.max_bytes:
                raise UploadTooLarge
            self.data.extend(data[start:end])

    def _part_end(self) -> None:
        self._in_file = False


#: A Content-Length header: ASCII digits, no more than a 64-bit count has.
_DIGITS = re.compile(r"[0-9]{1,19}")


async def read_upload(request: Request, max_bytes: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> bytes:
    """The ``file`` field of a multipart request, read in memory with its size and time bounded.

    Raises:
        HTTPException: 413 over the limit (by Content-Length, before reading, or
            while streaming), 415 not multipart, 422 malformed or no ``file`` field,
            400 an invalid Content-Length, 408 the body took over ``timeout`` seconds.
    """
    too_large = HTTPException(413, f"upload too large (limit {max_bytes / MIB:g} MiB)")
    body_limit = max_bytes + MULTIPART_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and not _DIGITS.fullmatch(length):
        raise HTTPException(400, "invalid Content-Length")
    if length is not None and int(length) > body_limit:
        raise too_large
    try:
        media_type, params = parse_options_header(request.headers.get("content-type", ""))
    except Exception:  # noqa: BLE001 - a hostile header; its text is never quoted
        media_type, params = b"", {}
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise HTTPException(415, f"send the image as multipart/form-data, field '{FILE_FIELD}'")
    field = FileField(max_bytes)
    received = 0
    try:
        parser = MultipartParser(boundary, field.callbacks())
        parser.logger = _SILENT
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:
                    raise too_large
                parser.write(chunk)
        parser.finalize()
    except UploadTooLarge:
        raise too_large from None
    except FormParserError:  # every python-multipart error, the boundary's length included
        raise HTTPException(422, "malformed multipart body") from None
    except TimeoutError:
        raise HTTPException(408, f"upload took longer than {timeout:g} s") from None
    if field.data is None:
        raise HTTPException(422, f"no image: send it as the multipart field '{FILE_FIELD}'")
    request.state.body_read = True
    data, field.data = bytes(field.data), None
    return data


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


#: ``?explain=1`` asks for an occlusion overlay with this many squares per side; ``&grid=N``
#: (2 to 16) for another tiling.
EXPLAIN_GRID = 8


#: The query parameters ``/api/classify`` reads; anything else is refused.
QUERY_PARAMETERS = ("explain", "grid")
_FLAGS = {"0": False, "false": False, "1": True, "true": True}
#: ``grid``: one or two ASCII digits (``str.isdigit`` would take "²" and "①").
_GRID = re.compile(r"[0-9]{1,2}")
#: Longest query string read at all.
MAX_QUERY_LENGTH = 256


def explain_grid(request: Request) -> int:
    """Squares per side of the explanation asked for (0: none), from a strictly parsed query.

    Raises:
        HTTPException: 422 for an unknown, repeated or malformed parameter, or a ``grid`` that
            is not an integer from 2 to 16.
    """
    if len(request.scope.get("query_string", b"")) > MAX_QUERY_LENGTH:
        raise HTTPException(422, f"query string too long (over {MAX_QUERY_LENGTH} characters)")
    params = request.query_params
    if set(params) - set(QUERY_PARAMETERS):
        raise HTTPException(422, f"unknown query parameter; known: {', '.join(QUERY_PARAMETERS)}")
    if any(len(params.getlist(name)) > 1 for name in params):
        raise HTTPException(422, "a query parameter is repeated")
    explain = params.get("explain", "0")
    if explain not in _FLAGS:
        raise HTTPException(422, "explain must be 0, 1, true or false")
    grid = params.get("grid", str(EXPLAIN_GRID))
    if not _GRID.fullmatch(grid) or not 2 <= int(grid) <= 16:
        raise HTTPException(422, "grid must be an integer from 2 to 16")
    return int(grid) if _FLAGS[explain] else 0


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


#: A body left unread: the connection is closed after the answer, so a client cannot go on
#: trickling the rest of it into a kept-alive connection.
CLOSE = {"connection": "close"}


def _body_unread(request: Request) -> bool:
    return request.method not in ("GET", "HEAD") and not getattr(request.state, "body_read", False)


async def http_error(request: Request, exc: HTTPException) -> Response:
    headers = {**(exc.headers or {}), **(CLOSE if _body_unread(request) else {})}
    return error(exc.status_code, exc.detail, headers or None)


async def image_error(request: Request, exc: CapsedgeError) -> Response:
    # CapsedgeError messages are one line and never carry DICOM header values.
    return error(422, str(exc) or "cannot process the image")


async def client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=400)


async def internal_error(request: Request, exc: Exception) -> Response:
    return error(500, "internal error")


class HostCheck:
    """Answers only requests whose ``Host`` is one of ``allowed_hosts`` (port ignored), else
    400 in the API's JSON shape: Starlette's ``TrustedHostMiddleware`` does the same check with
    a plain-text answer."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = {host.lower() for host in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and host_name(Headers(scope=scope).get("host", "")) not in self.allowed:
            response = error(400, "invalid Host header", CLOSE)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The lower-case host of a ``Host`` header without its port (``[::1]`` keeps its brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else ""
    return header.partition(":")[0]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response (a plain ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


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
