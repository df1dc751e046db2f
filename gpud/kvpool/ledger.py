"""Page accounting for the KV pool of one GPU: who holds which page, and who gives back.

The ledger is the pure core of the KV pool. It knows pages only as numbers
(0 .. total-1, each ``page_size`` bytes of one GPU), tenants (models) with a
guaranteed minimum, a cap and a priority, and whether each tenant is awake,
idle or asleep. It decides grants, and when a tenant needs pages that are not
free, which other tenants give back how many, in what order.

It must never do I/O: no asyncio, aiohttp, subprocess, sockets or CUDA (an
import-linter contract checks this). The server and the CUDA backend act on
its decisions; the ledger only records them, so it can be tested on data.

Rules, in the operator's words:

- A tenant never holds more than its ``kv_max`` pages.
- A tenant never has pages taken below its ``kv_min``. The sum of all
  minimums on a GPU must fit the pool (checked when a tenant is added), so a
  tenant can always be brought up to its minimum by taking pages from
  tenants above theirs, whatever their priority.
- Above its minimum, a tenant takes pages from others in this order:
  sleeping tenants first (their KV cache is discarded anyway), then idle
  ones, then awake ones of strictly lower priority; within a group, the
  lowest priority first, then the one holding the most spare pages.
  Idle tenants give to tenants of equal or higher priority; sleeping ones to
  anyone.
- Pages asked back for a tenant are earmarked for it: when they come back
  they are free, but only that tenant may take them.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from gpud.states import ACTIVE, State

MiB = 1024 * 1024
# The CUDA driver's VMM granularity on current NVIDIA GPUs; pages are multiples of it.
DRIVER_GRANULARITY = 2 * MiB
DEFAULT_PAGE_SIZE = DRIVER_GRANULARITY


class LedgerError(ValueError):
    """A request the ledger refuses; the message says what and how to fix it."""


class Activity(enum.Enum):
    """What a tenant is doing, as far as reclaiming its pages is concerned."""

    AWAKE = "awake"  # serving requests: its pages are in use
    IDLE = "idle"  # awake, no traffic lately: its pages above kv_min only hold prefix cache
    ASLEEP = "asleep"  # vLLM discarded its KV cache: its pages above kv_min are dead weight


def activity_of(state: str, inflight: int, quiet_s: float | None, idle_after: float) -> Activity:
    """A model's activity for the ledger, from what the reconciler sees: asleep (or not
    running) engines hold dead KV; an awake one with no request for ``idle_after`` s is idle."""
    if state not in ACTIVE:
        return Activity.ASLEEP
    if inflight or state != State.AWAKE or quiet_s is None or quiet_s < idle_after:
        return Activity.AWAKE
    return Activity.IDLE


# Lower number gives back first.
_GIVE_BACK_RANK = {Activity.ASLEEP: 0, Activity.IDLE: 1, Activity.AWAKE: 2}


@dataclass(frozen=True)
class TenantSpec:
    """A model's budget on one GPU, in pages."""

    name: str
    kv_min: int = 0
    kv_max: int | None = None  # None: up to the whole pool
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise LedgerError("a tenant needs a name (the model's name)")
        if self.kv_min < 0:
            raise LedgerError(
                f"model {self.name!r}: kv_min is {self.kv_min} pages; it must be >= 0"
            )
        if self.kv_max is not None and self.kv_max < self.kv_min:
            raise LedgerError(
                f"model {self.name!r}: kv_max ({self.kv_max} pages) is below kv_min "
                f"({self.kv_min} pages); raise kv_max or lower kv_min"
            )


@dataclass(frozen=True)
class Reclaim:
    """Ask ``tenant`` to give back ``pages`` pages, for ``beneficiary``."""

    tenant: str
    pages: int
    beneficiary: str


@dataclass(frozen=True)
class Decision:
    """What happens to a request for pages.

    ``granted`` are taken from free pages now. ``reclaims`` say whom to ask for
    more; those pages are earmarked for the requester and granted when they
    come back. ``refused`` pages cannot be had; ``reason`` says why.
    """

    tenant: str
    asked: int
    granted: tuple[int, ...]
    reclaims: tuple[Reclaim, ...] = ()
    refused: int = 0
    reason: str = ""

    @property
    def pending(self) -> int:
        return sum(r.pages for r in self.reclaims)


