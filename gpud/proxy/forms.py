"""Multipart form bodies (speech-to-text): the `model` field, and the body streamed through.

`/v1/audio/transcriptions` and `/v1/audio/translations` take a multipart form: an audio
file beside fields, `model` among them. gpud reads the body only as far as the end of the
`model` field (clients send fields before files: OpenAI's SDK through httpx does), then
relays what it read and streams the rest from the client's socket to the engine's, so a
large upload is never held whole in memory. An alias is rewritten inside that prefix only.
No routing and no I/O beyond reading the client's body.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from .api import ModelRoute
from .auth import ApiKey
from .errors import Reject, error_response
from .routing import route_named

_READ: Final = 64 * 1024
# The part header of the `model` field, up to its value (RFC 7578: name="model").
_MODEL_PART: Final = re.compile(rb'Content-Disposition:[^\r\n]*;\s*name="model"[^\r\n]*\r\n'
                                rb'(?:[^\r\n]+\r\n)*\r\n', re.IGNORECASE)


@dataclass(slots=True)
class StreamedBody:
    """A request body relayed as it arrives: `prefix` (already read, possibly rewritten),
    then the rest of the client's body; `length` is the whole relayed length, or None when
    the client sent it chunked (relayed chunked too)."""

    prefix: bytes
    rest: AsyncIterator[bytes]
    length: int | None


def _boundary(request: web.Request) -> bytes:
    ctype = request.headers.get("Content-Type", "")
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not ctype.lower().startswith("multipart/form-data") or m is None:
        raise Reject(error_response(
            400, f"{request.path} takes a multipart/form-data body (an audio file and a "
            "`model` field).", "not_multipart"))
    return b"\r\n--" + m.group(1).encode("latin-1")


def _find_model(buf: bytes, end_marker: bytes) -> tuple[int, int] | None:
    """(start, end) of the `model` field's value in `buf`, once the whole value is there."""
    m = _MODEL_PART.search(buf)
    if m is None:
        return None
    end = buf.find(end_marker, m.end())
    return None if end < 0 else (m.end(), end)


async def read_model_field(request: web.Request, limit: int) -> tuple[str, bytes, int, int]:
    """Read the body up to the end of its `model` field: (the model, the bytes read, and
    the value's start and end in them). 400 when the form has no `model` field."""
    end_marker = _boundary(request)
    buf = b""
    while (span := _find_model(buf, end_marker)) is None:
        chunk = await request.content.read(_READ)
        if not chunk:
            raise Reject(error_response(
                400, "Name the model in the form's `model` field.", "model_required",
                param="model"))
        buf += chunk
        if len(buf) > limit:
            raise Reject(error_response(
                413, f"No `model` field in the first {limit} bytes of the form.",
                "body_too_large"))
    start, end = span
    try:
        return buf[start:end].decode().strip(), buf, start, end
    except UnicodeDecodeError:
        raise Reject(error_response(400, "The form's `model` field is not UTF-8.",
                                    "bad_model", param="model")) from None


def streamed(request: web.Request, buf: bytes, span: tuple[int, int],
             rename: str | None) -> StreamedBody:
    """The body to relay: what was read (with `model` set to `rename`, when an alias was
    asked for) and then the rest of the client's body as it arrives."""
    length = request.content_length
    if rename is not None:
        start, end = span
        new = rename.encode()
        buf = buf[:start] + new + buf[end:]
        if length is not None:
            length += len(new) - (end - start)
    return StreamedBody(buf, request.content.iter_any(), length)


async def form_route(
    request: web.Request, routes: Mapping[str, ModelRoute],
    resolve: Callable[[str], ModelRoute | None], key: ApiKey | None, limit: int,
) -> tuple[StreamedBody, ModelRoute, str | None]:
    """A multipart request's route (from its `model` field), the body to relay, and the
    alias it asked for (None: the model's own name)."""
    name, buf, start, end = await read_model_field(request, limit)
    route, asked = route_named(routes, resolve, name, key)
    body = streamed(request, buf, (start, end), None if asked is None else route.name)
    return body, route, asked
