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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from aiohttp import web

from .affinity import conversation_key
from .api import ActivitySink, Backend, ModelRoute, ModelUnavailable, ProxyObserver, RequestFinished
from .auth import ApiKey, KeyRing
from .errors import Reject, error_response, timed_out, unreachable
from .forms import StreamedBody, form_route
from .keepalive import HeldStream, end_in_band, keep_alive, wants_stream
from .limits import ModelGate, QueueFull
from .paths import FORM_PATHS, INFERENCE_PATHS, unknown_path
from .relay import ALIAS, MARKS, RELAYED, SSE, TAIL, ModelRename, drop, mark, relay
from .routing import rename_request, request_headers, route_for
from .upstream import UpstreamClient, UpstreamError, UpstreamResponse

__all__ = ["INFERENCE_PATHS", "MAX_BODY", "ModelRename", "Proxy", "error_response"]

_QUEUE_FULL_RETRY_AFTER: Final = "1"
MAX_BODY: Final = 64 * 1024 * 1024  # long prompts and inline images; aiohttp's default is 1 MiB
_UPSTREAM_KEEPALIVE: Final = 3.0  # below uvicorn's 5 s, so we never reuse a socket it closes

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ModelRename = ModelRename  # the name tests know it by
Body = bytes | StreamedBody  # JSON is read whole; a multipart form streams through


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
        activity: ActivitySink | None = None,
    ) -> None:
        self.backend = backend
        self.activity = activity
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
        # last: any other path under /v1/ gets a 404 naming the routes (a 405 for GET on one)
        app.router.add_get("/v1/{tail:.*}", unknown_path)
        app.router.add_post("/v1/{tail:.*}", unknown_path)
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

    # -- handlers ------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        key = authenticate(self.keys, request)
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

    def _make_handler(self, path: str) -> _Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.forward(request, path)

        return handler

    async def forward(self, request: web.Request, path: str) -> web.StreamResponse:
        """Route one inference request; the whole request's life is here."""
        t0 = time.perf_counter()
        observer = self.observer
        model = ""
        key: ApiKey | web.Response | None = None
        asked: str | None = None
        task = asyncio.current_task() if self.disconnect_check else None
        if task is not None:
            self._active[task] = request
        marks: dict[str, Any] | None = None
        if self.timings is not None:
            marks = {"t0": t0, "at": time.time(), "path": path}
            request[MARKS] = marks
        try:
            key = authenticate(self.keys, request)
            if isinstance(key, web.Response):
                raise Reject(key)
            body, route, asked = await read_routed(request, path, self.backend.routes(),
                                                   self.resolve, key)
            model = route.name
            if asked is not None:
                request[ALIAS] = ModelRename(route.name, asked)
            if marks is not None:
                marks["model"] = model
                mark(request, "routed_ms")
            resp, ttft = await self._admit_and_forward(request, path, body, route, t0)
        except Reject as r:
            resp, ttft = r.response, None
        except asyncio.CancelledError:
            # 499: the client closed the request (nginx's code), unless it had its whole answer
            whole, ttft = request.get(RELAYED, (None, None))
            status = 499 if whole is None else whole.status
            if observer is not None:
                observer.request_done(model, path, status, time.perf_counter() - t0, ttft)
            self._record(marks, status)
            self._finished(request, whole, path, model, key, asked, status, t0, ttft)
            raise
        finally:
            if task is not None:
                del self._active[task]
        self._record(marks, resp.status)
        if observer is not None:
            observer.request_done(model, path, resp.status, time.perf_counter() - t0, ttft)
        self._finished(request, resp, path, model, key, asked, resp.status, t0, ttft)
        return resp

    def _finished(self, request: web.Request, resp: web.StreamResponse | None, *args: Any,
                  ) -> None:
        """Hand the finished request to the activity log, if there is one (no I/O here)."""
        if self.activity is not None:
            self.activity.request_done(finished(request, resp, *args))

    def _record(self, marks: dict[str, Any] | None, status: int) -> None:
        if marks is not None and self.timings is not None:
            marks.pop("t0", None)
            marks["status"] = status
            self.timings.append(marks)

    async def _admit_and_forward(
        self, request: web.Request, path: str, body: Body, route: ModelRoute, t0: float
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
                    return timed_out(route, "a free slot"), None
            try:
                return await self._wake_and_send(request, path, body, route, t0)
            finally:
                gate.release()
        finally:
            backend.request_finished(name)

    def _upstream_client(self) -> UpstreamClient:
        if self._client is None:
            raise RuntimeError("Proxy.start() was not called (or install() on a running app)")
        return self._client

    async def _wake_and_send(
        self, request: web.Request, path: str, body: Body, route: ModelRoute, t0: float
    ) -> tuple[web.StreamResponse, float | None]:
        headers = request_headers(request)
        sent: asyncio.Future[UpstreamResponse] | None = None
        opened: HeldStream | None = None
        base = self._serving_upstream(route, body)
        if base is None:  # asleep, loading, failed: wait (no timer, no task when awake)
            got, opened = await self._held(request, path, body, headers, route, t0)
            if isinstance(got, web.Response):
                if opened is None:
                    return got, None
                await end_in_band(opened, path, got.status, _bytes(got))
                return opened.resp, None
            base, sent = got
        else:
            mark(request, "upstream_ready_ms")
        try:
            return await self._send(request, base, path, body, headers, route, t0, sent, opened)
        finally:
            if opened is not None:
                await opened.quiet()
            self.backend.upstream_released(route.name, base)

    async def _held(
        self, request: web.Request, path: str, body: Body, headers: bytes, route: ModelRoute,
        t0: float,
    ) -> tuple[tuple[str, asyncio.Future[UpstreamResponse] | None] | web.Response,
               HeldStream | None]:
        """`_ready`, with SSE keep-alive comments to a streamed request that waits long:
        (what `_ready` gave, the client's response if opened)."""
        stream = isinstance(body, bytes) and wants_stream(body)
        return await keep_alive(request, self._ready(request, path, body, headers, route, t0),
                                route, stream)

    def _serving_upstream(self, route: ModelRoute, body: Body) -> str | None:
        """The backend's fast path; a conversation's key only for prefix routing (the one
        case that reads the body again; a form has no conversation)."""
        if not route.prefix_routing or not isinstance(body, bytes):
            return self.backend.serving_upstream(route.name)
        return self.backend.serving_upstream(route.name, affinity=conversation_key(body))

    async def _ready(
        self, request: web.Request, path: str, body: Body, headers: bytes, route: ModelRoute,
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
            return timed_out(route, "a ready engine")
        except ModelUnavailable as e:
            return error_response(
                503, e.reason, e.code, type_="service_unavailable", retry_after=e.retry_after
            )
        mark(request, "upstream_ready_ms")
        if sent is not None and (base != early or (sent.done() and sent.exception())):
            drop(sent)  # served elsewhere, or the early send failed: send it now
            sent = None
        return base, sent

    async def _wake(
        self, request: web.Request, route: ModelRoute, remaining: float, waking: Sequence[str],
        path: str, body: Body, headers: bytes,
    ) -> tuple[str, str | None, asyncio.Future[UpstreamResponse] | None]:
        """Wait for a sleeping model's engine: (its base URL, the engine the request was sent
        to early or None, that early send). On any exception, nothing is left behind."""
        client = self._upstream_client()
        ready = asyncio.ensure_future(
            asyncio.wait_for(self.backend.ready_upstream(route.name), remaining))
        sent: asyncio.Future[UpstreamResponse] | None = None
        try:
            early = await self._early(route.name, ready)
            if early is not None and isinstance(body, bytes):  # a stream cannot go twice
                # The engine was sent its wake and queues requests meanwhile: this one
                # follows the wake in, is tokenized while the weights come back and runs
                # the moment the engine is awake.
                sent = asyncio.ensure_future(client.post(early, path, body, headers))
                mark(request, "sent_early_ms")
            elif not ready.done():
                # The engine answers connections while it wakes: connect now, not after.
                task = asyncio.create_task(client.preconnect(waking[0]))
                self._preconnects.add(task)
                task.add_done_callback(self._preconnects.discard)
            return await ready, early, sent
        except BaseException:
            ready.cancel()
            drop(sent)
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
        body: Body,
        headers: bytes,
        route: ModelRoute,
        t0: float,
        sent: asyncio.Future[UpstreamResponse] | None = None,
        opened: HeldStream | None = None,
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
            if opened is None:
                return unreachable(route, e), None
            err = unreachable(route, e)
            await end_in_band(opened, path, err.status, _bytes(err))
            return opened.resp, None
        except BaseException:
            drop(sent)
            raise
        mark(request, "upstream_head_ms")
        return await relay(request, upstream, route, t0, opened)



def authenticate(keys: KeyRing, request: web.Request) -> ApiKey | web.Response | None:
    """The request's API key; None when keys are off; a 401 answer when it has none good."""
    if not keys.enabled:
        return None
    authorization = request.headers.get("Authorization")
    if authorization is None and "x-api-key" in request.headers:
        # Anthropic's clients send the key as `x-api-key` (its Messages API's header).
        authorization = "Bearer " + request.headers["x-api-key"]
    key = keys.authenticate(authorization)
    if key is None:
        return error_response(
            401,
            "Missing or invalid API key: send `Authorization: Bearer <key>` "
            "(or `x-api-key: <key>`).",
            "invalid_api_key",
            type_="authentication_error",
        )
    return key


async def read_routed(
    request: web.Request, path: str, routes: Mapping[str, ModelRoute],
    resolve: Callable[[str], ModelRoute | None], key: ApiKey | None,
) -> tuple[Body, ModelRoute, str | None]:
    """(the body to relay, its model's route, the alias asked or None): the body renamed
    to the model for an alias, the model's request rules applied."""
    body: Body
    if path in FORM_PATHS:
        body, route, asked = await form_route(request, routes, resolve, key, MAX_BODY)
    else:
        body = await request.read()
        route, asked = route_for(routes, resolve, body, path, key)
        if asked is not None:
            body = rename_request(body, route.name)
    if route.rules is not None and isinstance(body, bytes):
        # a model without rules never parses twice; a form is relayed as it came
        body = route.rules.apply(body, path) or body
    return body, route, asked


def finished(
    request: web.Request, resp: web.StreamResponse | None, path: str, model: str,
    key: ApiKey | web.Response | None, asked: str | None, status: int, t0: float,
    ttft: float | None,
) -> RequestFinished:
    """What the activity log keeps of one request."""
    duration = time.perf_counter() - t0
    stream = resp is not None and resp.content_type == SSE
    if isinstance(resp, web.Response):
        body = resp.body
        tail = body[-2048:] if isinstance(body, bytes) else b""
    else:
        tail = request.get(TAIL, b"")
    return RequestFinished(
        time.time() - duration, path, model, asked,
        key.name if isinstance(key, ApiKey) else None, status, stream, duration, ttft, tail)

def _bytes(resp: web.Response) -> bytes:
    body = resp.body
    return body if isinstance(body, bytes) else b""
