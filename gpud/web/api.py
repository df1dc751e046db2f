"""The JSON API under /api/v1 and /healthz.

Reads are snapshots of gpud's published state; writes are messages to its loop (overrides, reloads),
never direct changes to engines. Writes need the admin credential: a loopback peer, or the
admin token. Bad input gets a 4xx in OpenAI's error shape, never a 500: 400 for a body that
is not a JSON object, 422 for a field whose value is refused (a duration, a level, a GPU).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from datetime import datetime
from typing import Any

from aiohttp import web

from gpud.config.units import parse_duration
from gpud.web.control import Control, TestHooks

CONTROL_KEY: web.AppKey[Control] = web.AppKey("control")
HOOKS_KEY: web.AppKey[TestHooks] = web.AppKey("test_hooks")
ACTIVITY_MAX = 10_000  # rows one read may return (gpud.activity.MAX_LIMIT)
VERBS = {"sleep": "asleep", "wake": "awake", "load": "awake", "unload": "unloaded"}


def error(status: int, message: str, code: str = "bad_request") -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error",
                      "code": f"gpud_{code}"}}
    return web.json_response(body, status=status)


def _control(request: web.Request) -> Control:
    return request.app[CONTROL_KEY]


def _is_admin(request: web.Request) -> bool:
    token = _control(request).admin_token
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].encode(), token.encode())
    peer = request.remote or ""
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return peer == ""  # a Unix socket peer


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": "the body is not valid JSON",
                                       "code": "gpud_bad_json", "type": "invalid_request_error"}}),
            content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"message": "the body must be a JSON object",
                                       "code": "gpud_bad_json", "type": "invalid_request_error"}}),
            content_type="application/json")
    return body


def _until(body: dict[str, Any], control: Control) -> datetime | web.Response | None:
    raw = body.get("for")
    if raw in (None, ""):
        return None
    try:
        return control.now() + parse_duration(raw)
    except ValueError as exc:
        return error(422, f"'for': {exc}", "bad_value")


def _cross_site(request: web.Request) -> bool:
    """A browser write from another site (a page that POSTs a form to 127.0.0.1): refused.

    Loopback is trusted for writes, so any web page the operator visits could otherwise drive
    the API through their browser. Browsers send Origin on such writes; gpud's own page and
    the CLI either send the same origin or none.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    host = request.headers.get("Host", "")
    return origin not in (f"http://{host}", f"https://{host}")


