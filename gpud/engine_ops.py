"""Engine operations of the loop: start (load), blue-green move, sleep, wake, stop an engine
and supervise it (exit callbacks, RestartPolicy backoff). Runs inside action tasks the loop
started; changes an instance only through `change_state`. Never plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import aiohttp

from gpud.config.units import format_duration
from gpud.desired import (
    DesiredModel,
    Layers,
    effective,
)
from gpud.engines.phases import LoadPhases
from gpud.engines.process import (
    EngineError,
    EngineExited,
    EngineProcess,
    EngineStartTimeout,
    allocate_port,
)
from gpud.engines.records import (
    EngineRecord,
    remove_record,
    tag_env,
    write_record,
)
from gpud.engines.spec import EngineSpec
from gpud.engines.vllm import (
    EngineAPIError,
    VllmClient,
    build_argv,
    build_env,
    request_sent_trace,
)
from gpud.instance import (
    Instance,
    LoopState,
)
from gpud.states import State

log = logging.getLogger("gpud.reconcile")


class EngineOps(LoopState):
    """The reconciler's engine operations and their supervision."""

    def _gpu_lock(self, inst: Instance,
                  d: DesiredModel | None) -> contextlib.AbstractAsyncContextManager[Any]:
        # Loads on one GPU wait for each other while vLLM measures free memory to size its
        # KV cache; a model with an explicit KV budget skips that profiling and may overlap.
        if inst.gpu is None or d is None:
            return contextlib.nullcontext()
        m = self.config.models.get(inst.model)
        if m is not None and (m.kv_cache is not None or m.kv_max is not None):
            return contextlib.nullcontext()
        return self._gpu_locks.setdefault(inst.gpu, asyncio.Lock())

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                trace_configs=[request_sent_trace()])
        return self._session

    def spec_for(self, d: DesiredModel) -> EngineSpec:
        m = self.config.models[d.model]
        engine = self.config.engines[m.engine]
        kv = m.kv_cache if m.kv_cache is not None else m.kv_max
        env = {**engine.env, **m.env}
        if m.uses_pool:
            # The engine's KV cache grows from gpud's pool pages (the gpud_vllm plugin);
            # its capacity is kv_max, lent page group by page group.
            from gpud.kvpool.engine_env import pool_engine_env

            pe = pool_engine_env(d.model, d.gpu, self.runtime_dir, kv_min=m.kv_min,
                                 kv_max=m.kv_max)
            env.update(pe.env)
            kv = pe.kv_cache_bytes
        return EngineSpec(
            model=d.model, command=tuple(engine.command), source=m.source,
            served_model_name=d.model, gpu=d.gpu, max_model_len=m.max_model_len,
            sleep_mode=engine.sleep_mode, kv_cache_bytes=kv,
            gpu_memory_utilization=m.gpu_memory_utilization, args=tuple(m.args),
            env=tuple(env.items()),
        )

    def _tagged(self, env: dict[str, str], key: str, port: int, spec_hash: str) -> dict[str, str]:
        """The engine's env with its adoption record, found in /proc if the runtime dir goes."""
        return tag_env(env, self.state_dir, key, port, spec_hash, self.log_dir / f"{key}.log")

    def _taken_ports(self) -> set[int]:
        return {i.port for i in self.instances.values() if i.port}

    async def _load(self, inst: Instance, d: DesiredModel) -> bool:
        cfg = self.config
        m = cfg.models[d.model]
        engine = cfg.engines[m.engine]
        spec = self.spec_for(d)
        lo, hi = cfg.daemon.ports
        port = m.port if (m.port and d.replica == 0) else allocate_port(lo, hi, self._taken_ports())
        if inst.crashed_spec is not None and inst.crashed_spec != d.spec_hash:
            inst.restarts, inst.crashed_spec = 0, None  # a new config: old crashes say nothing
        inst.port, inst.spec_hash, inst.gpu = port, d.spec_hash, d.gpu
        inst.sleep_level = d.sleep_level
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = build_argv(spec, port)
        env = self._tagged(build_env(spec, dict(os.environ)), inst.key, port, d.spec_hash)
        log.info("%s: starting engine on port %d: %s", inst.key, port, " ".join(argv))
        started = time.monotonic()
        try:
            proc = EngineProcess.spawn(inst.key, argv, env, self.log_dir,
                                       log_bytes=self.config.daemon.engine_log_size,
                                       log_files=self.config.daemon.engine_log_files)
        except EngineError as exc:
            self._failed_start(inst, str(exc))
            return False
        inst.proc, inst.expect_exit = proc, False
        inst.client = VllmClient(inst.base_url or "", self.session)
        inst.started_at = time.time()
        self._follow_phases(inst, proc)
        self._watch_exit(inst, proc)
        write_record(self.runtime_dir, EngineRecord.of(proc, port, d.spec_hash))
        try:
            await proc.wait_healthy(inst.client, engine.startup_timeout.total_seconds())
        except EngineExited:
            return False  # the exit callback has recorded the cause and scheduled a retry
        except EngineStartTimeout:
            _, detail = proc.crash_cause()
            inst.expect_exit = True
            await proc.stop(engine.stop_timeout.total_seconds())
            self._failed_start(inst, f"not healthy within "
                               f"{format_duration(engine.startup_timeout)} (log: {detail})")
            return False
        if not await self._is_ours(inst.base_url or "", d.model):
            inst.expect_exit = True
            await proc.stop(engine.stop_timeout.total_seconds())
            self._failed_start(inst, f"port in use: another server answers on port {port}")
            return False
        duration = time.monotonic() - started
        self.events.publish("loaded", model=inst.key, duration=round(duration, 2))
        inst.backoff.succeeded()
        inst.last_error = None
        inst.change_state(State.AWAKE, d.reason)
        if (engine.sleep_mode and engine.warm_sleep and not inst.slept_once
                and d.state == State.AWAKE):
            # vLLM's first sleep allocates the pinned host buffer (seconds for an 8B model);
            # pay it now, while nothing waits, so the first sleep a schedule needs is quick.
            await self._warm_sleep(inst)
        return True

    def _follow_phases(self, inst: Instance, proc: EngineProcess) -> None:
        """Phases of this load from the engine's log lines, each one a `phase` event."""
        load = inst.load = LoadPhases(time.time())

        def line(text: str) -> None:
            if inst.load is not load or inst.state != State.STARTING:
                proc.on_line = None  # this load is over
                return
            before, since = load.phase, load.since
            now = time.time()
            if load.feed(text, now):
                self.events.publish("phase", model=inst.key, phase=load.phase,
                                    previous=before, seconds=round(now - since, 1),
                                    elapsed=round(now - load.started, 1))

        proc.on_line = line

    async def _is_ours(self, base_url: str, served: str) -> bool:
        """The server on our port serves our model (not another engine that took the port)."""
        try:
            async with self.session.get(base_url + "/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
                data = await resp.json()
            return any(m.get("id") == served for m in data.get("data", []))
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return False

    async def _move(self, inst: Instance, d: DesiredModel) -> bool:
        """Blue-green: start the new engine, switch routing to it, drain the old, stop it.

        Requests keep flowing to the old engine until the new one answers; if the new one
        fails, the old one keeps serving and the reason says why.
        """
        cfg = self.config
        m = cfg.models[d.model]
        engine = cfg.engines[m.engine]
        old_proc, old_url, old_gpu = inst.proc, inst.base_url, inst.gpu
        lo, hi = cfg.daemon.ports
        port = allocate_port(lo, hi, self._taken_ports() | {inst.port or 0})
        spec = self.spec_for(d)
        t0 = time.monotonic()
        self.events.publish("move", model=inst.key, phase="starting", gpu=d.gpu, previous=old_gpu)
        try:
            env = self._tagged(build_env(spec, dict(os.environ)), inst.key, port, d.spec_hash)
            proc = EngineProcess.spawn(inst.key, build_argv(spec, port), env, self.log_dir,
                                       log_bytes=self.config.daemon.engine_log_size,
                                       log_files=self.config.daemon.engine_log_files)
        except EngineError as exc:
            return self._move_failed(inst, d, str(exc))
        client = VllmClient(f"http://127.0.0.1:{port}", self.session)
        try:
            await proc.wait_healthy(client, engine.startup_timeout.total_seconds())
        except (EngineExited, EngineStartTimeout) as exc:
            proc.kill()
            await proc.wait()
            return self._move_failed(inst, d, str(exc))
        if not await self._is_ours(f"http://127.0.0.1:{port}", d.model):
            proc.kill()
            await proc.wait()
            return self._move_failed(inst, d, f"port in use: another server on port {port}")
        # Switch: new requests go to the new engine from here on.
        inst.proc, inst.port, inst.client = proc, port, client
        inst.spec_hash, inst.gpu, inst.started_at = d.spec_hash, d.gpu, time.time()
        self._watch_exit(inst, proc)
        write_record(self.runtime_dir, EngineRecord.of(proc, port, d.spec_hash))
        inst.change_state(State.MOVING,
                          f"moved to GPU {d.gpu}; draining the old engine on GPU {old_gpu}")
        self.events.publish("move", model=inst.key, phase="switched", gpu=d.gpu)
        drained = await self.drain(old_url, m.drain_timeout.total_seconds())
        if old_proc is not None:
            await old_proc.stop(engine.stop_timeout.total_seconds())
        took = time.monotonic() - t0
        inst.change_state(State.AWAKE, f"moved from GPU {old_gpu} to GPU {d.gpu} in {took:.1f}s"
                       + ("" if drained else " (drain timed out)"))
        self.events.publish("move", model=inst.key, phase="done", gpu=d.gpu,
                            duration=round(took, 2), drained=drained)
        return True

    def _move_failed(self, inst: Instance, d: DesiredModel, why: str) -> bool:
        inst.last_error = why
        # The old engine keeps serving, so a failed move never gives up: it waits at most cap.
        delay = self._backoff(inst)
        self._retry_in(inst, delay if delay is not None else inst.backoff.cap)
        inst.change_state(State.AWAKE, f"move to GPU {d.gpu} failed, still serving on GPU "
                          f"{inst.gpu}: {why}")
        self.events.publish("move", model=inst.key, phase="failed", error=why)
        return False

    def _backoff(self, inst: Instance) -> float | None:
        """Seconds before the next start after a failure, None to give up (RestartPolicy,
        with the engine's settings of the config in force)."""
        m = self.config.models.get(inst.model)
        engine = self.config.engines[m.engine] if m is not None else None
        b = inst.backoff
        if engine is not None:
            b.initial = engine.restart_backoff.total_seconds()
            b.cap = max(b.initial, engine.restart_backoff_max.total_seconds())
            b.max_tries = engine.max_restarts
        else:
            b.max_tries = 0
        return b.crashed(self._mono())

    def _retry_in(self, inst: Instance, delay: float) -> None:
        inst.retry_at = self._mono() + delay
        asyncio.get_running_loop().call_later(delay, self.trigger)

    async def _warm_sleep(self, inst: Instance) -> None:
        client = inst.client
        if client is None:
            return
        t = self.traffic.get(inst.model)
        if t and t.inflight:
            return
        t0 = time.monotonic()
        try:
            inst.awake.clear()
            await client.sleep(1)
            slept = time.monotonic() - t0
            await client.wake_up()
            inst.slept_once = True
            # The figure it hides (bench/gpu measures it): vLLM's first sleep, seconds for 8B.
            self.events.publish("warm_sleep", model=inst.key, sleep=round(slept, 3),
                                duration=round(time.monotonic() - t0, 3))
        except (aiohttp.ClientError, TimeoutError, EngineAPIError) as exc:
            log.warning("%s: warm-up sleep/wake failed: %s", inst.key, exc)
        finally:
            if inst.state == State.AWAKE:
                inst.awake.set()
                # Requests that arrived meanwhile wait in _bring_up on `changed`: release
                # them now rather than at their next 1 s poll.
                inst.changed.set()
                inst.changed = asyncio.Event()

    def _failed_start(self, inst: Instance, why: str) -> None:
        inst.last_error = why
        inst.proc, inst.port, inst.client = None, None, None  # no engine listens there
        remove_record(self.runtime_dir, inst.key)
        delay = self._backoff(inst)
        tries = inst.backoff.consecutive
        if delay is None:
            inst.change_state(State.FAILED, f"failed: {why} (gave up after {tries + 1} tries)")
            self.events.publish("failed", model=inst.key, reason=inst.reason)
            return
        self._retry_in(inst, delay)
        inst.change_state(State.UNLOADED,
                          f"{why}; retry {tries}/{inst.backoff.max_tries} in {delay:.0f}s")

    def _watch_exit(self, inst: Instance, proc: EngineProcess) -> None:
        def exited(_: EngineProcess) -> None:
            if inst.proc is not proc or inst.expect_exit:
                return
            cause, detail = proc.crash_cause()
            if inst.crashed_spec != inst.spec_hash:
                inst.restarts, inst.crashed_spec = 0, inst.spec_hash
            inst.restarts += 1
            self.events.publish("crashed", model=inst.key, pid=proc.pid, cause=cause,
                                detail=detail)
            starting = inst.state == State.STARTING
            # spec_hash stays: a `failed` model is retried only when its spec changes.
            inst.port, inst.client = None, None
            # The process layer ends the rest of the group (EngineCore, workers) itself.
            self._failed_start(inst, f"{cause}: {detail}" if detail else cause)
            task = self._tasks.get(inst.key)
            if task is not None and not starting:
                task.cancel()
            self.trigger()

        proc.add_exit_callback(exited)

    async def _sleep(self, inst: Instance, level: int, reason: str) -> bool:
        if inst.client is None:
            return False
        t0 = time.monotonic()
        await inst.client.sleep(level)
        inst.slept_once = True
        inst.sleep_level = level
        inst.queues_asleep = level == 1 and await self._queues_asleep(inst)
        inst.change_state(State.ASLEEP, reason)
        self.events.publish("slept", model=inst.key, level=level,
                            duration=round(time.monotonic() - t0, 3))
        return True

    async def _queues_asleep(self, inst: Instance) -> bool:
        """Ask a sleeping engine whether its scheduler is paused (see `early_upstream`)."""
        if inst.client is None:
            return False
        try:
            return await inst.client.is_paused() is True
        except (EngineAPIError, aiohttp.ClientError, TimeoutError) as exc:
            log.debug("%s: /is_paused: %s", inst.key, exc)
            return False

    async def _wake(self, inst: Instance, reason: str) -> bool:
        if inst.client is None:
            return False
        t0 = time.monotonic()
        inst.sleep_level = await inst.client.wake(inst.sleep_level, sent=inst.wake_sent) or 1
        if inst.model not in self.demand:
            # A wake nobody waits on (pre-wake, schedule, edit): send the engine's slow first
            # requests now (a few, ~2 s at most), so the first user request at the boundary
            # sees awake TTFT. A wake for a waiting request skips it (that request is the
            # warm-up), and a request that comes meanwhile ends it at once.
            m = self.config.models.get(inst.model)
            try:
                await inst.client.warm_up(
                    inst.model, max_model_len=m.max_model_len if m else None,
                    stop=lambda: inst.model in self.demand)
            except EngineAPIError as exc:
                log.warning("%s: warm-up request after wake failed: %s", inst.key, exc)
        inst.change_state(State.AWAKE, reason)
        self.events.publish("woke", model=inst.key, level=inst.sleep_level,
                            duration=round(time.monotonic() - t0, 3))
        return True

    def keep_warm(self, profile: str | None, until: float | None = None) -> None:
        """Right before a boundary: small requests to each model the coming profile wants
        awake that is awake and idle, so the first user request after the switch is hot:
        the warm-up set, then (with `until`, the loop's clock: the boundary) a 1-token
        request every quarter second until then. A user request for the model ends it."""
        now = self.now()
        for key, d in effective(self.config, Layers(profile=profile), now).items():
            inst = self.instances.get(key)
            t = self.traffic.get(d.model)
            if (d.state == State.AWAKE and inst is not None and inst.state == State.AWAKE
                    and inst.client is not None and key not in self._tasks
                    and not (t and t.inflight)):
                asyncio.get_running_loop().create_task(self._keep_warm_one(inst, until))

    async def _keep_warm_one(self, inst: Instance, until: float | None = None) -> None:
        if inst.client is None:
            return
        m = self.config.models.get(inst.model)
        t0 = time.monotonic()
        try:
            n = await inst.client.warm_up(
                inst.model, max_model_len=m.max_model_len if m else None, budget=1.0,
                stop=lambda: bool((t := self.traffic.get(inst.model)) and t.inflight),
                until=until)
        except (EngineAPIError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: keep-warm request failed: %s", inst.key, exc)
            return
        inst.answered_at = time.monotonic()
        self.events.publish("keep_warm", model=inst.key, requests=n,
                            duration=round(time.monotonic() - t0, 3))

    async def _unload(self, inst: Instance, reason: str) -> None:
        proc = inst.proc
        if proc is not None:
            inst.expect_exit = True
            m = self.config.models.get(inst.model)
            grace = self.config.engines[m.engine].stop_timeout.total_seconds() if m else 30.0
            await proc.stop(grace)
        remove_record(self.runtime_dir, inst.key)
        inst.proc, inst.client, inst.port, inst.spec_hash = None, None, None, None
        inst.slept_once = False
        inst.backoff.reset()
        inst.change_state(State.UNLOADED, reason)
