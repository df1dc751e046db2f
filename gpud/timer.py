"""The schedule's timer: APScheduler wakes the loop at boundaries and pre-wake instants; the
loop decides what they mean. Just before a boundary, pre-woken models get small requests up
to it (keep-warm): on the H100 the first request after ~30 s of quiet is 1.2-1.5x slower even
on an engine that never slept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpud.reconcile import Reconciler

KEEP_WARM_BEFORE = timedelta(seconds=1.5)


class BoundaryTimer:
    def __init__(self, reconciler: Reconciler, clock_offset: Callable[[], timedelta]) -> None:
        self.reconciler = reconciler
        # wall clock = the loop's clock - offset (a test clock may stand elsewhere)
        self.clock_offset = clock_offset
        self.scheduler: Any = None
        self._armed: object = None

    def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.scheduler = AsyncIOScheduler()
        self.scheduler.start()
        self.reconciler.on_pass.append(self.arm)

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)

    def rearm(self) -> None:
        """The clock jumped (tests): arm again at the next pass."""
        self._armed = None

    def arm(self) -> None:
        r = self.reconciler
        nb = r.next_boundary(r.now())
        key = (nb.at, nb.prewake) if nb else None
        if key == self._armed or self.scheduler is None:
            return
        self._armed = key
        self.scheduler.remove_all_jobs()
        if nb is None:
            return
        now, offset = r.now(), self.clock_offset()

        # Coroutine jobs: APScheduler runs plain functions in a thread pool, and waking the
        # loop (an asyncio.Event) must happen on the loop's own thread.
        async def wake_loop() -> None:
            r.trigger()

        async def keep_warm() -> None:
            # until the boundary, on the loop's clock (the schedule's may be a test clock)
            left = (nb.at - r.now()).total_seconds()
            r.keep_warm(nb.profile, until=asyncio.get_running_loop().time() + left)

        for i, at in enumerate(sorted({nb.at - nb.prewake, nb.at})):
            if at > now:
                self.scheduler.add_job(wake_loop, "date", run_date=at - offset,
                                       id=f"boundary-{i}", misfire_grace_time=None)
        warm_at = nb.at - KEEP_WARM_BEFORE
        if nb.prewake > KEEP_WARM_BEFORE and warm_at > now:
            self.scheduler.add_job(keep_warm, "date", run_date=warm_at - offset,
                                   id="keep-warm", misfire_grace_time=None)
