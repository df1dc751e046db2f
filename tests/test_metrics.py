"""/metrics: what a Prometheus scraper reads, parsed with prometheus_client's own parser.

Fast: a real daemon object on a real loopback socket, with one model that stays unloaded (no
engine is ever started) and a schedule; nothing here needs vLLM or a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from gpudproc import free_port
from prometheus_client.parser import text_string_to_metric_families

from gpud.config import load_config
from gpud.daemon import Daemon
from gpud.web import metrics as metrics_mod

# The families the issue promises, as the parser names them (counters lose `_total`).
FAMILIES = {
    "gpud_model_state": "gauge",
    "gpud_model_restarts": "counter",
    "gpud_requests": "counter",
    "gpud_request_duration_seconds": "histogram",
    "gpud_time_to_first_token_seconds": "histogram",
    "gpud_queue_depth": "gauge",
    "gpud_inflight": "gauge",
    "gpud_wake_duration_seconds": "histogram",
    "gpud_load_duration_seconds": "histogram",
    "gpud_reconcile_duration_seconds": "histogram",
    "gpud_config_valid": "gauge",
    "gpud_active_profile": "gauge",
    "gpud_gpu_memory_bytes": "gauge",
    "gpud_kv_pages": "gauge",
    "gpud_kv_pool_pages": "gauge",
    "gpud_kv_page_bytes": "gauge",
    "gpud_key_requests": "counter",
    "gpud_key_tokens": "counter",
}


_port = free_port  # the one free-port helper (tests/gpudproc.py)


def write_config(tmp_path: Path, models: str = "") -> Path:
    path = tmp_path / "gpud.toml"
    path.write_text(f"""
[daemon]
listen = "127.0.0.1:{_port()}"
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
timezone = "UTC"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]
{models}
""")
    return path


MODELS = """
[models.chat]
source = "nonexistent/chat"
state = "unloaded"

[profiles.day]
chat = "unloaded"

[profiles.night]
chat = "unloaded"

[[schedule]]
profile = "day"
when = "08:00-20:00"

