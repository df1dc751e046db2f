"""`--wait` of `gpud load` and `gpud reload`: until the box matches, or a model failed.

"Matches": every model (or the ones asked about) is in the state gpud wants for it now.
"Failed": one of them is `failed` (gpud gave up on it) since the wait began. Each wakes the
wait: the daemon's event stream (a thread reads it) says when to read the status again, and
on a terminal the progress line is redrawn each second with its phase and elapsed time. In a
pipe or a file there is one line per change (a phase, a crash, a state), no redrawing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from typing import Any, TextIO

from gpud import states
from gpud.cli import _api
from gpud.cli_fmt import colour_wanted, paint, seconds, state_text

STABLE = tuple(s.value for s in states.STABLE)


def _follow_events(args: argparse.Namespace, woke: threading.Event,
                   stop: threading.Event) -> None:
    """Set WOKE at every event the daemon publishes (the thread ends with the process)."""
    from gpud.cli_extra import _stream

    since = 0
    while not stop.is_set():
        try:
            with _stream(args, since, timeout=30.0) as resp:
                for raw in resp:
                    if stop.is_set():
                        return
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("data: "):
                        with contextlib.suppress(ValueError):
                            since = max(since, int(json.loads(line[6:]).get("seq", 0)))
                        woke.set()
        except OSError:
            stop.wait(1.0)  # no stream (an old daemon, a proxy in between): the 1 s tick


def _matched(models: dict[str, Any], names: set[str] | None, began: float
             ) -> tuple[list[str], list[str]]:
    """(instances not yet where gpud wants them, instances that failed during the wait)."""
    pending, failed = [], []
    waited = time.monotonic() - began
    for key, m in models.items():
        if names and m.get("model", key) not in names:
            continue
        if m["state"] == "failed" and m["desired"] != "unloaded":
            # failed before this wait began (and not retried since): nothing to wait for
            if (m.get("state_seconds") or 0.0) <= waited + 1.0 or not names:
                failed.append(key)
        elif m["state"] != m["desired"] or m["state"] not in STABLE:
            pending.append(key)
    return pending, failed


def _line(key: str, m: dict[str, Any]) -> str:
    text = f"{key}: {state_text(m)}"
    if m["state"] != m["desired"] and m["state"] in STABLE:
        text += f" -> {m['desired']}"
    reason = m.get("reason") or ""
    if m["state"] in (states.State.UNLOADED, states.State.FAILED) and m.get("last_error"):
        text += f" · {reason or m['last_error']}"
    return text


def wait_for_box(args: argparse.Namespace, names: set[str] | None = None,
                 timeout: float | None = None, out: TextIO | None = None) -> int:
    """0 when the box matches, 1 when a model failed (which, and why), 3 after TIMEOUT."""
    out = out or sys.stdout
    tty = colour_wanted(out) or out.isatty()
    colour = colour_wanted(out)
    began = time.monotonic()
    woke, stop = threading.Event(), threading.Event()
    threading.Thread(target=_follow_events, args=(args, woke, stop), daemon=True,
                     name="gpud-wait-events").start()
    shown: dict[str, str] = {}
    try:
        while True:
            woke.clear()
            data = _api("GET", "/api/v1/status", args)
            models = data.get("models", {})
            pending, failed = _matched(models, names, began)
            took = seconds(time.monotonic() - began)
            if failed:
                _end_line(out, tty)
                for key in failed:
                    m = models[key]
                    print(paint(f"{key}: failed", "failed", colour)
                          + f": {m.get('reason') or m.get('last_error') or ''}", file=out)
                return 1
            if not pending:
                _end_line(out, tty)
                asked = [k for k, m in models.items() if not names or m.get("model") in names]
                done = ", ".join(f"{k} {models[k]['state']}" for k in asked) or "no models"
                print(f"the box matches after {took}: {done}", file=out)
                return 0
            if tty:
                line = " | ".join(_line(k, models[k]) for k in pending)
                out.write("\r\x1b[K" + paint(line, "starting", colour))
                out.flush()
            else:
                for key in pending:
                    text = _line(key, models[key])
                    bare = state_text({**models[key], "phase_seconds": None,
                                       "state_seconds": None})
                    if shown.get(key) != bare:
                        shown[key] = bare
                        print(f"{took:>6}  {text}", file=out, flush=True)
            if timeout is not None and time.monotonic() - began > timeout:
                _end_line(out, tty)
                print(f"gpud: still waiting after {seconds(timeout)}: "
                      + ", ".join(_line(k, models[k]) for k in pending), file=sys.stderr)
                return 3
            woke.wait(1.0)
    finally:
        stop.set()


def _end_line(out: TextIO, tty: bool) -> None:
    if tty:
        out.write("\r\x1b[K")
        out.flush()
