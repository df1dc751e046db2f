"""The engine's side of the KV pool: a small synchronous client of gpud's page socket.

An engine process (later: the vLLM plugin inside EngineCore) connects to
``GPUD_KV_SOCKET`` as model ``GPUD_TENANT``, asks for pages and receives one
fd per page with the page's number and offset, maps them itself (on a GPU:
``cuda.PageMapper``), and returns pages it no longer needs. gpud may ask it
to give pages back at any time: the ``on_give_back`` handler unmaps up to
the number asked and returns the page numbers it freed. Those requests are
answered while the client waits for its own replies, and by ``poll()``,
which the engine calls from its own loop (or when ``fileno()`` is readable).

It is synchronous and thread-unsafe on purpose: the plugin calls it from
EngineCore's one busy-loop thread. It must never import asyncio, CUDA or
anything of gpud's daemon: engines run in their own virtualenv with only
this package's ``kvpool`` modules.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpud.kvpool import protocol
from gpud.kvpool.protocol import Message

#: n -> page numbers given back (unmapped already), at most n; may be fewer, even none.
GiveBackHandler = Callable[[int], Sequence[int]]


class KVPoolError(RuntimeError):
    """gpud refused a request, or the connection to it broke."""


@dataclass
class GrantedPage:
    """One page lent to this process. ``fd`` is ours to import and close (None: no backend)."""

    page: int
    offset: int
    fd: int | None

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class GrantResult:
    pages: list[GrantedPage]
    refused: int
    reason: str


class KVPoolClient:
    """One connection to gpud's KV pool, as one model on one GPU."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        tenant: str,
        gpu: int = 0,
        *,
        on_give_back: GiveBackHandler | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.tenant = tenant
        self.gpu = gpu
        self.timeout = timeout
        self.on_give_back = on_give_back
        self.held: set[int] = set()
        self._next_id = 1
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(os.fspath(path))
        except OSError as e:
            self._sock.close()
            raise KVPoolError(f"cannot reach gpud's KV pool at {os.fspath(path)}: {e}") from e
        welcome, _ = self._call(
            {"op": "hello", "tenant": tenant, "gpu": gpu, "version": protocol.VERSION}
        )
        self.page_size: int = welcome["page_size"]
        self.backend: str = welcome["backend"]

    @classmethod
    def from_env(cls, on_give_back: GiveBackHandler | None = None) -> KVPoolClient:
        """Connect as gpud told this engine to: GPUD_KV_SOCKET, GPUD_TENANT, GPUD_GPU."""
        try:
            path, tenant = os.environ["GPUD_KV_SOCKET"], os.environ["GPUD_TENANT"]
        except KeyError as e:
            raise KVPoolError(f"{e.args[0]} is not set: was this engine started by gpud?") from e
        return cls(path, tenant, int(os.environ.get("GPUD_GPU", "0")), on_give_back=on_give_back)

    # -- requests ------------------------------------------------------------------

    def grant(self, n: int) -> GrantResult:
        """Ask for ``n`` pages; blocks until gpud has lent what it can (maybe after give-backs)."""
        rid = self._send_request({"op": "grant", "pages": n})
        pages: list[GrantedPage] = []
        try:
            while True:
                msg, fds = self._reply(rid)
                if msg["op"] == "pages":
                    pages.extend(self._pages(msg, fds))
                elif msg["op"] == "granted":
                    return GrantResult(pages, int(msg["refused"]), str(msg["reason"]))
                else:
                    raise KVPoolError(f"unexpected reply {msg['op']!r} to a grant")
        except BaseException:
            for p in pages:
                p.close_fd()
            raise

    def give_back(self, pages: Sequence[int]) -> None:
        """Return pages (already unmapped here) to gpud."""
        pages = list(pages)
        if not pages:
            return
        self._call({"op": "return", "pages": pages})
        self.held.difference_update(pages)

    def status(self) -> dict[str, object]:
        msg, _ = self._call({"op": "status"})
        status: dict[str, object] = msg["status"]
        return status

    def poll(self, timeout: float | None = 0.0) -> int:
        """Answer give-back requests that have arrived; wait up to ``timeout`` s for one.

        Returns how many requests were answered. ``timeout=None`` waits until one comes.
        """
        handled = 0
        wait = timeout
        while True:
            ready, _, _ = select.select([self._sock], [], [], wait)
            if not ready:
                return handled
            msg, fds = self._recv()
            _close_all(fds)
            if msg["op"] != "give_back":
                raise KVPoolError(f"unexpected message {msg['op']!r} from gpud")
            self._answer_give_back(msg)
            handled += 1
            wait = 0.0

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self, return_pages: bool = True) -> None:
        """Close; with ``return_pages`` first return every page held (unmap them before)."""
        try:
            if return_pages and self.held:
                self.give_back(sorted(self.held))
        finally:
            self._sock.close()

    def __enter__(self) -> KVPoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _pages(self, msg: Message, fds: list[int]) -> list[GrantedPage]:
        pairs = msg["pages"]
        if fds and len(fds) != len(pairs):
            _close_all(fds)
            raise KVPoolError(f"gpud sent {len(pairs)} pages with {len(fds)} fds")
        out = [
            GrantedPage(page=int(p), offset=int(off), fd=fds[i] if fds else None)
            for i, (p, off) in enumerate(pairs)
        ]
        self.held.update(g.page for g in out)
        return out

    def _answer_give_back(self, msg: Message) -> None:
        n = protocol.count(msg, "pages")
        given = list(self.on_give_back(n)) if self.on_give_back is not None else []
        stray = sorted(set(given) - self.held)
        if stray or len(given) > n:
            raise KVPoolError(
                f"the give-back handler returned {len(given)} pages for {n} asked, "
                f"{len(stray)} of them not held here: {stray[:8]}"
            )
        self._send({"op": "gave_back", "id": msg["id"], "pages": given})
        self.held.difference_update(given)

    def _call(self, msg: Message) -> tuple[Message, list[int]]:
        return self._reply(self._send_request(msg))

    def _send_request(self, msg: Message) -> int:
        rid = self._next_id
        self._next_id += 1
        self._send({**msg, "id": rid})
        return rid

    def _send(self, msg: Message) -> None:
        try:
            self._sock.sendall(protocol.encode(msg))
        except OSError as e:
            raise KVPoolError(f"lost the connection to gpud's KV pool: {e}") from e

    def _reply(self, rid: int) -> tuple[Message, list[int]]:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._sock], [], [], max(0.0, left))
            if not ready:
                raise KVPoolError(f"gpud's KV pool did not answer within {self.timeout:g}s")
            msg, fds = self._recv()
            if msg["op"] == "give_back":
                _close_all(fds)
                self._answer_give_back(msg)
                continue
            if msg.get("id") != rid:
                _close_all(fds)
                raise KVPoolError(f"reply {msg['op']!r} for request {msg.get('id')}, not {rid}")
            if msg["op"] == "error":
                _close_all(fds)
                raise KVPoolError(f"gpud's KV pool refused: {msg.get('error')}")
            return msg, fds

    def _recv(self) -> tuple[Message, list[int]]:
        fds_size = socket.CMSG_SPACE(protocol.MAX_FDS_PER_MESSAGE * 4)
        try:
            data, ancdata, _flags, _ = self._sock.recvmsg(
                protocol.MAX_MESSAGE, fds_size, socket.MSG_CMSG_CLOEXEC
            )
        except OSError as e:
            raise KVPoolError(f"lost the connection to gpud's KV pool: {e}") from e
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            _close_all(list(fds))
            raise KVPoolError("gpud closed the KV pool connection")
        try:
            return protocol.decode(data), list(fds)
        except protocol.ProtocolError as e:
            _close_all(list(fds))
            raise KVPoolError(f"gpud sent a bad message: {e}") from e


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
