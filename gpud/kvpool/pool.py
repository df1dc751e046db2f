"""One GPU's KV pool: the ledger's decisions carried out on a page backend.

``KVPool`` is synchronous and owns no sockets or tasks: the server (or a
test, or the benchmark) calls it. It backs pages when they are granted (or
ahead of need, ``grow_ahead``), and gives memory back to the driver when the
pool shrinks (``shrink``), keeping the ledger's ``backed`` marks true.
``pool_status`` makes the plain dict the daemon puts under "kvpool" in its
status JSON.

It must never import asyncio or CUDA: the backend object is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from gpud.kvpool.backend import PageBackend
from gpud.kvpool.ledger import Activity, Decision, PoolLedger, TenantSpec


class PageRef(NamedTuple):
    """A granted page: its number, its byte offset in the pool, and its fd (None: no backend)."""

    page: int
    offset: int
    fd: int | None


@dataclass(frozen=True)
class Grant:
    decision: Decision
    pages: tuple[PageRef, ...]


class KVPool:
    """The pages of one GPU, their books and their memory."""

    def __init__(self, ledger: PoolLedger, backend: PageBackend, spare_pages: int = 0) -> None:
        if backend.page_size != ledger.page_size:
            raise ValueError(
                f"GPU {ledger.gpu}: backend pages are {backend.page_size} bytes, "
                f"the ledger's {ledger.page_size}"
            )
        self.ledger = ledger
        self.backend = backend
        # Free pages kept backed when the pool shrinks, so the next grant skips creation.
        self.spare_pages = spare_pages
        # The tenant that last held each backed page: a page that goes to another model is
        # zeroed first (so is every page fresh from the driver, which promises nothing).
        self._holder: dict[int, str] = {}
        self.zeroed_pages = 0

    @property
    def gpu(self) -> int:
        return self.ledger.gpu

    @property
    def page_size(self) -> int:
        return self.ledger.page_size

    def add_tenant(self, spec: TenantSpec, activity: Activity = Activity.AWAKE) -> None:
        self.ledger.add_tenant(spec, activity)

    def request(self, tenant: str, n: int) -> Grant:
        """Grant what is free now; the decision says whom to ask for the rest."""
        decision = self.ledger.request(tenant, n)
        return Grant(decision, self._back(tenant, list(decision.granted)))

    def grant_now(self, tenant: str, n: int) -> tuple[PageRef, ...]:
        """Grant ``n`` free pages at once or raise ``LedgerError``: the in-process fast path."""
        return self._back(tenant, self.ledger.grant(tenant, n))

    def reclaim(self, tenant: str, pages: Iterable[int]) -> None:
        """Take pages back (already unmapped) and give their memory back to the driver now."""
        pages = self.ledger.release(tenant, pages)
        for p in pages:
            self.backend.release(p)
            self._holder.pop(p, None)
        self.ledger.mark_unbacked(pages)

    def claim_earmarked(self, tenant: str) -> tuple[PageRef, ...]:
        return self._back(tenant, self.ledger.claim_earmarked(tenant))

    def release(self, tenant: str, pages: Iterable[int]) -> list[int]:
        return self.ledger.release(tenant, pages)

    def release_all(self, tenant: str) -> list[int]:
        return self.ledger.release_all(tenant)

    def grow_ahead(self, n: int) -> int:
        """Back up to ``n`` free pages now, so later grants only map them. Returns how many."""
        pages = self.ledger.unbacked_free(n)
        for p in pages:
            self.backend.create(p)
            self.ledger.mark_backed([p])
        self._zero(pages)
        return len(pages)

    def shrink(self, keep: int | None = None) -> int:
        """Give free pages' memory back to the driver, keeping ``keep`` spares (default: the
        pool's spares plus the pages earmarked for a waiting model, which go to it as they
        are, zeroed, instead of back to the driver and out again). Returns how many."""
        if keep is None:
            keep = self.spare_pages + self.ledger.earmarked_total()
        pages = self.ledger.surplus_backed(keep)
        for p in pages:
            self.backend.release(p)
            self._holder.pop(p, None)
            self.ledger.mark_unbacked([p])
        return len(pages)

    def ref(self, page: int) -> PageRef:
        return PageRef(page, page * self.page_size, self.backend.fd(page))

    def read(self, page: int, nbytes: int) -> bytes:
        return self.backend.read(page, nbytes)

    def close(self) -> None:
        self.backend.close()
        self.ledger.mark_unbacked(range(self.ledger.total_pages))

    def status(self) -> dict[str, object]:
        s = self.ledger.summary()
        s["backend"] = self.backend.name
        s["backend_info"] = self.backend.describe()
        s["bytes_total"] = self.ledger.total_pages * self.page_size
        s["zeroed_pages"] = self.zeroed_pages
        return s

    def _back(self, tenant: str, pages: list[int]) -> tuple[PageRef, ...]:
        try:
            dirty = [p for p in pages if self._holder.get(p, tenant) != tenant]
            for p in pages:
                if not self.ledger.is_backed(p):
                    self.backend.create(p)
                    self.ledger.mark_backed([p])
                    dirty.append(p)
            self._zero(dirty)
        except Exception:
            # Keep the books true: the tenant did not get pages the backend could not make.
            self.ledger.release(tenant, pages)
            raise
        for p in pages:
            self._holder[p] = tenant
        size, fd = self.page_size, self.backend.fd
        return tuple([PageRef(p, p * size, fd(p)) for p in pages])


    def _zero(self, pages: list[int]) -> None:
        if pages:
            self.backend.zero(pages)
            self.zeroed_pages += len(pages)
            for p in pages:
                self._holder.pop(p, None)


def pool_status(pools: Mapping[int, KVPool]) -> dict[str, object]:
    """The "kvpool" section of gpud's status JSON: per GPU, pages total, granted per model, free."""
    backends = sorted({p.backend.name for p in pools.values()})
    return {
        "backend": ",".join(backends) or "none",
        "gpus": {str(gpu): pools[gpu].status() for gpu in sorted(pools)},
    }
