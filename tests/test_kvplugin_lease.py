"""The plugin's lease of pool pages: page groups granted as real memfd fds and mapped by the
pool thread ahead of need, the engine's thread never waiting on a grant it did not have to,
give-back only of wholly free groups behind the fence of the thread that retired them, all
returned on sleep, group 0 back on wake; and the same over gpud's real socket and server."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpud.kvpool.backend import MemfdBackend
from gpud.kvpool.client import GrantedPage, GrantResult, KVPoolClient
from gpud.kvpool.ledger import Activity, PoolLedger, TenantSpec
from gpud.kvpool.pool import KVPool
from gpud.kvpool.server import KVPoolServer
from gpud_vllm.geometry import KVGeometry
from gpud_vllm.lease import Growth, LeaseError, PoolExhausted, PoolLink
from gpud_vllm.memfd import MemfdGroupMapper

PAGE = 2 * 1024 * 1024
GEO = KVGeometry(block_bytes=256 * 1024, num_tensors=3, num_blocks=40)  # 8 per page, 5 groups


@dataclass
class FakePool:
    """gpud's side, in-process: a cap on pages and real memfd pages (fds dup'ed per grant).
    ``gate``, when set, holds every grant until it is set (a slow round trip)."""

    cap: int
    backend: MemfdBackend = field(default_factory=lambda: MemfdBackend(PAGE))
    page_size: int = PAGE
    lent: set[int] = field(default_factory=set)
    returned: list[int] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)
    next_page: int = 0
    gate: threading.Event | None = None
    during_grant: Callable[[], None] | None = None

    def grant(self, n: int) -> GrantResult:
        self.asked.append(n)
        if self.during_grant is not None:
            self.during_grant()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never let the grant through"
        k = max(0, min(n, self.cap - len(self.lent)))
        pages = []
        for _ in range(k):
            p = self.next_page
            self.next_page += 1
            fd = self.backend.create(p)
            assert fd is not None
            pages.append(GrantedPage(p, p * PAGE, os.dup(fd)))
            self.lent.add(p)
        return GrantResult(pages, n - k, "" if k == n else "over kv_max")

    def give_back(self, pages: Sequence[int]) -> None:
        assert set(pages) <= self.lent, "returned a page that was not lent"
        self.lent -= set(pages)
        self.returned.extend(pages)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def fence_of_thread() -> str:
    """A fence token naming the thread that retired the blocks."""
    return f"fence:{threading.current_thread().name}"


@pytest.fixture
def pool() -> FakePool:
    return FakePool(cap=3 * 3)


@pytest.fixture
def links() -> Iterator[list[PoolLink]]:
    made: list[PoolLink] = []
    yield made
    for link in made:
        link.close()


def link_for(pool: FakePool, links: list[PoolLink], clock: Clock | None = None,
             growth: Growth | None = None) -> tuple[PoolLink, MemfdGroupMapper]:
    mapper = MemfdGroupMapper(GEO.num_tensors, PAGE)
    link = PoolLink(GEO, pool, mapper, clock=clock or Clock(), retry_after=1.0,
                    fence=fence_of_thread, growth=growth)
    link.start()
    links.append(link)
    return link, mapper


def grow(link: PoolLink, groups: int) -> list[int]:
    with link.lock:
        link.request_growth(groups)
        link.settle()
    return link.book.free_ids()


def test_group_zero_is_mapped_at_start_and_writes_reach_gpuds_pages(
    pool: FakePool, links: list[PoolLink]
) -> None:
    link, mapper = link_for(pool, links)
    assert pool.asked == [3] and link.pages_of == {0: [0, 1, 2]}
    assert link.book.free_ids() == list(range(1, 8))
    for t in range(3):
        mapper.view(t, 0)[:4] = bytes([t + 1] * 4)
    assert [pool.backend.read(p, 4) for p in (0, 1, 2)] == [b"\1" * 4, b"\2" * 4, b"\3" * 4]
    # An unmapped group is the scratch page: writes land nowhere that counts.
    mapper.view(0, 3)[:4] = b"junk"
    assert mapper.view(1, 4)[:4] == b"junk"


def test_grows_by_whole_groups_and_is_refused_at_the_cap(links: list[PoolLink]) -> None:
    pool, clock = FakePool(cap=3 * 3 + 2), Clock()
    link, _ = link_for(pool, links, clock)
    assert grow(link, 1) == list(range(1, 16))
    assert grow(link, 4) == list(range(1, 24))  # 2 pages over: not a whole group
    assert sorted(pool.lent) == list(range(9))  # the 2 partial pages went straight back
    assert link.book.mapped_groups == [0, 1, 2] and link.growing == 0
    assert not link.can_grow() and "kv_max" in link.last_refusal
    with link.lock:
        assert link.request_growth(1) == 0
    clock.now = 1.5
    assert link.can_grow()


def test_start_without_group_zero_fails_loudly(links: list[PoolLink]) -> None:
    pool = FakePool(cap=2)
    with pytest.raises(PoolExhausted, match="group 0"):
        link_for(pool, links)
    assert pool.lent == set()  # the two pages it did lend went back


def test_page_size_mismatch_is_refused() -> None:
    pool = FakePool(cap=9, backend=MemfdBackend(4 * 1024 * 1024), page_size=4 * 1024 * 1024)
    with pytest.raises(LeaseError, match="bytes"):
        PoolLink(GEO, pool, MemfdGroupMapper(3, PAGE))


def test_the_watermark_grows_ahead_without_the_engine_waiting(links: list[PoolLink]) -> None:
    """Below the low mark the engine asks and goes on; the pages arrive while it works and
    reach vLLM's free queue (on_fresh) at its next look."""
    gate = threading.Event()
    gate.set()
    pool = FakePool(cap=3 * 5, gate=gate)
    link, _ = link_for(pool, links, growth=Growth(low_groups=1, low_share=0, step_groups=2))
    fresh: list[int] = []
    link.on_fresh = fresh.extend
    gate.clear()
    with link.lock:
        link.book.take(range(1, 6))  # 2 free blocks left: under one group's 8
        link.keep_ahead(link.book.free_blocks)
        assert link.growing == 2  # asked, and returned at once: the grant is still held
        link.keep_ahead(link.book.free_blocks)  # no second ask while one is under way
        assert link.absorb() == [] and link.book.free_blocks == 2
    gate.set()
    with link.lock:
        link.settle()
    assert fresh == list(range(8, 24)) and link.growing == 0
    assert pool.asked == [3, 6] and link.book.mapped_groups == [0, 1, 2]  # one ask of 2 groups


