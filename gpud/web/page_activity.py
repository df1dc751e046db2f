"""The page's Activity and Playground tabs (server-rendered; `static/activity.js` keeps them).

Activity: the newest requests of the activity log, for admins only (rows name API keys).
Playground: pick a model, send a prompt to gpud's own `/v1/chat/completions` from the browser
and watch it stream, with TTFT and tokens/s measured in the browser. Every value is escaped.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from gpud.web.control import Control

ROWS_SHOWN = 50


def _esc(value: object) -> str:
    import html

    return html.escape("" if value is None else str(value), quote=True)


def _secs(value: Any) -> str:
    return "–" if value is None else f"{float(value) * 1000:.0f} ms"


def activity_cells(r: dict[str, Any], tz: tzinfo | None) -> list[str]:
    """One row's cells as text (static/activity.js's cells() says the same)."""
    model = (r.get("model") or "–") + (f" ({r['asked']})" if r.get("asked") else "")
    tin, tout = r.get("tokens_in"), r.get("tokens_out")
    tokens = "–" if tin is None and tout is None else f"{tin or 0} → {tout or 0}"
    return [datetime.fromtimestamp(float(r["at"]), tz).strftime("%H:%M:%S"), model,
            r.get("key") or "–",
            str(r.get("endpoint", "")) + (" · stream" if r.get("stream") else ""),
            str(r.get("status")), _secs(r.get("ttft")), _secs(r.get("duration")), tokens]


HEAD = ("Time", "Model", "Key", "Endpoint", "Status", "TTFT", "Duration", "Tokens")


async def render_activity(control: Control, admin: bool, tz: tzinfo | None) -> str:
    if not admin:
        return ('<p class="empty">The activity log names API keys: it is shown to admins '
                "(loopback, or the admin token).</p>")
    data = await control.activity(model=None, key=None, limit=ROWS_SHOWN)
    rows = data.get("rows", [])
    body = "".join(
        f'<tr data-id="{_esc(r["id"])}" class="{"bad" if int(r["status"]) >= 400 else ""}">'
        + "".join(f'<td data-label="{h}">{_esc(c)}</td>'
                  for h, c in zip(HEAD, activity_cells(r, tz), strict=True)) + "</tr>"
        for r in rows)
    empty = "" if rows else '<p class="empty" id="activity-empty">No requests yet.</p>'
    head = "".join(f"<th>{h}</th>" for h in HEAD)
    return (f'<p class="sub">The newest requests through the proxy (the last {ROWS_SHOWN}; '
            f'<code>gpud activity</code> shows more). Kept: {_esc(data.get("cap"))} rows.</p>'
            f'<table class="activity"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>{empty}")


def render_playground(status: dict[str, Any], key: str | None) -> str:
    """`key`: the proxy's key for the admin's playground (None: inference is open, or not
    an admin, whose prompt then gets the proxy's 401)."""
    names = sorted({str(m.get("model", k)) for k, m in status.get("models", {}).items()})
    if not names:
        return '<p class="empty">No models to talk to.</p>'
    attr = f' data-key="{_esc(key)}"' if key else ""
    options = "".join(f'<option value="{_esc(n)}">{_esc(n)}</option>' for n in names)
    return (
        f'<form id="play" class="play"{attr}>'
        f'<label>Model <select id="play-model" name="model">{options}</select></label>'
        '<label>Max tokens <input id="play-max" type="number" min="1" max="4096" value="64">'
        "</label>"
        '<textarea id="play-prompt" name="prompt" rows="3" placeholder="Say something…" '
        'required></textarea>'
        '<div class="play-actions"><button type="submit" id="play-send" class="btn">Send'
        '</button> <button type="button" id="play-stop" class="btn" disabled>Stop</button>'
        "</div></form>"
        '<p class="play-stats"><span>TTFT <strong id="play-ttft">–</strong></span> '
        '<span>tokens/s <strong id="play-rate">–</strong></span> '
        '<span>tokens <strong id="play-tokens">–</strong></span> '
        '<span id="play-state" class="sub"></span></p>'
        '<pre id="play-out" aria-live="polite"></pre>'
        '<noscript><p class="sub">The playground needs JavaScript.</p></noscript>')
