"""What every request of ``capsedge serve`` passes: the ``Host`` check (DNS rebinding), the
security headers, and the one error shape its exception handlers answer with."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import CapsedgeError

#: Host names the loopback service answers to (a page elsewhere reaching it by DNS rebinding
#: sends its own name).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

#: Every response: no caching of patient images or results, no sniffing, nothing from elsewhere.
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
}


class ClientGone(Exception):
    """The client hung up: the work for it is dropped."""


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
