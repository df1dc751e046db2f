"""The OpenAI-compatible endpoint: route by `model`, queue, wake, relay.

Sits on the daemon's aiohttp listener (`Proxy.install(app)`) and forwards to
the engine that `Backend.ready_upstream` names. It must never buffer a
streamed body, re-encode a relayed one, log a key, or hold state that a
reload could invalidate: routes are read from the backend on every request.

A client that goes away must stop the engine's work for it: that is the
cancellation of the request's handler, which closes the engine socket.
aiohttp cancels such a handler at once only on an
`AppRunner(app, handler_cancellation=True)`; without it, the proxy's own
sweep (`disconnect_check`, every second) finds the departed clients; the daemon
runs with the former and passes `disconnect_check=None` (no sweep, no tracking).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict

from .api import Backend, ModelRoute, ModelUnavailable, ProxyObserver
from .auth import ApiKey, KeyRing
from .limits import ModelGate, QueueFull
from .upstream import UpstreamClient, UpstreamError, UpstreamResponse

INFERENCE_PATHS: Final = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
)
# Paths whose `model` field vLLM treats as optional: one model served, it is used.
_MODEL_OPTIONAL: Final = frozenset({"/tokenize", "/detokenize"})
# Headers worth relaying; everything hop-by-hop or gpud's own (Authorization) stays behind.
_FORWARD_REQUEST_HEADERS: Final = ("Accept", "X-Request-Id", "Traceparent")
_RELAY_RESPONSE_HEADERS: Final = (
    ("content-type", "Content-Type"),
    ("content-encoding", "Content-Encoding"),
    ("x-request-id", "X-Request-Id"),
)
_SSE: Final = "text/event-stream"
_QUEUE_FULL_RETRY_AFTER: Final = "1"
MAX_BODY: Final = 64 * 1024 * 1024  # long prompts and inline images; aiohttp's default is 1 MiB
_UPSTREAM_KEEPALIVE: Final = 3.0  # below uvicorn's 5 s, so we never reuse a socket it closes

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    """gpud's own error, in OpenAI's error JSON shape, with a `gpud_` code."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": f"gpud_{code}"}}
    headers = None
    if retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return web.json_response(body, status=status, headers=headers)



def _mark(request: web.Request, name: str) -> None:
    marks = request.get(_MARKS)
    if marks is not None:
        marks[name] = round((time.perf_counter() - marks["t0"]) * 1000, 3)


_MARKS = web.RequestKey("gpud_timing_marks", dict)


class _StreamResponse(web.StreamResponse):
    """Headers go out with the first chunk, in one send: on the first token's path a
    separate send costs ~0.1 ms of loopback TCP (aiohttp's own web.Response does this)."""

    _send_headers_immediately = False

def _request_headers(request: web.Request) -> bytes:
    """The header lines relayed to the engine, each ending in CRLF."""
    rh = request.headers
    extra = b"Content-Type: " + rh.get("Content-Type", "application/json").encode() + b"\r\n"
    for h in _FORWARD_REQUEST_HEADERS:
        v = rh.get(h)
        if v is not None:
            extra += f"{h}: {v}\r\n".encode()
    return extra


def _drop(sent: asyncio.Future[UpstreamResponse] | None) -> None:
    """Give up a request sent ahead of a wake: its engine connection closes, and vLLM drops
    the request it queued (the client of that connection is gone)."""
    if sent is None:
        return
    if not sent.done():
        sent.cancel()  # UpstreamClient.post aborts the connection when cancelled
    elif not sent.cancelled() and sent.exception() is None:
        sent.result().close()


def _rename_request(body: bytes, name: str) -> bytes:
    """The body with `model` set to the engine's served name (an alias was asked for)."""
    payload = json.loads(body)
    payload["model"] = name
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


class _ModelRename:
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


_ALIAS = web.RequestKey("gpud_alias", _ModelRename)


