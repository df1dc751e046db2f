"""gpud's listener: the site it serves on, its defences, and a live `daemon.listen` move.

Defences (issue 21: 20,000 idle sockets took every fd, a slowloris stayed open for ever):
- a request head must arrive within `header_timeout` of the connection, or of its first byte
  after a keep-alive wait; an idle keep-alive connection closes after `idle_timeout`;
- at most `max_connections` (lowered to fit the open-file limit, which gpud raises to its
  hard limit): at the cap the longest-waiting connection (no request in progress) is closed
  to make room; when every connection has a request in progress, the new one gets a 503;
- an accept that fails for want of file descriptors (EMFILE) is logged once per interval,
  not once per try with a traceback; so are closes at the cap; a malformed request gets
  OpenAI's JSON error shape, logged at debug level (port scanners send those all day).

A live `listen` change binds the new address before the old one is closed, so a refused move
(the port is taken, the address is not on this host) leaves gpud serving where it was; the
reason is logged and shown in status. A move between hosts on one port has to close the old
socket first, and opens it again when the new one fails. Open connections finish on the old
socket. This module never touches the app's routes, only its sites and connections.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gpud.config.schema import DaemonConfig

log = logging.getLogger("gpud.daemon")

REPORT_EVERY = 10.0  # seconds between two log lines about the same trouble
_FD_RESERVE = 128  # fds kept for engines' logs, state files, the KV pool, NVML
# Connections accepted in one event-loop turn. asyncio uses the listen backlog for this too,
# so a flood of 5,000 connects was accepted 1,024 at a time, each batch set up in one turn
# while /healthz waited (225 ms). The kernel queue stays deep (GuardedSite.start).
ACCEPT_BATCH = 16
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                503: "service_unavailable"}


def error_body(status: int, message: str, code: str) -> bytes:
    """gpud's own error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": f"gpud_{code}"}}).encode()


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 8192

    @classmethod
    def of(cls, d: DaemonConfig) -> Limits:
        return cls(d.header_timeout.total_seconds(), d.idle_timeout.total_seconds(),
                   d.max_connections)


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE, raised to the hard limit first (systemd's LimitNOFILE=)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Reporter:
    """Counts one kind of trouble and logs it at once, then at most every `every` seconds
    with the count since the last line (a storm is one line per interval, never one per
    occurrence)."""

    def __init__(self, say: Callable[[int], None], every: float = REPORT_EVERY) -> None:
        self.say, self.every = say, every
        self.total = 0
        self._pending = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self) -> None:
        self.total += 1
        self._pending += 1
        if self._timer is None:
            self._flush()

    def _flush(self) -> None:
        n, self._pending = self._pending, 0
        if not n:
            self._timer = None
            return
        self.say(n)
        self._timer = asyncio.get_running_loop().call_later(self.every, self._flush)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# A connection's phase: waiting for a request head (no byte yet, or part of one), handling a
# request (no deadline: a stream may last), or idle after a response (keep-alive).
HEAD, BUSY, IDLE, CLOSED, REFUSED = "head", "busy", "idle", "closed", "refused"


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol, told by its ConnectionGuard when to give up."""

    __slots__ = ("_guard", "phase", "timer")

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self.phase = HEAD
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.admit(self, transport):
            super().connection_made(transport)
        else:
            self.phase = REFUSED

    def data_received(self, data: bytes) -> None:
        if self.phase == IDLE:
            self._guard.head_started(self)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.phase == REFUSED:
            return  # refused at the door: aiohttp never saw it
        self._guard.forget(self)
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (or, past every middleware, a bug): JSON."""
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.debug("bad request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was under way; cannot send an error instead")
        text = message or (str(exc) if exc else "") or "gpud could not read the request"
        resp = web.Response(status=status, content_type="application/json",
                            body=error_body(status, text, "bad_request" if status < 500
                                            else "internal_error"))
        resp.force_close()
        return resp


