"""The middlewares in front of every route: OpenAI-shaped errors and the Host check.

- `json_errors`: every error gpud itself answers (no route 404, 405, 413, a bad body, a bug's
  500) has OpenAI's error JSON; aiohttp's plain-text pages never reach a client. A bug is
  logged with its traceback, at most once per interval for the same place.
- `check_host`: DNS rebinding. A page on attacker.example whose name the attacker points at
  127.0.0.1 is, to the browser, same-origin with gpud: Origin and Host both say
  attacker.example, so the Origin check of writes passes and the page can read every
  answer. gpud answers only requests whose Host is an IP address (a rebinding page always
  names its own host), localhost, or a name in `[daemon] allowed_hosts`; others get 403.
  The OpenAI endpoint is checked too while it is open (no `[[auth.keys]]`: a rebinding page
  could use the models); with keys, a key is the credential and clients may call the box
  by any name (a load balancer's, a tunnel's), so Host is not checked there.
Never touches the daemon's state: reads the config and the listen address only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from gpud.listener import error_body, track_requests

if TYPE_CHECKING:
    from gpud.web.control import Control

log = logging.getLogger("gpud.web")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_INFERENCE = ("/v1/", "/v2/", "/tokenize", "/detokenize", "/pooling", "/classify", "/score",
              "/rerank")  # the proxy's paths (gpud.proxy.paths)
_BUG_REPORT_EVERY = 10.0


def json_error(status: int, message: str, code: str,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, code),
                        content_type="application/json", headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    status = exc.status
    if status == 404:
        msg, code = (f"nothing at {request.method} {request.path}: gpud serves /v1/* (OpenAI), "
                     "/api/v1/* (its API, docs/api.md), / (the page) and /metrics", "not_found")
    elif status == 405:
        allowed = exc.headers.get("Allow", "").replace(",", ", ")
        msg, code = (f"{request.method} is not allowed on {request.path}; use "
                     f"{allowed or 'another method'}", "method_not_allowed")
    elif status == 413:
        msg, code = (f"the request body is larger than gpud accepts ({exc.text})",
                     "body_too_large")
    else:
        text = exc.text or ""
        msg = text if text and not text.startswith(f"{status}:") else (exc.reason or str(exc))
        code = "bad_request" if status < 500 else "internal_error"
    return json_error(status, msg, code, headers)


_last_bug: dict[str, float] = {}


def _report_bug(request: web.Request, exc: BaseException) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{type(exc).__name__}@{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb \
        else type(exc).__name__
    now = time.monotonic()
    if now - _last_bug.get(where, -_BUG_REPORT_EVERY) >= _BUG_REPORT_EVERY:
        _last_bug[where] = now
        log.error("%s %s failed (a gpud bug; the client got a 500; the same failure is "
                  "logged at most every %gs)", request.method, request.path,
                  _BUG_REPORT_EVERY, exc_info=exc)


@web.middleware
async def json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise  # a redirect, or an error gpud already shaped
        return _from_http_exception(request, exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except RecursionError:
        return json_error(400, "the request is nested too deeply to read", "too_deep")
    except Exception as exc:
        _report_bug(request, exc)
        return json_error(500, f"gpud failed on this request ({type(exc).__name__}); its log "
                          "has the details", "internal_error")


def host_of(header: str) -> str:
    """The host of a Host header, without its port, brackets or trailing dot, lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


def host_allowed(host: str, allowed: list[str]) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        ipaddress.ip_address(host)
        return True  # an IP literal cannot be rebound to another server
    except ValueError:
        pass
    for pattern in allowed:
        if pattern == "*" or host == pattern or (
                pattern.startswith(".") and (host == pattern[1:] or host.endswith(pattern))):
            return True
    return False


def make_check_host(control: Control) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check_host(request: web.Request, handler: _Handler) -> web.StreamResponse:
        header = request.headers.get("Host")
        if header is None:  # HTTP/1.0 or a raw client: browsers always send Host
            return await handler(request)
        cfg = control.config
        host = host_of(header)
        if host_allowed(host, cfg.daemon.allowed_hosts):
            return await handler(request)
        if cfg.auth.keys and request.path.startswith(_INFERENCE):
            return await handler(request)  # a key is the credential there
        log.debug("refused Host %r for %s %s", header, request.method, request.path)
        return json_error(403, f"Host {host[:100]!r} is not a name gpud answers to (a guard "
                          "against DNS rebinding): call it by IP address or localhost, or add "
                          "the name to [daemon] allowed_hosts", "host_not_allowed")
    return check_host


def install(app: web.Application, control: Control) -> None:
    """Before any route's own middleware: request tracking (the listener's deadlines),
    JSON errors, then the Host check (its 403 is JSON too)."""
    app.middlewares[:0] = [track_requests, json_errors, make_check_host(control)]
