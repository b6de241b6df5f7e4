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
"""

from __future__ import annotations

import base64
import hmac
import io
import queue
import socket
from collections.abc import Sequence
from importlib import resources
from typing import Any

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
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

    def classify(self, data: bytes, explain_grid: int = 0) -> dict[str, Any]:
        """Classify encoded image bytes with the next free classifier (blocks until one is): the
        prediction's record, with ``explanation`` (an occlusion overlay as a PNG data URL) when
        ``explain_grid`` squares per side are asked for."""
        classifier = self._free.get()
        try:
            record = classifier.classify(data).to_dict()
            if explain_grid:
                from .explain import occlusion_map, render_overlay

                explanation = occlusion_map(classifier, data, explain_grid)
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


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The ``file`` field of a multipart request, read in memory with its size bounded.

    Raises:
        HTTPException: 413 over the limit (by Content-Length, before reading, or
            while streaming), 415 not multipart, 422 malformed or no ``file`` field.
    """
    too_large = HTTPException(413, f"upload too large (limit {max_bytes / MIB:g} MiB)")
    body_limit = max_bytes + MULTIPART_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > body_limit:
        raise too_large
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise HTTPException(415, f"send the image as multipart/form-data, field '{FILE_FIELD}'")
    field = FileField(max_bytes)
    parser = MultipartParser(boundary, field.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except UploadTooLarge:
        raise too_large from None
    except MultipartParseError:
        raise HTTPException(422, "malformed multipart body") from None
    if field.data is None:
        raise HTTPException(422, f"no image: send it as the multipart field '{FILE_FIELD}'")
    return bytes(field.data)


def create_app(
    classifier: Classifier | Sequence[Classifier],
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> Starlette:
    """The ASGI application: ``GET /api/health``, ``POST /api/classify``, the page at ``/``.

    Args:
        classifier: a loaded classifier, or several to run inferences in parallel.
        token: if given, every ``/api/`` call needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest accepted image file; larger uploads get 413.
    """
    pool = ClassifierPool([classifier] if isinstance(classifier, Classifier) else list(classifier))
    slots = anyio.Semaphore(pool.size)
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
        data = await read_upload(request, max_upload_bytes)
        # Queue on the event loop, first come first served (a thread lock is not fair), and
        # hand a thread only as many requests as there are classifiers.
        async with slots:
            record = await run_in_threadpool(pool.classify, data, explain_grid(request))
        return JSONResponse(record)

    async def static(request: Request) -> Response:
        body, media_type = page[request.url.path]
        return Response(body, media_type=media_type)

    routes = [
        Route("/api/health", health, methods=["GET"]),
        Route("/api/classify", classify, methods=["POST"]),
        *(Route(path, static, methods=["GET"]) for path in page),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            HTTPException: http_error,
            CapsedgeError: image_error,
            ClientDisconnect: client_gone,
            Exception: internal_error,
        },
    )


#: ``?explain=1`` asks for an occlusion overlay with this many squares per side; ``&grid=N``
#: (2 to 16) for another tiling.
EXPLAIN_GRID = 8


def explain_grid(request: Request) -> int:
    """Squares per side of the explanation asked for (0: none).

    Raises:
        HTTPException: 422 for a ``grid`` that is not an integer from 2 to 16.
    """
    if request.query_params.get("explain") not in ("1", "true"):
        return 0
    grid = request.query_params.get("grid", str(EXPLAIN_GRID))
    if not grid.isdigit() or not 2 <= int(grid) <= 16:
        raise HTTPException(422, "grid must be an integer from 2 to 16")
    return int(grid)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, exc.detail, exc.headers)


async def image_error(request: Request, exc: CapsedgeError) -> Response:
    # CapsedgeError messages are one line and never carry DICOM header values.
    return error(422, str(exc) or "cannot process the image")


async def client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=400)


async def internal_error(request: Request, exc: Exception) -> Response:
    return error(500, "internal error")


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


def run(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` with uvicorn until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="info", server_header=False, date_header=False)
    uvicorn.Server(config).run(sockets=[sock])