class _Reject(Exception):
    """Raised inside the handler to answer with an error response."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


class Proxy:
    """The inference endpoint, backed by a `Backend`.

    Lifecycle: `install(app)` adds the routes and opens/closes the pooled
    upstream session with the app; or call `start()` and `close()` yourself.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        keys: KeyRing | None = None,
        observer: ProxyObserver | None = None,
        disconnect_check: float | None = 1.0,
    ) -> None:
        self.backend = backend
        self.disconnect_check = disconnect_check
        self._active: dict[asyncio.Task[Any], web.Request] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.keys = keys if keys is not None else KeyRing()
        self.observer = observer
        self._gates: dict[str, ModelGate] = {}
        self._client: UpstreamClient | None = None
        self._preconnects: set[asyncio.Task[None]] = set()
        # Per-request timing marks of the last requests (a test hook, off by default): where
        # a slow first token spent its time inside gpud (bench/gpu/gpu_truth.py reads them).
        self.timings: collections.deque[dict[str, Any]] | None = None
        self._alias_src: Mapping[str, ModelRoute] | None = None
        self._aliases: dict[str, ModelRoute] = {}

    # -- lifecycle -----------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add the proxy's routes and lifecycle hooks to the daemon's application."""
        for path in INFERENCE_PATHS:
            app.router.add_post(path, self._make_handler(path))
        app.router.add_get("/v1/models", self.handle_models)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)

    def make_app(self) -> web.Application:
        """A standalone application with only the proxy (tests, bench).

        The daemon's own application needs `client_max_size=MAX_BODY` too.
        """
        app = web.Application(client_max_size=MAX_BODY)
        self.install(app)
        return app

    async def start(self) -> None:
        if self._client is None:
            self._client = UpstreamClient(keepalive=_UPSTREAM_KEEPALIVE)
        if self._sweeper is None and self.disconnect_check:
            self._sweeper = asyncio.create_task(self._sweep(), name="gpud-proxy-disconnects")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _sweep(self) -> None:
        """Cancel the handlers of clients that went away (see the module's docstring)."""
        while True:
            await asyncio.sleep(self.disconnect_check or 1.0)
            for task, request in list(self._active.items()):
                transport = request.transport
                if transport is None or transport.is_closing():
                    task.cancel()

    async def _on_startup(self, app: web.Application) -> None:
        await self.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.close()

    def set_keys(self, keys: KeyRing) -> None:
        """Replace the keys (config reload); requests already admitted go on."""
        self.keys = keys

    # -- observable state ----------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: `inflight`, `queued`, `last_request` (time.time() or None).

        Models gone from the desired state are dropped once they have no requests.
        """
        routes = self.backend.routes()
        for name in [n for n, g in self._gates.items() if n not in routes]:
            g = self._gates[name]
            if not g.inflight and not g.queued:
                del self._gates[name]
        return {
            name: {"inflight": g.inflight, "queued": g.queued, "last_request": g.last_request}
            for name, g in self._gates.items()
        }

    def busy(self, model: str) -> bool:
        """True while `model` has requests in flight or queued (never idle-sleep it)."""
        g = self._gates.get(model)
        return g is not None and (g.inflight > 0 or g.queued > 0)

    # -- routing -------------------------------------------------------------

    def resolve(self, name: str) -> ModelRoute | None:
        """The route for a model name or alias, read from the backend now."""
        routes = self.backend.routes()
        route = routes.get(name)
        if route is not None:
            return route
        if routes is not self._alias_src:
            self._aliases = {a: r for r in routes.values() for a in r.aliases}
            self._alias_src = routes
        return self._aliases.get(name)

    def _unknown_model(self, name: str, key: ApiKey | None) -> _Reject:
        known = sorted(n for n in self.backend.routes() if key is None or key.allows(n))
        return _Reject(
            error_response(
                404,
                f"The model {name!r} does not exist. Known models: {', '.join(known) or '(none)'}.",
                "model_not_found",
                param="model",
            )
        )

    # -- handlers ------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        key = self._authenticate(request)
        if isinstance(key, web.Response):
            return key
        data = [
            {
                "id": r.name,
                "object": "model",
                "created": 0,
                "owned_by": "gpud",
                "state": r.state,
                "aliases": list(r.aliases),
            }
            for r in self.backend.routes().values()
            if key is None or key.allows(r.name)
        ]
        return web.json_response({"object": "list", "data": data})

    def _authenticate(self, request: web.Request) -> ApiKey | web.Response | None:
        if not self.keys.enabled:
            return None
        key = self.keys.authenticate(request.headers.get("Authorization"))
        if key is None:
            return error_response(
                401,
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                "invalid_api_key",
                type_="authentication_error",
            )
        return key

    def _make_handler(self, path: str) -> _Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.forward(request, path)

        return handler

    async def forward(self, request: web.Request, path: str) -> web.StreamResponse:
        """Route one inference request; the whole request's life is here."""
        t0 = time.perf_counter()
        observer = self.observer
        model = ""
        task = asyncio.current_task() if self.disconnect_check else None
        if task is not None:
            self._active[task] = request
        marks: dict[str, Any] | None = None
        if self.timings is not None:
            marks = {"t0": t0, "at": time.time(), "path": path}
            request[_MARKS] = marks
        try:
            key = self._authenticate(request)
            if isinstance(key, web.Response):
                raise _Reject(key)
            body = await request.read()
            route, asked = self._route_for(body, path, key)
            model = route.name
            if asked is not None:
                body = _rename_request(body, route.name)
                request[_ALIAS] = _ModelRename(route.name, asked)
            if marks is not None:
                marks["model"] = model
                _mark(request, "routed_ms")
            resp, ttft = await self._admit_and_forward(request, path, body, route, t0)
        except _Reject as r:
            resp, ttft = r.response, None
        except asyncio.CancelledError:
            if observer is not None:  # 499: the client closed the request (nginx's code)
                observer.request_done(model, path, 499, time.perf_counter() - t0, None)
            self._record(marks, 499)
            raise
        finally:
            if task is not None:
                del self._active[task]
        self._record(marks, resp.status)
        if observer is not None:
            observer.request_done(model, path, resp.status, time.perf_counter() - t0, ttft)
        return resp

    def _record(self, marks: dict[str, Any] | None, status: int) -> None:
        if marks is not None and self.timings is not None:
            marks.pop("t0", None)
            marks["status"] = status
            self.timings.append(marks)

    def _route_for(
        self, body: bytes, path: str, key: ApiKey | None
    ) -> tuple[ModelRoute, str | None]:
        """The route of the request, and the alias it named (None: the model's own name)."""
        try:
            payload = json.loads(body)
        except ValueError:
            raise _Reject(
                error_response(400, "The request body is not valid JSON.", "invalid_json")
            ) from None
        name = payload.get("model") if isinstance(payload, dict) else None
        if name is None and path in _MODEL_OPTIONAL:
            routes = self.backend.routes()
            if len(routes) == 1:
                return next(iter(routes.values())), None
        if not isinstance(name, str):
            known = ", ".join(sorted(self.backend.routes()))
            raise _Reject(
                error_response(
                    400,
                    f"Name the model in the `model` field. Known models: {known or '(none)'}.",
                    "model_required",
                    param="model",
                )
            )
        route = self.resolve(name)
        if route is None or (key is not None and not key.allows(route.name)):
            if route is not None and key is not None:
                raise _Reject(
                    error_response(
                        403,
                        f"The API key {key.name!r} may not use the model {route.name!r}.",
                        "model_not_allowed",
                        type_="permission_error",
                        param="model",
                    )
                )
            raise self._unknown_model(name, key)
        return route, (None if name == route.name else name)

    async def _admit_and_forward(
        self, request: web.Request, path: str, body: bytes, route: ModelRoute, t0: float
    ) -> tuple[web.StreamResponse, float | None]:
        name = route.name
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = ModelGate()
        gate.last_request = time.time()
        backend = self.backend
        backend.request_started(name)
        try:
            if not gate.try_acquire(route.max_concurrency):
                try:
                    async with asyncio.timeout(route.request_timeout):
                        await gate.acquire(route.max_concurrency, route.max_queue)
                except QueueFull:
                    return error_response(
                        429,
                        f"The model {name!r} has {route.max_queue} requests queued already; "
                        "retry later.",
                        "queue_full",
                        type_="rate_limit_error",
                        retry_after=float(_QUEUE_FULL_RETRY_AFTER),
                    ), None
                except TimeoutError:
                    return self._timed_out(route, "a free slot"), None
            try:
                return await self._wake_and_send(request, path, body, route, t0)
            finally:
                gate.release()
        finally:
            backend.request_finished(name)

    def _timed_out(self, route: ModelRoute, what: str) -> web.Response:
        return error_response(
            503,
            f"The model {route.name!r} did not get {what} within its request_timeout "
            f"({route.request_timeout:g} s); retry later.",
            "request_timeout",
            type_="service_unavailable",
            retry_after=min(max(route.request_timeout / 4, 1.0), 30.0),
        )

    def _upstream_client(self) -> UpstreamClient:
        if self._client is None:
            raise RuntimeError("Proxy.start() was not called (or install() on a running app)")
        return self._client

    async def _wake_and_send(
        self, request: web.Request, path: str, body: bytes, route: ModelRoute, t0: float
    ) -> tuple[web.StreamResponse, float | None]:
        headers = _request_headers(request)
        sent: asyncio.Future[UpstreamResponse] | None = None
        base = self.backend.serving_upstream(route.name)
        if base is None:  # asleep, loading, failed: wait (no timer, no task when awake)
            got = await self._ready(request, path, body, headers, route, t0)
            if isinstance(got, web.Response):
                return got, None
            base, sent = got
        else:
            _mark(request, "upstream_ready_ms")
        try:
            return await self._send(request, base, path, body, headers, route, t0, sent)
        finally:
            self.backend.upstream_released(route.name, base)

    async def _ready(
        self, request: web.Request, path: str, body: bytes, headers: bytes, route: ModelRoute,
        t0: float,
    ) -> tuple[str, asyncio.Future[UpstreamResponse] | None] | web.Response:
        """An engine for a model that serves nowhere now: (its base URL, the request sent
        to it ahead of the wake or None), or the error to answer."""
        # The request's whole wait (queue and wake) counts against request_timeout.
        remaining = max(route.request_timeout - (time.perf_counter() - t0), 0.0)
        early: str | None = None
        sent: asyncio.Future[UpstreamResponse] | None = None
        try:
            waking = self.backend.waking_upstreams(route.name)
            if waking:
                base, early, sent = await self._wake(request, route, remaining, waking, path,
                                                     body, headers)
            else:
                async with asyncio.timeout(remaining):
                    base = await self.backend.ready_upstream(route.name)
        except TimeoutError:
            return self._timed_out(route, "a ready engine")
        except ModelUnavailable as e:
            return error_response(
                503, e.reason, e.code, type_="service_unavailable", retry_after=e.retry_after
            )
        _mark(request, "upstream_ready_ms")
        if sent is not None and (base != early or (sent.done() and sent.exception())):
            _drop(sent)  # served elsewhere, or the early send failed: send it now
            sent = None
        return base, sent

    async def _wake(
        self, request: web.Request, route: ModelRoute, remaining: float, waking: Sequence[str],
        path: str, body: bytes, headers: bytes,
    ) -> tuple[str, str | None, asyncio.Future[UpstreamResponse] | None]:
        """Wait for a sleeping model's engine: (its base URL, the engine the request was sent
        to early or None, that early send). On any exception, nothing is left behind."""
        client = self._upstream_client()
        ready = asyncio.ensure_future(
            asyncio.wait_for(self.backend.ready_upstream(route.name), remaining))
        sent: asyncio.Future[UpstreamResponse] | None = None
        try:
            early = await self._early(route.name, ready)
            if early is not None:
                # The engine was sent its wake and queues requests meanwhile: this one
                # follows the wake in, is tokenized while the weights come back and runs
                # the moment the engine is awake.
                sent = asyncio.ensure_future(client.post(early, path, body, headers))
                _mark(request, "sent_early_ms")
            elif not ready.done():
                # The engine answers connections while it wakes: connect now, not after.
                task = asyncio.create_task(client.preconnect(waking[0]))
                self._preconnects.add(task)
                task.add_done_callback(self._preconnects.discard)
            return await ready, early, sent
        except BaseException:
            ready.cancel()
            _drop(sent)
            raise

    async def _early(self, model: str, ready: asyncio.Future[str]) -> str | None:
        """The engine to send the request to before its wake ends, once it was sent its
        wake (`Backend.early_upstream`); None when there is none or the wait ended first."""
        early = asyncio.ensure_future(self.backend.early_upstream(model))
        both: set[asyncio.Future[str | None]] = {early, ready}  # type: ignore[arg-type]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not early.done():
                early.cancel()
        if early.cancelled() or early.exception() is not None:
            return None
        return early.result()

    async def _send(
        self,
        request: web.Request,
        base: str,
        path: str,
        body: bytes,
        headers: bytes,
        route: ModelRoute,
        t0: float,
        sent: asyncio.Future[UpstreamResponse] | None = None,
    ) -> tuple[web.StreamResponse, float | None]:
        client = self._upstream_client()
        try:
            upstream = None
            if sent is not None:
                with contextlib.suppress(UpstreamError, OSError):
                    upstream = await sent  # failed: it is sent again below, once
            if upstream is None:
                upstream = await client.post(base, path, body, headers)
        except (UpstreamError, OSError, TimeoutError) as e:
            return error_response(
                502,
                f"The engine of {route.name!r} did not answer ({e}); gpud restarts it if it died.",
                "upstream_unreachable",
                type_="service_unavailable",
            ), None
        except BaseException:
            _drop(sent)
            raise
        _mark(request, "upstream_head_ms")
        try:
            uh = upstream.headers
            out = CIMultiDict[str]()
            for lower, name in _RELAY_RESPONSE_HEADERS:
                v = uh.get(lower)
                if v is not None:
                    out[name] = v
            rename = request.get(_ALIAS)
            if rename is not None and "content-encoding" in uh:
                rename = None  # compressed: relayed as it is
            if not uh.get("content-type", "").startswith(_SSE):
                raw = await upstream.read()
                if rename is not None:
                    raw = rename.whole(raw)
                return web.Response(body=raw, status=upstream.status, headers=out), None
            return await self._stream(request, upstream, out, route, t0, rename)
        except UpstreamError as e:
            return error_response(
                502,
                f"The engine of {route.name!r} broke off its answer ({e}).",
                "upstream_broken",
                type_="service_unavailable",
            ), None
        finally:
            # Cancellation (client gone) or error: drop the engine socket, which makes
            # the engine abort the request. No-op once the body was read to its end.
            upstream.close()

    async def _stream(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        headers: CIMultiDict[str],
        route: ModelRoute,
        t0: float,
        rename: _ModelRename | None = None,
    ) -> tuple[web.StreamResponse, float | None]:
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        resp = _StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        ttft: float | None = None
        try:
            while chunk := await upstream.readany():
                if rename is not None and not (chunk := rename.chunk(chunk)):
                    continue  # no whole line yet
                if ttft is None:
                    _mark(request, "upstream_first_chunk_ms")
                    await resp.write(chunk)
                    ttft = time.perf_counter() - t0
                    _mark(request, "first_chunk_written_ms")
                else:
                    await resp.write(chunk)  # waits for the client to drain: backpressure
            if rename is not None and (chunk := rename.rest()):
                await resp.write(chunk)
        except UpstreamError as e:
            # The engine broke off mid-stream: say so in-band (the SDKs raise on it).
            err = {
                "error": {
                    "message": f"The engine of {route.name!r} broke off its answer "
                    f"({type(e).__name__}).",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "gpud_upstream_broken",
                }
            }
            try:
                await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
            except ConnectionResetError:
                return resp, ttft
        except ConnectionResetError:
            return resp, ttft  # the client left; _send drops the engine socket
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp, ttft
