"""Build the daemon's KV pool from the config: one pool per GPU that pool models use.

The pool is sized by its tenants' caps (kv_max, else kv_min). On a machine with a GPU and
cuda-python, pages are real device memory (CudaBackend); elsewhere the pool keeps its books
with no backend and its status says so. Never called for a config with no pool model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gpud.config.schema import GpudConfig
from gpud.kvpool.backend import NoBackend, PageBackend
from gpud.kvpool.ledger import DEFAULT_PAGE_SIZE, PoolLedger, TenantSpec
from gpud.kvpool.pool import KVPool
from gpud.kvpool.server import AllowPeer, KVPoolServer

log = logging.getLogger("gpud.kvpool")


def _pages(nbytes: int) -> int:
    return -(-nbytes // DEFAULT_PAGE_SIZE)


def _backend(gpu: int) -> tuple[PageBackend, str | None]:
    try:
        from gpud.kvpool.cuda import CudaBackend

        return CudaBackend(gpu, DEFAULT_PAGE_SIZE), None
    except Exception as exc:
        return NoBackend(DEFAULT_PAGE_SIZE), f"no GPU backend ({exc}); keeping the books only"


def build_server(cfg: GpudConfig, runtime_dir: Path, allow: AllowPeer) -> KVPoolServer | None:
    tenants = {name: m for name, m in cfg.models.items() if m.uses_pool}
    if not tenants:
        return None
    pools: dict[int, KVPool] = {}
    for gpu in sorted({m.gpu or 0 for m in tenants.values()}):
        members = {n: m for n, m in tenants.items() if (m.gpu or 0) == gpu}
        total = sum(_pages(m.kv_max or m.kv_min or 0) for m in members.values())
        backend, note = _backend(gpu)
        if note:
            log.info("KV pool GPU %d: %s", gpu, note)
        pool = KVPool(PoolLedger(gpu, total), backend)
        for name, m in members.items():
            pool.add_tenant(TenantSpec(name, _pages(m.kv_min or 0),
                                       _pages(m.kv_max) if m.kv_max else None, m.priority))
        pools[gpu] = pool
    return KVPoolServer(pools, runtime_dir / "kvpool.sock", allow)
