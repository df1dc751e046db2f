"""`gpud run`: the daemon. Owns the event loop, the listener, the watcher and the reconciler.

Everything it starts, it stops, in reverse order. It never lets an invalid file replace the
running config: the last good one is kept in the state dir and used again at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from gpud import __version__, dirlock, lastgood, upgrade
from gpud.activity import ActivityLog
from gpud.config import (
    EMBEDDED_DEFAULT,
    ConfigError,
    EmptyConfigError,
    GpudConfig,
    LoadedConfig,
    load_config,
    reload_effects,
)
from gpud.config.load import DEFAULT_PATH
from gpud.config.schema import DaemonConfig
from gpud.controls import DaemonControl, DaemonTestHooks
from gpud.events import EventBus
from gpud.kvlink import KVLink
from gpud.listener import ConnectionGuard, GuardedSite, Limits, open_site
from gpud.memory import measure, model_bytes
from gpud.policy_loop import run_policies
from gpud.reconcile import Reconciler
from gpud.states import RUNNING, TRANSITIONAL
from gpud.systemd import Notifier, run_watchdog, status_line
from gpud.timer import BoundaryTimer

log = logging.getLogger("gpud.daemon")

def _writable_dir(path: Path, fallback: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


class Daemon:
    def __init__(self, loaded: LoadedConfig, config_path: Path | None, *,
                 stop_engines_on_exit: bool | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.loaded = loaded
        self.config_error: str | None = None
        # Why gpud runs on the last good copy (the file was invalid at start-up), until a
        # valid file loads.
        self.fallback: str | None = None
        self.started_at = datetime.now(UTC)
        cfg = loaded.config
        self.state_dir = _writable_dir(cfg.daemon.state_dir, lastgood.state_fallback())
        runtime = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / f"gpud-{os.getuid()}"
        self.runtime_dir = _writable_dir(cfg.daemon.runtime_dir, runtime)
        self.events = EventBus()
        self.notifier = notifier or Notifier(unset_environment=True)
        if stop_engines_on_exit is None:
            stop_engines_on_exit = cfg.daemon.stop_engines_on_exit
        if stop_engines_on_exit is None:
            # A clean stop (SIGTERM: Ctrl-C, `systemctl stop`) takes the engines down; a crash,
            # a watchdog kill or kill -9 leaves them running and the next gpud adopts them.
            # `stop_engines_on_exit = false` keeps them across `systemctl restart` (upgrades).
            stop_engines_on_exit = True
        self.stop_engines_on_exit = stop_engines_on_exit
        self.clock_offset = _test_clock_offset()
        self.reconciler = Reconciler(loaded, self.events, state_dir=self.state_dir,
                                     runtime_dir=self.runtime_dir, clock=self._now)
        self.reconciler.on_pass.append(self._update_status)
        self.admin_token = self._read_admin_token()
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._watching = asyncio.Event()  # the config watcher is set up
        # READY=1 went out at start-up: before that, a reload (the watcher's catch-up one)
        # must not tell systemd RELOADING/READY, or it reads the daemon as up before it listens.
        self._announced = False
        self._clean_stop = False  # set once a stop was asked for (not an error, not an upgrade's)
        self._bg: dict[str, asyncio.Task[None]] = {}
        self._status_line = ""
        self.proxy: Any = None
        self.activity = ActivityLog(self.state_dir / "activity.sqlite3", cfg.daemon.activity_rows)
        self.kv = KVLink(self.reconciler, self.runtime_dir)
        self.control = DaemonControl(self)  # what the page, the API and /metrics see
        self.timer = BoundaryTimer(self.reconciler, lambda: self.clock_offset)
        self.memory: dict[str, Any] | None = None
        self.memory_at = 0.0
        self.runner: web.AppRunner | None = None
        self.site: GuardedSite | None = None
        self.guard: ConnectionGuard | None = None  # the listener's timeouts and cap
        self.listening: str | None = None  # where the listener is, whatever the file says
        self.listen_problem: str | None = None  # why the file's listen is not applied

    @property
    def kvpool(self) -> Any:
        """The KV pool's server, None when no model uses it."""
        return self.kv.server

    def _now(self) -> datetime:
        from gpud.config import zone_of

        return (datetime.now(UTC) + self.clock_offset).astimezone(
            zone_of(self.reconciler.config if hasattr(self, "reconciler") else
                    self.loaded.config))

    def set_clock(self, at: datetime) -> None:
        self.clock_offset = at - datetime.now(UTC)
        self.timer.rearm()
        self.reconciler.trigger()

    # --- config -------------------------------------------------------------------------

    def _read_admin_token(self) -> str | None:
        cfg = self.loaded.config
        path = cfg.auth.admin_token_file or cfg.daemon.admin_token_file
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            log.error("cannot read the admin token file %s: %s", path, exc.strerror)
            return None

    def save_last_good(self) -> None:
        lastgood.save(self.state_dir, self.loaded)

    async def reload(self, source: str) -> dict[str, Any]:
        """Validate, then swap. An invalid file changes nothing but the reported error."""
        try:
            return await self._reload(source)
        except Exception as exc:  # a bug, not a bad file: the watcher and the API outlive it
            log.exception("config reload (%s) failed", source)
            self.config_error = f"reload failed: {type(exc).__name__}: {exc}"
            return {"valid": False, "changed": False, "revision": self.loaded.revision,
                    "error": self.config_error}

    async def _reload(self, source: str) -> dict[str, Any]:
        async with self._reload_lock:
            announced = self._announced
            if announced:
                self.notifier.reloading()
            try:
                try:
                    new = await asyncio.to_thread(load_config, self.config_path)
                except ConfigError as exc:
                    self.config_error = str(exc)
                    # An empty file is most often a save caught halfway: a warning, not an error.
                    log.log(logging.WARNING if isinstance(exc, EmptyConfigError) else
                            logging.ERROR, "config reload (%s) refused; still running "
                            "revision %s:\n%s", source, self.loaded.revision, exc)
                    self.events.publish("config", valid=False, error=self.config_error,
                                        revision=self.loaded.revision, source=source)
                    return {"valid": False, "changed": False, "revision": self.loaded.revision,
                            "error": self.config_error}
                self.config_error = None
                if self.fallback is not None:
                    self.fallback = None
                    log.info("the file is valid again (revision %s)", new.revision)
                if new.revision == self.loaded.revision:
                    return {"valid": True, "changed": False, "revision": new.revision,
                            "error": None}
                old = self.loaded.revision
                effects = reload_effects(self.loaded.config, new.config)
                self.loaded = new
                try:
                    await self._apply(new)
                except Exception:  # the watcher and SIGHUP must survive a bug in applying
                    log.exception("config reload (%s): applying revision %s failed", source,
                                  new.revision)
                log.info("config reloaded (%s): revision %s -> %s", source, old, new.revision)
                for line in effects:
                    log.warning("config reload (%s): %s", source, line)
                self.events.publish("config", valid=True, revision=new.revision, previous=old,
                                    source=source)
                return {"valid": True, "changed": True, "revision": new.revision, "error": None}
            finally:
                self._update_status()
                if announced:
                    self.notifier.ready()

    async def _follow_listen(self) -> None:
        """Move the listener where the file's `listen` now says (or say why not)."""
        from gpud.listener import rebind

        want = self.loaded.config.daemon.listen
        if self.site is None or self.runner is None or self.listening in (None, want):
            self.listen_problem = None
            return
        assert self.listening is not None
        self.site, why = await rebind(self.runner, self.site, self.listening, want)
        if why is None:
            self.listening, self.listen_problem = want, None
        else:
            self.listen_problem = f"{why}; still listening on {self.listening}"
            log.error("listen change refused: %s", self.listen_problem)

    async def _apply(self, new: LoadedConfig) -> None:
        await self.kv.sync(new.config)  # before the reconciler starts any new pool engine
        self.reconciler.set_config(new)
        if self.guard is not None:
            self.guard.configure(Limits.of(new.config.daemon))
        self.admin_token = self._read_admin_token()
        self.activity.cap = new.config.daemon.activity_rows
        if self.proxy is not None:
            self.proxy.set_keys(self._keyring())
        await asyncio.to_thread(self.save_last_good)
        await self._follow_listen()

    def _keyring(self) -> Any:
        return keyring(self.loaded.config)

    # --- status -------------------------------------------------------------------------

    def _update_status(self) -> None:
        r = self.reconciler
        models = r.instances
        ready = sum(1 for i in models.values() if i.state in RUNNING)
        moving = {k: i.state.value for k, i in models.items() if i.state in TRANSITIONAL}
        profile, _ = r.active_profile(r.now())
        line = status_line(profile, ready, len(models), moving, self.loaded.revision)
        if self.fallback:
            line += " · file invalid, on the last good config"
        elif self.config_error:
            line += " · last reload refused"
        if line != self._status_line:
            self._status_line = line
            self.notifier.status(line)

    def config_status(self) -> dict[str, Any]:
        return {"path": str(self.loaded.path), "revision": self.loaded.revision,
                "valid": self.config_error is None, "error": self.config_error,
                "embedded": self.loaded.embedded, "fallback": self.fallback}

    def profile_status(self) -> dict[str, Any]:
        r = self.reconciler
        now = r.now()
        profile, why = r.active_profile(now)
        forced = None
        fp = r.forced_profile
        if fp is not None and fp.active(now):
            until = fp.until.isoformat(timespec="seconds") if fp.until else None
            forced = {"profile": fp.name, "until": until, "reason": fp.reason}
        nb = r.next_boundary(now) if forced is None else None
        return {"profile": profile, "source": why, "forced": forced,
                "next_boundary": {"at": nb.at.isoformat(timespec="seconds"), "profile": nb.profile,
                                  "prewake_seconds": nb.prewake.total_seconds()} if nb else None,
                "profiles": list(r.config.profiles)}

    def status(self) -> dict[str, Any]:
        r = self.reconciler
        prof = self.profile_status()
        out: dict[str, Any] = {
            "daemon": {"pid": os.getpid(), "version": __version__,
                       "started_at": self.started_at.isoformat(timespec="seconds"),
                       "listen": self.listening, "listen_problem": self.listen_problem},
            "now": r.now().isoformat(timespec="seconds"),
            "profile": prof["profile"],
            "schedule": {"source": prof["source"], "forced": prof["forced"],
                         "next_boundary": prof["next_boundary"]},
            "config": self.config_status(),
            "models": r.status_models(),
            "policies": r.policy_status,
            "kvpool": self.kv.status(),
        }
        fresh = self.memory is not None and time.monotonic() - self.memory_at < 2.0
        out["memory"] = self.memory if fresh else measure(self.control.engines())
        # Per model: GPU bytes (NVML, the engine's whole process group) where a GPU holds
        # it, else host RSS. `gpud status` prints this column; it was never filled before.
        per_key = model_bytes(out["memory"])
        for key, m in out["models"].items():
            m["memory_bytes"] = per_key.get(key)
        if self.proxy is not None:
            for name, stats in self.proxy.stats().items():
                for m in out["models"].values():
                    if m["model"] == name:
                        m["inflight"] = stats["inflight"]
                        m["queued"] = stats["queued"]
        return out

    def plan_json(self) -> dict[str, Any]:
        return self.reconciler.decide().to_json()

    def config_json(self) -> dict[str, Any]:
        r = self.reconciler
        desired = r.desired()
        return {**self.config_status(),
                "files": [str(s.path) for s in self.loaded.sources],
                "effective": {k: d.to_json() for k, d in desired.items()},
                "config": self.loaded.config.model_dump(mode="json")}

    def log_file_tail(self, key: str, lines: int) -> list[str]:
        from gpud.logs import tail_lines

        return tail_lines(self.state_dir / "logs" / f"{key}.log", lines)

    # --- the loop -----------------------------------------------------------------------

    async def _watch(self) -> None:
        from gpud.watch import watch_config

        if self.loaded.embedded or (self.config_path is None and not DEFAULT_PATH.exists()):
            self._watching.set()
            return
        await watch_config(self.loaded.path, lambda: self.reload(source="file change"),
                           self._stop, self._watching)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> int:
        """uvicorn's shape: start up on an exit stack, run until asked to stop, and let the
        stack stop every started piece in reverse order (on a clean stop, a failed start-up
        or an error alike; engines are stopped only on a clean stop, if asked)."""
        async with contextlib.AsyncExitStack() as stack:
            if not await self._startup(stack):
                return 1
            await self._main_loop(stack)
        return 0

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        from gpud.proxy.app import Proxy
        from gpud.web import api, guards, metrics, page

        guards.install(app, self.control)
        # No disconnect sweep: the runner's handler_cancellation (below) does that.
        self.proxy = Proxy(self.reconciler, keys=self._keyring(), disconnect_check=None,
                           activity=self.activity)
        self.proxy.install(app)
        metrics.install(app, self.control)
        hooks = DaemonTestHooks(self) if os.environ.get("GPUD_TEST_HOOKS") == "1" else None
        api.install(app, self.control, hooks=hooks)
        page.install(app, self.control)
        return app

    async def _startup(self, stack: contextlib.AsyncExitStack) -> bool:
        """Listener, signals, the KV pool, adopted engines, timers; False if it cannot listen.
        Each piece pushes its own stop right after it started."""
        loop = asyncio.get_running_loop()
        cfg = self.loaded.config
        app = self.make_app()
        stack.push_async_callback(self.kv.close)  # last: engines may hold its pages
        stack.push_async_callback(self._stop_engines)
        # The watcher comes first: from the moment /healthz answers, every edit is seen.
        self._bg = {"watch": asyncio.create_task(self._watch(), name="watch")}
        stack.push_async_callback(self._cancel_background)
        stack.push_async_callback(asyncio.to_thread, self.activity.start())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._watching.wait(), 5.0)
        # handler_cancellation: a client that goes away cancels its handler (and the engine
        # request) at once, not at the next write.
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    handler_cancellation=True)
        await self.runner.setup()
        stack.push_async_callback(self.runner.cleanup)
        self.guard = ConnectionGuard(Limits.of(cfg.daemon))
        self.guard.start(loop)
        stack.callback(self.guard.stop)
        try:
            self.site = await open_site(self.runner, cfg.daemon.listen, self.guard)
            self.listening = cfg.daemon.listen
        except OSError as exc:
            log.error("cannot listen on %s: %s", cfg.daemon.listen, exc.strerror)
            self._stop.set()
            return False
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: loop.create_task(self.reload(source="SIGHUP")))
        stack.callback(_remove_signal_handlers)
        await self.kv.start(cfg)
        adopted = await self.reconciler.adopt_engines()
        if adopted:
            log.info("adopted %d running engine(s): %s", len(adopted), ", ".join(adopted))
        await asyncio.to_thread(self.save_last_good)
        self.timer.start()
        stack.callback(self.timer.stop)
        self._start_background()
        return True

    def _start_background(self) -> None:
        interval = self.notifier.watchdog_interval()
        self.reconciler.set_max_tick(interval)  # a pass at least every ping interval
        self._bg.update({
            "reconcile": asyncio.create_task(self.reconciler.run(), name="reconcile"),
            "policies": asyncio.create_task(
                run_policies(self.reconciler, self.events, lambda: self.loaded.config),
                name="policies"),
            "memory": asyncio.create_task(self._measure_memory(), name="memory"),
            "watchdog": asyncio.create_task(
                run_watchdog(self.notifier, lambda: self.reconciler.last_pass,
                             max_age=2 * (interval or 0) or None), name="watchdog"),
        })

    async def _main_loop(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.loaded.config
        self.reconciler.pass_once()
        self._update_status()
        self._bg["gc"] = asyncio.create_task(collect_garbage(FULL_GC_EVERY), name="gc")
        self.notifier.ready()
        self._announced = True
        where = "embedded default" if self.loaded.embedded else str(self.loaded.path)
        log.info("gpud %s ready on http://%s (config %s, revision %s)", __version__,
                 cfg.daemon.listen, where, self.loaded.revision)
        await self._stop.wait()
        self._clean_stop = _announce_stop(self.loaded.config.daemon, self.runtime_dir,
                                          self.stop_engines_on_exit)
        self.notifier.stopping()

    # --- shutdown steps (the exit stack runs them in reverse order of start) -------------

    async def _cancel_background(self) -> None:
        tasks = list(self._bg.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _measure_memory(self) -> None:
        """NVML every tick, off the loop: feeds fit checks, footprints and status."""
        from gpud.footprints import gpus_from_measure

        while True:
            try:
                mem = await asyncio.to_thread(measure, self.control.engines())
                self.memory, self.memory_at = mem, time.monotonic()
                self.reconciler.set_gpus(gpus_from_measure(mem))
                if self.reconciler.gpus:
                    self.reconciler.record_footprints(model_bytes(mem))
            except Exception:  # memory figures are best effort
                log.exception("memory measurement failed")
            await asyncio.sleep(self.loaded.config.daemon.tick.total_seconds())

    async def _stop_engines(self) -> None:
        # Only a clean stop stops engines (when asked), and not an upgrade's (gpud.upgrade);
        # after an error they keep serving and the next gpud adopts them.
        await self.reconciler.stop_all(self.stop_engines_on_exit and self._clean_stop)


def _announce_stop(cfg: DaemonConfig, runtime_dir: Path, stop_engines: bool) -> bool:
    """Log how this clean stop ends; False when it keeps the engines for a package upgrade
    (gpud.upgrade) although a clean stop takes them."""
    if upgrade.keeps_engines(cfg, runtime_dir):
        return False
    log.info("stopping%s", " (engines too)" if stop_engines
             else " (engines keep running; a new gpud adopts them)")
    return True


def keyring(config: GpudConfig) -> Any:
    """The proxy's API keys from `[auth]`; a key unusable since check time is logged and
    never served open."""
    from gpud.proxy.auth import ApiKey, KeyRing

    keys = []
    for k in config.auth.keys:
        try:
            if k.key_file is not None:
                keys.append(ApiKey.from_file(k.name, k.key_file, k.models))
            elif k.key_hash is not None:
                keys.append(ApiKey.from_hash(k.name, k.key_hash, k.models))
        except (OSError, ValueError) as exc:
            # check time refuses these; a key file changed since is logged, never served open
            log.error("API key %r unusable: %s", k.name, exc)
    if config.auth.keys and not keys:
        keys.append(ApiKey.from_hash("(none usable)", "0" * 64, ()))
    return KeyRing(keys)


def _test_clock_offset() -> timedelta:
    """GPUD_TEST_CLOCK=ISO-8601 (with GPUD_TEST_HOOKS=1 only): the daemon's clock starts at that
    instant and runs at the real rate, so tests can stand a minute before 08:00 at any hour."""
    raw = os.environ.get("GPUD_TEST_CLOCK")
    if not raw or os.environ.get("GPUD_TEST_HOOKS") != "1":
        return timedelta(0)
    start = datetime.fromisoformat(raw)
    if start.tzinfo is None:
        raise SystemExit("GPUD_TEST_CLOCK needs an offset, e.g. 2026-03-30T07:59:00+02:00")
    return start - datetime.now(UTC)


def load_initial(path: Path | None) -> tuple[LoadedConfig, str | None]:
    """The config to start with: the file, else (when invalid) the last good copy, with
    the sentence saying why; exits with the located errors when there is no copy."""
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        found = lastgood.load_for(path or DEFAULT_PATH, exc)
        if found is None:
            print(f"gpud: the config is invalid (and no last good copy of it):\n{exc}",
                  file=sys.stderr)
            raise SystemExit(1) from None
        log.warning("%s", found[1])
        return found
    if loaded.embedded:
        log.warning("no %s: running on the embedded default (%s); no models are configured",
                    DEFAULT_PATH, EMBEDDED_DEFAULT)
    return loaded, None



def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)


FULL_GC_EVERY = 300.0  # seconds between two full garbage collections (collect_garbage)


async def collect_garbage(every: float) -> None:
    """Garbage collection for a server holding thousands of connections.

    What start-up made (modules, the app, the config) lives as long as the daemon: frozen
    out of the collector's reach, a full collection scans only what came since. A full
    collection stops the loop (50-250 ms with 5,000 connections open, measured by
    bench/idle_connections.py), and Python starts one each time the heap grew by a quarter,
    so a flood of connections set off one after another. The young generations still
    collect as before; the full collection runs here, on a clock, so cycles that outlived
    the young ones are freed within minutes and a flood never sets one off."""
    gc.freeze()
    gc.set_threshold(*gc.get_threshold()[:2], 10**9)
    while True:
        await asyncio.sleep(every)
        t0 = time.perf_counter()
        found = gc.collect()
        log.debug("full garbage collection: %d objects in %.0f ms", found,
                  (time.perf_counter() - t0) * 1000)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (a dependency) unless GPUD_LOOP=asyncio; asyncio's own loop if uvloop cannot
    be imported (a build without it). bench/proxy_daemon.py measures both."""
    if os.environ.get("GPUD_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on asyncio's own loop")
        return None
    return uvloop.new_event_loop


def run_daemon(path: Path | None, *, stop_engines_on_exit: bool | None = None) -> int:
    import faulthandler

    from gpud.logs import setup_logging

    faulthandler.enable()  # a watchdog SIGABRT prints the stuck stack to the journal
    setup_logging(os.environ.get("GPUD_LOG_LEVEL", "info").upper())
    loaded, fallback = load_initial(path)
    logging.getLogger().setLevel(loaded.config.daemon.log_level.upper())

    async def main() -> int:
        daemon = Daemon(loaded, path, stop_engines_on_exit=stop_engines_on_exit)
        daemon.fallback = daemon.config_error = fallback
        try:
            with dirlock.hold(daemon.state_dir, daemon.runtime_dir):
                upgrade.clear_left_over(daemon.runtime_dir)  # ours now: the old gpud is gone
                return await daemon.serve()
        except dirlock.DirLocked as exc:
            log.error("not starting: %s", exc)
            return 1

    t0 = time.monotonic()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code = runner.run(main())
    log.info("stopped after %.0fs", time.monotonic() - t0)
    return code
