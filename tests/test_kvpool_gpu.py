"""The KV pool on a real GPU: pages lent to another process, memory back to the driver, growth.

Marked ``gpu``: skipped, with the reason shown, where cuda-python or a GPU is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpud.kvpool.backend import BackendError
from gpud.kvpool.ledger import PoolLedger, TenantSpec
from gpud.kvpool.pool import KVPool
from gpud.kvpool.server import KVPoolServer

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
PAGE = 2 << 20


def _gpu_reason() -> str | None:
    try:
        from gpud.kvpool import cuda

        if cuda.gpu_count() < 1:
            return "the CUDA driver sees no GPU"
    except BackendError as e:
        return str(e)
    return None


REASON = _gpu_reason()
if REASON:
    pytest.skip(f"no GPU for the KV pool tests: {REASON}", allow_module_level=True)

from gpud.kvpool import cuda  # noqa: E402  (only once we know cuda-python is there)


@pytest.fixture(scope="module")
def device() -> cuda.Device:
    return cuda.Device(0)


class ServerThread:
    """The asyncio server on its own loop in a thread, as the daemon would run it."""

    def __init__(self, pool: KVPool, path: Path, allow_pids: set[int]) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = KVPoolServer(
            {0: pool}, path, lambda p, t: p.pid in allow_pids, give_back_timeout=10
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


ENGINE = textwrap.dedent(
    """
    import json, sys
    from gpud.kvpool import cuda
    from gpud.kvpool.client import KVPoolClient
    path, n = sys.argv[1], int(sys.argv[2])
    sys.stdin.readline()
    client = KVPoolClient(path, "chat")
    dev = cuda.Device(0)
    mapper = cuda.PageMapper(dev, 64 * client.page_size, client.page_size)
    r = client.grant(n)
    placed = [(i * client.page_size, g.fd) for i, g in enumerate(r.pages)]
    mapper.map_fds(placed)
    for i, g in enumerate(r.pages):
        mapper.fill(i * client.page_size, 0xC0DE0000 + g.page, client.page_size)
    print(json.dumps({"pages": [g.page for g in r.pages]}), flush=True)
    sys.stdin.readline()  # gpud reads them now
    mapper.unmap_all()
    client.give_back([g.page for g in r.pages])
    mapper.close()
    client.close()
    print(json.dumps({"done": True}), flush=True)
    """
)


@pytest.fixture
def gpu_pool(device: cuda.Device) -> Iterator[KVPool]:
    ledger = PoolLedger(gpu=0, total_pages=64)
    ledger.add_tenant(TenantSpec("chat", kv_max=32, priority=10))
    pool = KVPool(ledger, cuda.CudaBackend(0, PAGE))
    yield pool
    pool.close()


def test_pages_lent_to_another_process_are_written_there_and_read_back_by_gpud(
    gpu_pool: KVPool, tmp_path: Path
) -> None:
    pids: set[int] = set()
    srv = ServerThread(gpu_pool, tmp_path / "kv.sock", pids)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, str(srv.server.path), "8"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        pids.add(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"engine failed: exit {proc.wait()}"
        pages = json.loads(line)["pages"]
        assert len(pages) == 8
        for p in pages:
            word = int.from_bytes(gpu_pool.read(p, 4), "little")
            assert word == 0xC0DE0000 + p, f"page {p}: gpud read {word:#x}"
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"done": True}
        assert proc.wait(30) == 0
        srv.call(srv.server.wait_until(lambda: gpu_pool.ledger.free_pages == 64))
    finally:
        srv.close()


def test_released_pages_give_the_memory_back_to_the_driver(device: cuda.Device) -> None:
    n = 256  # 512 MiB
    ledger = PoolLedger(gpu=0, total_pages=n)
    pool = KVPool(ledger, cuda.CudaBackend(0, PAGE))
    free0, _ = device.mem_info()
    assert pool.grow_ahead(n) == n
    free1, _ = device.mem_info()
    assert free0 - free1 >= n * PAGE, f"{(free0 - free1) >> 20} MiB used for {n} pages"
    assert pool.shrink(keep=0) == n
    free2, _ = device.mem_info()
    assert abs(free2 - free0) <= 8 * PAGE, f"{(free0 - free2) >> 20} MiB did not come back"
    pool.close()


def test_pool_grows_and_shrinks_under_three_tenants_without_losing_a_page(
    device: cuda.Device,
) -> None:
    ledger = PoolLedger(gpu=0, total_pages=96)
    for name, lo, prio in (("chat", 8, 100), ("code", 4, 50), ("batch", 0, 1)):
        ledger.add_tenant(TenantSpec(name, kv_min=lo, kv_max=64, priority=prio))
    backend = cuda.CudaBackend(0, PAGE)
    pool = KVPool(ledger, backend, spare_pages=4)
    free0, _ = device.mem_info()
    mapper = cuda.PageMapper(device, 96 * PAGE, PAGE)
    script = [
        ("batch", 60),
        ("code", 20),
        ("chat", 40),  # batch gives back
        ("batch", -30),
        ("code", 30),
        ("chat", -40),
        ("batch", 50),
    ]
    for step, (name, delta) in enumerate(script):
        if delta > 0:
            g = pool.request(name, delta)
            mapper.map_handles([(r.offset, backend.handle(r.page)) for r in g.pages])
            for rc in g.decision.reclaims:
                give = sorted(ledger.pages_of(rc.tenant))[: rc.pages]
                for p in give:
                    mapper.unmap(p * PAGE)
                pool.release(rc.tenant, give)
            late = pool.claim_earmarked(name)
            mapper.map_handles([(r.offset, backend.handle(r.page)) for r in late])
        else:
            give = sorted(ledger.pages_of(name))[:-delta]
            for p in give:
                mapper.unmap(p * PAGE)
            pool.release(name, give)
            pool.shrink()
        ledger.check()
        # Every granted page is backed, and the driver holds exactly the backed pages.
        assert ledger.granted_pages + ledger.free_pages == 96, f"step {step}"
        assert backend.live_pages == ledger.backed_pages
        assert all(ledger.is_backed(p) for n in ledger.tenants() for p in ledger.pages_of(n))
        assert len(mapper.mapped) == ledger.granted_pages
    mapper.unmap_all()
    for name in ledger.tenants():
        pool.release_all(name)
    pool.shrink(keep=0)
    assert backend.live_pages == 0 and ledger.free_pages == 96
    mapper.close()
    pool.close()
    free_end, _ = device.mem_info()
    assert abs(free_end - free0) <= 8 * PAGE
