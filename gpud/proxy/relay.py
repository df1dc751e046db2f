"""Relaying an engine's answer to the client: whole, or streamed chunk by chunk.

Never buffers a streamed body and never re-encodes a relayed one (an alias is written back
into `"model"` keys only). No routing, no state beyond the one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict

from .api import ModelRoute
from .errors import broken
from .keepalive import HeldStream, end_in_band
from .upstream import UpstreamError, UpstreamResponse

RELAY_RESPONSE_HEADERS: Final = (
    ("content-type", "Content-Type"),
    ("content-encoding", "Content-Encoding"),
    ("x-request-id", "X-Request-Id"),
)
SSE: Final = "text/event-stream"

MARKS = web.RequestKey("gpud_timing_marks", dict)
# The last two chunks of a streamed answer (its `usage`, if sent), for the activity log.
TAIL = web.RequestKey("gpud_stream_tail", bytes)
# A stream relayed to its end: (the response, seconds to its first chunk). A client that
# closes once it has read the end (`data: [DONE]`) can do so before the engine's socket
# ends or while the last bytes drain: the request was answered, not abandoned (499).
RELAYED = web.RequestKey("gpud_stream_relayed", tuple)
_ENDS = b"data: [DONE]"  # an OpenAI stream's last event
_ENDS_MESSAGES = b"message_stop"  # an Anthropic Messages stream's


def mark(request: web.Request, name: str) -> None:
    """A timing mark of the request (ms since arrival), when marks are kept (a test hook)."""
    marks = request.get(MARKS)
    if marks is not None:
        marks[name] = round((time.perf_counter() - marks["t0"]) * 1000, 3)


class _StreamResponse(web.StreamResponse):
    """Headers go out with the first chunk, in one send: on the first token's path a
    separate send costs ~0.1 ms of loopback TCP (aiohttp's own web.Response does this)."""

    _send_headers_immediately = False


class ModelRename:
    """Writes the name the client asked for (an alias) back into the engine's answer.

    vLLM serves one name (`--served-model-name`, the model's own) and writes it as
    `"model":"NAME"` (pydantic's compact JSON); every such key becomes the alias. The
    pattern cannot occur inside a JSON string (its quotes would be escaped), so only
    real `model` keys change. A streamed answer is rewritten line by line: a chunk's
    last, unfinished line waits for the next chunk, so a key split across two reads is
    still found.
    """

    __slots__ = ("_carry", "_pairs")

    def __init__(self, served: str, asked: str) -> None:
        self._pairs = [
            (f'"model"{sep}{json.dumps(served)}'.encode(),
             f'"model"{sep}{json.dumps(asked, ensure_ascii=False)}'.encode())
            for sep in (":", ": ")
        ]
        self._carry = b""

    def whole(self, body: bytes) -> bytes:
        for old, new in self._pairs:
            body = body.replace(old, new)
        return body

    def chunk(self, data: bytes) -> bytes:
        """The rewritten complete lines of `carry + data`; the rest waits."""
        data = self._carry + data
        end = data.rfind(b"\n") + 1
        self._carry = data[end:]
        return self.whole(data[:end])

    def rest(self) -> bytes:
        """What is left once the answer ended (a last line without a newline)."""
        data, self._carry = self._carry, b""
        return self.whole(data)


ALIAS = web.RequestKey("gpud_alias", ModelRename)


def drop(sent: asyncio.Future[UpstreamResponse] | None) -> None:
    """Give up a request sent ahead of a wake: its engine connection closes, and vLLM drops
    the request it queued (the client of that connection is gone)."""
    if sent is None:
        return
    if not sent.done():
        sent.cancel()  # UpstreamClient.post aborts the connection when cancelled
    elif not sent.cancelled() and sent.exception() is None:
        sent.result().close()


async def relay(
    request: web.Request, upstream: UpstreamResponse, route: ModelRoute, t0: float,
    opened: HeldStream | None = None,
) -> tuple[web.StreamResponse, float | None]:
    """The engine's answer to the client: (the response, seconds to its first streamed chunk
    or None). Closes the engine socket however it ends (a cancelled client included): the
    engine then aborts the request. A no-op once the body was read to its end.

    `opened`: the client's SSE response, already sent (keep-alive comments while the model
    loaded, until the first chunk): the engine's stream continues it, and an answer that
    is not a stream is written into it as an error event."""
    try:
        if opened is not None:
            return await _into_opened(request, upstream, route, t0, opened)
        uh = upstream.headers
        out = CIMultiDict[str]()
        for lower, name in RELAY_RESPONSE_HEADERS:
            v = uh.get(lower)
            if v is not None:
                out[name] = v
        rename = request.get(ALIAS)
        if rename is not None and "content-encoding" in uh:
            rename = None  # compressed: relayed as it is
        if not uh.get("content-type", "").startswith(SSE):
            raw = await upstream.read()
            if rename is not None:
                raw = rename.whole(raw)
            return web.Response(body=raw, status=upstream.status, headers=out), None
        return await stream(request, upstream, out, route, t0, rename)
    except UpstreamError as e:
        return broken(route, e), None
    finally:
        upstream.close()


async def _into_opened(
    request: web.Request, upstream: UpstreamResponse, route: ModelRoute, t0: float,
    opened: HeldStream,
) -> tuple[web.StreamResponse, float | None]:
    rename = request.get(ALIAS)
    if rename is not None and "content-encoding" in upstream.headers:
        rename = None
    if upstream.headers.get("content-type", "").startswith(SSE):
        return await stream(request, upstream, CIMultiDict(), route, t0, rename, opened)
    raw = await upstream.read()
    await end_in_band(opened, request.path, upstream.status, raw)
    return opened.resp, None


async def stream(
    request: web.Request,
    upstream: UpstreamResponse,
    headers: CIMultiDict[str],
    route: ModelRoute,
    t0: float,
    rename: ModelRename | None = None,
    opened: HeldStream | None = None,
) -> tuple[web.StreamResponse, float | None]:
    if opened is not None:
        resp = opened.resp
    else:
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        resp = _StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
    ttft: float | None = None
    prev = last = b""
    try:
        while chunk := await upstream.readany():
            prev, last = last, chunk
            if rename is not None and not (chunk := rename.chunk(chunk)):
                continue  # no whole line yet
            if ttft is None:
                mark(request, "upstream_first_chunk_ms")
                if opened is not None:
                    await opened.quiet()  # no comment between the answer's bytes
                await resp.write(chunk)
                ttft = time.perf_counter() - t0
                mark(request, "first_chunk_written_ms")
            else:
                await resp.write(chunk)  # waits for the client to drain: backpressure
            if _ENDS in chunk[-40:] or _ENDS_MESSAGES in chunk[-80:]:
                # The client has the whole answer and may hang up before the engine's
                # socket ends (the openai client does): answered, not abandoned.
                request[TAIL] = prev[-2048:] + last[-2048:]
                request[RELAYED] = (resp, ttft)
        request[TAIL] = prev[-2048:] + last[-2048:]
        request[RELAYED] = (resp, ttft)
        if rename is not None and (chunk := rename.rest()):
            await resp.write(chunk)
    except UpstreamError as e:
        await _broken_in_band(resp, route, e)
    except ConnectionResetError:
        return resp, ttft  # the client left; relay() drops the engine socket
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp, ttft


async def _broken_in_band(resp: web.StreamResponse, route: ModelRoute, e: Exception) -> None:
    """The engine broke off mid-stream: say so in-band (the SDKs raise on it)."""
    err: dict[str, Any] = {
        "error": {
            "message": f"The engine of {route.name!r} broke off its answer "
            f"({type(e).__name__}).",
            "type": "service_unavailable",
            "param": None,
            "code": "gpud_upstream_broken",
        }
    }
    with contextlib.suppress(ConnectionResetError):
        await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
