"""The daemon as the web sees it: `gpud.web.control.Control` (and its test hooks) over `Daemon`.

The one place that knows where the daemon keeps what the page, the API and /metrics read, and
how their messages reach the loop. Nothing here decides; every write is a message the loop acts
on in its next pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gpud.config.schema import GpudConfig
from gpud.events import EventBus
from gpud.memory import Engine
from gpud.schedule import Schedule

if TYPE_CHECKING:
    from gpud.daemon import Daemon


PLAYGROUND_KEY = "admin-playground"  # the key name the playground's requests are logged under


class DaemonControl:
    """Reads of the daemon's published state, and messages to its loop."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self._r = daemon.reconciler
        self._play_secret: str | None = None

    @property
    def events(self) -> EventBus:
        return self._d.events

    @property
    def config(self) -> GpudConfig:
        return self._r.config  # type: ignore[no-any-return]

    @property
    def config_error(self) -> str | None:
        return self._d.config_error

    @property
    def admin_token(self) -> str | None:
        return self._d.admin_token

    @property
    def schedule(self) -> Schedule | None:
        return self._r.schedule

    @property
    def gpus(self) -> Sequence[int]:
        return sorted(self._r.gpus)

    @property
    def last_pass_seconds(self) -> float | None:
        return self._r.last_pass_seconds

    @property
    def connections(self) -> dict[str, Any] | None:
        guard = self._d.guard
        return guard.stats() if guard is not None else None

    def now(self) -> datetime:
        return self._r.now()

    def status(self) -> dict[str, Any]:
        return self._d.status()

    def model_states(self) -> dict[str, dict[str, Any]]:
        return self._r.status_models()

    def active_profile(self) -> str | None:
        return self._r.active_profile(self._r.now())[0]

    def profile_status(self) -> dict[str, Any]:
        return self._d.profile_status()

    def plan_json(self) -> dict[str, Any]:
        return self._d.plan_json()

    def config_json(self) -> dict[str, Any]:
        return self._d.config_json()

    def has_instance(self, key: str) -> bool:
        return key in self._r.instances or key.split("#")[0] in self._r.config.models

    def log_tail(self, key: str, lines: int) -> list[str]:
        inst = self._r.instances.get(key)
        if inst is not None and inst.proc is not None:
            return inst.proc.log_tail(lines)
        return self._d.log_file_tail(key, lines)

    def engines(self) -> list[Engine]:
        """The engines gpud runs now (spawned or adopted), for memory accounting."""
        out = []
        for key, inst in list(self._r.instances.items()):
            proc = inst.proc
            pgid = getattr(proc, "pgid", None) if proc is not None else None
            if isinstance(pgid, int) and pgid > 1:
                out.append(Engine(key, inst.model, pgid, inst.gpu))
        return out

    def proxy_stats(self) -> dict[str, dict[str, Any]]:
        proxy = self._d.proxy
        return proxy.stats() if proxy is not None else {}

    def kv_status(self) -> dict[str, Any] | None:
        pool = self._d.kvpool
        return pool.status() if pool is not None else None

    def on_pass(self, hook: Callable[[], None]) -> Callable[[], None]:
        hooks = self._r.on_pass
        hooks.append(hook)

        def remove() -> None:
            if hook in hooks:
                hooks.remove(hook)
        return remove

    def observe_requests(self, observer: Any) -> None:
        proxy = self._d.proxy
        if proxy is not None and getattr(proxy, "observer", None) is None:
            proxy.observer = observer

    async def activity(self, *, model: str | None, key: str | None,
                       limit: int) -> dict[str, Any]:
        log = self._d.activity
        rows = await asyncio.to_thread(log.query, model=model, key=key, limit=limit)
        return {"rows": rows, "cap": log.cap, "dropped": log.dropped}

    def activity_totals(self) -> dict[str, dict[str, int]]:
        return self._d.activity.totals()

    def playground_key(self) -> str | None:
        """A key for the page's playground, for admins' pages, when the proxy wants keys:
        made once per daemon and added back to the proxy's keys after a reload replaced them
        (the page asks again on a 401). Never logged, never in the config."""
        from gpud.proxy.auth import ApiKey, KeyRing

        proxy = self._d.proxy
        if proxy is None or not proxy.keys.enabled:
            return None
        if self._play_secret is None:
            self._play_secret = secrets.token_urlsafe(32)
        ring = proxy.keys
        if not any(k.name == PLAYGROUND_KEY for k in ring):
            digest = hashlib.sha256(self._play_secret.encode()).digest()
            proxy.set_keys(KeyRing([*ring, ApiKey(PLAYGROUND_KEY, digest)]))
        return self._play_secret

    # --- messages to the loop -----------------------------------------------------------

    def set_override(self, model: str, state: str | None, until: datetime | None, reason: str,
                     *, gpu: int | None = None, level: int | None = None) -> None:
        self._r.set_override(model, state, until, reason, gpu=gpu, level=level)

    def clear_override(self, model: str) -> None:
        self._r.clear_override(model)

    def force_profile(self, name: str, until: datetime | None, reason: str) -> None:
        self._r.force_profile(name, until, reason)

    def release_profile(self) -> None:
        self._r.release_profile()

    async def reload(self, source: str) -> dict[str, Any]:
        return await self._d.reload(source=source)


class DaemonTestHooks:
    """GPUD_TEST_HOOKS=1 only. Installing them turns on the proxy's timing marks."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        if daemon.proxy is not None:
            import collections

            daemon.proxy.timings = collections.deque(maxlen=256)

    def stall_loop(self) -> None:
        """Block the loop's thread from its next pass on, as a stuck pass would."""
        def stall() -> None:
            while True:
                time.sleep(0.05)

        self._d.reconciler.before_pass.append(stall)
        self._d.reconciler.trigger()

    def set_clock(self, at: datetime) -> None:
        self._d.set_clock(at)

    def request_timings(self) -> list[dict[str, Any]]:
        proxy = self._d.proxy
        return list(proxy.timings or []) if proxy is not None else []
