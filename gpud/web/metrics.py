"""`GET /metrics`: gpud's own state in Prometheus text format.

One private CollectorRegistry per daemon. State (models, queues, profile, config, memory) is
read from the daemon's snapshots at scrape time by a custom collector; request, wake, load
and reconcile durations are histograms fed as they happen (the proxy's observer hook, the
event bus, the loop's pass hook). A scrape never calls an engine and never wakes a
model; engines' own metrics are not re-exported under gpud's names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from gpud.memory import measure
from gpud.states import State
from gpud.web.control import Control

log = logging.getLogger("gpud.web.metrics")

# Every state an instance can be in; gpud_model_state has one series per state (0 or 1).
MODEL_STATES = tuple(s.value for s in State)

REQUEST_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 900, 1800)
RECONCILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


def _model_of(key: str) -> str:
    """The model of an instance key ("chat#1" -> "chat"): durations are per model."""
    return key.split("#", 1)[0]


class RequestMetrics:
    """The proxy's `ProxyObserver`: counts and times every request at the proxy.

    Wire it with `Proxy(backend, observer=metrics.observer)` (or set `proxy.observer`).
    Called on the hot path: a label lookup and two observations.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gpud_requests", "Requests answered by gpud's proxy, by model and HTTP status "
            "(model is empty when none was resolved: unknown name, bad JSON, 401).",
            ["model", "code"], registry=registry)
        self.duration = Histogram(
            "gpud_request_duration_seconds", "Seconds from a request's arrival to its last "
            "byte, queueing and waking included.", ["model"], buckets=REQUEST_BUCKETS,
            registry=registry)
        self.ttft = Histogram(
            "gpud_time_to_first_token_seconds", "Seconds from a streamed request's arrival "
            "to the first body chunk sent to the client, measured at the proxy.", ["model"],
            buckets=TTFT_BUCKETS, registry=registry)

        # The labelled children, looked up once (labels() takes a lock and builds a key).
        self._counts: dict[tuple[str, int], Any] = {}
        self._times: dict[str, tuple[Any, Any]] = {}

    def request_done(
        self, model: str, endpoint: str, status: int, duration: float, ttft: float | None
    ) -> None:
        count = self._counts.get((model, status))
        if count is None:
            count = self._counts[model, status] = self.requests.labels(model, str(status))
        count.inc()
        if model:
            times = self._times.get(model)
            if times is None:
                times = self._times[model] = (self.duration.labels(model),
                                              self.ttft.labels(model))
            times[0].observe(duration)
            if ttft is not None:
                times[1].observe(ttft)


