"""gpud's side of the KV pool socket: lends pages to engine processes and takes them back.

A Unix SOCK_SEQPACKET socket in the runtime directory. An engine says which
model it serves; gpud checks the peer's credentials (SO_PEERCRED) with the
``allow`` callable the daemon passes in (is this a pid gpud started for that
model?), then grants pages as fds (SCM_RIGHTS), asks engines to give pages
back when a tenant of higher priority needs them, and takes back every page
of an engine that dies. Wire format: ``protocol``.

Pages of a connection that closed while its process still lives may still
be mapped there, so they are held back until the process exits (a pidfd
tells us when), never lent twice.

This module must never call CUDA itself: the backend inside each
``KVPool`` does. It must never block the loop on a peer: every wait on an
engine has a timeout.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpud.kvpool import protocol
from gpud.kvpool.ledger import Activity, LedgerError, Reclaim
from gpud.kvpool.pool import KVPool, PageRef, pool_status
from gpud.kvpool.protocol import Message, ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCredentials:
    """Who is at the other end of a connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


#: (peer, model name) -> may this process hold pages for that model?
AllowPeer = Callable[[PeerCredentials, str], bool]


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: PeerCredentials
    tenant: str | None = None
    gpu: int | None = None
    pages: set[int] = field(default_factory=set)
    queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    waiting: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    asked: dict[int, int] = field(default_factory=dict)  # give-back id -> pages asked
    closed: bool = False

    def label(self) -> str:
        return f"pid {self.peer.pid}" + (f" (model {self.tenant!r})" if self.tenant else "")


