"""What the proxy needs from the daemon, and nothing more.

The proxy never imports the reconciler, the engines or the config: the daemon
hands it an object that satisfies `Backend` (and optionally `ProxyObserver`),
so the proxy can be tested against an in-memory backend and a loopback
upstream. This module must stay free of aiohttp and of any I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .rules import RequestRules


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One model of the effective desired state, as the proxy routes it.

    `state` is the model's current state in the operator's words (`awake`,
    `asleep`, `unloaded`, `starting`, `failed`, ...); it is shown by
    `GET /v1/models` and never interpreted by the proxy: whether a request
    may wake or load the model is the backend's call in `ready_upstream`.
    """

    name: str
    aliases: tuple[str, ...] = ()
    max_concurrency: int = 32
    max_queue: int = 256
    request_timeout: float = 300.0  # seconds a request may wait for a wake or a slot
    load_on_demand: bool = False
    state: str = "awake"
    # seconds between SSE keep-alive comments to a streamed request held by a load or a
    # wake (gpud.proxy.keepalive); 0: none
    stream_keepalive: float = 5.0
    rules: RequestRules | None = None  # None: every body is relayed as it came
    prefix_routing: bool = False  # replicas: a conversation goes back where its start went


class ModelUnavailable(Exception):
    """The backend cannot give an engine for this model (now or at all).

    The proxy answers 503 with `Retry-After: retry_after` and `reason` as the
    message, so say what the operator or the client should do.
    """

    def __init__(self, reason: str, *, retry_after: float = 5.0, code: str = "model_unavailable"):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.code = code  # shown as `gpud_<code>` in the error JSON


class Backend(Protocol):
    """Implemented by the daemon (the reconciler's read side).

    Every method is called on the event loop; the sync ones are on the
    per-request hot path and must not block or allocate much.
    """

    def routes(self) -> Mapping[str, ModelRoute]:
        """The models of the effective desired state, by name.

        Read on every request (never cached by the proxy), so a reload takes
        effect for requests already waiting. Return the same mapping object
        until it changes: the proxy caches its alias index by identity.
        """
        ...

    def serving_upstream(self, model: str, affinity: str | None = None) -> str | None:
        """Base URL of an engine that serves `model` this moment, or None (asleep,
        loading, failed: the proxy then awaits `ready_upstream`). The per-request fast
        path: a returned URL counts as one `ready_upstream` returned (released once).
        `affinity` (passed only for a route with `prefix_routing`): the request's
        conversation (gpud.proxy.affinity), to send it back to the replica it went to."""
        ...

    async def ready_upstream(self, model: str) -> str:
        """Base URL of an engine that serves `model` now.

        `http://127.0.0.1:18001`, or `unix:/run/gpud/engines/chat.sock` for an
        engine started with `--uds` (cheaper per request than loopback TCP).

        Returns at once when the model is awake. Otherwise wakes it (asleep) or
        loads it (unloaded with `load_on_demand`), with one wake for many
        concurrent callers (use `gpud.proxy.SingleFlight`), and returns once
        the engine answers. Raises `ModelUnavailable` when that cannot happen.
        The proxy cancels the call when the request's `request_timeout`
        passes or its client goes away: the wake itself must carry on for the
        other waiters (`SingleFlight` shields it).
        """
        ...

    def upstream_released(self, model: str, base: str) -> None:
        """The proxy is done with `base`, which `ready_upstream` returned for `model`.

        Called exactly once per successful `ready_upstream`, whatever the outcome
        (answered, engine error, client gone): outstanding counts per engine
        drive replica balancing and draining.
        """
        ...

    def waking_upstreams(self, model: str) -> Sequence[str]:
        """Base URLs of `model`'s engines that are running but not serving yet (asleep,
        waking); empty when one serves. The proxy opens a connection to the first while
        the engine wakes, so the request does not pay for it after the wake."""
        ...

    async def early_upstream(self, model: str) -> str | None:
        """Base URL of `model`'s engine that may be sent a request before its wake ends
        (it queues requests while asleep and runs them once awake), or None at once.
        Returns once the engine was sent its wake, so the request follows the wake in (on
        an H100, ahead of the wake it slowed a 1.8 GB model's wake by ~10%). The proxy
        sends the request there and relays the answer once `ready_upstream` returns the
        same URL; on any other outcome it closes that connection, which makes the engine
        drop the queued request. Cancelled when `ready_upstream` ends first."""
        ...

    def request_started(self, model: str) -> None:
        """A request for `model` arrived (it may still queue). Idle tracking."""
        ...

    def request_finished(self, model: str) -> None:
        """A request counted by `request_started` is done, whatever its outcome."""
        ...


class ProxyObserver(Protocol):
    """Optional metrics hook (Prometheus later). Called on the hot path: be cheap."""

    def request_done(
        self, model: str, endpoint: str, status: int, duration: float, ttft: float | None
    ) -> None:
        """One request finished.

        `model` is the route's name ("" when no model was resolved: unknown
        name, bad JSON, 401). `endpoint` is the path (`/v1/chat/completions`).
        `duration` is seconds from arrival to the last byte written (or to the
        error), queueing and waking included. `ttft` is seconds from arrival
        to the first body chunk of a streamed (SSE) response written to the
        client, None otherwise.
        """
        ...


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """One request as the proxy saw it end, for the activity log (`ActivitySink`).

    `at` is time.time() at arrival; `asked` the alias the client named (None: the model's own
    name); `key` the API key's name (None without auth), never its secret; `stream` whether
    the answer was SSE; `tail` the last bytes of the answer, where an OpenAI-style `usage`
    object sits (b"" when none was kept). No prompt or completion text is handed over.
    """

    at: float
    endpoint: str
    model: str
    asked: str | None
    key: str | None
    status: int
    stream: bool
    duration: float
    ttft: float | None
    tail: bytes = b""


class ActivitySink(Protocol):
    """Optional per-request record (gpud.activity.ActivityLog). Called on the event loop for
    every request: append and return, never any I/O."""

    def request_done(self, finished: RequestFinished) -> None: ...
