"""How the CLI writes for people: durations, a model's state with its phase, its flags, and
colour only where a person looks at a terminal (never in a pipe, a file, or with NO_COLOR).

Pure formatting of the API's JSON; `gpud.cli` and its verb modules print what this returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TextIO

from gpud.states import STABLE, State

# ANSI SGR colours by state (green awake, blue asleep, red failed, yellow on its way)
_COLOURS = {State.AWAKE.value: "32", State.ASLEEP.value: "34", State.FAILED.value: "31",
            State.UNLOADED.value: "2"}
_STABLE = frozenset(s.value for s in STABLE)
_MOVING = "33"


def colour_wanted(stream: TextIO) -> bool:
    """Colour for STREAM: a terminal, NO_COLOR unset or empty (no-color.org), TERM not dumb."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, state: str, on: bool) -> str:
    if not on or not text:
        return text
    code = _COLOURS.get(state, _MOVING)
    return f"\x1b[{code}m{text}\x1b[0m"


def seconds(value: float | None) -> str:
    """12s, 3m05s, 1h02m: an elapsed time to the second."""
    if value is None:
        return "-"
    s = int(max(0.0, value) + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def state_text(m: dict[str, Any]) -> str:
    """`awake`, `waking 3s`, `starting: loading weights 12s (41s in all)`."""
    state = str(m.get("state", "?"))
    if m.get("phase"):
        text = f"{state}: {m['phase']} {seconds(m.get('phase_seconds'))}"
        total = m.get("state_seconds")
        if total is not None and m.get("phases"):
            text += f" ({seconds(total)} in all)"
        return text
    if state in _STABLE:
        return state
    return f"{state} {seconds(m.get('state_seconds'))}"


def phases_text(m: dict[str, Any]) -> str:
    """A load's phases so far: `starting process 4s · loading weights 2s · now compiling
    and profiling 3s`."""
    done = [f"{p['phase']} {seconds(p['seconds'])}" for p in m.get("phases") or []]
    return " · ".join([*done, f"now {m['phase']} {seconds(m.get('phase_seconds'))}"])


def flags_text(m: dict[str, Any]) -> str:
    """What else explains the model's behaviour: priority, pinned, on-demand, idle timer."""
    out = []
    if m.get("priority"):
        out.append(f"prio {m['priority']}")
    if m.get("pinned"):
        out.append("pinned")
    if m.get("load_on_demand"):
        out.append("on-demand")
    after = m.get("idle_sleep_after")
    if after is not None:
        sleep_in = m.get("idle_sleep_in")
        out.append(f"idle-sleep {seconds(after)}"
                   + (f" (in {seconds(sleep_in)})" if sleep_in is not None else ""))
    if m.get("rules"):
        out.append(f"{len(m['rules'])} rule{'s' if len(m['rules']) > 1 else ''}")
    if m.get("routing") == "prefix":
        out.append("prefix-routing")
    return ", ".join(out) or "-"


def table(rows: Sequence[Sequence[str]], last_free: bool = True) -> list[str]:
    """Columns padded to their widest cell; the last column is left as it is."""
    if not rows:
        return []
    n = len(rows[0])
    fixed = n - 1 if last_free else n
    widths = [max(len(_plain(r[i])) for r in rows) for i in range(fixed)]
    lines = []
    for r in rows:
        cells = [c + " " * (w - len(_plain(c))) for c, w in zip(r[:fixed], widths, strict=False)]
        if last_free:
            cells.append(r[-1])
        lines.append("  ".join(cells).rstrip())
    return lines


def _plain(text: str) -> str:
    """TEXT without its colour codes (their width is zero on a terminal)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            i = end + 1 if end != -1 else len(text)
            continue
        out.append(text[i])
        i += 1
    return "".join(out)
