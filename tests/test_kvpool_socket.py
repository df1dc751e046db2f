"""The KV pool socket on CPU: real engine-like client processes, real fds, a real SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpud.kvpool.backend import MemfdBackend, NoBackend
from gpud.kvpool.client import KVPoolClient, KVPoolError
from gpud.kvpool.ledger import PoolLedger, TenantSpec
from gpud.kvpool.pool import KVPool
from gpud.kvpool.server import KVPoolServer, PeerCredentials

REPO = Path(__file__).resolve().parents[1]

# An engine stand-in: maps each page it is lent, writes "<model>:<page>" at its start,
# gives pages back when gpud asks, and obeys "grant N" / "return" / "exit" on stdin.
ENGINE = textwrap.dedent(
    """
    import json, mmap, os, select, sys
    from gpud.kvpool.client import KVPoolClient

    path, tenant = sys.argv[1], sys.argv[2]
    sys.stdin.readline()  # wait until gpud knows our pid
    maps = {}

    def give_back(n):
        pages = sorted(maps, reverse=True)[:n]
        for p in pages:
            maps.pop(p).close()  # unmap before returning
        print(json.dumps({"gave_back": pages}), flush=True)
        return pages

    client = KVPoolClient(path, tenant, on_give_back=give_back)
    print(json.dumps({"hello": client.backend, "page_size": client.page_size}), flush=True)
    while True:
        ready, _, _ = select.select([sys.stdin, client], [], [])
        if client in ready:
            client.poll()
        if sys.stdin in ready:
            cmd = sys.stdin.readline().split()
            if not cmd or cmd[0] == "exit":
                break
            if cmd[0] == "grant":
                r = client.grant(int(cmd[1]))
                for g in r.pages:
                    m = mmap.mmap(g.fd, client.page_size)
                    g.close_fd()
                    m[:32] = f"{tenant}:{g.page}".encode().ljust(32, b"\\0")
                    maps[g.page] = m
                print(json.dumps({"granted": [g.page for g in r.pages],
                                  "refused": r.refused, "reason": r.reason}), flush=True)
            elif cmd[0] == "return":
                pages = sorted(maps)
                for p in pages:
                    maps.pop(p).close()
                client.give_back(pages)
                print(json.dumps({"returned": pages}), flush=True)
    client.close()
    """
)


class Engine:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def read(self, key: str) -> Any:
        assert self.proc.stdout is not None
        async with asyncio.timeout(10):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"engine {self.pid} exited before saying {key!r}")
                msg = json.loads(line)
                if key in msg:
                    return msg


def make_pool(backend: str = "memfd", total: int = 16) -> KVPool:
    ledger = PoolLedger(gpu=0, total_pages=total)
    ledger.add_tenant(TenantSpec("low", kv_min=2, priority=1))
    ledger.add_tenant(TenantSpec("high", kv_min=0, priority=9))
    page_size = ledger.page_size
    be = MemfdBackend(page_size) if backend == "memfd" else NoBackend(page_size)
    return KVPool(ledger, be)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[KVPoolServer, set[int]]]:
    started: set[int] = set()

    def allow(peer: PeerCredentials, tenant: str) -> bool:
        return peer.pid in started

    server = KVPoolServer({0: make_pool()}, tmp_path / "kv.sock", allow, give_back_timeout=5)
    await server.start()
    yield server, started
    await server.close()


async def start_engine(server: KVPoolServer, started: set[int], tenant: str) -> Engine:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ENGINE,
        str(server.path),
        tenant,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    started.add(proc.pid)
    engine = Engine(proc)
    await engine.send("go")
    assert (await engine.read("hello"))["hello"] == "memfd"
    return engine


async def test_two_engines_share_pages_and_a_killed_one_gives_them_all_back(
    served: tuple[KVPoolServer, set[int]],
) -> None:
    server, started = served
    pool = server.pools[0]
    low = await start_engine(server, started, "low")
    high = await start_engine(server, started, "high")

    await low.send("grant 12")
    got = await low.read("granted")
    assert len(got["granted"]) == 12 and got["refused"] == 0
    # What the engine wrote into its mapping is in gpud's page: one memory, two processes.
    page = got["granted"][0]
    assert pool.read(page, 32).rstrip(b"\0") == f"low:{page}".encode()

    # "high" wants 8, only 4 are free: "low" (lower priority, above its minimum) gives back 4.
    created: list[int] = []
    create = pool.backend.create
    pool.backend.create = lambda p: created.append(p) or create(p)  # type: ignore[method-assign]
    await high.send("grant 8")
    gave = await low.read("gave_back")
    assert len(gave["gave_back"]) == 4
    got_high = await high.read("granted")
    assert len(got_high["granted"]) == 8 and got_high["refused"] == 0
    assert set(got_high["granted"]) >= set(gave["gave_back"])
    # The 4 pages low gave back went to high as they were (zeroed), not through the driver.
    assert len(created) == 4 and not set(created) & set(gave["gave_back"])
    status = server.status()
    assert status["backend"] == "memfd"
    assert status["gpus"]["0"]["granted"] == {"high": 8, "low": 8}  # type: ignore[index]
    assert status["gpus"]["0"]["pages_free"] == 0  # type: ignore[index]

    # SIGKILL: no goodbye, no return. gpud takes its 8 pages back anyway.
    low.proc.send_signal(signal.SIGKILL)
    assert await low.proc.wait() == -signal.SIGKILL
    await server.wait_until(lambda: pool.ledger.free_pages == 8)
    assert pool.ledger.pages_of("low") == frozenset()
    pool.ledger.check()

    # And those pages are lent again, to whoever asks.
    await high.send("grant 4")
    assert len((await high.read("granted"))["granted"]) == 4
    await high.send("return")
    await high.read("returned")
    await high.send("exit")
    assert await high.proc.wait() == 0
    await server.wait_until(lambda: pool.ledger.free_pages == 16)
    pool.ledger.check()


async def test_a_process_gpud_did_not_start_is_refused(
    served: tuple[KVPoolServer, set[int]],
) -> None:
    server, _started = served
    # This test's own process is not in the allow-list.
    with pytest.raises(KVPoolError, match=r"pid \d+ may not hold KV pages for model 'low'"):
        await asyncio.to_thread(KVPoolClient, server.path, "low")
    with pytest.raises(KVPoolError, match="model 'nobody' has no place"):
        await asyncio.to_thread(KVPoolClient, server.path, "nobody")
    assert server.pools[0].ledger.free_pages == 16


async def test_without_backend_pages_are_books_only_and_status_says_so(tmp_path: Path) -> None:
    server = KVPoolServer({0: make_pool("none")}, tmp_path / "kv.sock", lambda p, t: True)
    await server.start()
    try:
        client = await asyncio.to_thread(KVPoolClient, server.path, "high")
        assert client.backend == "none"
        r = await asyncio.to_thread(client.grant, 3)
        assert [g.fd for g in r.pages] == [None, None, None]
        assert server.status()["backend"] == "none"
        info = server.status()["gpus"]["0"]["backend_info"]  # type: ignore[index]
        assert "no GPU backend" in info["note"]
        # Closed without returning, process still alive: pages are held back, not re-lent.
        await asyncio.to_thread(client.close, False)
        await server.wait_until(lambda: not server.status()["clients"])
        assert server.status()["held_back"] == {"high": 3}
        assert server.pools[0].ledger.free_pages == 13
    finally:
        await server.close()
    assert server.pools[0].ledger.free_pages == 16


async def test_a_grant_beyond_what_anyone_may_give_is_partly_refused_with_a_reason(
    tmp_path: Path,
) -> None:
    server = KVPoolServer({0: make_pool("none", total=4)}, tmp_path / "kv.sock", lambda p, t: True)
    await server.start()
    try:
        low = await asyncio.to_thread(KVPoolClient, server.path, "low")
        assert len((await asyncio.to_thread(low.grant, 2)).pages) == 2  # its minimum
        high = await asyncio.to_thread(KVPoolClient, server.path, "high")
        r = await asyncio.to_thread(high.grant, 4)
        assert len(r.pages) == 2 and r.refused == 2
        assert "no other model may give back" in r.reason
        await asyncio.to_thread(high.close)
        await asyncio.to_thread(low.close)
        await server.wait_until(lambda: server.pools[0].ledger.free_pages == 4)
    finally:
        await server.close()


async def test_an_idle_model_is_trimmed_to_its_kv_min_and_memory_goes_back(
    served: tuple[KVPoolServer, set[int]],
) -> None:
    """What gpud does when a pool model goes quiet: it asks the engine for every page above
    kv_min; the engine unmaps and returns them, and their memory goes back to the driver."""
    from gpud.kvpool.ledger import Activity

    server, started = served
    low = await start_engine(server, started, "low")
    await low.send("grant 6")
    assert len((await low.read("granted"))["granted"]) == 6
    pool = server.pools[0]
    assert pool.status()["pages_backed"] == 6

    server.set_activity("low", Activity.IDLE)
    assert pool.ledger.activity("low") is Activity.IDLE
    asked = await server.trim("low")
    assert asked == 4  # 6 held, kv_min 2
    assert len((await low.read("gave_back"))["gave_back"]) == 4
    await server.wait_until(lambda: pool.ledger.summary()["granted"] == {"high": 0, "low": 2})
    assert pool.status()["pages_backed"] == 2  # the 4 pages' memory was released
    assert await server.trim("low") == 0  # at its minimum: nothing more to ask
    await low.send("exit")
    await low.proc.wait()