@dataclass
class _Tenant:
    spec: TenantSpec
    activity: Activity = Activity.AWAKE
    pages: set[int] = field(default_factory=set)
    earmarked: int = 0  # free pages set aside for this tenant

    def cap(self, total: int) -> int:
        return total if self.spec.kv_max is None else min(self.spec.kv_max, total)


class _FreePages:
    """Free page numbers, handed out backed-first then lowest-numbered first, in O(log n).

    A plain sorted() per grant costs milliseconds on an 80 GiB pool (40,960
    pages), which is the whole budget of a cross-process grant.
    """

    def __init__(self, pages: Iterable[int]) -> None:
        self._members: set[int] = set(pages)
        self._backed: set[int] = set()
        self._heaps: tuple[list[int], list[int]] = ([], sorted(self._members))

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, page: object) -> bool:
        return page in self._members

    def __iter__(self) -> Iterator[int]:
        return iter(self._members)

    def add(self, page: int) -> None:
        if page not in self._members:
            self._members.add(page)
            heapq.heappush(self._heaps[0 if page in self._backed else 1], page)

    def set_backed(self, page: int, backed: bool) -> None:
        if backed == (page in self._backed):
            return
        if backed:
            self._backed.add(page)
        else:
            self._backed.discard(page)
        if page in self._members:
            # The old heap entry goes stale and is skipped when popped.
            heapq.heappush(self._heaps[0 if backed else 1], page)

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        for which, heap in enumerate(self._heaps):
            while heap and len(out) < n:
                p = heapq.heappop(heap)
                if p in self._members and (p in self._backed) == (which == 0):
                    self._members.discard(p)
                    out.append(p)
        return out

    def peek(self, n: int) -> list[int]:
        return sorted(self._members, key=lambda p: (p not in self._backed, p))[:n]

    def backed(self) -> set[int]:
        return self._members & self._backed

    def unbacked(self) -> set[int]:
        return self._members - self._backed


