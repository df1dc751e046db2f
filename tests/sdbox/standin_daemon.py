"""A stand-in for `gpud run` that speaks through gpud.systemd only.

Lets the packaged unit (its hardening, user, directories and watchdog) be run
under a real systemd before and independently of the real daemon:
READY after start-up, a STATUS line, watchdog pings from an asyncio timer
that need a fresh "reconcile pass", SIGHUP -> RELOADING/READY, SIGUSR1 ->
the reconcile loop hangs (pings stop), SIGTERM -> STOPPING and exit 0.
It writes what it could and could not do to $RUNTIME_DIRECTORY/probe.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from gpud.logs import setup_logging
from gpud.systemd import Notifier, run_watchdog, status_line


def _probe() -> dict[str, object]:
    def writable(path: str) -> bool:
        try:
            p = Path(path) / f".probe-{os.getpid()}"
            p.write_text("x")
            p.unlink()
            return True
        except OSError:
            return False

    return {
        "uid": os.getuid(),
        "groups": sorted(os.getgroups()),
        "state_writable": writable(os.environ.get("STATE_DIRECTORY", "/var/lib/gpud")),
        "runtime_writable": writable(os.environ.get("RUNTIME_DIRECTORY", "/run/gpud")),
        "etc_writable": writable("/etc/gpud") or writable("/etc"),
        "etc_gpud_writable": writable("/etc/gpud"),
        "usr_writable": writable("/usr"),
        "tmp_writable": writable("/tmp"),
        "config_dir": os.environ.get("CONFIGURATION_DIRECTORY"),
        "umask": oct(os.umask(0o077)),
        "env_notify": "NOTIFY_SOCKET" in os.environ,
        "journal_stream": "JOURNAL_STREAM" in os.environ,
    }


async def main() -> int:
    setup_logging("info")
    log = logging.getLogger("gpud.standin")
    notifier = Notifier(unset_environment=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hang = False
    reloads = 0
    last_pass: float | None = None
    revision = os.environ.get("STANDIN_REVISION", "a1b2c3")

    def line() -> str:
        return status_line("day", 0, 0, {}, f"{revision}-{reloads}")

    async def reconcile() -> None:
        nonlocal last_pass
        while True:
            if hang:
                log.warning("reconcile loop hangs on purpose")
                await asyncio.Event().wait()
            last_pass = time.monotonic()
            await asyncio.sleep(0.2)

    def on_hup() -> None:
        nonlocal reloads
        notifier.reloading(status="reloading")
        reloads += 1
        notifier.ready(status=line())
        log.info("reloaded (%d)", reloads)

    def on_usr1() -> None:
        nonlocal hang
        hang = True

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    await asyncio.sleep(float(os.environ.get("STANDIN_DELAY", "1")))
    runtime = Path(os.environ.get("RUNTIME_DIRECTORY", "/run/gpud"))
    (runtime / "probe.json").write_text(json.dumps(_probe()))
    tasks = [
        asyncio.create_task(reconcile()),
        asyncio.create_task(run_watchdog(notifier, lambda: last_pass)),
    ]
    notifier.ready(status=line())
    log.info("ready")
    try:
        raise RuntimeError("a traceback that must stay one journal entry")
    except RuntimeError:
        log.exception("folded traceback test")
    await stop.wait()
    notifier.stopping(status="stopping")
    log.info("stopping")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