def test_a_request_short_of_blocks_asks_for_them_plus_a_step(
    pool: FakePool, links: list[PoolLink]
) -> None:
    link, _ = link_for(pool, links, growth=Growth(step_groups=1, step_share=0))
    with link.lock:
        assert link.short_by(9) == 3  # 2 groups of 8 for 9 blocks, plus a step of 1
        assert link.short_by(9) == 0  # the growth under way covers it
        fresh = link.wait_growth()
    assert fresh == list(range(8, 24))  # 2 of the 3 groups: the cap is 3 groups in all
    assert link.book.mapped_groups == [0, 1, 2] and link.last_refusal == "over kv_max"


def test_give_back_while_idle_is_done_by_the_pool_thread_behind_its_fence(
    pool: FakePool, links: list[PoolLink]
) -> None:
    link, mapper = link_for(pool, links)
    grow(link, 2)
    retired: list[int] = []
    link.on_retire = retired.extend
    with link.lock:
        link.book.take([9])  # a request holds a block of group 1
    pages = link.handle_give_back(9)  # nobody holds the lock: the asker retires them
    assert pages == [6, 7, 8]  # group 2 only: group 1 is in use, group 0 stays
    assert retired == list(range(16, 24))
    assert mapper.fences == [f"fence:{threading.current_thread().name}"]
    with link.lock:
        link.absorb()
        assert link.book.mapped_groups == [0, 1] and 2 not in link.pages_of
    assert link.handle_give_back(2) == []  # fewer pages than a group: nothing
    with link.lock:
        link.book.release([9])
        assert link.trim() == 1
        link.settle()
    assert pool.returned == [3, 4, 5] and link.pages_held == 3


def test_give_back_while_the_engine_steps_is_retired_by_the_engine_after_its_step(
    pool: FakePool, links: list[PoolLink]
) -> None:
    link, mapper = link_for(pool, links)
    grow(link, 2)
    got: list[list[int]] = []
    with link.lock:  # a step is running
        asker = threading.Thread(target=lambda: got.append(link.handle_give_back(6)),
                                 name="asker")
        asker.start()
        while link._asked is None:  # until the ask has reached the link
            threading.Event().wait(0.001)
        assert got == []  # it cannot retire anything while the step holds the lock
        link.service()  # what after_step does
    asker.join(5)
    assert got == [[6, 7, 8, 3, 4, 5]]
    assert mapper.fences == [f"fence:{threading.current_thread().name}"]  # the engine's


