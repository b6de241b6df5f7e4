"""What ``capsedge serve`` reads from a request, within bounds: the uploaded image, in memory
(its size and arrival time limited), and the strictly parsed query.

Uploads are read from the request stream under a byte bound and parsed by
python-multipart's streaming parser into memory: Starlette's ``request.form()``
would spool files over 1 MB to a temporary file, and an X-ray must never touch
the disk.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .limits import DEFAULT_GRID, MAX_SERVED_GRID, MIN_GRID

MIB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 50 * MIB
#: Seconds a request body may take to arrive; slower ones get 408.
DEFAULT_BODY_TIMEOUT = 60.0
#: Room for the multipart framing (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
FILE_FIELD = "file"


class UploadTooLarge(Exception):
    """The request body or the file in it is over the limit."""


#: python-multipart logs parse errors (one quotes a raw body byte) on its module logger; each
#: parser gets this detached, disabled logger instead, so nothing reaches stderr and no global
#: logger is touched.
_SILENT = logging.Logger("capsedge.serve.multipart")
_SILENT.disabled = True


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


#: ``?explain=1`` asks for an occlusion overlay with this many squares per side; ``&grid=N``
#: (:data:`~capsedge.limits.MIN_GRID` to :data:`~capsedge.limits.MAX_SERVED_GRID`) for another tiling.
EXPLAIN_GRID = DEFAULT_GRID


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
            is not an integer from :data:`~capsedge.limits.MIN_GRID` to
            :data:`~capsedge.limits.MAX_SERVED_GRID`.
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
    if not _GRID.fullmatch(grid) or not MIN_GRID <= int(grid) <= MAX_SERVED_GRID:
        raise HTTPException(422, f"grid must be an integer from {MIN_GRID} to {MAX_SERVED_GRID}")
    return int(grid) if _FLAGS[explain] else 0