class PoolLedger:
    """The pages of one GPU's KV pool and the tenants that hold them."""

    def __init__(self, gpu: int, total_pages: int, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if total_pages < 0:
            raise LedgerError(f"GPU {gpu}: the pool needs >= 0 pages, got {total_pages}")
        if page_size <= 0 or page_size % DRIVER_GRANULARITY:
            raise LedgerError(
                f"GPU {gpu}: page size {page_size} bytes is not a multiple of the driver's "
                f"2 MiB granularity; use 2MiB, 4MiB, 6MiB, ..."
            )
        self.gpu = gpu
        self.page_size = page_size
        self.total_pages = total_pages
        self._tenants: dict[str, _Tenant] = {}
        # Free pages; granted lowest-numbered first so the pool's used part stays compact.
        self._free = _FreePages(range(total_pages))
        # Pages that have physical memory behind them (the backend created them).
        self._backed: set[int] = set()
        # giver -> beneficiary -> pages asked back and not yet returned.
        self._owed: dict[str, dict[str, int]] = {}

    def grow(self, pages: int) -> None:
        """Add ``pages`` page numbers to the pool (a model joined it on a config reload)."""
        if pages < 0:
            raise LedgerError(f"GPU {self.gpu}: cannot grow the pool by {pages} pages")
        for p in range(self.total_pages, self.total_pages + pages):
            self._free.add(p)
        self.total_pages += pages

    # -- tenants ---------------------------------------------------------------

    def add_tenant(self, spec: TenantSpec, activity: Activity = Activity.AWAKE) -> None:
        if spec.name in self._tenants:
            raise LedgerError(f"GPU {self.gpu}: model {spec.name!r} is already in the KV pool")
        mins = sum(t.spec.kv_min for t in self._tenants.values()) + spec.kv_min
        if mins > self.total_pages:
            raise LedgerError(
                f"GPU {self.gpu}: model {spec.name!r} asks kv_min {spec.kv_min} pages, but the "
                f"minimums would total {mins} pages and the pool has {self.total_pages}; "
                f"lower some kv_min or grow the pool"
            )
        self._tenants[spec.name] = _Tenant(spec=spec, activity=activity)

    def update_tenant(self, spec: TenantSpec) -> int:
        """Change a tenant's budget; return how many pages it now holds above kv_max."""
        t = self._tenant(spec.name)
        mins = sum(o.spec.kv_min for o in self._tenants.values() if o is not t) + spec.kv_min
        if mins > self.total_pages:
            raise LedgerError(
                f"GPU {self.gpu}: model {spec.name!r}: the minimums would total {mins} pages "
                f"and the pool has {self.total_pages}"
            )
        t.spec = spec
        return max(0, len(t.pages) - t.cap(self.total_pages))

    def remove_tenant(self, name: str) -> list[int]:
        """Forget a tenant; its pages become free. Returns them."""
        pages = self.release_all(name)
        self.cancel_earmark(name)
        self._owed.pop(name, None)
        del self._tenants[name]
        return pages

    def set_activity(self, name: str, activity: Activity) -> None:
        self._tenant(name).activity = activity

    def tenants(self) -> list[str]:
        return sorted(self._tenants)

    def spec(self, name: str) -> TenantSpec:
        return self._tenant(name).spec

    def activity(self, name: str) -> Activity:
        return self._tenant(name).activity

    def pages_of(self, name: str) -> frozenset[int]:
        return frozenset(self._tenant(name).pages)

    def owner(self, page: int) -> str | None:
        for name, t in self._tenants.items():
            if page in t.pages:
                return name
        return None

    def earmarked(self, name: str) -> int:
        return self._tenant(name).earmarked

    # -- numbers -----------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def granted_pages(self) -> int:
        return sum(len(t.pages) for t in self._tenants.values())

    def available_to(self, name: str) -> int:
        """Free pages this tenant may take now (free minus what is earmarked for others)."""
        t = self._tenant(name)
        others = sum(o.earmarked for o in self._tenants.values() if o is not t)
        return max(0, len(self._free) - others)

    # -- decisions ---------------------------------------------------------------

    def decide(self, name: str, n: int) -> Decision:
        """What asking for ``n`` more pages would give, without changing anything."""
        return self._decide(name, n, commit=False)

    def request(self, name: str, n: int) -> Decision:
        """Ask for ``n`` more pages: grant what is free, earmark what must be reclaimed."""
        return self._decide(name, n, commit=True)

    def _decide(self, name: str, n: int, *, commit: bool) -> Decision:
        if n < 0:
            raise LedgerError(f"model {name!r} asked for {n} pages; ask for 0 or more")
        t = self._tenant(name)
        room = max(0, t.cap(self.total_pages) - len(t.pages) - t.earmarked)
        want = min(n, room)
        refused = n - want
        reason = ""
        if refused:
            reason = (
                f"model {name!r} holds {len(t.pages)} pages (+{t.earmarked} on the way) and "
                f"its kv_max is {t.cap(self.total_pages)} pages"
            )
        # Pages already earmarked for this tenant are its to take first.
        take_free = min(want + t.earmarked, self.available_to(name))
        from_earmark = min(t.earmarked, take_free)
        from_free = take_free - from_earmark
        still = want - from_free
        reclaims: list[Reclaim] = []
        if still > 0:
            reclaims = self._choose_givers(t, still)
            found = sum(r.pages for r in reclaims)
            if found < still:
                refused += still - found
                reason = reason or (
                    f"GPU {self.gpu}: no pages free and no other model may give back more "
                    f"(model {name!r}, priority {t.spec.priority})"
                )
        granted: tuple[int, ...]
        if commit:
            t.earmarked -= from_earmark
            granted = tuple(self._take(t, take_free))
            for r in reclaims:
                owed = self._owed.setdefault(r.tenant, {})
                owed[name] = owed.get(name, 0) + r.pages
                t.earmarked += r.pages
        else:
            granted = tuple(self._free.peek(take_free))
        return Decision(
            tenant=name,
            asked=n,
            granted=granted,
            reclaims=tuple(reclaims),
            refused=refused,
            reason=reason,
        )

    def _choose_givers(self, needer: _Tenant, need: int) -> list[Reclaim]:
        # Pages still missing to bring the needer up to its guaranteed minimum.
        below_min = max(0, needer.spec.kv_min - len(needer.pages) - needer.earmarked)
        ranked: list[tuple[tuple[int, int, int, str], _Tenant, int]] = []
        for o in self._tenants.values():
            spare = len(o.pages) - self.asked_back(o.spec.name) - o.spec.kv_min
            if o is not needer and spare > 0:
                key = (_GIVE_BACK_RANK[o.activity], o.spec.priority, -spare, o.spec.name)
                ranked.append((key, o, spare))
        ranked.sort(key=lambda c: c[0])
        out: list[Reclaim] = []
        for _key, o, spare in ranked:
            if need <= 0:
                break
            willing = self._may_give(o, needer)
            # Everyone gives to bring a tenant up to its minimum; above it, only the willing.
            k = min(spare if willing else min(spare, below_min), need)
            if k > 0:
                out.append(Reclaim(tenant=o.spec.name, pages=k, beneficiary=needer.spec.name))
                need -= k
                below_min = max(0, below_min - k)
        return out

    @staticmethod
    def _may_give(giver: _Tenant, needer: _Tenant) -> bool:
        if giver.activity is Activity.ASLEEP:
            return True
        if giver.activity is Activity.IDLE:
            return giver.spec.priority <= needer.spec.priority
        return giver.spec.priority < needer.spec.priority

    def excess(self, name: str) -> int:
        """Pages a tenant holds above its cap (after its kv_max was lowered)."""
        t = self._tenant(name)
        return max(0, len(t.pages) - t.cap(self.total_pages))

    def reclaimable(self, name: str) -> int:
        """Pages a tenant could give back without going below its minimum."""
        t = self._tenant(name)
        return max(0, len(t.pages) - self.asked_back(name) - t.spec.kv_min)

    def asked_back(self, name: str) -> int:
        """Pages this tenant was asked to give back and has not returned yet."""
        return sum(self._owed.get(name, {}).values())

    # -- state changes -----------------------------------------------------------

    def grant(self, name: str, n: int) -> list[int]:
        """Take ``n`` pages for a tenant from what it may take now, or refuse."""
        t = self._tenant(name)
        if len(t.pages) + n > t.cap(self.total_pages):
            raise LedgerError(
                f"model {name!r} would hold {len(t.pages) + n} pages; its kv_max is "
                f"{t.cap(self.total_pages)}"
            )
        if n > self.available_to(name):
            raise LedgerError(
                f"GPU {self.gpu}: model {name!r} asked for {n} pages, "
                f"{self.available_to(name)} are free for it"
            )
        t.earmarked = max(0, t.earmarked - n)
        return self._take(t, n)

    def claim_earmarked(self, name: str) -> list[int]:
        """Grant a tenant the earmarked pages that have come back so far."""
        t = self._tenant(name)
        n = min(t.earmarked, len(self._free))
        t.earmarked -= n
        return self._take(t, n)

    def cancel_earmark(self, name: str) -> int:
        """Drop what is still earmarked for a tenant (it gave up waiting). Returns the count."""
        t = self._tenant(name)
        n = t.earmarked
        t.earmarked = 0
        for owed in self._owed.values():
            owed.pop(name, None)
        return n

    def release(self, name: str, pages: Iterable[int]) -> list[int]:
        """A tenant gives pages back; they become free (or go to whom they are earmarked for)."""
        t = self._tenant(name)
        pages = list(pages)
        if len(set(pages)) != len(pages):
            raise LedgerError(f"model {name!r} returned the same page twice: {sorted(pages)}")
        foreign = [p for p in pages if p not in t.pages]
        if foreign:
            raise LedgerError(
                f"model {name!r} returned pages it does not hold: {sorted(foreign)[:8]}"
            )
        for p in pages:
            t.pages.discard(p)
            self._free.add(p)
        self._settle(name, len(pages))
        return pages

    def release_all(self, name: str) -> list[int]:
        t = self._tenant(name)
        pages = sorted(t.pages)
        self.release(name, pages)
        # It holds nothing now, so it owes nothing.
        self._owed.pop(name, None)
        return pages

    def give_back_answered(self, name: str, asked: int, returned: int) -> None:
        """A tenant answered a give-back request with fewer pages than asked: stop counting on them.

        The earmarks that counted on those pages stay until the waiting tenant
        gives up (``cancel_earmark``), so they are not taken by someone else.
        """
        self._tenant(name)
        if returned < asked:
            self._settle(name, asked - returned)

    # -- physical backing ------------------------------------------------------

    def mark_backed(self, pages: Iterable[int]) -> None:
        for p in pages:
            self._backed.add(p)
            self._free.set_backed(p, True)

    def mark_unbacked(self, pages: Iterable[int]) -> None:
        for p in pages:
            self._backed.discard(p)
            self._free.set_backed(p, False)

    def is_backed(self, page: int) -> bool:
        return page in self._backed

    @property
    def backed_pages(self) -> int:
        return len(self._backed)

    def free_backed(self) -> list[int]:
        return sorted(self._free.backed())

    def earmarked_total(self) -> int:
        """Free pages set aside for tenants waiting on a give-back."""
        return sum(t.earmarked for t in self._tenants.values())

    def surplus_backed(self, keep: int) -> list[int]:
        """Free pages with memory behind them beyond ``keep`` spares: release these to shrink."""
        spare = sorted(self._free.backed(), reverse=True)
        return spare[: max(0, len(spare) - keep)]

    def unbacked_free(self, n: int) -> list[int]:
        """Up to ``n`` free pages with no memory behind them yet: create these to grow ahead."""
        return sorted(self._free.unbacked())[:n]

    # -- checks and numbers -------------------------------------------------

    def check(self) -> None:
        """Raise if the books do not balance. Cheap enough to call after every change in tests."""
        seen: dict[int, str] = {}
        for name, t in self._tenants.items():
            for p in t.pages:
                if p in seen:
                    raise AssertionError(f"page {p} granted to both {seen[p]!r} and {name!r}")
                if p in self._free:
                    raise AssertionError(f"page {p} is free and granted to {name!r}")
                seen[p] = name
            if len(t.pages) > t.cap(self.total_pages):
                raise AssertionError(f"model {name!r} holds more than its kv_max")
        if len(seen) + len(self._free) != self.total_pages:
            raise AssertionError(
                f"{self.total_pages} pages in the pool, {len(seen)} granted + "
                f"{len(self._free)} free: pages were lost"
            )
        if not all(0 <= p < self.total_pages for p in self._free):
            raise AssertionError("a page number outside the pool is marked free")

    def summary(self) -> dict[str, object]:
        """Plain numbers for status JSON."""
        return {
            "gpu": self.gpu,
            "page_size": self.page_size,
            "pages_total": self.total_pages,
            "pages_free": len(self._free),
            "pages_backed": len(self._backed),
            "granted": {n: len(t.pages) for n, t in sorted(self._tenants.items())},
            "tenants": {
                n: {
                    "pages": len(t.pages),
                    "kv_min": t.spec.kv_min,
                    "kv_max": t.cap(self.total_pages),
                    "priority": t.spec.priority,
                    "activity": t.activity.value,
                    "earmarked": t.earmarked,
                    "asked_back": self.asked_back(n),
                }
                for n, t in sorted(self._tenants.items())
            },
        }

    # -- internals -------------------------------------------------------------

    def _tenant(self, name: str) -> _Tenant:
        try:
            return self._tenants[name]
        except KeyError:
            known = ", ".join(sorted(self._tenants)) or "none"
            raise LedgerError(
                f"GPU {self.gpu}: model {name!r} has no place in the KV pool (known: {known})"
            ) from None

    def _take(self, t: _Tenant, n: int) -> list[int]:
        # Pages with memory behind them first (no creation cost), then by number.
        pages = self._free.take(n) if n > 0 else []
        t.pages.update(pages)
        return pages

    def _settle(self, giver: str, n: int) -> None:
        # Oldest requests first: dicts keep insertion order.
        owed = self._owed.get(giver, {})
        for beneficiary in list(owed):
            if n <= 0:
                break
            k = min(n, owed[beneficiary])
            owed[beneficiary] -= k
            n -= k
            if not owed[beneficiary]:
                del owed[beneficiary]


def pages_for(nbytes: int, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """Pages needed to hold ``nbytes`` (rounded up)."""
    return -(-nbytes // page_size)


def summaries(ledgers: Mapping[int, PoolLedger]) -> dict[str, dict[str, object]]:
    return {str(gpu): ledgers[gpu].summary() for gpu in sorted(ledgers)}