class StateCollector(Collector):
    """Reads the daemon's state at scrape time; nothing here talks to an engine."""

    def __init__(self, control: Control) -> None:
        self.control = control
        # Measured off the event loop just before a scrape renders (see GpudMetrics.scrape).
        self.memory: dict[str, Any] = {"gpus": [], "host": {"engines": {}}}

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        try:
            self._fill(*families)
        except Exception:  # a scrape shows what it has rather than a 500
            log.exception("collecting gpud's state for /metrics failed")
        return families

    @staticmethod
    def _families() -> tuple[Any, ...]:
        return (
            GaugeMetricFamily("gpud_model_state", "1 for the state each model instance is in "
                              "now, 0 for the others.", labels=["model", "state"]),
            CounterMetricFamily("gpud_model_restarts", "Times an instance's engine exited "
                                "unexpectedly since gpud started.", labels=["model"]),
            GaugeMetricFamily("gpud_queue_depth", "Requests waiting for a slot or a wake, "
                              "by model.", labels=["model"]),
            GaugeMetricFamily("gpud_inflight", "Requests being served by an engine, by "
                              "model.", labels=["model"]),
            GaugeMetricFamily("gpud_config_valid", "1 when the last config load was valid, "
                              "0 when the last reload was refused (the previous config runs)."),
            GaugeMetricFamily("gpud_active_profile", "1 for the active profile, 0 for the "
                              "other defined profiles.", labels=["profile"]),
            GaugeMetricFamily("gpud_gpu_memory_bytes", "GPU memory by GPU and kind: total, "
                              "used, free, models (gpud's engines) and other (everything "
                              "else). No series without a GPU.", labels=["gpu", "kind"]),
            GaugeMetricFamily("gpud_model_memory_bytes", "Memory held by each model instance "
                              "on a GPU (NVML) or, without a GPU, its engine's host RSS.",
                              labels=["model", "device"]),
            GaugeMetricFamily("gpud_kv_pages", "KV pool pages lent to each model, by GPU "
                              "(one page is gpud_kv_page_bytes). No series without a pool "
                              "model.", labels=["gpu", "model"]),
            GaugeMetricFamily("gpud_kv_pool_pages", "KV pool pages by GPU and kind: total, "
                              "granted, free, backed (with GPU memory behind them).",
                              labels=["gpu", "kind"]),
            GaugeMetricFamily("gpud_kv_page_bytes", "Bytes in one KV pool page.", labels=["gpu"]),
        )

    def _fill(self, state: GaugeMetricFamily, restarts: CounterMetricFamily,
              queue: GaugeMetricFamily, inflight: GaugeMetricFamily,
              config_valid: GaugeMetricFamily, profile: GaugeMetricFamily,
              gpu_mem: GaugeMetricFamily, model_mem: GaugeMetricFamily,
              kv_pages: GaugeMetricFamily, kv_pool: GaugeMetricFamily,
              kv_page: GaugeMetricFamily) -> None:
        d = self.control
        models = d.model_states()
        for key, m in models.items():
            for st in MODEL_STATES:
                state.add_metric([key, st], 1.0 if m["state"] == st else 0.0)
            if m["state"] not in MODEL_STATES:
                state.add_metric([key, str(m["state"])], 1.0)
            restarts.add_metric([key], float(m.get("restarts") or 0))
        stats = d.proxy_stats()
        for name in sorted(set(d.config.models) | set(stats)):
            s = stats.get(name, {})
            queue.add_metric([name], float(s.get("queued", 0)))
            inflight.add_metric([name], float(s.get("inflight", 0)))
        config_valid.add_metric([], 0.0 if d.config_error else 1.0)
        active = d.active_profile()
        for name in sorted(set(d.config.profiles) | ({active} if active else set())):
            profile.add_metric([name], 1.0 if name == active else 0.0)
        memory = self.memory
        for gpu in memory["gpus"]:
            idx = str(gpu["index"])
            models_total = sum(gpu["models"].values())
            for kind, value in (("total", gpu["total"]), ("used", gpu["used"]),
                                ("free", gpu["free"]), ("models", models_total),
                                ("other", gpu["other"])):
                gpu_mem.add_metric([idx, kind], float(value))
            for key, used in sorted(gpu["models"].items()):
                model_mem.add_metric([key, f"gpu{idx}"], float(used))
        if not memory["gpus"]:
            for key, e in sorted(memory["host"]["engines"].items()):
                model_mem.add_metric([key, "host"], float(e["rss"]))
        pool = d.kv_status() or {"gpus": {}}
        for gpu, g in sorted(pool["gpus"].items()):
            for model, pages in sorted(g["granted"].items()):
                kv_pages.add_metric([gpu, model], float(pages))
            kv_pool.add_metric([gpu, "granted"], float(sum(g["granted"].values())))
            for kind, key in (("total", "pages_total"), ("free", "pages_free"),
                              ("backed", "pages_backed")):
                kv_pool.add_metric([gpu, kind], float(g[key]))
            kv_page.add_metric([gpu], float(g.get("page_size", 0)))


