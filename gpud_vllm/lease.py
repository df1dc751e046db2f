"""The engine's pages from gpud, per page group: grown ahead of need, given back when asked.

``PoolLink`` joins three things: the ``BlockBook`` (which groups are mapped,
which blocks used), gpud's page client (``gpud.kvpool.client.KVPoolClient``:
N pages in, one fd each) and a ``GroupMapper`` (maps one page per layer
buffer at a group's offset; on the GPU ``gpud_vllm.vmm.CudaGroupMapper``, in
tests a memfd mapper).

Two threads share it:

* the engine's thread (EngineCore's busy loop, under ``lock``, the plugin's
  lock) owns the book and vLLM's free queue. It never talks to gpud: it asks
  for growth (``request_growth``: a free-block watermark crossed, or a
  request short of blocks), takes in what was mapped meanwhile (``absorb``),
  and retires wholly free groups when gpud asks for pages (``service``),
  recording a fence (a CUDA event on its stream) for the blocks given back;
* the pool thread (``gpud-kv-pool``) owns the socket and does the slow
  parts: grant round trips, mapping, waiting on a fence, unmapping, and
  answering gpud's give-back requests (while the engine idles it retires
  the groups itself, under the lock).

So the scheduler waits on gpud only when it must (``wait_growth``: a running
request would be preempted, or nothing runs at all), never for a give-back's
unmapping, and no reclaim synchronizes the whole device.

It must never import torch, vLLM or CUDA: the client, the mapper and the
fence are passed in, so the whole flow is tested on CPU
(tests/test_kvplugin_lease.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gpud_vllm.book import BlockBook, GroupState
from gpud_vllm.geometry import KVGeometry

log = logging.getLogger("vllm.gpud_kv")  # under vLLM's logger: its handlers, its format

#: Called with block ids leaving service (a group being retired): drop them from vLLM's
#: free queue and forget their prefix-cache hashes.
RetireHook = Callable[[list[int]], None]
#: Called with block ids that became usable (groups mapped by the pool thread).
FreshHook = Callable[[list[int]], None]
#: Returns a fence covering every GPU write launched so far (None: "all of it", a full sync).
FenceSource = Callable[[], object]

#: How long the pool thread lets a give-back wait for the engine's thread (gpud waits 5 s).
GIVE_BACK_WAIT_S = 4.0


class PoolExhausted(RuntimeError):
    """gpud lent fewer pages than a page group needs; the scheduler should preempt."""


class LeaseError(RuntimeError):
    """The pages gpud lent cannot be used (wrong size, no fds on a GPU backend)."""


class PageGrant(Protocol):
    @property
    def page(self) -> int: ...
    @property
    def fd(self) -> int | None: ...
    def close_fd(self) -> None: ...


class GrantOutcome(Protocol):
    @property
    def pages(self) -> Sequence[PageGrant]: ...
    @property
    def refused(self) -> int: ...
    @property
    def reason(self) -> str: ...


class PoolClient(Protocol):
    """What the plugin uses of ``gpud.kvpool.client.KVPoolClient`` (pool thread only)."""

    page_size: int

    def grant(self, n: int) -> GrantOutcome: ...
    def give_back(self, pages: Sequence[int]) -> None: ...


class GroupMapper(Protocol):
    """One reserved range per layer buffer; a group is one page at the same offset in each."""

    def map_group(self, group: int, fds: Sequence[int | None]) -> None:
        """Map one page per buffer (``fds[i]`` into buffer ``i``) over the scratch page.
        The mapper owns the fds from here on (closes them, on failure too)."""
        ...

    def unmap_group(self, group: int) -> None:
        """Unmap the group's pages and put the scratch page back under them."""
        ...

    def wait(self, fence: object) -> None:
        """Block until the GPU work ``fence`` covers is done (None: all work so far)."""
        ...


