"""SSE comment lines to a streamed request that waits for its model to load or wake.

A load takes 30 s to minutes; proxies and clients with an idle timeout (nginx's 60 s, a
load balancer's, an SDK's read timeout) cut a connection that says nothing for that long.
A streamed request (`"stream": true`) that has waited FIRST_AFTER seconds gets its SSE
response opened (200, text/event-stream) and a comment line every `interval` seconds
(`: keep-alive loading chat 12s`) until the engine's first byte (after a load, a busy
engine may be slow to its first token too); OpenAI's and Anthropic's SSE readers skip
comments. Then the engine's stream follows in the same response. A non-streamed request
gets nothing extra, and a shorter wait changes nothing (an error is still a plain 503).

Once the response is open its status is 200, so a later error (the load failed, the engine
refused the request) is written in-band as an SSE error event, which the SDKs raise.
Never used on the per-request fast path: only when no engine serves the model this moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from aiohttp import web

from gpud.states import State

from .api import ModelRoute

T = TypeVar("T")

FIRST_AFTER: Final = 1.0  # seconds of waiting before the response opens (a wake is faster)


def wants_stream(body: bytes) -> bool:
    """True when the JSON body asks for a streamed answer (`"stream": true`)."""
    if b'"stream"' not in body:
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("stream") is True


class HeldStream:
    """The client's SSE response, opened while its request waited, and the ticker that
    writes its keep-alive comments until the first byte of the answer (`quiet`): the wait
    for an engine, then for the engine's first token, which a busy engine may take long
    to give after a load."""

    __slots__ = ("_ticker", "resp")

    def __init__(self, resp: web.StreamResponse, ticker: asyncio.Task[None]) -> None:
        self.resp = resp
        self._ticker = ticker

    async def quiet(self) -> web.StreamResponse:
        """Stop the comments (idempotent); the response, for the answer to go on."""
        if not self._ticker.done():
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        return self.resp


async def _tick(resp: web.StreamResponse, model: str, doing: str, interval: float,
                t0: float) -> None:
    with contextlib.suppress(ConnectionResetError):  # the client left: the handler ends it
        while True:
            line = f": keep-alive {doing} {model} {time.monotonic() - t0:.0f}s\n\n"
            await resp.write(line.encode())
            await asyncio.sleep(interval)


async def keep_alive(
    request: web.Request, waiter: Awaitable[T], route: ModelRoute, stream: bool,
) -> tuple[T, HeldStream | None]:
    """Await `waiter` (the wait for an engine), speaking to a streamed request meanwhile
    when its model has keep-alives on: (the waiter's result, the held stream or None)."""
    if not stream or route.stream_keepalive <= 0:
        return await waiter, None
    doing = "waking" if route.state in (State.ASLEEP, State.WAKING) else "loading"
    return await wait_speaking(request, waiter, route.name, doing, route.stream_keepalive)


async def wait_speaking(
    request: web.Request, waiter: Awaitable[T], model: str, doing: str, interval: float,
) -> tuple[T, HeldStream | None]:
    """Await `waiter`; if it takes longer than FIRST_AFTER (or `interval`, if shorter), open
    the client's SSE response and write a comment every `interval` seconds from then on,
    until `HeldStream.quiet`. Returns (the waiter's result, the held stream or None)."""
    task = asyncio.ensure_future(waiter)
    t0 = time.monotonic()
    held: HeldStream | None = None
    try:
        await asyncio.wait({task}, timeout=min(FIRST_AFTER, interval))
        if task.done():
            return task.result(), None
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        held = HeldStream(resp, asyncio.create_task(_tick(resp, model, doing, interval, t0)))
        return await task, held
    except BaseException:
        if held is not None:
            await held.quiet()
        raise
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def end_in_band(held: HeldStream, path: str, status: int, body: bytes) -> None:
    """An answer that is not a stream (gpud's error, the engine's error), written into an
    SSE response already open, then its end: as `event: error` for Anthropic's Messages
    API, as an OpenAI-style `data:` error line otherwise."""
    payload: Any
    try:
        payload = json.loads(body)
    except ValueError:
        payload = {"error": {"message": body.decode(errors="replace"), "type": "error"}}
    if path.startswith("/v1/messages"):
        err = payload.get("error") if isinstance(payload, dict) else None
        message = err.get("message") if isinstance(err, dict) else str(payload)
        kind = "overloaded_error" if status >= 500 else "invalid_request_error"
        event = {"type": "error", "error": {"type": kind, "message": message}}
        chunk = b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    else:
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            payload["error"].setdefault("status", status)
        chunk = b"data: " + json.dumps(payload).encode() + b"\n\n"
    resp = await held.quiet()
    with contextlib.suppress(ConnectionResetError):
        await resp.write(chunk)
        await resp.write_eof()
