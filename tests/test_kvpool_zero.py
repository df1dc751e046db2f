"""A page's bytes never reach another model: pages are zeroed when they change hands.

The memfd backend stands in for GPU pages: the test writes through the page's fd as an
engine writes its KV cache, then the page goes back and to someone else.
"""

from __future__ import annotations

import mmap

from gpud.kvpool.backend import MemfdBackend
from gpud.kvpool.ledger import PoolLedger, TenantSpec
from gpud.kvpool.pool import KVPool

PAGE = 2 * 1024 * 1024


def scribble(fd: int | None, byte: int) -> None:
    assert fd is not None
    with mmap.mmap(fd, PAGE, mmap.MAP_SHARED) as m:
        m[:] = bytes([byte]) * PAGE


def make_pool(total: int = 4) -> KVPool:
    ledger = PoolLedger(0, total, page_size=PAGE)
    pool = KVPool(ledger, MemfdBackend(PAGE))
    pool.add_tenant(TenantSpec("chat", 0, None, 10))
    pool.add_tenant(TenantSpec("code", 0, None, 10))
    return pool


def test_a_page_given_back_and_granted_to_another_model_arrives_zeroed() -> None:
    pool = make_pool(1)
    (ref,) = pool.grant_now("chat", 1)  # fresh from the backend: cleared once
    assert pool.status()["zeroed_pages"] == 1
    scribble(ref.fd, 0xAB)
    pool.release("chat", [ref.page])
    (again,) = pool.grant_now("code", 1)
    assert again.page == ref.page
    assert pool.read(again.page, PAGE) == bytes(PAGE)
    assert pool.status()["zeroed_pages"] == 2


def test_a_page_back_to_the_same_model_is_not_cleared_again() -> None:
    pool = make_pool(1)
    (ref,) = pool.grant_now("chat", 1)
    scribble(ref.fd, 0x11)
    pool.release("chat", [ref.page])
    before = pool.status()["zeroed_pages"]
    (again,) = pool.grant_now("chat", 1)
    assert pool.read(again.page, 4) == b"\x11" * 4  # its own bytes: nothing leaked
    assert pool.status()["zeroed_pages"] == before


def test_pages_made_ahead_are_zeroed_once_then_granted_without_more_work() -> None:
    pool = make_pool(4)
    assert pool.grow_ahead(4) == 4
    assert pool.status()["zeroed_pages"] == 4
    refs = pool.grant_now("chat", 4)
    assert pool.status()["zeroed_pages"] == 4
    assert all(pool.read(r.page, PAGE) == bytes(PAGE) for r in refs)
