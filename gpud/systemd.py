"""systemd's notify protocol for gpud: READY, STATUS, RELOADING, STOPPING, WATCHDOG.

All of sd_notify(3) lives here, on top of the `sdnotify` package, so the daemon
only says *what* happened (ready, reloading, a pass completed) and never builds
protocol lines itself. Every call is a no-op when NOTIFY_SOCKET is unset, so the
same daemon runs under systemd, in a terminal and in tests.

This module must never decide that the daemon is healthy: the watchdog ping is
sent only on proof that the reconcile loop completed a pass recently, which the
caller supplies. A timer that pings on its own would keep a stuck loop alive.
It also must never leak the notify socket or watchdog settings to engines:
`engine_env` strips them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

import sdnotify

_log = logging.getLogger(__name__)

__all__ = [
    "Notifier",
    "engine_env",
    "run_watchdog",
    "status_line",
]

# Variables that belong to gpud's own unit and must not reach an engine: an
# engine that inherited NOTIFY_SOCKET could send READY/STOPPING for gpud, and
# LISTEN_FDS would make it claim gpud's sockets.
_MANAGER_VARS = ("NOTIFY_SOCKET",)
_MANAGER_PREFIXES = ("WATCHDOG_", "LISTEN_")


def engine_env(env: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of `env` without what systemd handed to gpud itself.

    Removes NOTIFY_SOCKET and every WATCHDOG_* and LISTEN_* variable. Engines
    outlive gpud (they are adopted after a restart), so nothing that ties them
    to gpud's unit may be inherited.
    """
    return {
        key: value
        for key, value in env.items()
        if key not in _MANAGER_VARS and not key.startswith(_MANAGER_PREFIXES)
    }


def _one_line(text: str) -> str:
    # The protocol is newline-separated KEY=VALUE: a newline in a value would
    # start a new (bogus) assignment.
    return " ".join(text.split())


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Speaks sd_notify for the daemon's main process.

    Built once at start-up from the environment (or an explicit mapping in
    tests). With no NOTIFY_SOCKET every method does nothing and returns False,
    so callers never branch on "am I under systemd".

    `unset_environment=True` removes NOTIFY_SOCKET, WATCHDOG_* and LISTEN_*
    from `os.environ` after reading them (like libsystemd's sd_notify(1, ...)),
    so nothing gpud spawns later can talk to systemd as gpud.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._client: sdnotify.SystemdNotifier | None = None
        if self._address is not None:
            self._client = self._connect()
        if unset_environment and environ is None:
            for key in list(os.environ):
                if key in _MANAGER_VARS or key.startswith(_MANAGER_PREFIXES):
                    del os.environ[key]

    def _connect(self) -> sdnotify.SystemdNotifier | None:
        # sdnotify reads the address from os.environ: point it at ours while
        # the constructor runs, so an explicit `environ` (tests) works too.
        saved = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = self._address or ""
        try:
            # debug=True: raise instead of silently dropping every message
            return sdnotify.SystemdNotifier(debug=True)
        except OSError as exc:
            _log.warning("cannot connect to NOTIFY_SOCKET %s: %s", self._address, exc)
            return None
        finally:
            if saved is None:
                os.environ.pop("NOTIFY_SOCKET", None)
            else:
                os.environ["NOTIFY_SOCKET"] = saved

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given and could be connected."""
        return self._client is not None

    def notify(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines as one datagram. False if not under systemd."""
        if self._client is None or not assignments:
            return False
        # systemd ignores a STATUS= that is not UTF-8, and sdnotify encodes
        # str as Latin-1: pass the UTF-8 bytes through as Latin-1 code points.
        wire = "\n".join(assignments).encode("utf-8").decode("latin-1")
        try:
            self._client.notify(wire)
        except OSError as exc:
            # A lost READY or WATCHDOG is reported by systemd's own timeouts;
            # a notification must never take the daemon down.
            _log.warning("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: config valid, listener bound, loop running (not models loaded)."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def status(self, line: str) -> bool:
        """STATUS=: the one line `systemctl status gpud` shows."""
        return self.notify(f"STATUS={_one_line(line)}")

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC; call `ready()` when the reload is done."""
        lines = ["RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: a clean shutdown has begun."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time while starting or draining."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None when not ours.

        None when there is no watchdog, no notify socket, WATCHDOG_USEC is not
        a positive integer, or WATCHDOG_PID names another process (the
        variables were inherited from a parent that is the real main process).
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2_000_000

    def ping_if_alive(
        self,
        last_pass_monotonic: float | None,
        now: float,
        max_age: float | None = None,
    ) -> bool:
        """Send WATCHDOG=1 only if the reconcile loop completed a pass recently.

        `last_pass_monotonic` is the `time.monotonic()` at which the loop last
        finished a pass (None: never); `now` is the current monotonic time.
        The pass must be at most `max_age` seconds old (default: the ping
        interval, so the loop must complete a pass at least that often).
        Returns True if a ping was sent.
        """
        interval = self.watchdog_interval()
        if interval is None or last_pass_monotonic is None:
            return False
        limit = interval if max_age is None else max_age
        if now - last_pass_monotonic > limit:
            return False
        return self.notify("WATCHDOG=1")


async def run_watchdog(
    notifier: Notifier,
    last_pass: Callable[[], float | None],
    *,
    max_age: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Ping every watchdog interval while `last_pass()` is fresh; return at once
    when there is no watchdog. Run it as a task; cancel it on shutdown.

    A blocked event loop cannot run this task, and a loop stuck inside a pass
    leaves `last_pass()` stale: either way the pings stop and systemd kills us.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.ping_if_alive(last_pass(), clock(), max_age)
        await asyncio.sleep(interval)


def status_line(
    profile: str | None,
    ready: int,
    total: int,
    transitions: Mapping[str, str] | Iterable[tuple[str, str]],
    revision: str | None,
    *,
    max_transitions: int = 3,
) -> str:
    """The STATUS= line: `profile day · 3/4 models ready · chat waking · config a1b2c3`.

    `transitions` maps model name to what it is doing now ("waking",
    "starting", "sleeping"...); at most `max_transitions` are named, the rest
    counted. `revision` is the active config's revision (shortened).
    """
    pairs = sorted(transitions.items() if isinstance(transitions, Mapping) else transitions)
    parts = [f"profile {profile}" if profile else "no profile"]
    parts.append(f"{ready}/{total} models ready" if total else "no models")
    named = [f"{model} {verb}" for model, verb in pairs[:max_transitions]]
    if len(pairs) > max_transitions:
        named.append(f"+{len(pairs) - max_transitions} more")
    if named:
        parts.append(", ".join(named))
    parts.append(f"config {revision[:12]}" if revision else "no config")
    return _one_line(" · ".join(parts))
