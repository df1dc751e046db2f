"""Observation: the engines' own answers (`/is_sleeping`) over gpud's memory of what it asked,
adoption of engines that outlived a gpud restart, and stopping everything at exit.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from gpud.engines.records import (
    adopt,
    find_records,
    stop_duplicate,
    write_record,
)
from gpud.engines.vllm import (
    EngineAPIError,
    VllmClient,
)
from gpud.instance import (
    HEALTH_FAILURES,
    OBSERVE_AT_LEAST,
    OBSERVE_QUIET,
    Instance,
    LoopState,
)
from gpud.states import RUNNING, State

log = logging.getLogger("gpud.reconcile")


class Observation(LoopState):
    """The reconciler's observation, adoption and stop."""

    async def observe(self) -> None:
        """Trust the engines' own answers over our memory of what we asked."""
        mono = time.monotonic()
        checks = [i for i in self.instances.values()
                  if i.state in RUNNING and i.client and i.key not in self._tasks
                  and not self._answered_lately(i, mono)]
        if not checks:
            return

        async def one(inst: Instance) -> None:
            assert inst.client is not None
            asked_at = time.time()
            try:
                sleeping = await asyncio.wait_for(inst.client.is_sleeping(), 5.0)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # A dead leader is seen at once through its pidfd; this catches a hung one.
                inst.health_failures += 1
                if inst.health_failures >= HEALTH_FAILURES and inst.proc is not None:
                    log.error("%s: engine pid %d has not answered for %d checks (%s); killing "
                              "it to restart", inst.key, inst.proc.pid, inst.health_failures,
                              type(exc).__name__)
                    inst.last_error = "not answering its API"
                    inst.proc.kill()
                return
            inst.health_failures = 0
            inst.observed_at = time.monotonic()
            if inst.key in self._tasks or inst.state_since >= asked_at:
                return  # an action changed it while we asked: the answer is stale
            actual = State.ASLEEP if sleeping else State.AWAKE
            if actual != inst.state:
                log.warning("%s: engine says %s, gpud thought %s", inst.key, actual, inst.state)
                if sleeping:  # slept behind gpud's back: at a level gpud did not choose
                    inst.sleep_level, inst.queues_asleep = None, False
                inst.change_state(actual, f"engine reports {actual}")

        await asyncio.gather(*(one(i) for i in checks))

    def _answered_lately(self, inst: Instance, mono: float) -> bool:
        """Skip asking: the engine is serving or just answered (but not for too long)."""
        if mono - inst.observed_at >= OBSERVE_AT_LEAST:
            return False
        t = self.traffic.get(inst.model)
        if t is not None and (t.inflight or mono - t.last_request < OBSERVE_QUIET):
            return True
        return mono - inst.answered_at < OBSERVE_QUIET

    async def adopt_engines(self) -> list[str]:
        """After a gpud restart: take back engines that are still alive; clean stale records."""
        adopted = []
        records, twice = find_records(self.runtime_dir, self.state_dir)
        for record in twice:
            await stop_duplicate(record)
        for record in records:
            proc = adopt(record, self.runtime_dir)
            if proc is None:
                continue
            write_record(self.runtime_dir, record)  # back, if it came from /proc
            key = record.model
            model = key.split("#", 1)[0]
            replica = int(key.split("#", 1)[1]) if "#" in key else 0
            inst = self.instances.get(key) or self._instance(key, model, replica)
            self.instances[key] = inst
            inst.proc, inst.port, inst.spec_hash = proc, record.port, record.spec_hash
            inst.client = VllmClient(inst.base_url or "", self.session)
            inst.started_at = record.started_at
            inst.slept_once = True
            d = self.desired().get(key)
            inst.gpu = d.gpu if d else None
            self._watch_exit(inst, proc)
            try:
                sleeping = await asyncio.wait_for(inst.client.is_sleeping(), 5.0)
                if sleeping:
                    await self._adopted_asleep(inst)
                inst.change_state(State.ASLEEP if sleeping else State.AWAKE,
                                  "adopted after a gpud restart")
            except (aiohttp.ClientError, TimeoutError, OSError, EngineAPIError):
                inst.change_state(State.STARTING, "adopted; waiting for its health check")
                self._tasks[key] = asyncio.create_task(self._finish_adopt(inst))
            adopted.append(key)
            self.events.publish("adopted", model=key, pid=proc.pid, port=record.port)
            log.info("%s: adopted engine pid %d on port %d", key, proc.pid, record.port)
        return adopted

    async def _adopted_asleep(self, inst: Instance) -> None:
        """The level an adopted engine sleeps at is not recorded: its metrics say (None:
        asked again at wake time), and at level 1 whether it queues requests meanwhile."""
        assert inst.client is not None
        try:
            level = await inst.client.sleep_state_from_metrics()
        except (EngineAPIError, aiohttp.ClientError, TimeoutError):
            level = None
        inst.sleep_level = level if level in (1, 2) else None
        inst.queues_asleep = inst.sleep_level == 1 and await self._queues_asleep(inst)

    async def _finish_adopt(self, inst: Instance) -> None:
        try:
            assert inst.proc is not None and inst.client is not None
            ok = await inst.proc.wait_healthy(inst.client, 900)
            if ok:
                sleeping = await inst.client.is_sleeping()
                if sleeping:
                    await self._adopted_asleep(inst)
                inst.change_state(State.ASLEEP if sleeping else State.AWAKE,
                                  "adopted after a gpud restart")
        finally:
            self._tasks.pop(inst.key, None)
            self.trigger()

    async def stop_all(self, stop_engines: bool) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if stop_engines:
            await asyncio.gather(*(self._unload(i, "gpud stopped")
                                   for i in self.instances.values() if i.proc))
        else:
            for inst in self.instances.values():
                if inst.proc is not None:
                    inst.proc.close()
        if self._session is not None:
            await self._session.close()