[[schedule]]
profile = "night"
when = "otherwise"
"""


@contextlib.asynccontextmanager
async def serve(path: Path) -> AsyncIterator[tuple[TestClient[web.Request, web.Application],
                                                   Daemon, metrics_mod.GpudMetrics]]:
    from gpud.proxy.app import Proxy
    from gpud.web import api, page

    daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
    app = web.Application()
    daemon.proxy = Proxy(daemon.reconciler, keys=daemon._keyring())
    daemon.proxy.install(app)
    api.install(app, daemon.control)
    page.install(app, daemon.control)
    m = metrics_mod.install(app, daemon.control)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, daemon, m
    finally:
        await client.close()


async def scrape(client: TestClient[web.Request, web.Application]) -> dict[str, object]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_every_family_is_present_with_a_model(tmp_path: Path) -> None:
    async with serve(write_config(tmp_path, MODELS)) as (client, daemon, m):
        # The proxy reports through the observer the install handed it.
        assert daemon.proxy.observer is m.observer
        m.observer.request_done("chat", "/v1/chat/completions", 200, 0.42, 0.05)
        m.observer.request_done("", "/v1/chat/completions", 401, 0.001, None)
        daemon.events.publish("woke", model="chat", level=1, duration=0.3)
        daemon.events.publish("loaded", model="chat#1", duration=31.5)
        daemon.reconciler.pass_once()  # feeds the reconcile histogram where it is recorded
        import asyncio

        await asyncio.sleep(0.05)  # the event follower runs on the loop
        families = await scrape(client)
    for name, kind in FAMILIES.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, name  # type: ignore[attr-defined]

    def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        fam = families[name]
        return {(s.name, *sorted(s.labels.items())): s.value  # type: ignore[misc]
                for s in fam.samples}  # type: ignore[attr-defined]

    state = samples("gpud_model_state")
    assert state[("gpud_model_state", ("model", "chat"), ("state", "unloaded"))] == 1.0
    assert state[("gpud_model_state", ("model", "chat"), ("state", "awake"))] == 0.0
    assert samples("gpud_model_restarts")[
        ("gpud_model_restarts_total", ("model", "chat"))] == 0.0
    reqs = samples("gpud_requests")
    assert reqs[("gpud_requests_total", ("code", "200"), ("model", "chat"))] == 1.0
    assert reqs[("gpud_requests_total", ("code", "401"), ("model", ""))] == 1.0
    assert samples("gpud_request_duration_seconds")[
        ("gpud_request_duration_seconds_count", ("model", "chat"))] == 1.0
    assert samples("gpud_time_to_first_token_seconds")[
        ("gpud_time_to_first_token_seconds_count", ("model", "chat"))] == 1.0
    assert samples("gpud_wake_duration_seconds")[
        ("gpud_wake_duration_seconds_count", ("level", "1"), ("model", "chat"))] == 1.0
    # Replicas ("chat#1") count under their model.
    assert samples("gpud_load_duration_seconds")[
        ("gpud_load_duration_seconds_count", ("model", "chat"))] == 1.0
    assert samples("gpud_queue_depth")[("gpud_queue_depth", ("model", "chat"))] == 0.0
    assert samples("gpud_inflight")[("gpud_inflight", ("model", "chat"))] == 0.0
    assert samples("gpud_config_valid")[("gpud_config_valid",)] == 1.0
    profiles = samples("gpud_active_profile")
    assert sorted(v for v in profiles.values()) == [0.0, 1.0]
    assert ("gpud_reconcile_duration_seconds_count",) in samples("gpud_reconcile_duration_seconds")


async def test_families_present_without_models(tmp_path: Path) -> None:
    """An empty box still describes every family (HELP/TYPE), so dashboards and alerts
    do not break before the first model is configured."""
    async with serve(write_config(tmp_path)) as (client, _daemon, _m):
        families = await scrape(client)
    missing = set(FAMILIES) - set(families)
    assert not missing, f"families missing without models: {sorted(missing)}"
    assert families["gpud_config_valid"].samples[0].value == 1.0  # type: ignore[attr-defined]


async def test_a_refused_reload_shows_in_config_valid(tmp_path: Path) -> None:
    path = write_config(tmp_path, MODELS)
    async with serve(path) as (client, daemon, _m):
        path.write_text(path.read_text() + "\n[models.broken]\nstate = 'sideways'\n")
        result = await daemon.reload(source="test")
        assert result["valid"] is False
        families = await scrape(client)
    assert families["gpud_config_valid"].samples[0].value == 0.0  # type: ignore[attr-defined]


async def test_scraping_never_starts_an_engine(tmp_path: Path) -> None:
    async with serve(write_config(tmp_path, MODELS)) as (client, daemon, _m):
        for _ in range(3):
            await scrape(client)
        assert all(i.proc is None for i in daemon.reconciler.instances.values())
        assert not daemon.reconciler._tasks
        assert not daemon.reconciler.demand


@pytest.mark.parametrize("kind", ["woke", "loaded"])
def test_events_without_a_duration_are_ignored(tmp_path: Path, kind: str) -> None:
    path = write_config(tmp_path, MODELS)
    daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
    m = metrics_mod.GpudMetrics(daemon.control)
    m.on_event({"kind": kind, "model": "chat"})
    m.on_event({"kind": kind, "model": "chat", "duration": "fast"})
    text = m.registry  # nothing observed: no labelled children
    assert not list(m.wake._metrics) and not list(m.load._metrics), text


async def test_kv_pool_pages_per_model_and_the_model_asleep_to_the_ledger(tmp_path: Path) -> None:
    pooled = MODELS.replace('state = "unloaded"\n', 'state = "unloaded"\nkv_min = "4MiB"\n'
                            'kv_max = "64MiB"\n', 1)
    async with serve(write_config(tmp_path, pooled)) as (client, daemon, _m):
        (tmp_path / "run").mkdir(exist_ok=True)
        await daemon.kv.start(daemon.loaded.config)
        assert daemon.kvpool is not None
        try:
            pool = daemon.kvpool.pools[0]
            pool.grant_now("chat", 3)  # what an engine's grant does
            daemon.reconciler.pass_once()  # the pass hook tells the ledger what chat does
            assert pool.ledger.summary()["tenants"]["chat"]["activity"] == "asleep"
            families = await scrape(client)
            page = await (await client.get("/")).text()  # the status page says it too
            assert "KV pool: 3 pages (6" in page
        finally:
            await daemon.kvpool.close()

    def samples(name: str) -> dict[tuple[str, ...], float]:
        return {tuple(v for _, v in sorted(s.labels.items())): s.value  # type: ignore[misc]
                for s in families[name].samples}  # type: ignore[attr-defined]

    assert samples("gpud_kv_pages") == {("0", "chat"): 3.0}
    kinds = samples("gpud_kv_pool_pages")
    assert kinds[("0", "total")] == 32.0 and kinds[("0", "granted")] == 3.0
    assert kinds[("0", "free")] == 29.0
    assert samples("gpud_kv_page_bytes") == {("0",): 2.0 * 1024 * 1024}


def test_a_pool_models_engine_gets_the_plugins_env_and_kv_max(tmp_path: Path) -> None:
    """What gpud adds for the gpud_vllm plugin: its socket, the model, the GPU, and
    --kv-cache-memory-bytes = kv_max (vLLM's virtual KV size; pages come as load grows)."""
    from gpud.engines.vllm import build_argv, build_env

    pooled = MODELS.replace('state = "unloaded"\n', 'state = "unloaded"\ngpu = 0\n'
                            'kv_min = "64MiB"\nkv_max = "8GiB"\n', 1)
    path = write_config(tmp_path, pooled)
    daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
    r = daemon.reconciler
    spec = r.spec_for(r.desired()["chat"])
    env = dict(build_env(spec, {}))
    assert env["GPUD_KV_SOCKET"] == str(tmp_path / "run" / "kvpool.sock")
    assert env["GPUD_TENANT"] == "chat" and env["GPUD_GPU"] == "0"
    assert " ".join(build_argv(spec, 18001)).count(f"--kv-cache-memory-bytes {8 << 30}") == 1


async def test_a_reload_that_adds_a_pool_model_starts_the_pool(tmp_path: Path) -> None:
    path = write_config(tmp_path, MODELS)
    async with serve(path) as (client, daemon, _m):
        assert daemon.kvpool is None
        (tmp_path / "run").mkdir(exist_ok=True)
        path.write_text(path.read_text().replace(
            'state = "unloaded"\n', 'state = "unloaded"\nkv_max = "64MiB"\n', 1))
        result = await daemon.reload(source="test")
        assert result["valid"] and result["changed"]
        try:
            status = await (await client.get("/api/v1/status")).json()
            assert status["kvpool"]["gpus"]["0"]["tenants"]["chat"]["kv_max"] == 32
            assert (tmp_path / "run" / "kvpool.sock").exists()
        finally:
            await daemon.kvpool.close()