class KVPoolServer:
    """Serves the pools of a box's GPUs on one Unix socket."""

    def __init__(
        self,
        pools: Mapping[int, KVPool],
        path: str | Path,
        allow: AllowPeer,
        *,
        give_back_timeout: float = 5.0,
        socket_mode: int = 0o660,
    ) -> None:
        self.pools = dict(pools)
        self.path = Path(path)
        self.allow = allow
        self.give_back_timeout = give_back_timeout
        self.socket_mode = socket_mode
        self._listener: socket.socket | None = None
        self._conns: set[_Conn] = set()
        self._next_id = 1
        self._changed = asyncio.Event()
        self._held_back: dict[int, tuple[int, str, set[int]]] = {}  # pidfd -> gpu, tenant, pages
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > 107:
            raise OSError(
                errno.ENAMETOOLONG,
                f"KV pool socket path {self.path} is longer than the 107 bytes Unix sockets "
                f"allow; use a shorter runtime directory",
            )
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                # A socket left by a gpud that died; a live one would own its runtime dir.
                self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        sock.bind(os.fspath(self.path))
        os.chmod(self.path, self.socket_mode)
        sock.listen(64)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        log.info("KV pool listening on %s (%s)", self.path, self.backend_names())

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for conn in list(self._conns):
            self._drop(conn, "gpud is stopping", hold_back=False)
        for task in list(self._tasks):
            task.cancel()
        for pidfd in list(self._held_back):
            self._free_held_back(pidfd)

    def backend_names(self) -> str:
        return ",".join(sorted({p.backend.name for p in self.pools.values()})) or "none"

    # -- observing -----------------------------------------------------------------

    def status(self) -> dict[str, object]:
        s = pool_status(self.pools)
        s["socket"] = os.fspath(self.path)
        s["clients"] = [{"pid": c.peer.pid, "model": c.tenant, "gpu": c.gpu,
                         "pages": len(c.pages)}
                        for c in sorted(self._conns, key=lambda c: c.peer.pid)]
        held = sorted(self._held_back.values(), key=lambda v: v[1])
        s["held_back"] = {t: len(p) for _g, t, p in held}
        return s

    def set_activity(self, tenant: str, activity: Activity) -> None:
        """What the reconciler sees the model doing (decides whom the ledger asks first)."""
        for pool in self.pools.values():
            if tenant in pool.ledger.tenants() and pool.ledger.activity(tenant) is not activity:
                pool.ledger.set_activity(tenant, activity)

    async def trim(self, tenant: str) -> int:
        """Ask a model's engines for every page above its kv_min (an idle or sleeping model);
        they answer with what they can free (whole page groups). Returns the pages asked."""
        asked = 0
        for pool in self.pools.values():
            if tenant not in pool.ledger.tenants():
                continue
            n = pool.ledger.reclaimable(tenant)
            if n > 0:
                asked += n
                await self._reclaim(pool, [Reclaim(tenant, n, beneficiary="")])
        return asked

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after every change to the pool."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- connections ---------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = _Conn(sock=sock, peer=peer_credentials(sock))
            self._conns.add(conn)
            conn.worker = self._spawn(self._serve(conn))
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, conn)

    def _readable(self, conn: _Conn) -> None:
        fds_size = socket.CMSG_SPACE(protocol.MAX_FDS_PER_MESSAGE * 4)
        while not conn.closed:
            try:
                data, ancdata, _flags, _ = conn.sock.recvmsg(
                    protocol.MAX_MESSAGE, fds_size, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(conn, f"read failed: {e}")
                return
            for level, kind, payload in ancdata:
                # Engines send no fds; close any so they cannot leak into gpud.
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)
            if not data:
                self._drop(conn, "closed the connection")
                return
            try:
                msg = protocol.decode(data)
            except ProtocolError as e:
                self._drop(conn, str(e))
                return
            if msg["op"] == "gave_back":
                # Answered at once, not queued: the engine's own grant may be waiting on it.
                self._gave_back(conn, msg)
            else:
                conn.queue.put_nowait(msg)

    async def _serve(self, conn: _Conn) -> None:
        while True:
            msg = await conn.queue.get()
            rid = msg.get("id")
            try:
                await self._handle(conn, msg)
            except (ProtocolError, LedgerError) as e:
                await self._send(conn, {"op": "error", "id": rid, "error": str(e)})
                if conn.tenant is None:
                    self._drop(conn, str(e))
                    return

    async def _handle(self, conn: _Conn, msg: Message) -> None:
        op, rid = msg["op"], msg.get("id")
        if op == "hello":
            await self._hello(conn, msg)
            return
        if conn.tenant is None or conn.gpu is None:
            raise ProtocolError(f"{op!r} before 'hello': say which model you serve first")
        pool = self.pools[conn.gpu]
        if op == "grant":
            await self._grant(conn, pool, rid, protocol.count(msg, "pages"))
        elif op == "return":
            pages = protocol.int_list(msg, "pages")
            self._take_back(conn, pool, pages)
            await self._send(conn, {"op": "returned", "id": rid, "count": len(pages)})
        elif op == "status":
            await self._send(conn, {"op": "status", "id": rid, "status": pool.status()})
        else:
            raise ProtocolError(f"unknown request {op!r}")

    async def _hello(self, conn: _Conn, msg: Message) -> None:
        tenant, gpu = msg.get("tenant"), msg.get("gpu", 0)
        if not isinstance(tenant, str) or not isinstance(gpu, int):
            raise ProtocolError("'hello' needs a model name ('tenant') and a GPU index ('gpu')")
        if msg.get("version") != protocol.VERSION:
            raise ProtocolError(
                f"client speaks KV pool protocol {msg.get('version')}, gpud speaks "
                f"{protocol.VERSION}: use the client library of this gpud"
            )
        if gpu not in self.pools:
            raise ProtocolError(f"GPU {gpu} has no KV pool here (pools: {sorted(self.pools)})")
        if tenant not in self.pools[gpu].ledger.tenants():
            raise ProtocolError(f"model {tenant!r} has no place in the KV pool of GPU {gpu}")
        if not self.allow(conn.peer, tenant):
            log.warning(
                "KV pool: refused pid %d (uid %d) as model %r", conn.peer.pid, conn.peer.uid, tenant
            )
            raise ProtocolError(
                f"pid {conn.peer.pid} may not hold KV pages for model {tenant!r}: "
                f"only engines gpud started for it may connect"
            )
        if conn.tenant is not None:
            raise ProtocolError("'hello' was already said on this connection")
        conn.tenant, conn.gpu = tenant, gpu
        pool = self.pools[gpu]
        await self._send(
            conn,
            {
                "op": "welcome",
                "id": msg.get("id"),
                "gpu": gpu,
                "page_size": pool.page_size,
                "backend": pool.backend.name,
            },
        )

    async def _grant(self, conn: _Conn, pool: KVPool, rid: object, n: int) -> None:
        assert conn.tenant is not None
        grant = pool.request(conn.tenant, n)
        decision = grant.decision
        await self._send_pages(conn, rid, grant.pages)
        count, refused, reason = len(grant.pages), decision.refused, decision.reason
        if decision.reclaims:
            await self._reclaim(pool, decision.reclaims)
            if not conn.closed:
                refs = pool.claim_earmarked(conn.tenant)
                await self._send_pages(conn, rid, refs)
                count += len(refs)
                missing = decision.pending - len(refs)
                if missing > 0:
                    pool.ledger.cancel_earmark(conn.tenant)
                    refused += missing
                    reason = reason or (
                        f"other models did not give back {missing} pages within "
                        f"{self.give_back_timeout:g}s"
                    )
        self._notify()
        await self._send(
            conn, {"op": "granted", "id": rid, "count": count, "refused": refused, "reason": reason}
        )

    async def _send_pages(self, conn: _Conn, rid: object, refs: Sequence[PageRef]) -> None:
        assert conn.tenant is not None
        conn.pages.update(r.page for r in refs)
        step = protocol.MAX_FDS_PER_MESSAGE
        for i in range(0, len(refs), step):
            chunk = refs[i : i + step]
            fds = [r.fd for r in chunk if r.fd is not None]
            body = {"op": "pages", "id": rid, "pages": [[r.page, r.offset] for r in chunk]}
            await self._send(conn, body, fds)

    async def _reclaim(self, pool: KVPool, reclaims: Sequence[Reclaim]) -> None:
        asks: list[tuple[_Conn, int, asyncio.Future[int]]] = []
        for r in reclaims:
            need = r.pages
            holders = sorted(
                (c for c in self._conns if c.tenant == r.tenant and c.gpu == pool.gpu),
                key=lambda c: -len(c.pages),
            )
            for c in holders:
                k = min(need, len(c.pages))
                if k <= 0:
                    continue
                gid = self._next_id
                self._next_id += 1
                fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                c.waiting[gid], c.asked[gid] = fut, k
                asks.append((c, k, fut))
                await self._send(c, {"op": "give_back", "id": gid, "pages": k})
                need -= k
            if need > 0:
                pool.ledger.give_back_answered(r.tenant, need, 0)
        if not asks:
            return
        done, _ = await asyncio.wait([f for _, _, f in asks], timeout=self.give_back_timeout)
        for c, k, fut in asks:
            if fut not in done and c.tenant is not None:
                log.warning(
                    "KV pool: %s did not give back %d pages within %gs",
                    c.label(),
                    k,
                    self.give_back_timeout,
                )
                pool.ledger.give_back_answered(c.tenant, k, 0)
                fut.cancel()

    def _gave_back(self, conn: _Conn, msg: Message) -> None:
        gid = msg.get("id")
        fut = conn.waiting.pop(gid, None) if isinstance(gid, int) else None
        asked = conn.asked.pop(gid, 0) if isinstance(gid, int) else 0
        try:
            pages = protocol.int_list(msg, "pages")
            if conn.tenant is None or conn.gpu is None:
                raise ProtocolError("'gave_back' before 'hello'")
            pool = self.pools[conn.gpu]
            self._take_back(conn, pool, pages)
            pool.ledger.give_back_answered(conn.tenant, asked, len(pages))
        except (ProtocolError, LedgerError) as e:
            log.warning("KV pool: bad give-back from %s: %s", conn.label(), e)
            pages = []
        if fut is not None and not fut.done():
            fut.set_result(len(pages))

    def _take_back(self, conn: _Conn, pool: KVPool, pages: list[int]) -> None:
        assert conn.tenant is not None
        foreign = sorted(set(pages) - conn.pages)
        if foreign:
            raise LedgerError(
                f"{conn.label()} returned pages it was not lent on this connection: {foreign[:8]}"
            )
        pool.release(conn.tenant, pages)
        conn.pages.difference_update(pages)
        pool.shrink()
        self._notify()

    # -- sending -------------------------------------------------------------------

    async def _send(self, conn: _Conn, msg: Message, fds: Sequence[int] = ()) -> None:
        if conn.closed:
            return
        data = protocol.encode(msg)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn.sock.sendmsg([data], anc)
                return
            except (BlockingIOError, InterruptedError):
                ready = loop.create_future()
                loop.add_writer(conn.sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(conn.sock.fileno())
            except OSError as e:
                self._drop(conn, f"write failed: {e}")
                return

    # -- endings ---------------------------------------------------------------------

    def _drop(self, conn: _Conn, why: str, *, hold_back: bool = True) -> None:
        if conn.closed:
            return
        conn.closed = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(conn.sock.fileno())
        conn.sock.close()
        self._conns.discard(conn)
        if conn.worker is not None and conn.worker is not asyncio.current_task():
            conn.worker.cancel()
        for fut in conn.waiting.values():
            if not fut.done():
                fut.set_result(0)
        if conn.tenant is not None and conn.gpu is not None and conn.pages:
            self._pages_of_gone_client(conn, why, hold_back)
        self._notify()

    def _pages_of_gone_client(self, conn: _Conn, why: str, hold_back: bool) -> None:
        assert conn.tenant is not None and conn.gpu is not None
        pidfd = _pidfd(conn.peer.pid) if hold_back else None
        if pidfd is not None and not _exited(pidfd):
            # The process lives on and may still map these pages: lend them again only
            # once it has exited.
            log.warning(
                "KV pool: %s: %s while holding %d pages; they come back when it exits",
                conn.label(),
                why,
                len(conn.pages),
            )
            self._held_back[pidfd] = (conn.gpu, conn.tenant, set(conn.pages))
            asyncio.get_running_loop().add_reader(pidfd, self._free_held_back, pidfd)
            return
        if pidfd is not None:
            os.close(pidfd)
        pool = self.pools[conn.gpu]
        pages = sorted(conn.pages)
        pool.release(conn.tenant, pages)
        conn.pages.clear()
        pool.shrink()
        log.info("KV pool: %s: %s; took back %d pages", conn.label(), why, len(pages))

    def _free_held_back(self, pidfd: int) -> None:
        gpu, tenant, pages = self._held_back.pop(pidfd)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        pool = self.pools[gpu]
        pool.release(tenant, sorted(pages))
        pool.shrink()
        log.info("KV pool: model %r's process exited; took back %d pages", tenant, len(pages))
        self._notify()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError:
        # No pidfds (old kernel, some sandboxes): fall back to taking pages back at once.
        return None


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)