@dataclass
class Growth:
    """How far ahead of need the engine keeps mapped free blocks (in page groups)."""

    # Mapped-but-free groups cost nothing while no other model needs them, and gpud takes
    # wholly free groups back when one does; a burst that finds them mapped does not wait.
    #: Grow when fewer fresh blocks than this many groups' worth are mapped and free ...
    low_groups: int = 8
    #: ... or fewer than this share of what is mapped.
    low_share: float = 1 / 4
    #: Each growth asks for at least this many groups ...
    step_groups: int = 8
    #: ... and at least this share of what is mapped (a burst ramps up geometrically).
    step_share: float = 1 / 2
    #: Free blocks that hold a prefix-cache entry are kept (grown around, as stock vLLM with its
    #: whole budget mapped keeps them) up to this many groups' worth; past that they count as
    #: free and vLLM evicts the oldest, as it does under pressure. Growing around every cached
    #: block maps the whole kv_max in any burst of unique prompts, and that mapping competes
    #: with the engine's own thread (H200, bench/results/kvplugin-h200.md). kvcached caps its
    #: cache the same way (KVCACHED_MAX_CACHED_TOKENS, 16000 tokens).
    cache_groups: int = 16

    def low_blocks(self, mapped_groups: int, blocks_per_group: int) -> int:
        return max(self.low_groups, int(mapped_groups * self.low_share)) * blocks_per_group

    def step(self, mapped_groups: int) -> int:
        return max(self.step_groups, math.ceil(mapped_groups * self.step_share))


@dataclass
class _Ticket:
    """Groups retired for a give-back: unmap after ``fence``, then the pages go back."""

    groups: list[int]
    pages: list[int]
    fence: object


@dataclass
class LinkStats:
    grants: int = 0
    groups_grown: int = 0
    grant_s: float = 0.0
    map_s: float = 0.0
    waits: int = 0
    wait_s: float = 0.0
    give_backs: int = 0
    groups_given: int = 0
    fence_s: float = 0.0
    #: Time vLLM's scheduler spent in the plugin's block-pool hooks, and how many calls.
    hook_s: float = 0.0
    hook_calls: int = 0
    last_logged: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.grants} grants, {self.groups_grown} groups in {self.grant_s:.3f}s of "
                f"round trips + {self.map_s:.3f}s mapping (pool thread); the scheduler waited "
                f"{self.waits} times, {self.wait_s:.3f}s; {self.give_backs} give-backs, "
                f"{self.groups_given} groups, {self.fence_s:.3f}s on fences; "
                f"{self.hook_calls} block-pool hook calls, {self.hook_s:.3f}s")


