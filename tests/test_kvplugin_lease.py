"""The plugin's lease of pool pages: page groups granted as real memfd fds, mapped, written
through, given back wholly free, all returned on sleep, group 0 back on wake."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from gpud.kvpool.backend import MemfdBackend
from gpud.kvpool.client import GrantedPage, GrantResult
from gpud_vllm.geometry import KVGeometry
from gpud_vllm.lease import LeaseError, PoolExhausted, PoolLink
from gpud_vllm.memfd import MemfdGroupMapper

PAGE = 2 * 1024 * 1024
GEO = KVGeometry(block_bytes=256 * 1024, num_tensors=3, num_blocks=40)  # 8 per page, 5 groups


@dataclass
class FakePool:
    """gpud's side, in-process: a cap on pages and real memfd pages (fds dup'ed per grant)."""

    cap: int
    backend: MemfdBackend = field(default_factory=lambda: MemfdBackend(PAGE))
    page_size: int = PAGE
    lent: set[int] = field(default_factory=set)
    returned: list[int] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)
    next_page: int = 0

    def grant(self, n: int) -> GrantResult:
        self.asked.append(n)
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


@pytest.fixture
def pool() -> FakePool:
    return FakePool(cap=3 * 3)


def link_for(pool: FakePool, clock: Clock | None = None) -> tuple[PoolLink, MemfdGroupMapper]:
    mapper = MemfdGroupMapper(GEO.num_tensors, PAGE)
    link = PoolLink(GEO, pool, mapper, clock=clock or Clock(), retry_after=1.0)
    link.start()
    return link, mapper


def test_group_zero_is_mapped_at_start_and_writes_reach_gpuds_pages(pool: FakePool) -> None:
    link, mapper = link_for(pool)
    assert pool.asked == [3] and link.pages_of == {0: [0, 1, 2]}
    assert link.book.free_ids() == list(range(1, 8))
    for t in range(3):
        mapper.view(t, 0)[:4] = bytes([t + 1] * 4)
    assert [pool.backend.read(p, 4) for p in (0, 1, 2)] == [b"\1" * 4, b"\2" * 4, b"\3" * 4]
    # An unmapped group is the scratch page: writes land nowhere that counts.
    mapper.view(0, 3)[:4] = b"junk"
    assert mapper.view(1, 4)[:4] == b"junk"


def test_grows_by_whole_groups_and_is_refused_at_the_cap() -> None:
    pool, clock = FakePool(cap=3 * 3 + 2), Clock()
    link, _ = link_for(pool, clock)
    assert link.grow(1) == list(range(8, 16))
    assert link.grow(4) == list(range(16, 24))  # 2 pages over: not a whole group
    assert sorted(pool.lent) == list(range(9))  # the 2 partial pages went straight back
    assert link.book.mapped_groups == [0, 1, 2]
    assert not link.can_grow() and link.grow(1) == [] and "kv_max" in link.last_refusal
    clock.now = 1.5
    assert link.can_grow()


def test_start_without_group_zero_fails_loudly() -> None:
    with pytest.raises(PoolExhausted, match="group 0"):
        link_for(FakePool(cap=2))


def test_page_size_mismatch_is_refused() -> None:
    pool = FakePool(cap=9, backend=MemfdBackend(4 * 1024 * 1024), page_size=4 * 1024 * 1024)
    with pytest.raises(LeaseError, match="bytes"):
        PoolLink(GEO, pool, MemfdGroupMapper(3, PAGE))


def test_give_back_only_wholly_free_groups_after_the_fence(pool: FakePool) -> None:
    link, mapper = link_for(pool)
    link.grow(2)
    link.book.take([9])  # a request holds a block of group 1
    retired: list[int] = []
    link.on_retire = retired.extend
    pages = link.handle_give_back(9)
    assert pages == [6, 7, 8]  # group 2 only: group 1 is in use, group 0 stays
    assert retired == list(range(16, 24)) and mapper.syncs == 1
    assert link.book.mapped_groups == [0, 1]
    assert link.handle_give_back(2) == []  # fewer pages than a group: nothing
    link.book.release([9])
    assert link.trim() == 1 and pool.returned == [3, 4, 5]
    assert link.pages_held == 3


def test_sleep_returns_every_page_and_wake_takes_group_zero_back(pool: FakePool) -> None:
    link, mapper = link_for(pool)
    link.grow(2)
    assert link.sleep() == 9
    assert pool.lent == set() and link.pages_held == 0
    assert all(not t for t in mapper.pages)
    assert link.grow(1) == [] and not link.can_grow()
    assert link.wake() == list(range(1, 8))
    assert len(pool.lent) == 3 and link.book.mapped_groups == [0]
    link.book.check()


def test_a_failed_map_gives_the_pages_back(pool: FakePool) -> None:
    link, mapper = link_for(pool)

    def broken(group: int, fds: Sequence[int | None]) -> None:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        raise OSError("map failed")

    mapper.map_group = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        link.grow(2)
    assert sorted(pool.lent) == [0, 1, 2] and link.book.mapped_groups == [0]
