"""A bounded in-memory event history with live subscribers (the API's SSE stream).

Events are plain JSON-able dicts with a sequence number and a time; late subscribers get the
recent history first. Never blocks the publisher: a slow subscriber loses events, not gpud.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any


class EventBus:
    def __init__(self, history: int = 500) -> None:
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._seq = 0

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        event = {"seq": self._seq, "time": time.time(), "kind": kind, **fields}
        self._history.append(event)
        for queue in list(self._subscribers):
            # A stalled client misses events; it resyncs from status.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)
        return event

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        items = list(self._history)
        return items[-limit:] if limit else items

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)
