"""The engine's pages from gpud, per page group: grant, map, give back, sleep, wake.

``PoolLink`` joins three things: the ``BlockBook`` (which groups are mapped,
which blocks used), gpud's page client (``gpud.kvpool.client.KVPoolClient``:
N pages in, one fd each) and a ``GroupMapper`` (maps one page per layer
buffer at a group's offset; on the GPU ``gpud_vllm.vmm.CudaGroupMapper``, in
tests a memfd mapper). Everything here runs on EngineCore's thread, under
the plugin's lock.

It must never import torch, vLLM or CUDA: the client and the mapper are
passed in, so the whole flow is tested on CPU (tests/test_kvplugin_lease.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from gpud_vllm.book import BlockBook
from gpud_vllm.geometry import KVGeometry

log = logging.getLogger("vllm.gpud_kv")  # under vLLM's logger: its handlers, its format

#: Called with block ids leaving service (a group being retired): drop them from vLLM's
#: free queue and forget their prefix-cache hashes.
RetireHook = Callable[[list[int]], None]


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
    """What the plugin uses of ``gpud.kvpool.client.KVPoolClient``."""

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

    def sync(self) -> None:
        """Wait until the device has finished all work launched so far (the fence)."""
        ...


class PoolLink:
    """One engine's lease of pool pages, in page groups."""

    def __init__(
        self,
        geometry: KVGeometry,
        client: PoolClient,
        mapper: GroupMapper,
        *,
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
        self.book = BlockBook(geometry, first_mapped=False)
        self.pages_of: dict[int, list[int]] = {}
        self.on_retire: RetireHook | None = None
        self.clock = clock
        self.retry_after = retry_after
        self.refused_at: float | None = None
        self.last_refusal = ""

    # -- growing ---------------------------------------------------------------------

    def start(self) -> None:
        """Map page group 0 (it holds vLLM's null block); gpud must lend it."""
        self._map_groups([0], required=True)

    def can_grow(self) -> bool:
        """Is there room to ask gpud for more (groups left, no recent refusal)?"""
        if self.book.asleep or not self.book.unmapped_groups(1):
            return False
        if self.refused_at is None:
            return True
        return self.clock() - self.refused_at >= self.retry_after

    def grow(self, groups: int) -> list[int]:
        """Ask for up to ``groups`` more page groups and map them; returns the blocks that
        became free (possibly none: gpud refused, or the virtual pool is fully mapped)."""
        if groups <= 0 or not self.can_grow():
            return []
        return self._map_groups(self.book.unmapped_groups(groups), required=False)

    def _map_groups(self, groups: list[int], *, required: bool) -> list[int]:
        r = self.geometry.num_tensors
        outcome = self.client.grant(len(groups) * r)
        pages = list(outcome.pages)
        whole = min(len(pages) // r, len(groups))
        surplus = pages[whole * r :]
        if surplus:
            for p in surplus:
                p.close_fd()
            self.client.give_back([p.page for p in surplus])
        if whole < len(groups):
            self.refused_at = self.clock()
            self.last_refusal = outcome.reason or f"gpud lent {len(pages)} of {len(groups) * r}"
            if required:
                self._give_back_unmapped(pages[: whole * r])
                raise PoolExhausted(
                    f"gpud lent {len(pages)} pages where page group 0 needs {r}: "
                    f"{self.last_refusal}"
                )
        else:
            self.refused_at = None
        fresh: list[int] = []
        for i in range(whole):
            g, chunk = groups[i], pages[i * r : (i + 1) * r]
            try:
                self.mapper.map_group(g, [p.fd for p in chunk])
            except BaseException:
                self._give_back_unmapped([p for c in range(i + 1, whole)
                                          for p in pages[c * r : (c + 1) * r]])
                self.client.give_back([p.page for p in chunk])
                raise
            self.pages_of[g] = [p.page for p in chunk]
            fresh.extend(self.book.mapped([g]))
        return fresh

    def _give_back_unmapped(self, pages: Sequence[PageGrant]) -> None:
        for p in pages:
            p.close_fd()
        if pages:
            self.client.give_back([p.page for p in pages])

    # -- giving back -------------------------------------------------------------------

    def reclaim(self, max_pages: int) -> list[int]:
        """Give back wholly free groups, at most ``max_pages`` pages; returns the page
        numbers, unmapped already (gpud's give-back request; the client reports them)."""
        groups = self.book.wholly_free(max_pages // self.geometry.num_tensors)
        if not groups:
            return []
        return self._unmap(groups, self.book.retire(groups))

    def handle_give_back(self, n: int) -> list[int]:
        """``KVPoolClient``'s give-back handler."""
        pages = self.reclaim(n)
        log.info("gpud-kv: gave back %d pages (%d asked)", len(pages), n)
        return pages

    def trim(self, keep_groups: int = 1) -> int:
        """Return wholly free groups above ``keep_groups`` mapped to gpud now; how many."""
        extra = len(self.book.mapped_groups) - keep_groups
        groups = self.book.wholly_free(max(extra, 0))
        if groups:
            self.client.give_back(self._unmap(groups, self.book.retire(groups)))
        return len(groups)

    def sleep(self) -> int:
        """Unmap every group (group 0 too) and return every page to gpud; how many pages."""
        groups = self.book.mapped_groups
        pages = self._unmap(groups, self.book.sleep())
        self.client.give_back(pages)
        return len(pages)

    def wake(self) -> list[int]:
        """Take group 0 back after a sleep; returns its free blocks."""
        if not self.book.asleep:
            return []
        self.refused_at = None
        self.book.asleep = False
        try:
            return self._map_groups([0], required=True)
        except BaseException:
            self.book.asleep = True
            raise

    def _unmap(self, groups: list[int], blocks: list[int]) -> list[int]:
        if self.on_retire is not None:
            self.on_retire(blocks)
        # Work already launched may still write blocks freed a step ago (async scheduling).
        self.mapper.sync()
        pages: list[int] = []
        for g in groups:
            self.mapper.unmap_group(g)
            pages.extend(self.pages_of.pop(g))
        self.book.retired(groups)
        return pages

    # -- reporting ------------------------------------------------------------------------

    @property
    def pages_held(self) -> int:
        return sum(len(p) for p in self.pages_of.values())

    def summary(self) -> dict[str, int | bool | str]:
        return {
            "groups_mapped": len(self.book.mapped_groups),
            "pages_held": self.pages_held,
            "blocks_free": self.book.free_blocks,
            "blocks_used": self.book.used_blocks,
            "asleep": self.book.asleep,
            "last_refusal": self.last_refusal,
        }
