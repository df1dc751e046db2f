"""The KV pool's books: grants, give-back order, minimums, and no page lost or double-granted."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpud.kvpool.ledger import (
    Activity,
    LedgerError,
    PoolLedger,
    TenantSpec,
    pages_for,
)


def pool(total: int = 100, *tenants: TenantSpec) -> PoolLedger:
    ledger = PoolLedger(gpu=0, total_pages=total)
    for spec in tenants:
        ledger.add_tenant(spec)
    return ledger


def test_grant_from_free_pages_and_status_numbers() -> None:
    ledger = pool(10, TenantSpec("chat", kv_min=2, kv_max=8, priority=100))
    d = ledger.request("chat", 4)
    assert len(d.granted) == 4 and d.refused == 0 and not d.reclaims
    s = ledger.summary()
    assert s["pages_total"] == 10 and s["pages_free"] == 6 and s["granted"] == {"chat": 4}


def test_kv_max_caps_a_tenant_and_says_why() -> None:
    ledger = pool(10, TenantSpec("chat", kv_max=3))
    d = ledger.request("chat", 5)
    assert len(d.granted) == 3 and d.refused == 2
    assert "kv_max is 3" in d.reason


def test_minimums_that_do_not_fit_the_pool_are_refused_with_numbers() -> None:
    ledger = pool(10, TenantSpec("a", kv_min=6))
    with pytest.raises(LedgerError, match="minimums would total 11 pages and the pool has 10"):
        ledger.add_tenant(TenantSpec("b", kv_min=5))


def test_page_size_must_be_a_multiple_of_the_driver_granularity() -> None:
    with pytest.raises(LedgerError, match="2 MiB"):
        PoolLedger(gpu=0, total_pages=4, page_size=3 * 1024 * 1024)
    assert PoolLedger(gpu=0, total_pages=4, page_size=4 * 1024 * 1024).page_size == 4 << 20


def test_sleeping_tenants_give_back_first_then_idle_never_below_min() -> None:
    ledger = pool(
        30,
        TenantSpec("sleepy", kv_min=2, priority=50),
        TenantSpec("idle", kv_min=3, priority=10),
        TenantSpec("busy", kv_min=1, priority=10),
        TenantSpec("vip", kv_min=0, priority=100),
    )
    for name in ("sleepy", "idle", "busy"):
        ledger.request(name, 10)
    ledger.set_activity("sleepy", Activity.ASLEEP)
    ledger.set_activity("idle", Activity.IDLE)
    assert ledger.free_pages == 0

    d = ledger.request("vip", 25)
    asked = [(r.tenant, r.pages) for r in d.reclaims]
    # Sleeping first (down to its min of 2), then idle (to 3), then the busy lower-priority one.
    assert asked == [("sleepy", 8), ("idle", 7), ("busy", 9)]
    assert d.refused == 1 and d.granted == ()

    for r in d.reclaims:
        give = sorted(ledger.pages_of(r.tenant))[: r.pages]
        ledger.release(r.tenant, give)
    got = ledger.claim_earmarked("vip")
    assert len(got) == 24
    assert {n: len(ledger.pages_of(n)) for n in ("sleepy", "idle", "busy")} == {
        "sleepy": 2,
        "idle": 3,
        "busy": 1,
    }
    ledger.check()


def test_awake_tenants_of_equal_priority_keep_their_pages() -> None:
    ledger = pool(10, TenantSpec("a", priority=5), TenantSpec("b", priority=5))
    ledger.request("a", 10)
    d = ledger.request("b", 3)
    assert d.reclaims == () and d.refused == 3
    assert "no other model may give back" in d.reason


def test_a_tenant_below_its_minimum_takes_from_anyone_above_theirs() -> None:
    ledger = pool(10, TenantSpec("big", kv_min=2, priority=100), TenantSpec("small", kv_min=4))
    ledger.request("big", 10 - 0)  # takes everything while small is not there yet
    assert ledger.free_pages == 0
    d = ledger.request("small", 6)
    # Up to its minimum only, although "big" has the higher priority.
    assert [(r.tenant, r.pages) for r in d.reclaims] == [("big", 4)]
    assert d.refused == 2


def test_earmarked_pages_are_not_taken_by_others() -> None:
    ledger = pool(
        4,
        TenantSpec("low", priority=1),
        TenantSpec("high", priority=9),
        TenantSpec("other", priority=1),
    )
    ledger.request("low", 4)
    d = ledger.request("high", 2)
    assert [(r.tenant, r.pages) for r in d.reclaims] == [("low", 2)]
    ledger.release("low", sorted(ledger.pages_of("low"))[:2])
    assert ledger.available_to("other") == 0
    assert ledger.request("other", 1).granted == ()
    assert len(ledger.claim_earmarked("high")) == 2
    ledger.check()


def test_returning_a_page_one_does_not_hold_is_refused() -> None:
    ledger = pool(4, TenantSpec("a"), TenantSpec("b"))
    pa = ledger.request("a", 1).granted
    with pytest.raises(LedgerError, match="does not hold"):
        ledger.release("b", pa)


def test_backed_pages_are_granted_first_and_surplus_is_reported() -> None:
    ledger = pool(8, TenantSpec("a"))
    ledger.mark_backed([5, 6, 7])
    assert list(ledger.request("a", 2).granted) == [5, 6]
    assert ledger.surplus_backed(keep=0) == [7]
    assert ledger.unbacked_free(2) == [0, 1]


def test_pages_for_rounds_up() -> None:
    assert pages_for(1) == 1 and pages_for(2 << 20) == 1 and pages_for((2 << 20) + 1) == 2


OPS = st.lists(
    st.tuples(
        st.sampled_from(["request", "release", "activity", "claim", "cancel", "die"]),
        st.integers(0, 2),
        st.integers(0, 40),
    ),
    max_size=300,
)


def run_ops(ops: list[tuple[str, int, int]], seed: int) -> PoolLedger:
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    ledger = pool(
        64,
        TenantSpec("a", kv_min=8, kv_max=40, priority=1),
        TenantSpec("b", kv_min=4, kv_max=None, priority=5),
        TenantSpec("c", kv_min=0, kv_max=30, priority=9),
    )
    outstanding: list[tuple[str, int]] = []
    for op, who, n in ops:
        name = names[who]
        before = len(ledger.pages_of(name))
        if op == "request":
            earmarked = ledger.earmarked(name)
            d = ledger.request(name, n)
            # Every page asked for is granted, on its way, or refused with a reason;
            # pages earmarked earlier that came back are granted with it.
            assert n <= len(d.granted) + d.pending + d.refused <= n + earmarked
            assert bool(d.refused) == bool(d.reason)
            # Asked-for pages never come from below anyone's minimum.
            for r in d.reclaims:
                spec = ledger.spec(r.tenant)
                assert len(ledger.pages_of(r.tenant)) - r.pages >= spec.kv_min
            outstanding.extend((r.tenant, r.pages) for r in d.reclaims)
            assert len(ledger.pages_of(name)) >= before
        elif op == "release":
            held = sorted(ledger.pages_of(name))
            ledger.release(name, rng.sample(held, min(n, len(held))))
        elif op == "activity":
            ledger.set_activity(name, list(Activity)[n % 3])
        elif op == "claim":
            ledger.claim_earmarked(name)
        elif op == "cancel":
            ledger.cancel_earmark(name)
        elif op == "die":
            ledger.release_all(name)
        if outstanding and rng.random() < 0.5:
            # A tenant answers a give-back, giving what it was asked (never below its min).
            giver, k = outstanding.pop(0)
            spec = ledger.spec(giver)
            k = min(k, max(0, len(ledger.pages_of(giver)) - spec.kv_min))
            ledger.release(giver, sorted(ledger.pages_of(giver))[:k])
        ledger.check()
        assert ledger.granted_pages <= ledger.total_pages
    return ledger


@settings(max_examples=60, deadline=None)
@given(OPS, st.integers(0, 2**32))
def test_property_no_page_lost_or_double_granted(
    ops: list[tuple[str, int, int]], seed: int
) -> None:
    run_ops(ops, seed)


def test_ten_thousand_random_operations_across_three_tenants() -> None:
    rng = random.Random(8)
    kinds = ["request", "release", "activity", "claim", "cancel", "die"]
    weights = [40, 30, 10, 10, 5, 5]
    ops = [
        (rng.choices(kinds, weights)[0], rng.randrange(3), rng.randrange(41)) for _ in range(10_000)
    ]
    ledger = run_ops(ops, seed=1)
    assert ledger.granted_pages + ledger.free_pages == 64


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 64)), min_size=1, max_size=40))
def test_property_a_tenant_always_reaches_its_minimum(asks: list[tuple[int, int]]) -> None:
    """Whatever the others took, a tenant can get its kv_min back by asking."""
    ledger = pool(
        32,
        TenantSpec("a", kv_min=10, priority=1),
        TenantSpec("b", kv_min=10, priority=50),
        TenantSpec("c", kv_min=10, priority=99),
    )
    names = ["a", "b", "c"]
    for who, n in asks:
        ledger.request(names[who], n)
        ledger.claim_earmarked(names[who])
    for name in names:
        ledger.cancel_earmark(name)
    for name in names:
        need = max(0, 10 - len(ledger.pages_of(name)))
        d = ledger.request(name, need)
        for r in d.reclaims:
            ledger.release(r.tenant, sorted(ledger.pages_of(r.tenant))[: r.pages])
        ledger.claim_earmarked(name)
        assert len(ledger.pages_of(name)) >= 10, ledger.summary()
        ledger.check()