class PoolLink:
    """One engine's lease of pool pages, in page groups."""

    def __init__(
        self,
        geometry: KVGeometry,
        client: PoolClient,
        mapper: GroupMapper,
        *,
        lock: threading.RLock | None = None,
        fence: FenceSource = lambda: None,
        growth: Growth | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_after: float = 1.0,
    ) -> None:
        if client.page_size != geometry.page_size:
            raise LeaseError(
                f"gpud's pool pages are {client.page_size} bytes; the plugin lays KV out "
                f"on {geometry.page_size}-byte pages"
            )
        self.geometry = geometry
        self.client = client
        self.mapper = mapper
        self.lock = lock if lock is not None else threading.RLock()
        self.fence = fence
        self.growth = growth or Growth()
        self.book = BlockBook(geometry, first_mapped=False)
        self.pages_of: dict[int, list[int]] = {}
        self.on_retire: RetireHook | None = None
        self.on_fresh: FreshHook | None = None
        self.clock = clock
        self.retry_after = retry_after
        self.refused_at: float | None = None
        self.last_refusal = ""
        self.stats = LinkStats()
        self.broken: BaseException | None = None
        # Between the two threads, under _cv: commands for the pool thread, what it did.
        self._cv = threading.Condition(threading.Lock())
        self._cmds: collections.deque[tuple[str, object]] = collections.deque()
        self._done: collections.deque[tuple[str, list[int], object]] = collections.deque()
        self._busy = 0  # commands posted and not yet done
        self._asked: int | None = None  # pages gpud asked back, not yet retired for
        self._ticket: _Ticket | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        """Map page group 0 (it holds vLLM's null block; gpud must lend it), then start the
        pool thread."""
        self.book.grow_into([0])
        self._grow([0])
        self.absorb()
        if self.book.state[0] is not GroupState.MAPPED:
            raise PoolExhausted(f"gpud lent too few pages for page group 0: {self.last_refusal}")
        self._thread = threading.Thread(target=self._run, name="gpud-kv-pool", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
        self._kick()
        if self._thread is not None:
            self._thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- the engine's side (caller holds self.lock) -----------------------------------

    def can_grow(self) -> bool:
        """Is there room to ask gpud for more (groups left, no recent refusal)?"""
        if (self.broken is not None or self.book.asleep
                or not self.book.count(GroupState.UNMAPPED)):
            return False
        if self.refused_at is None:
            return True
        return self.clock() - self.refused_at >= self.retry_after

    @property
    def growing(self) -> int:
        """Page groups asked for and not yet mapped or refused."""
        return self.book.count(GroupState.GROWING)

    def request_growth(self, groups: int) -> int:
        """Ask the pool thread for up to ``groups`` more page groups; returns how many were
        asked (0: none left, gpud refused lately, or the engine is asleep)."""
        if groups <= 0 or not self.can_grow():
            return 0
        targets = self.book.grow_into(self.book.unmapped_groups(groups))
        self._post("grow", targets)
        return len(targets)

    def keep_ahead(self, fresh_free: int) -> None:
        """The watermark: with fewer than the low mark of fresh free blocks and no growth
        under way, ask for the next step ahead of need."""
        mapped = self.book.count(GroupState.MAPPED)
        if self.growing or fresh_free >= self.growth.low_blocks(
            mapped, self.geometry.blocks_per_group
        ):
            return
        self.request_growth(self.growth.step(mapped))

    def short_by(self, blocks: int) -> int:
        """A request found ``blocks`` too few: ask for them plus a step ahead, unless a
        growth already under way covers them. Returns the groups asked now."""
        need = self.geometry.groups_for(max(blocks, 1))
        if self.growing >= need:
            return 0
        return self.request_growth(need + self.growth.step(self.book.count(GroupState.MAPPED)))

    def absorb(self) -> list[int]:
        """Take in what the pool thread did: mapped groups join the book (and vLLM's free
        queue, through ``on_fresh``), refused ones are unmapped again, unmapped ones are
        done. Returns the blocks that became free."""
        if not self._done:
            return []
        with self._cv:
            done = list(self._done)
            self._done.clear()
        fresh: list[int] = []
        for kind, groups, payload in done:
            if kind == "mapped":
                assert isinstance(payload, list)
                for g, pages in zip(groups, payload, strict=True):
                    self.pages_of[g] = pages
                fresh.extend(self.book.mapped(groups))
            elif kind == "failed":
                self.book.growth_failed(groups)
                self.refused_at, self.last_refusal = self.clock(), str(payload)
            elif kind == "granted":
                self.refused_at = None
            elif kind == "unmapped":
                for g in groups:
                    self.pages_of.pop(g, None)
                self.book.retired(groups)
        if fresh and self.on_fresh is not None:
            self.on_fresh(fresh)
        return fresh

    def wait_growth(self, timeout: float = 10.0) -> list[int]:
        """Wait for the growth under way (the scheduler must: a request would be preempted),
        answering gpud's give-back asks meanwhile. Returns the blocks that became free."""
        t0 = time.monotonic()
        fresh = self.absorb()
        while self.growing and self.broken is None:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                break
            self.service()
            with self._cv:
                if not self._done:
                    self._cv.wait(min(left, 0.05))
            fresh += self.absorb()
        self.stats.waits += 1
        self.stats.wait_s += time.monotonic() - t0
        return fresh

    def service(self) -> None:
        """If gpud asked for pages back: retire wholly free groups for it now (the pool
        thread unmaps them once the fence is passed and answers gpud)."""
        if self._asked is None:
            return
        with self._cv:
            n, self._asked = self._asked, None
            if n is None:
                return
        groups = self.book.wholly_free(n // self.geometry.num_tensors)
        ticket = _Ticket(groups, [p for g in groups for p in self.pages_of[g]], None)
        if groups:
            blocks = self.book.retire(groups)
            if self.on_retire is not None:
                self.on_retire(blocks)
            ticket.fence = self.fence()
        with self._cv:
            self._ticket = ticket
            self._cv.notify_all()

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the pool thread has done everything posted (answering gpud's asks
        meanwhile, as the lock's holder), then absorb it."""
        deadline = time.monotonic() + timeout
        while True:
            self.service()
            with self._cv:
                left = deadline - time.monotonic()
                if self._busy == 0 or left <= 0:
                    break
                self._cv.wait(min(left, 0.05))
        self.absorb()

    def trim(self, keep_groups: int = 1) -> int:
        """Give wholly free groups above ``keep_groups`` back to gpud (behind a fence, by the
        pool thread); how many."""
        extra = len(self.book.mapped_groups) - keep_groups
        groups = self.book.wholly_free(max(extra, 0))
        if groups:
            self._retire_and_return(groups, self.book.retire(groups))
        return len(groups)

    def sleep(self) -> int:
        """Unmap every group (group 0 too) and return every page to gpud; how many pages.
        vLLM has aborted every request and synchronized: this waits for it all."""
        self.settle()
        while self.growing:
            self.wait_growth()
        groups = self.book.mapped_groups
        pages = sum(len(self.pages_of[g]) for g in groups)
        self._retire_and_return(groups, self.book.sleep())
        self.settle()
        return pages

    def wake(self) -> list[int]:
        """Take group 0 back after a sleep; returns its free blocks (also to ``on_fresh``)."""
        if not self.book.asleep:
            return []
        self.settle()
        self.refused_at = None
        self.book.asleep = False
        self.book.grow_into([0])
        self._post("grow", [0])
        fresh = self.wait_growth(timeout=60.0)
        if self.book.state[0] is not GroupState.MAPPED:
            self.book.asleep = True
            raise PoolExhausted(f"gpud lent too few pages for page group 0: {self.last_refusal}")
        return fresh

    def _retire_and_return(self, groups: list[int], blocks: list[int]) -> None:
        if self.on_retire is not None:
            self.on_retire(blocks)
        pages = [p for g in groups for p in self.pages_of[g]]
        self._post("return", _Ticket(groups, pages, self.fence()))

    # -- gpud's give-back requests (the pool thread, or a test's) ------------------------

    def handle_give_back(self, n: int) -> list[int]:
        """``KVPoolClient``'s give-back handler: get wholly free groups retired (by the
        engine's thread after its step, or here while it idles), wait for their fence,
        unmap them; returns their pages."""
        with self._cv:
            self._asked, self._ticket = n, None
        deadline = time.monotonic() + GIVE_BACK_WAIT_S
        while True:
            with self._cv:
                ticket = self._ticket
                if ticket is None and time.monotonic() > deadline:
                    self._asked = None
                    log.warning("gpud-kv: the engine did not free pages within %gs of "
                                "gpud's ask", GIVE_BACK_WAIT_S)
                    return []
            if ticket is not None:
                break
            if self.lock.acquire(timeout=0.02):
                try:
                    self.service()
                finally:
                    self.lock.release()
        with self._cv:
            self._ticket = None
        self._unmap(ticket)
        self.stats.give_backs += 1
        self.stats.groups_given += len(ticket.groups)
        log.info("gpud-kv: gave back %d pages (%d asked)", len(ticket.pages), n)
        return ticket.pages

    # -- the pool thread -----------------------------------------------------------------

    def _post(self, kind: str, arg: object) -> None:
        with self._cv:
            self._cmds.append((kind, arg))
            self._busy += 1
        self._kick()

    def _kick(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
            os.write(self._wake_w, b"x")

    def _finish(self, kind: str, groups: list[int], payload: object = None) -> None:
        with self._cv:
            self._done.append((kind, groups, payload))
            self._cv.notify_all()

    def _run(self) -> None:
        fileno = getattr(self.client, "fileno", None)
        watch = [self._wake_r] + ([fileno()] if fileno is not None else [])
        while True:
            with self._cv:
                if self._stop:
                    return
                cmd = self._cmds.popleft() if self._cmds else None
            try:
                if cmd is None:
                    ready, _, _ = select.select(watch, [], [], 1.0)
                    if self._wake_r in ready:
                        os.read(self._wake_r, 4096)
                    if len(watch) > 1 and watch[1] in ready:
                        self.client.poll(0)  # type: ignore[attr-defined]
                    continue
                kind, arg = cmd
                if kind == "grow":
                    assert isinstance(arg, list)
                    self._grow(arg)
                else:
                    assert isinstance(arg, _Ticket)
                    self._unmap(arg)
                    self.client.give_back(arg.pages)
            except Exception as e:  # a broken pool link must be loud, not a silent thread
                log.error("gpud-kv: the connection to gpud's KV pool broke: %r", e)
                self.broken = e
                if cmd is None:
                    return
            finally:
                if cmd is not None:
                    with self._cv:
                        self._busy -= 1
                        self._cv.notify_all()

    def _grow(self, groups: list[int]) -> None:
        """Grant and map ``groups`` (pool thread; ``start`` calls it inline for group 0).
        Every group ends "mapped" or "failed", on errors too."""
        r = self.geometry.num_tensors
        t0 = time.monotonic()
        done = 0
        try:
            outcome = self.client.grant(len(groups) * r)
            t1 = time.monotonic()
            self.stats.grant_s += t1 - t0
            pages = list(outcome.pages)
            whole = min(len(pages) // r, len(groups))
            self._give_back_unmapped(pages[whole * r :])
            for i in range(whole):
                g, chunk = groups[i], pages[i * r : (i + 1) * r]
                try:
                    self.mapper.map_group(g, [p.fd for p in chunk])
                except BaseException:
                    self._give_back_unmapped(pages[(i + 1) * r : whole * r])
                    self.client.give_back([p.page for p in chunk])
                    raise
                self._finish("mapped", [g], [[p.page for p in chunk]])
                done += 1
            self.stats.grants += 1
            self.stats.groups_grown += whole
            self.stats.map_s += time.monotonic() - t1
        except BaseException as e:
            self._finish("failed", groups[done:], f"growing failed: {e!r}")
            raise
        if whole < len(groups):
            why = outcome.reason or f"gpud lent {len(pages)} of {len(groups) * r}"
            self._finish("failed", groups[whole:], why)
        else:
            self._finish("granted", [])

    def _unmap(self, ticket: _Ticket) -> None:
        t0 = time.monotonic()
        # Work launched before the blocks were retired may still write them (async
        # scheduling): wait for that work only, then unmap.
        self.mapper.wait(ticket.fence)
        self.stats.fence_s += time.monotonic() - t0
        for g in ticket.groups:
            self.mapper.unmap_group(g)
        self._finish("unmapped", ticket.groups)

    def _give_back_unmapped(self, pages: Sequence[PageGrant]) -> None:
        for p in pages:
            p.close_fd()
        if pages:
            self.client.give_back([p.page for p in pages])

    # -- reporting ------------------------------------------------------------------------

    @property
    def pages_held(self) -> int:
        return sum(len(p) for p in self.pages_of.values())

    def summary(self) -> dict[str, int | bool | str]:
        return {
            "groups_mapped": len(self.book.mapped_groups),
            "groups_growing": self.growing,
            "pages_held": self.pages_held,
            "blocks_free": self.book.free_blocks,
            "blocks_used": self.book.used_blocks,
            "asleep": self.book.asleep,
            "last_refusal": self.last_refusal,
        }