@web.middleware
async def admin_writes(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.method != "GET" and request.path.startswith("/api/"):
        if _cross_site(request):
            return error(403, "cross-site write refused: the Origin does not match this host",
                         "forbidden")
        if not _is_admin(request):
            return error(403, "writes need the admin token (Authorization: Bearer ...) or "
                         "loopback", "forbidden")
    return await handler(request)  # type: ignore[no-any-return]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def status(request: web.Request) -> web.Response:
    return web.json_response(_control(request).status())


async def models(request: web.Request) -> web.Response:
    return web.json_response(_control(request).status()["models"])


async def model(request: web.Request) -> web.Response:
    d = _control(request)
    name = request.match_info["name"]
    data = d.status()["models"].get(name)
    if data is None:
        return error(404, f"no model {name!r}; known: {', '.join(d.status()['models'])}",
                     "model_not_found")
    m = d.config.models.get(data["model"])
    data = {**data, "spec": m.model_dump(mode="json") if m else None}
    return web.json_response(data)


async def model_logs(request: web.Request) -> web.Response:
    d = _control(request)
    name = request.match_info["name"]
    try:
        lines = int(request.query.get("lines", "200"))
    except ValueError:
        return error(400, "lines must be an integer")
    if not 0 < lines <= 2000:
        return error(400, "lines must be between 1 and 2000")
    if not d.has_instance(name):
        return error(404, f"no model {name!r}", "model_not_found")
    tail = d.log_tail(name, lines)
    return web.json_response({"model": name, "lines": tail})


async def activity(request: web.Request) -> web.Response:
    """The newest rows of the activity log, newest first; `?model=`, `?key=`, `?limit=`.
    Admins only: rows name API keys (never their secrets)."""
    if not _is_admin(request):
        return error(403, "the activity log names API keys: read it from loopback or with the "
                     "admin token", "forbidden")
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        return error(400, f"limit must be an integer, not {q.get('limit')!r}")
    if not 0 < limit <= ACTIVITY_MAX:
        return error(400, f"limit must be between 1 and {ACTIVITY_MAX}, not {limit}")
    data = await _control(request).activity(model=q.get("model"), key=q.get("key"),
                                            limit=limit)
    return web.json_response(data)


async def model_action(request: web.Request) -> web.Response:
    d = _control(request)
    name, verb = request.match_info["name"], request.match_info["verb"]
    if verb not in VERBS and verb != "move":
        return error(404, f"unknown action {verb!r}; use sleep, wake, load, unload or move")
    if name not in d.config.models:
        known = ", ".join(d.config.models) or "none"
        return error(404, f"no model {name!r}; known: {known}", "model_not_found")
    body = await _json_body(request)
    until = _until(body, d)
    if isinstance(until, web.Response):
        return until
    if verb == "move":
        gpu = body.get("gpu")
        refused = _unknown_gpu(gpu, sorted(d.gpus))
        if refused is not None:
            return error(422, refused, "bad_value")
        d.set_override(name, None, until, f"moved to GPU {gpu} by an operator",
                                  gpu=gpu)
        return web.json_response({"ok": True, "message": f"{name}: moving to GPU {gpu}"})
    level = body.get("level")
    if level is not None and (isinstance(level, bool) or level not in (1, 2)):
        return error(422, f"'level' must be 1 or 2 (got {json.dumps(level)[:40]})",
                     "bad_value")
    reason = f"{verb} by an operator"
    d.set_override(name, VERBS[verb], until, reason,
                              level=level if verb == "sleep" else None)
    msg = f"{name}: {verb} requested" + (f" until {until.isoformat(timespec='minutes')}"
                                         if until else "")
    return web.json_response({"ok": True, "message": msg})


def _unknown_gpu(gpu: object, known: list[int]) -> str | None:
    """Why `gpu` is no place to move to (None: it is one of the GPUs gpud sees)."""
    if not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 0:
        return f"'gpu' must be a GPU index, an integer >= 0 (got {json.dumps(gpu)[:40]})"
    if gpu not in known:
        if not known:
            return f"GPU {gpu} is not a GPU gpud sees: NVML reports none on this host"
        return f"GPU {gpu} does not exist on this host; its GPUs: {', '.join(map(str, known))}"
    return None


async def override_delete(request: web.Request) -> web.Response:
    """Drop a model's manual override: back to the file, the profile and the policies."""
    d = _control(request)
    name = request.match_info["name"]
    if name not in d.config.models:
        return error(404, f"no model {name!r}", "model_not_found")
    d.clear_override(name)
    return web.json_response({"ok": True, "message": f"{name}: back to the file and schedule"})


async def profile_get(request: web.Request) -> web.Response:
    return web.json_response(_control(request).profile_status())


async def profile_put(request: web.Request) -> web.Response:
    d = _control(request)
    body = await _json_body(request)
    name = body.get("profile")
    if not isinstance(name, str) or name not in d.config.profiles:
        known = ", ".join(d.config.profiles) or "none"
        return error(422, f"'profile' must name a defined profile (defined: {known})",
                     "bad_value")
    until = _until(body, d)
    if isinstance(until, web.Response):
        return until
    d.force_profile(name, until, str(body.get("reason") or "forced by an operator"))
    return web.json_response(d.profile_status())


async def profile_delete(request: web.Request) -> web.Response:
    d = _control(request)
    d.release_profile()
    return web.json_response(d.profile_status())


async def plan_get(request: web.Request) -> web.Response:
    return web.json_response(_control(request).plan_json())


async def config_get(request: web.Request) -> web.Response:
    return web.json_response(_control(request).config_json())


async def reload(request: web.Request) -> web.Response:
    d = _control(request)
    await _json_body(request)
    # Shielded: a client that hangs up must not leave a reload half done.
    result = await asyncio.shield(d.reload(source="api"))
    return web.json_response(result, status=200 if result["valid"] else 422)


async def events(request: web.Request) -> web.StreamResponse:
    d = _control(request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    queue = d.events.subscribe()
    try:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            since = 0
        only_history = request.query.get("history") == "only"
        for event in d.events.history(None if only_history else 100):
            if event["seq"] > since:
                await resp.write(f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n".encode())
        if only_history:
            await resp.write_eof()
            return resp
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=15)
                await resp.write(f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n".encode())
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        d.events.unsubscribe(queue)
    return resp


async def debug_stall(request: web.Request) -> web.Response:
    """Test hook (GPUD_TEST_HOOKS=1 only): block the reconcile loop to prove the watchdog."""
    request.app[HOOKS_KEY].stall_loop()
    return web.json_response({"ok": True})


async def debug_clock(request: web.Request) -> web.Response:
    """Test hook (GPUD_TEST_HOOKS=1 only): set the daemon's clock; it runs on from there."""
    body = await _json_body(request)
    try:
        at = datetime.fromisoformat(str(body.get("now")))
    except ValueError:
        return error(400, "'now' must be an ISO 8601 instant with an offset")
    if at.tzinfo is None:
        return error(400, "'now' needs an offset")
    request.app[HOOKS_KEY].set_clock(at)
    now = _control(request).now()
    return web.json_response({"ok": True, "now": now.isoformat(timespec="seconds")})


async def debug_requests(request: web.Request) -> web.Response:
    """Test hook (GPUD_TEST_HOOKS=1 only): the proxy's timing marks of the last requests,
    milliseconds from arrival: routed, upstream ready (woken), upstream head, first chunk."""
    return web.json_response({"requests": request.app[HOOKS_KEY].request_timings()})


def install(app: web.Application, control: Control, *, hooks: TestHooks | None = None) -> None:
    """The API's routes; the debug routes only with test hooks (GPUD_TEST_HOOKS=1)."""
    app[CONTROL_KEY] = control
    app.middlewares.append(admin_writes)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/api/v1/status", status)
    r.add_get("/api/v1/models", models)
    r.add_get("/api/v1/models/{name}", model)
    r.add_get("/api/v1/models/{name}/logs", model_logs)
    r.add_post("/api/v1/models/{name}/{verb}", model_action)
    r.add_delete("/api/v1/models/{name}/override", override_delete)
    r.add_get("/api/v1/profile", profile_get)
    r.add_put("/api/v1/profile", profile_put)
    r.add_delete("/api/v1/profile", profile_delete)
    r.add_get("/api/v1/plan", plan_get)
    r.add_get("/api/v1/config", config_get)
    r.add_post("/api/v1/reload", reload)
    r.add_get("/api/v1/events", events)
    r.add_get("/api/v1/activity", activity)
    if hooks is not None:
        app[HOOKS_KEY] = hooks
        r.add_post("/api/v1/debug/stall", debug_stall)
        r.add_post("/api/v1/debug/clock", debug_clock)
        r.add_get("/api/v1/debug/requests", debug_requests)
