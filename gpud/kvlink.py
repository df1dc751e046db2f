"""The daemon's side of the KV pool: start it when a model uses it, follow reloads, tell it
what each pool model is doing after every pass, and close it last (engines hold its pages).

Only engines gpud started may take pages, and only for their own model (`allow_peer`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpud.states import State

if TYPE_CHECKING:
    from gpud.config import GpudConfig
    from gpud.reconcile import Reconciler

log = logging.getLogger("gpud.daemon")


class KVLink:
    def __init__(self, reconciler: Reconciler, runtime_dir: Path) -> None:
        self.reconciler = reconciler
        self.runtime_dir = runtime_dir
        self.server: Any = None
        self.problems: list[str] = []
        self._trimmed: set[str] = set()  # pool models trimmed in their current quiet spell
        self._tasks: set[asyncio.Task[int]] = set()

    async def start(self, config: GpudConfig) -> None:
        from gpud.kvpool.setup import build_server

        try:
            self.server = build_server(config, self.runtime_dir, self.allow_peer)
            if self.server is not None:
                await self.server.start()
                self.reconciler.on_pass.append(self.after_pass)
        except Exception as exc:
            log.error("KV pool not started: %s", exc)
            self.server = None

    async def sync(self, config: GpudConfig) -> None:
        """A reload: pool models that joined become tenants (the pool starts if it was not
        running); changed budgets apply; what cannot is logged and shown in status."""
        from gpud.kvpool.setup import sync_server

        if self.server is None:
            await self.start(config)
            return
        self.problems = sync_server(self.server, config)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = (self.server.status() if self.server is not None else
                               {"backend": "none", "gpus": {},
                                "note": "no model uses the KV pool"})
        if self.problems:
            out["problems"] = list(self.problems)
        return out

    def after_pass(self) -> None:
        """Tell the pool what each pool model is doing, and trim a model that went idle or
        to sleep back to its kv_min (once per quiet spell)."""
        from gpud.kvpool.ledger import Activity, activity_of

        pool, r = self.server, self.reconciler
        if pool is None:
            return
        mono = time.monotonic()
        idle_after = r.config.daemon.kv_idle_after.total_seconds()
        for name, m in r.config.models.items():
            if not m.uses_pool:
                continue
            insts = [i for i in r.instances.values() if i.model == name]
            state = next((i.state for i in insts if i.state == State.AWAKE),
                         insts[0].state if insts else State.UNLOADED)
            t = r.traffic.get(name)
            activity = activity_of(state, t.inflight if t else 0, r.quiet_for(name, mono),
                                   idle_after)
            pool.set_activity(name, activity)
            if activity is Activity.AWAKE:
                self._trimmed.discard(name)
            elif name not in self._trimmed:
                self._trimmed.add(name)
                task = asyncio.get_running_loop().create_task(pool.trim(name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def allow_peer(self, peer: Any, model: str) -> bool:
        """Only engines gpud started may take pages, and only for their own model."""
        for inst in self.reconciler.instances.values():
            proc = inst.proc
            if inst.model == model and proc is not None and peer.pid > 0:
                try:
                    if os.getpgid(peer.pid) == proc.pgid:
                        return True
                except ProcessLookupError:
                    return False
        return False