def test_waiting_for_growth_answers_a_give_back_asked_meanwhile(links: list[PoolLink]) -> None:
    """gpud may ask this engine for pages while its own grant is under way (another model's
    burst): the engine, waiting with the lock held, retires them itself; no deadlock."""
    pool = FakePool(cap=3 * 5)
    link, _ = link_for(pool, links)
    grow(link, 1)
    answered: list[list[int]] = []
    pool.during_grant = lambda: answered.append(link.handle_give_back(3))
    with link.lock:
        link.request_growth(1)
        link.wait_growth(timeout=5)
        link.settle()
    assert answered == [[3, 4, 5]]  # group 1 went back before group 2 came in
    assert link.book.mapped_groups == [0, 2] and link.growing == 0


def test_sleep_returns_every_page_and_wake_takes_group_zero_back(
    pool: FakePool, links: list[PoolLink]
) -> None:
    link, mapper = link_for(pool, links)
    grow(link, 2)
    fresh: list[int] = []
    link.on_fresh = fresh.extend
    with link.lock:
        assert link.sleep() == 9
        assert pool.lent == set() and link.pages_held == 0
        assert all(not t for t in mapper.pages)
        assert link.request_growth(1) == 0 and not link.can_grow()
        assert link.wake() == list(range(1, 8)) == fresh
    assert len(pool.lent) == 3 and link.book.mapped_groups == [0]
    link.book.check()


def test_a_failed_map_gives_the_pages_back(pool: FakePool, links: list[PoolLink]) -> None:
    link, mapper = link_for(pool, links)

    def broken(group: int, fds: Sequence[int | None]) -> None:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        raise OSError("map failed")

    mapper.map_group = broken  # type: ignore[method-assign]
    with link.lock:
        link.request_growth(2)
        link.settle()
    assert sorted(pool.lent) == [0, 1, 2] and link.book.mapped_groups == [0]
    assert link.growing == 0 and isinstance(link.broken, OSError)
    assert not link.can_grow()


def test_over_gpuds_socket_a_burst_takes_the_pages_an_idle_engine_gives_back(
    tmp_path: Path, links: list[PoolLink]
) -> None:
    """Two engines on one pool through the real server and client: B holds most of it and
    idles; A's growth makes gpud ask B, whose pool thread retires, fences, unmaps and
    answers on its own while B's engine thread does nothing."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ledger = PoolLedger(gpu=0, total_pages=5 * 3)
    for name in ("A", "B"):
        ledger.add_tenant(TenantSpec(name, kv_min=3, priority=5))
    server = KVPoolServer({0: KVPool(ledger, MemfdBackend(PAGE))}, tmp_path / "kv.sock",
                          allow=lambda peer, tenant: True)

    def call(coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)  # type: ignore[arg-type]

    call(server.start())
    try:
        made: dict[str, tuple[PoolLink, MemfdGroupMapper]] = {}
        for name in ("A", "B"):
            def give_back(n: int, name: str = name) -> list[int]:
                return made[name][0].handle_give_back(n)

            client = KVPoolClient(server.path, name, 0, on_give_back=give_back)
            mapper = MemfdGroupMapper(GEO.num_tensors, PAGE)
            link = PoolLink(GEO, client, mapper, fence=fence_of_thread)
            made[name] = (link, mapper)
            link.start()
            links.append(link)
        a, b = made["A"][0], made["B"][0]
        assert grow(b, 3) == list(range(1, 32))  # B: 4 groups, A: 1 -> the pool is full

        async def idle() -> None:
            ledger.set_activity("B", Activity.IDLE)

        call(idle())
        with a.lock:
            a.short_by(16)  # A's burst: 2 groups more
            a.wait_growth(timeout=10)
        # A asked for 2 groups plus a step; B gave back all it could above its kv_min.
        assert a.book.mapped_groups == [0, 1, 2, 3]
        assert made["B"][1].fences == ["fence:gpud-kv-pool"]  # B's pool thread retired them
        with b.lock:
            b.absorb()
        assert b.book.mapped_groups == [0] and b.pages_held == 3
        assert ledger.summary()["granted"] == {"A": 12, "B": 3}
    finally:
        call(server.close())
        loop.call_soon_threadsafe(loop.stop)
