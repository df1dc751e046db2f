"""The status page at `/`: what the box is doing, why, and what happens next on the schedule.

Server-rendered HTML that is complete without JavaScript; `static/page.js` then keeps it live
from the SSE stream (`/api/v1/events`) and `/api/v1/status`, and follows a model's log.
Everything shown is read from the daemon's snapshots (never from an engine), and every value
that came from a file, a request or an engine is escaped: a model's reason may hold user text.
Admin buttons are forms that POST to the JSON API; they are shown to admins only and the API
checks again.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import socket
from collections.abc import Iterable
from datetime import datetime, time, timedelta, tzinfo
from pathlib import Path
from string import Template
from typing import Any

from aiohttp import web

from gpud import __version__
from gpud.memory import model_bytes
from gpud.schedule import Schedule
from gpud.states import TRANSITIONAL, State, ordered
from gpud.web.control import Control
from gpud.web.page_activity import render_activity, render_playground

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"

# Colours for models (memory bars, table dots) and profiles (timeline), in this order.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#e15759",
           "#9c755f", "#ff9da7", "#86bcb6")
# Which buttons make sense in which state (the API accepts every verb in every state).
ACTIONS: dict[str, tuple[str, ...]] = {
    State.AWAKE: ("sleep", "unload"),
    State.ASLEEP: ("wake", "unload"),
    State.UNLOADED: ("load",),
    State.FAILED: ("load", "unload"),
}
# page.js takes both from the page (data- attributes), so the enum is their one source.
STATE_ATTRS = {
    "transitional": " ".join(ordered(TRANSITIONAL)),
    "actions": json.dumps({str(k): list(v) for k, v in ACTIONS.items()}),
}
LOG_LINES = 200
EVENTS_SHOWN = 30


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --- small formatting helpers (static/page.js has the same ones) ------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def model_colours(names: Iterable[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(set(names)))}


def describe_event(e: dict[str, Any]) -> str:
    """One line for an event (static/page.js's describeEvent says the same)."""
    kind = e.get("kind")
    dur = e.get("duration")
    took = f" in {dur}s" if isinstance(dur, int | float) else ""
    if kind == "action":
        text = f"{e.get('action')} {'done' if e.get('ok') else 'failed'}{took}"
        if e.get("reason"):
            text += f" · {e['reason']}"
        if not e.get("ok") and e.get("error"):
            text += f" · {e['error']}"
        return text
    if kind in ("woke", "slept"):
        return f"level {e.get('level')}{took}"
    if kind == "loaded":
        return f"healthy after {dur}s"
    if kind == "config":
        if e.get("valid"):
            return (f"reloaded ({e.get('source')}): revision {e.get('previous')} → "
                    f"{e.get('revision')}")
        return f"reload refused ({e.get('source')}): {e.get('error')}"
    if kind == "profile":
        return f"profile {e.get('profile') or '(schedule)'} · {e.get('reason', '')}"
    if kind == "phase":
        return (f"{e.get('previous')} took {e.get('seconds')}s, now {e.get('phase')} "
                f"({e.get('elapsed')}s in all)")
    if kind == "crashed":
        return f"pid {e.get('pid')}: {e.get('cause')} {e.get('detail') or ''}".strip()
    parts = [str(e[k]) for k in ("state", "reason", "error") if e.get(k)]
    return " · ".join(parts)


# --- the schedule's day ---------------------------------------------------------------


def day_segments(schedule: Schedule | None, now: datetime) -> tuple[datetime, datetime,
                                                                    list[tuple[datetime, datetime,
                                                                               str | None]]]:
    """Today (local midnight to midnight, in the schedule's zone) cut where the profile
    changes: [(start, end, profile)]. Without a schedule: one segment with no profile."""
    tz = schedule.tz if schedule is not None else now.tzinfo
    local = now.astimezone(tz)
    start = datetime.combine(local.date(), time(), tzinfo=tz)
    end = datetime.combine(local.date() + timedelta(days=1), time(), tzinfo=tz)
    if schedule is None:
        return start, end, [(start, end, None)]
    segments: list[tuple[datetime, datetime, str | None]] = []
    t, profile = start, schedule.active_profile(start)
    while t < end and len(segments) < 1000:
        boundary = schedule.next_boundary(t)
        stop = min(boundary.at, end) if boundary is not None else end
        segments.append((t, stop, profile))
        t = stop
        if boundary is not None:
            profile = boundary.profile
    return start, end, segments


# --- sections ---------------------------------------------------------------------------


def _state_pill(state: str) -> str:
    moving = " moving" if state in TRANSITIONAL else ""
    return f'<span class="state state-{esc(state)}{moving}">{esc(state)}</span>'


def render_models(status: dict[str, Any], admin: bool) -> str:
    models: dict[str, dict[str, Any]] = status.get("models", {})
    if not models:
        return ('<p class="empty">No models are configured. Describe one under '
                '<code>[models.NAME]</code> in the config file; <code>gpud check</code> '
                'validates it.</p>')
    colours = model_colours(m["model"] for m in models.values())
    memory = model_bytes(status.get("memory") or {})
    kv = kv_pages_by_model(status)
    rows = []
    for key, m in models.items():
        rows.append(_model_row(key, m, colours[m["model"]], memory.get(key), admin,
                               kv.get(key) if m.get("replica") in (0, None) else None))
    head = ("<thead><tr><th>Model</th><th>State</th><th>Why</th><th>Up</th>"
            "<th>In flight</th><th>Memory</th>" + ("<th>Actions</th>" if admin else "")
            + "</tr></thead>")
    return f'<table class="models">{head}<tbody>{"".join(rows)}</tbody></table>'


def kv_pages_by_model(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(pages, bytes) lent by gpud's KV pool to each model, over all GPUs."""
    out: dict[str, tuple[int, int]] = {}
    for g in ((status.get("kvpool") or {}).get("gpus") or {}).values():
        size = int(g.get("page_size") or 0)
        for model, pages in (g.get("granted") or {}).items():
            n, b = out.get(model, (0, 0))
            out[model] = (n + int(pages), b + int(pages) * size)
    return out


def _model_row(key: str, m: dict[str, Any], colour: str, mem: int | None, admin: bool,
               kv: tuple[int, int] | None = None) -> str:
    state = str(m.get("state", "unloaded"))
    desired = m.get("desired")
    goal = (f' <span class="goal" title="desired state">→ {esc(desired)}</span>'
            if desired and desired != state else "")
    where = "cpu" if m.get("gpu") is None else f"gpu {m['gpu']}"
    layer = f' <span class="layer">{esc(m["layer"])}</span>' if m.get("layer") else ""
    error = (f'<div class="error">{esc(m["last_error"])}</div>'
             if m.get("last_error") and m.get("last_error") not in (m.get("reason") or "")
             else "")
    up = human_duration(m.get("uptime_seconds")) if m.get("uptime_seconds") is not None else "–"
    flight = f"{m.get('inflight', 0)} / {m.get('queued', 0)}"
    sub = [where]
    if m.get("port"):
        sub.append(f"port {m['port']}")
    if m.get("restarts"):
        sub.append(f"{m['restarts']} restarts")
    cells = [
        _cell("Model", "name",
              f'<span class="dot" style="background:{colour}"></span><strong>{esc(key)}</strong>'
              f'<div class="sub">{esc(" · ".join(sub))}</div>'),
        _cell("State", "st", f"{_state_pill(state)}{goal}{_progress(m)}"),
        _cell("Why", "reason", f"{esc(m.get('reason'))}{layer}{error}"),
        _cell("Up", "up", esc(up), f"state since {m.get('state_since') or ''}"),
        _cell("In flight", "flight", esc(flight), "in flight / queued"),
        _cell("Memory", "mem", esc(human_bytes(mem) if mem else "–") + (
            f'<div class="sub kv">KV pool: {kv[0]} pages ({esc(human_bytes(kv[1]))})</div>'
            if kv is not None else "")),
    ]
    if admin:
        cells.append(_cell("Actions", "actions", _buttons(m, state)))
    return (f'<tr data-key="{esc(key)}" data-model="{esc(m.get("model", key))}" '
            f'class="row-{esc(state)}">{"".join(cells)}</tr>')


def elapsed(seconds: float | None) -> str:
    """12s, 3m05s: a load phase's time to the second (gpud status writes the same)."""
    s = int(max(0.0, seconds or 0.0) + 0.5)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"


def _progress(m: dict[str, Any]) -> str:
    """Under a starting model's state: the load's phase and its time, the phases before
    with theirs, the engine's last log line; under another moving state, its time so far."""
    if m.get("phase"):
        done = "".join(f'<li>{esc(p["phase"])} <span class="t">{elapsed(p["seconds"])}</span>'
                       "</li>" for p in m.get("phases") or [])
        line = (f'<div class="sub logline">{esc(m["log_line"])}</div>'
                if m.get("log_line") else "")
        return (f'<ol class="phases">{done}<li class="current">{esc(m["phase"])} <span class="t">'
                f'{elapsed(m.get("phase_seconds"))}</span></li></ol>{line}')
    if m.get("state") in TRANSITIONAL and m.get("state_seconds") is not None:
        return f' <span class="sub t">{elapsed(m["state_seconds"])}</span>'
    return ""


def _cell(label: str, cls: str, inner: str, title: str | None = None) -> str:
    """A table cell; its content sits in one <div> so that the phone layout (a label and a
    value per line) keeps pills, notes and buttons together."""
    t = f' title="{esc(title)}"' if title else ""
    return f'<td data-label="{esc(label)}" class="{cls}"{t}><div class="v">{inner}</div></td>'


def _buttons(m: dict[str, Any], state: str) -> str:
    if m.get("replica"):
        return '<span class="sub">see replica 0</span>'
    model = str(m.get("model", ""))
    verbs = ACTIONS.get(state, ("unload",))
    return "".join(
        f'<form method="post" class="act" action="/api/v1/models/{esc(model)}/{verb}">'
        f'<button type="submit" class="btn btn-{verb}" data-verb="{verb}" '
        f'data-model="{esc(model)}">{verb}</button></form>'
        for verb in verbs
    )


def render_memory(status: dict[str, Any]) -> str:
    memory = status.get("memory") or {}
    models = status.get("models", {})
    colours = model_colours(m["model"] for m in models.values())
    key_colour = {k: colours[m["model"]] for k, m in models.items()}
    parts = []
    for gpu in memory.get("gpus", []):
        total = max(1, int(gpu["total"]))
        segs, legend = [], []
        for key, used in sorted(gpu.get("models", {}).items()):
            colour = key_colour.get(key, "#888")
            segs.append(_seg(used, total, colour, f"{key}: {human_bytes(used)}"))
            legend.append(_legend(colour, key, used))
        segs.append(_seg(gpu["other"], total, "var(--other)",
                         f"other processes: {human_bytes(gpu['other'])}"))
        legend.append(_legend("var(--other)", "other", gpu["other"]))
        legend.append(_legend("var(--free)", "free", gpu["free"]))
        parts.append(
            f'<div class="gpu"><div class="gpu-head"><strong>GPU {esc(gpu["index"])}</strong> '
            f'<span class="sub">{esc(gpu.get("name"))} · {esc(human_bytes(gpu["used"]))} of '
            f'{esc(human_bytes(gpu["total"]))} used</span></div>'
            f'<div class="bar">{"".join(segs)}</div><ul class="legend">{"".join(legend)}</ul>'
            "</div>")
    if not memory.get("gpus"):
        host = memory.get("host") or {}
        total = max(1, int(host.get("total") or 1))
        engines = host.get("engines") or {}
        segs, legend = [], []
        for key, e in sorted(engines.items()):
            colour = key_colour.get(key, "#888")
            segs.append(_seg(e["rss"], total, colour, f"{key}: {human_bytes(e['rss'])} RSS"))
            legend.append(_legend(colour, key, e["rss"]))
        used_by_others = max(0, total - int(host.get("available") or 0)
                             - sum(int(e["rss"]) for e in engines.values()))
        segs.append(_seg(used_by_others, total, "var(--other)", "everything else"))
        legend.append(_legend("var(--other)", "other", used_by_others))
        legend.append(_legend("var(--free)", "available", host.get("available")))
        note = esc(memory.get("note") or "no GPU")
        parts.append(
            f'<p class="nogpu"><strong>{note}</strong>: GPU memory cannot be shown on this '
            'machine. Host memory (resident set of each engine\'s processes):</p>'
            f'<div class="gpu"><div class="gpu-head"><strong>Host</strong> <span class="sub">'
            f'{esc(human_bytes(host.get("total")))} total</span></div>'
            f'<div class="bar">{"".join(segs)}</div><ul class="legend">{"".join(legend)}</ul>'
            "</div>")
    return "".join(parts)


def _seg(value: Any, total: int, colour: str, title: str) -> str:
    pct = max(0.0, min(100.0, 100.0 * float(value or 0) / total))
    if pct <= 0:
        return ""
    return (f'<span class="seg" style="width:{pct:.2f}%;background:{colour}" '
            f'title="{esc(title)}"></span>')


def _legend(colour: str, label: str, value: Any) -> str:
    return (f'<li><span class="dot" style="background:{colour}"></span>{esc(label)} '
            f'<span class="sub">{esc(human_bytes(value))}</span></li>')


def _ticks() -> str:
    return "".join(f'<span class="tick" style="left:{h / 24 * 100:.3f}%">{h:02d}</span>'
                   for h in range(0, 25, 3))


def render_schedule(control: Control, status: dict[str, Any]) -> str:
    now = control.now()
    start, end, segments = day_segments(control.schedule, now)
    profiles = list(control.config.profiles)
    colour = {p: PALETTE[(i + 3) % len(PALETTE)] for i, p in enumerate(profiles)}
    span = (end - start).total_seconds()

    def pos(t: datetime) -> float:
        return max(0.0, min(100.0, 100.0 * (t - start).total_seconds() / span))

    sched = status.get("schedule") or {}
    active = status.get("profile")
    forced = sched.get("forced")
    nb = sched.get("next_boundary")
    lines = [f'<p class="active">Active profile: <span class="profile" style="background:'
             f'{colour.get(active, "var(--other)") if active else "var(--other)"}">'
             f'{esc(active or "none")}</span> <span class="sub">'
             f'{esc(sched.get("source") or "")}</span></p>']
    if forced:
        until = forced.get("until")
        until_text = f" until {esc(until[11:16])}" if until else ""
        lines.append(f'<p class="forced">Forced by an operator{until_text}'
                     f' · {esc(forced.get("reason"))}. <code>gpud profile --auto</code> '
                     'returns to the schedule.</p>')
    if nb:
        at = datetime.fromisoformat(nb["at"])
        lines.append(f'<p class="next">Next switch: <strong>{esc(nb["profile"] or "none")}'
                     f'</strong> at <time datetime="{esc(nb["at"])}">{esc(at.strftime("%a %H:%M"))}'
                     f'</time> <span class="sub" data-countdown="{esc(nb["at"])}">in '
                     f'{esc(human_duration((at - now).total_seconds()))}</span></p>')
    elif control.schedule is None:
        lines.append('<p class="next sub">No [[schedule]] in the config: models follow their '
                     "defaults (and any forced profile).</p>")
    elif not forced:
        lines.append('<p class="next sub">No switch ahead: the schedule keeps this profile.</p>')
    segs = []
    for s0, s1, prof in segments:
        left, width = pos(s0), pos(s1) - pos(s0)
        label = prof or "defaults"
        bg = colour.get(prof, "var(--other)") if prof else "var(--other)"
        segs.append(
            f'<div class="tseg" style="left:{left:.3f}%;width:{width:.3f}%;background:{bg}" '
            f'title="{esc(label)} {s0:%H:%M}–{"24:00" if s1 == end else s1.strftime("%H:%M")}">'
            f'<span>{esc(label) if width > 8 else ""}</span></div>')
    ticks = _ticks()
    next_mark = ""
    if nb:
        at = datetime.fromisoformat(nb["at"])
        if start <= at < end:
            next_mark = (f'<div class="next-mark" style="left:{pos(at):.3f}%" '
                         f'title="next switch">▼</div>')
    timeline = (
        f'<div class="timeline" data-start="{start.isoformat()}" data-end="{end.isoformat()}" '
        f'aria-label="today\'s schedule">{"".join(segs)}{next_mark}'
        f'<div class="now" style="left:{pos(now):.3f}%"><span>now {now:%H:%M}</span></div>'
        f'</div><div class="ticks">{ticks}</div>')
    tzname = now.strftime("%Z") or str(now.tzinfo)
    return ("".join(lines) + timeline
            + f'<p class="sub tz">Today, {esc(now.strftime("%a %d %b"))} ({esc(tzname)}).</p>')


def render_events(events: list[dict[str, Any]], tz: tzinfo | None) -> str:
    if not events:
        return '<ol class="events"><li class="empty">No events yet.</li></ol>'
    items = []
    for e in reversed(events):
        t = datetime.fromtimestamp(float(e.get("time", 0)), tz).strftime("%H:%M:%S")
        bad = e.get("kind") in ("failed", "crashed") or e.get("ok") is False \
            or e.get("valid") is False
        items.append(
            f'<li class="ev{" bad" if bad else ""}" data-seq="{esc(e.get("seq"))}">'
            f'<time>{t}</time><span class="kind">{esc(e.get("kind"))}</span>'
            f'<span class="who">{esc(e.get("model") or "")}</span>'
            f'<span class="what">{esc(describe_event(e))}</span></li>')
    return f'<ol class="events">{"".join(items)}</ol>'


def render_logs(control: Control, status: dict[str, Any], selected: str | None) -> str:
    keys = list(status.get("models", {}))
    if not keys:
        return '<p class="empty">No models, no logs.</p>'
    tabs = "".join(
        f'<a href="/?log={esc(k)}#logs" data-log="{esc(k)}" '
        f'class="tab{" on" if k == selected else ""}">{esc(k)}</a>' for k in keys)
    body = "Pick a model to see the tail of its engine's log."
    if selected is not None and selected in keys:
        lines = control.log_tail(selected, LOG_LINES)
        body = "\n".join(lines) or "(the log is empty)"
    return (f'<nav class="tabs">{tabs}<label class="follow"><input type="checkbox" '
            f'id="follow" checked> follow</label></nav>'
            f'<pre id="log" data-model="{esc(selected or "")}">{esc(body)}</pre>')


# --- the handler ----------------------------------------------------------------------


def _asset_version() -> str:
    h = hashlib.sha256(__version__.encode())
    for p in sorted(STATIC.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:10]


class Page:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.template = Template((TEMPLATES / "page.html").read_text())
        self.version = _asset_version()
        self.host = socket.gethostname()

    async def handle(self, request: web.Request) -> web.Response:
        from gpud.web.api import _is_admin

        d = self.control
        status = await _status(d)
        admin = _is_admin(request)
        cfg = status["config"]
        what = ("The file is invalid" if cfg.get("fallback") else
                "The last reload was refused")
        problem = "" if cfg["valid"] else (
            f'<section class="banner"><strong>{what}</strong>; gpud runs the last good '
            f'revision {esc(cfg["revision"])}.<pre>{esc(cfg["error"])}</pre></section>')
        events = d.events.history(EVENTS_SHOWN)
        selected = request.query.get("log")
        body = self.template.substitute(
            title=esc(f"gpud · {self.host}"),
            host=esc(self.host),
            version=esc(__version__),
            asset=self.version,
            admin="1" if admin else "0",
            transitional=esc(STATE_ATTRS["transitional"]),
            actions=esc(STATE_ATTRS["actions"]),
            seq=esc(events[-1]["seq"] if events else 0),
            revision=esc(cfg["revision"]),
            config_state="valid" if cfg["valid"] else "invalid",
            config_path=esc(cfg["path"]),
            profile=esc(status.get("profile") or "none"),
            problem=problem,
            memory=render_memory(status),
            models=render_models(status, admin),
            schedule=render_schedule(d, status),
            events=render_events(events, d.now().tzinfo),
            tz=esc(_zone_name(d)),
            logs=render_logs(d, status, selected),
            activity=await render_activity(d, admin, d.now().tzinfo),
            playground=render_playground(status, d.playground_key() if admin else None),
        )
        return web.Response(text=body, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache",
                                     "Content-Security-Policy": CSP,
                                     "X-Content-Type-Options": "nosniff",
                                     "Referrer-Policy": "same-origin"})


# Inline styles are used for computed widths and colours only; no inline script.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'")


def _zone_name(d: Control) -> str:
    """The IANA name of the schedule's zone, for the browser to show the same wall clock."""
    tz = d.now().tzinfo
    return str(getattr(tz, "key", "") or "UTC")


async def _status(d: Control) -> dict[str, Any]:
    status = d.status()
    if "memory" not in status:
        from gpud.memory import measure

        status["memory"] = await asyncio.to_thread(measure, d.engines())
    return status


def install(app: web.Application, control: Control) -> None:
    """Add `GET /` and the page's assets under `/static/`."""
    page = Page(control)
    app.router.add_get("/", page.handle)
    app.router.add_static("/static/", STATIC, append_version=False)
