"""A lean HTTP/1.1 keep-alive client for gpud's own engines, nothing else.

Why not aiohttp's ClientSession: on the proxy's hot path it cost about half
of gpud's added latency (cookie, auth, redirect, tracing and URL machinery
that a loopback hop to our own engine never uses); see
bench/proxy_overhead.py. This client speaks what vLLM's uvicorn answers
(Content-Length or chunked bodies, keep-alive) over plain TCP or a Unix
socket, with a pool of idle connections per engine and read-side flow
control; the framing itself is llhttp's (Node's parser, via `httptools`).

It must never follow redirects, speak TLS, or be pointed at anything but an
engine that gpud started.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

import httptools

from .forms import StreamedBody

_HIGH_WATER: Final = 256 * 1024  # pause reading the engine beyond this many unread bytes
_MAX_HEAD: Final = 64 * 1024  # an engine's response head is a few hundred bytes


class UpstreamError(ConnectionError):
    """The engine closed the connection or answered something that is not HTTP/1.1."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed before any byte of the answer arrived (safe to retry once)."""


class _Conn(asyncio.Protocol):
    """One connection to an engine; carries one request at a time.

    Framing is llhttp's (through `httptools`, as in uvicorn): Content-Length, chunked with
    extensions and trailers, or a body until the engine closes.
    """

    def __init__(self, pool: _HostPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._buffered = 0  # bytes in _body
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        # State of the current exchange.
        self.response: UpstreamResponse | None = None
        self._got_any = False
        self._head_bytes = 0
        self._head_done = False
        self._until_close = False  # no Content-Length, not chunked: the body ends at EOF
        self._eof = False
        self._error: BaseException | None = None
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused

    # -- asyncio.Protocol ------------------------------------------------------

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        """Wait while the engine's socket buffer is full (a streamed request body)."""
        if self._writable is not None:
            await self._writable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.resume_writing()
        self.pool.forget(self)
        if self.response is not None and not self._eof:
            if self._until_close and self._head_done:
                self._eof = True
            else:
                self._error = exc
        self._wake()

    def data_received(self, data: bytes) -> None:
        self._got_any = True
        if self.response is None or self._eof:
            # Bytes outside any exchange: the engine broke protocol; drop the socket.
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"engine sent bad HTTP: {e}"))
            return
        if not self._head_done:
            self._head_bytes += len(data)  # all of it head so far
            if self._head_bytes > _MAX_HEAD:
                self._fail(UpstreamError("engine's response head is too large"))
                return
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    # -- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:  # a second answer to one request
            raise httptools.HttpParserError("more than one response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.response
        if resp is not None and not self._head_done:  # trailers are not relayed
            resp.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
            resp.head_size += len(name) + len(value)
            if resp.head_size > _MAX_HEAD:
                raise httptools.HttpParserError("engine's response head is too large")

    def on_headers_complete(self) -> None:
        resp = self.response
        assert resp is not None
        resp.status = self._parser.get_status_code()
        resp.keep_alive = self._parser.should_keep_alive()
        h = resp.headers
        self._until_close = (
            "content-length" not in h
            and "chunked" not in h.get("transfer-encoding", "").lower()
            and resp.status not in (204, 304)
            and resp.status >= 200
        )
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        self._eof = True

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self.abort()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- used by UpstreamResponse --------------------------------------------------

    async def wait(self) -> None:
        if self._error is not None:
            if isinstance(self._error, UpstreamError):
                raise self._error
            raise UpstreamError(f"engine connection failed: {self._error}") from self._error
        if self.closed:
            raise UpstreamError("engine closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """The body bytes parsed so far."""
        body = self._body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def start(self, resp: UpstreamResponse) -> None:
        self.response = resp
        self._got_any = False
        self._head_bytes = 0
        self._head_done = False
        self._until_close = False
        self._eof = False
        self._error = None

    def finish(self) -> None:
        """The exchange ended cleanly: back to the pool, or closed."""
        resp = self.response
        self.response = None
        if resp is None or self.closed or not resp.keep_alive or self._until_close:
            self.abort()
        else:
            self.pool.put(self)

    def abort(self) -> None:
        self.closed = True
        self.response = None
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """An engine's answer: status and headers (lowercase names) then the body."""

    __slots__ = ("_conn", "head_size", "headers", "keep_alive", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_size = 0
        self.keep_alive = True

    async def _read_head(self) -> None:
        conn = self._conn
        assert conn is not None
        while not conn._head_done:
            try:
                await conn.wait()
            except UpstreamError:
                if not conn._got_any:
                    raise UpstreamDisconnected("engine closed the connection") from None
                raise

    @property
    def done(self) -> bool:
        return self._conn is None

    async def readany(self) -> bytes:
        """The next piece of the body as it arrives; b"" once the body is complete."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            data = conn.take()
            if data:
                return data
            if conn._eof:
                self._conn = None
                conn.finish()
                return b""
            await conn.wait()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while True:
            data = await self.readany()
            if not data:
                break
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Give up on the rest of the body: the socket is closed, the engine aborts."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()


class _HostPool:
    __slots__ = ("host", "idle", "path", "port", "prefix")

    def __init__(self, host: str, port: int, path: str | None = None) -> None:
        self.host = host
        self.port = port
        self.path = path  # a Unix socket instead of host:port
        self.idle: collections.deque[_Conn] = collections.deque()
        self.prefix = b"Host: localhost\r\n" if path else f"Host: {host}:{port}\r\n".encode()

    def put(self, conn: _Conn) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)


class UpstreamClient:
    """Pooled keep-alive connections to engines, keyed by base URL.

    A base URL is `http://HOST:PORT` or `unix:/ABSOLUTE/PATH` (an engine run
    with `vllm serve --uds PATH`: a Unix socket skips the loopback TCP stack,
    the largest single cost of a proxied request on small machines).

    `keepalive` must stay below the engine's own idle timeout (uvicorn: 5 s),
    so gpud never sends on a socket the engine is closing.
    """

    def __init__(self, keepalive: float = 3.0, connect_timeout: float = 10.0) -> None:
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._pools: dict[str, _HostPool] = {}

    def _pool(self, base: str) -> _HostPool:
        pool = self._pools.get(base)
        if pool is None and base.startswith("unix:/"):
            pool = self._pools[base] = _HostPool("localhost", 0, base.removeprefix("unix:"))
        if pool is None:
            rest = base.removeprefix("http://").rstrip("/")
            if "/" in rest or base.startswith("https://"):
                raise ValueError(f"engine base URL must be http://host:port, not {base!r}")
            host, _, port = rest.rpartition(":")
            pool = self._pools[base] = _HostPool(host.strip("[]"), int(port))
        return pool

    async def _conn(self, pool: _HostPool) -> _Conn:
        loop = asyncio.get_running_loop()
        idle = pool.idle
        now = loop.time()
        while idle:
            conn = idle.pop()  # most recently used first: warmest socket
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            conn.abort()
        return await self._connect(pool)

    async def preconnect(self, base: str) -> None:
        """Open a connection to `base` now, for a request that will come (an engine
        waking up answers connections already), unless a fresh one is idle."""
        pool = self._pool(base)
        now = asyncio.get_running_loop().time()
        if any(not c.closed and now - c.idle_since < self.keepalive for c in pool.idle):
            return
        try:
            conn = await self._connect(pool)
        except (OSError, TimeoutError):
            return  # the request will connect (and report) itself
        pool.put(conn)

    async def _connect(self, pool: _HostPool) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            if pool.path is not None:
                _, proto = await loop.create_unix_connection(lambda: _Conn(pool), pool.path)
            else:
                _, proto = await loop.create_connection(lambda: _Conn(pool), pool.host, pool.port)
        return proto

    async def post(
        self, base: str, path: str, body: bytes | StreamedBody, headers: bytes = b""
    ) -> UpstreamResponse:
        """Send `POST path` with `body`; returns once the response head arrived.

        `headers` are extra raw header lines, each ending in CRLF. Retries once
        on a pooled connection that turned out closed before answering.
        """
        pool = self._pool(base)
        if isinstance(body, StreamedBody):
            return await self._post_streamed(pool, path, body, headers)
        head = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\n",
                pool.prefix,
                headers,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
            )
        )
        for attempt in (0, 1):
            conn = await self._conn(pool)
            resp = UpstreamResponse(conn)
            conn.start(resp)
            assert conn.transport is not None
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            try:
                await resp._read_head()
            except UpstreamDisconnected:
                conn.abort()
                if attempt:
                    raise
                continue
            except BaseException:
                conn.abort()
                raise
            return resp
        raise AssertionError("unreachable")

    async def _post_streamed(
        self, pool: _HostPool, path: str, body: StreamedBody, headers: bytes
    ) -> UpstreamResponse:
        """`post` of a body that is relayed as it arrives, on a new connection: it cannot be
        sent twice, so never on a pooled socket that may turn out closed."""
        chunked = body.length is None
        framing = (b"Transfer-Encoding: chunked" if chunked
                   else b"Content-Length: " + str(body.length).encode())
        head = b"".join((b"POST ", path.encode(), b" HTTP/1.1\r\n", pool.prefix, headers,
                         framing, b"\r\n\r\n"))

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if chunked and data else data

        conn = await self._connect(pool)
        resp = UpstreamResponse(conn)
        conn.start(resp)
        assert conn.transport is not None
        try:
            conn.transport.write(head + frame(body.prefix))
            async for data in body.rest:
                if conn.closed:
                    break  # the engine answered early and closed; its answer is read below
                conn.transport.write(frame(data))
                await conn.drain()
            if chunked and not conn.closed:
                conn.transport.write(b"0\r\n\r\n")
            await resp._read_head()
        except BaseException:
            conn.abort()
            raise
        return resp

    def close(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().abort()
        self._pools.clear()