class ConnectionCollector(Collector):
    """The listener's connections (gpud.listener.ConnectionGuard), read at scrape time."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily,
                             CounterMetricFamily]:
        return (
            GaugeMetricFamily("gpud_http_connections", "Open client connections of gpud's "
                              "listener, by kind: open, cap (max_connections as applied)",
                              labels=["kind"]),
            CounterMetricFamily("gpud_http_connections_refused", "Connections answered 503 "
                                "at the cap because every open one had a request in "
                                "progress."),
            CounterMetricFamily("gpud_http_connections_closed", "Connections gpud closed, by "
                                "reason: header_timeout, idle_timeout, evicted (the "
                                "longest-idle one, at the cap).", labels=["reason"]),
            CounterMetricFamily("gpud_http_accept_failures", "Accepts that failed for want "
                                "of file descriptors (EMFILE/ENFILE)."),
        )

    def collect(self) -> Iterable[Metric]:
        conns, refused, closed, accept = families = self._families()
        stats: dict[str, Any] = self.control.connections or {
            "open": 0, "cap": 0, "refused": 0, "closed": {}, "accept_failures": 0}
        conns.add_metric(["open"], float(stats["open"]))
        conns.add_metric(["cap"], float(stats["cap"]))
        refused.add_metric([], float(stats["refused"]))
        for reason in ("header_timeout", "idle_timeout", "evicted"):
            closed.add_metric([reason], float(stats["closed"].get(reason, 0)))
        accept.add_metric([], float(stats["accept_failures"]))
        return families


class KeyCollector(Collector):
    """Requests and tokens per API key name since start-up, from the activity log's writer
    (so up to its flush interval behind). Key "" is requests without auth."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily("gpud_key_requests", "Requests through the proxy by API key "
                                "name (\"\": no auth), as the activity log recorded them.",
                                labels=["key"]),
            CounterMetricFamily("gpud_key_tokens", "Tokens by API key name and direction "
                                "(in: prompt, out: completion), from the answers' usage.",
                                labels=["key", "direction"]),
        )

    def collect(self) -> Iterable[Metric]:
        requests, tokens = families = self._families()
        for key, t in sorted(self.control.activity_totals().items()):
            requests.add_metric([key], float(t["requests"]))
            tokens.add_metric([key, "in"], float(t["tokens_in"]))
            tokens.add_metric([key, "out"], float(t["tokens_out"]))
        return families


class GpudMetrics:
    """gpud's registry: the scrape-time collector plus the histograms fed as things happen."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.registry = CollectorRegistry(auto_describe=True)
        self.observer = RequestMetrics(self.registry)
        self.wake = Histogram(
            "gpud_wake_duration_seconds", "Seconds an engine took to wake, by model and "
            "sleep level.", ["model", "level"], buckets=WAKE_BUCKETS, registry=self.registry)
        self.load = Histogram(
            "gpud_load_duration_seconds", "Seconds from an engine's start to its first "
            "healthy answer, by model.", ["model"], buckets=LOAD_BUCKETS,
            registry=self.registry)
        self.reconcile = Histogram(
            "gpud_reconcile_duration_seconds", "Seconds one reconcile pass took (planning "
            "and starting actions; the actions themselves run after).",
            buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.state = StateCollector(control)
        self.registry.register(self.state)
        self.registry.register(ConnectionCollector(control))
        self.registry.register(KeyCollector(control))
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[dict[str, Any]] | None = None

    # --- feeds ----------------------------------------------------------------------------

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        duration = event.get("duration")
        if not isinstance(duration, int | float) or duration < 0:
            return
        model = _model_of(str(event.get("model", "")))
        if kind == "woke":
            self.wake.labels(model, str(event.get("level", 1))).observe(duration)
        elif kind == "loaded":
            self.load.labels(model).observe(duration)

    def on_pass(self) -> None:
        seconds = self.control.last_pass_seconds
        if isinstance(seconds, int | float) and seconds >= 0:
            self.reconcile.observe(seconds)

    async def _follow(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            self.on_event(await queue.get())

    async def start(self) -> None:
        if self._task is None:
            self._queue = self.control.events.subscribe()
            self._task = asyncio.create_task(self._follow(self._queue), name="metrics-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            self.control.events.unsubscribe(self._queue)
            self._queue = None

    # --- exposition -----------------------------------------------------------------------

    async def scrape(self) -> bytes:
        """Measure memory in a worker thread (NVML, /proc), then render on the loop, where
        the daemon's state may be read safely."""
        self.state.memory = await asyncio.to_thread(measure, self.control.engines())
        return generate_latest(self.registry)


METRICS_KEY: web.AppKey[GpudMetrics] = web.AppKey("gpud_metrics", GpudMetrics)


async def handle_metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS_KEY].scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def install(app: web.Application, control: Control) -> GpudMetrics:
    """Add `GET /metrics` and start feeding the histograms.

    Also hands the request observer to the proxy when it has none yet, and hooks the loop's
    pass for gpud_reconcile_duration_seconds (the pass's own duration, as the loop records it).
    """
    metrics = GpudMetrics(control)
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", handle_metrics)
    control.observe_requests(metrics.observer)
    remove_hook = control.on_pass(metrics.on_pass)

    async def on_startup(_: web.Application) -> None:
        await metrics.start()

    async def on_cleanup(_: web.Application) -> None:
        await metrics.stop()
        remove_hook()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return metrics
