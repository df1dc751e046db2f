"""One in-flight call per key, shared by every caller that asks meanwhile.

Used for wake-on-request: twenty requests for an asleep model must cause one
wake, not twenty. Must never hold a result after the call finished (a later
call runs again) and must never let one impatient caller cancel the shared
call for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Deduplicate concurrent async calls by key.

    `await flight.run(key, fn)` starts `fn()` as a task unless a call for
    `key` is already running, and waits for that call's result (or error).
    A caller that is cancelled stops waiting; the call goes on for the others
    (it is shielded). `cancel(key)` stops it for everyone, e.g. when the
    reconciler unloads the model instead.
    """

    __slots__ = ("_calls", "started")

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[T]] = {}
        self.started = 0  # calls actually started: the tests count wakes with it

    def running(self, key: K) -> bool:
        return key in self._calls

    async def run(self, key: K, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(_call(fn))
            self._calls[key] = task
            self.started += 1
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def cancel(self, key: K) -> bool:
        task = self._calls.get(key)
        return task is not None and task.cancel()

    def _done(self, key: K, task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        # Mark the error as seen: when every waiter gave up, nobody else will.
        if not task.cancelled():
            task.exception()


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
