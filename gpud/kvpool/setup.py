"""Build the daemon's KV pool from the config: one pool per GPU that pool models use.

The pool is sized by its tenants' caps (kv_max, else kv_min). On a machine with a GPU and
cuda-python, pages are real device memory (CudaBackend); elsewhere the pool keeps its books
with no backend and its status says so. Never called for a config with no pool model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gpud.config.schema import GpudConfig, ModelConfig
from gpud.kvpool.backend import NoBackend, PageBackend
from gpud.kvpool.engine_env import DEFAULT_POOL_KV_BYTES
from gpud.kvpool.ledger import DEFAULT_PAGE_SIZE, LedgerError, PoolLedger, TenantSpec
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


def _spec(name: str, m: ModelConfig) -> TenantSpec:
    return TenantSpec(name, _pages(m.kv_min or 0), _pages(m.kv_max) if m.kv_max else None,
                      m.priority)


def _cap_pages(m: ModelConfig) -> int:
    """The pool's share for a model: what its engine may map (engine_env's capacity)."""
    if m.kv_max:
        return _pages(m.kv_max)
    return _pages(max(m.kv_min or 0, DEFAULT_POOL_KV_BYTES))


def build_server(cfg: GpudConfig, runtime_dir: Path, allow: AllowPeer) -> KVPoolServer | None:
    tenants = {name: m for name, m in cfg.models.items() if m.uses_pool}
    if not tenants:
        return None
    server = KVPoolServer({}, runtime_dir / "kvpool.sock", allow)
    sync_server(server, cfg)
    return server


def sync_server(server: KVPoolServer, cfg: GpudConfig) -> list[str]:
    """Make the pools match the config (start, and every reload): a pool per GPU that pool
    models use, each model a tenant with its budget; a model that joins grows its GPU's pool
    by its cap. A model that left keeps its pages until its engine is gone (gpud stops it).
    Returns what could not be applied, one line each (the rest is applied)."""
    problems: list[str] = []
    for name, m in cfg.models.items():
        if not m.uses_pool:
            continue
        gpu = m.gpu or 0
        pool = server.pools.get(gpu)
        if pool is None:
            backend, note = _backend(gpu)
            if note:
                log.info("KV pool GPU %d: %s", gpu, note)
            pool = server.pools[gpu] = KVPool(PoolLedger(gpu, 0), backend)
        ledger, spec = pool.ledger, _spec(name, m)
        try:
            if name in ledger.tenants():
                if ledger.spec(name) != spec:
                    ledger.update_tenant(spec)
            else:
                ledger.grow(_cap_pages(m))
                pool.add_tenant(spec)
        except LedgerError as exc:
            problems.append(f"model {name!r}: {exc}")
            log.error("KV pool: model %r: %s", name, exc)
    return problems
