"""Per-model admission: `max_concurrency` in flight, then a FIFO queue.

Pure bookkeeping on the event loop (no locks: one thread). The limits are
passed on every `acquire`, so a reload that raises `max_concurrency` lets
queued requests in at once, and one that lowers it only slows admission.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class QueueFull(Exception):
    """The model's queue already holds `max_queue` requests."""


class ModelGate:
    """Slots and FIFO queue of one model."""

    __slots__ = ("_queue", "inflight", "last_request", "max_concurrency")

    def __init__(self) -> None:
        self.inflight = 0
        self.max_concurrency = 1
        self.last_request: float | None = None
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def try_acquire(self, max_concurrency: int) -> bool:
        """Take a slot if one is free and nobody queues before us (FIFO)."""
        self.max_concurrency = max_concurrency
        if self._queue:
            self._admit()
        if self.inflight < max_concurrency and not self._queue:
            self.inflight += 1
            return True
        return False

    async def acquire(self, max_concurrency: int, max_queue: int) -> None:
        """Wait for a slot in FIFO order; `QueueFull` when the queue is full.

        Cancel the waiting task (e.g. with `asyncio.timeout`) to give up.
        """
        if self.try_acquire(max_concurrency):
            return
        if len(self._queue) >= max_queue:
            raise QueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed over as we were cancelled: pass it on.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(fut)
            raise

    def release(self) -> None:
        self.inflight -= 1
        if self._queue:
            self._admit()

    def _admit(self) -> None:
        queue = self._queue
        while queue and self.inflight < self.max_concurrency:
            fut = queue.popleft()
            if not fut.done():
                self.inflight += 1
                fut.set_result(None)