class ConnectionGuard:
    """Every connection of gpud's listener: header and idle deadlines, the cap, counts."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.fd_limit = open_files_limit()
        # The kernel's queue of connections not yet accepted (they hold no fd of ours).
        self.backlog = max(16, min(4096, self.fd_limit // 4))
        self.cap = self._cap_for(limits)
        self.open: set[GuardedHandler] = set()
        # Connections without a request in progress, the longest-waiting first.
        self.waiting: collections.OrderedDict[GuardedHandler, None] = collections.OrderedDict()
        self.closed: collections.Counter[str] = collections.Counter()
        self.refused = Reporter(lambda n: log.warning(
            "connection cap reached: refused %d connection(s) with 503 in %gs (all %d open "
            "ones have a request in progress)", n, REPORT_EVERY, len(self.open)))
        self.evicted = Reporter(lambda n: log.warning(
            "connection cap (%d) reached: closed %d idle connection(s) in %gs to make room",
            self.cap, n, REPORT_EVERY))
        self.out_of_fds = Reporter(lambda n: log.error(
            "accepting connections failed %d time(s) in %gs: out of file descriptors "
            "(%d open connections, cap %d, open-file limit %d)", n, REPORT_EVERY,
            len(self.open), self.cap, self.fd_limit))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._old_handler: Any = None

    def _cap_for(self, limits: Limits) -> int:
        # A proxied request holds a second fd (its engine connection): half of what is left.
        # asyncio accepts up to ACCEPT_BATCH sockets in one go before any close runs: the cap
        # leaves room for that batch, so an accept never meets EMFILE for our own doing.
        room = max(16, (self.fd_limit - _FD_RESERVE - ACCEPT_BATCH) // 2)
        if limits.max_connections > room:
            log.warning("max_connections %d lowered to %d to fit the open-file limit %d "
                        "(raise LimitNOFILE to allow more)", limits.max_connections, room,
                        self.fd_limit)
        return min(limits.max_connections, room)

    def configure(self, limits: Limits) -> None:
        """A reload: new deadlines apply from each connection's next phase, the cap at once."""
        if limits != self.limits:
            self.limits, self.cap = limits, self._cap_for(limits)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self.open), "cap": self.cap, "refused": self.refused.total,
                "closed": dict(self.closed), "accept_failures": self.out_of_fds.total}

    # --- the loop's accept errors -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._old_handler = loop, loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.set_exception_handler(self._old_handler)
            self._loop = None
        for r in (self.refused, self.evicted, self.out_of_fds):
            r.stop()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_FDS:
            self.out_of_fds.note()  # asyncio retries the accept in a second by itself
        elif self._old_handler is not None:
            self._old_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # --- connections ------------------------------------------------------------------------

    def protocol_factory(self, server: web.Server) -> Callable[[], GuardedHandler]:
        loop = asyncio.get_running_loop()

        def make() -> GuardedHandler:
            lim = self.limits
            # aiohttp's own keep-alive close is a backstop behind the deadlines here.
            return GuardedHandler(server, self, loop=loop, access_log=None,
                                  keepalive_timeout=lim.header_timeout + lim.idle_timeout)
        return make

    def admit(self, conn: GuardedHandler, transport: asyncio.BaseTransport) -> bool:
        if len(self.open) >= self.cap:
            if self.waiting:
                victim = next(iter(self.waiting))
                self._close(victim, "evicted")
                self.evicted.note()
            else:
                self.refused.note()
                body = error_body(503, f"gpud has {len(self.open)} connections, each with a "
                                  "request in progress (max_connections); retry later",
                                  "too_many_connections")
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                transport.close()
                return False
        self.open.add(conn)
        self.waiting[conn] = None
        self._arm(conn, self.limits.header_timeout, "header_timeout")
        return True

    def head_started(self, conn: GuardedHandler) -> None:
        """The first byte of a request after a keep-alive wait: its head has header_timeout."""
        conn.phase = HEAD
        self._arm(conn, self.limits.header_timeout, "header_timeout")

    def request_started(self, conn: GuardedHandler) -> None:
        if conn.phase == CLOSED:
            return
        conn.phase = BUSY
        self.waiting.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def request_finished(self, conn: GuardedHandler) -> None:
        if conn.phase == CLOSED:
            return  # the client left while its request ran
        conn.phase = IDLE
        self.waiting[conn] = None
        self._arm(conn, self.limits.idle_timeout, "idle_timeout")

    def forget(self, conn: GuardedHandler) -> None:
        conn.phase = CLOSED
        self.open.discard(conn)
        self.waiting.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _arm(self, conn: GuardedHandler, seconds: float, reason: str) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = asyncio.get_running_loop().call_later(seconds, self._expire, conn, reason)

    def _expire(self, conn: GuardedHandler, reason: str) -> None:
        conn.timer = None
        if conn.phase not in (HEAD, IDLE):
            return
        transport = conn.transport
        if isinstance(transport, asyncio.WriteTransport) and \
                transport.get_write_buffer_size() > 0:
            # The last answer is still going out to a slow reader: not idle yet.
            self._arm(conn, self.limits.idle_timeout, reason)
            return
        log.debug("closing a connection from %s: %s", conn.peername, reason)
        self._close(conn, reason)

    def _close(self, conn: GuardedHandler, reason: str) -> None:
        self.closed[reason] += 1
        self.forget(conn)
        conn.force_close()


@web.middleware
async def track_requests(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         ) -> web.StreamResponse:
    """The outermost middleware: a connection has no deadline while its request runs."""
    conn = request.protocol
    if not isinstance(conn, GuardedHandler):  # an app served some other way (tests)
        return await handler(request)
    guard = conn._guard
    guard.request_started(conn)
    try:
        return await handler(request)
    finally:
        guard.request_finished(conn)


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections are GuardedHandlers of one ConnectionGuard."""

    __slots__ = ("guard",)

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 guard: ConnectionGuard) -> None:
        # A deep backlog: thousands of clients connecting at once are queued, not dropped.
        super().__init__(runner, host, port, reuse_address=True, backlog=guard.backlog)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.protocol_factory(server), self._host, self._port,
            backlog=ACCEPT_BATCH, reuse_address=True)
        for ts in self._server.sockets:  # the same sockets, listening with a deep queue
            with socket.socket(fileno=os.dup(ts.fileno())) as sock:
                sock.listen(self._backlog)


def split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def open_site(runner: web.AppRunner, listen: str, guard: ConnectionGuard) -> GuardedSite:
    host, port = split(listen)
    site = GuardedSite(runner, host or "127.0.0.1", port, guard)  # as DaemonConfig.host
    await site.start()
    return site


async def rebind(runner: web.AppRunner, site: GuardedSite, old: str,
                 new: str) -> tuple[GuardedSite, str | None]:
    """(the site now listening, None) after a move to `new`; (`site`, why) when refused."""
    same_port = split(old)[1] == split(new)[1]
    try:
        moved = await open_site(runner, new, site.guard)
    except OSError as exc:
        if not same_port:
            return site, f"cannot listen on {new}: {exc.strerror or exc}"
    else:
        await site.stop()
        log.info("now listening on http://%s (was %s)", new, old)
        return moved, None
    await site.stop()  # same port on another host: the old socket holds it
    try:
        moved = await open_site(runner, new, site.guard)
    except OSError as exc:
        why = f"cannot listen on {new}: {exc.strerror or exc}"
        return await open_site(runner, old, site.guard), why
    log.info("now listening on http://%s (was %s)", new, old)
    return moved, None
