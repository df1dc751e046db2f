"""The reconcile loop: the one owner of observed state.

Level-triggered: every config change, engine event, API action and tick leads to a pass that
computes the effective desired state, plans with the pure planner and starts the actions.
Actions run as tasks (one chain per engine instance; on one GPU one at a time where memory is
measured); their outcome lands back here and the next pass sees it. Nothing else writes
observed state: the proxy and the API read snapshots and send requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from gpud.config import LoadedConfig, zone_of
from gpud.config.units import format_duration
from gpud.decide import Decision, Memory, decide
from gpud.desired import (
    Composed,
    DesiredModel,
    ForcedProfile,
    Intent,
    LayerInputs,
    Layers,
    Override,
    active_profile,
    compose,
    demand_holds,
    effective,
    quiet_for,
)
from gpud.engines.process import (
    EngineError,
    EngineExited,
    EngineProcess,
    EngineStartTimeout,
    allocate_port,
)
from gpud.engines.records import (
    EngineRecord,
    adopt,
    find_records,
    remove_record,
    stop_duplicate,
    tag_env,
    write_record,
)
from gpud.engines.restart import RestartPolicy
from gpud.engines.spec import EngineSpec
from gpud.engines.vllm import (
    EngineAPIError,
    VllmClient,
    build_argv,
    build_env,
    max_num_seqs,
    request_sent_trace,
)
from gpud.events import EventBus
from gpud.fit import (
    FitResult,
    Footprint,
    FootprintStore,
    GpuMemory,
    estimate_for,
    fit,
    measured_footprint,
)
from gpud.plan import Action, ObservedModel, Plan
from gpud.proxy.api import ModelRoute, ModelUnavailable
from gpud.proxy.singleflight import SingleFlight
from gpud.schedule import Boundary, Schedule, schedule_of
from gpud.states import RUNNING, IllegalTransition, State, legal

log = logging.getLogger("gpud.reconcile")

HEALTH_FAILURES = 5  # consecutive unanswered checks (one per tick) before an engine is killed
# An engine that just answered gpud (an action, a keep-warm) or a user request is not asked
# /is_sleeping for this long: the answer is the observation, and the extra request would land
# on the engine while it serves (the pass right after a wake asked the woken engine while its
# first request was in flight). Every engine is still asked every OBSERVE_AT_LEAST seconds.
OBSERVE_QUIET = 3.0
OBSERVE_AT_LEAST = 15.0
# The state an instance is in while an action runs on it.
DURING = {"load": State.STARTING, "restart": State.STARTING, "wake": State.WAKING,
          "sleep": State.SLEEPING, "unload": State.STOPPING}


@dataclass
class Instance:
    """One engine instance (a model, or one replica of it) as gpud observes it."""

    key: str
    model: str
    replica: int = 0
    state: State = State.UNLOADED
    spec_hash: str | None = None
    gpu: int | None = None
    port: int | None = None
    proc: EngineProcess | None = None
    client: VllmClient | None = None
    restarts: int = 0
    backoff: RestartPolicy = field(default_factory=RestartPolicy)
    retry_at: float = 0.0
    reason: str = ""
    last_error: str | None = None
    state_since: float = field(default_factory=time.time)
    started_at: float | None = None
    slept_once: bool = False
    sleep_level: int | None = 1  # None: not known (adopted asleep); the engine's metrics say
    # The engine queues requests while asleep (its scheduler paused: vLLM 0.17+), so one may
    # be sent to it as its level-1 wake starts and runs the moment it is awake.
    queues_asleep: bool = False
    expect_exit: bool = False
    health_failures: int = 0
    observed_at: float = 0.0  # monotonic: the engine last answered /is_sleeping
    answered_at: float = 0.0  # monotonic: the engine last answered anything gpud sent it
    state_before: State = State.UNLOADED
    awake: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the engine was sent its `/wake_up` (the request's headers left), for the
    # proxy's early send; cleared on every state but awake.
    wake_sent: asyncio.Event = field(default_factory=asyncio.Event)

    # Told of every change of state (the reconciler publishes a `state` event).
    on_change: Callable[[Instance, State], None] | None = field(
        default=None, repr=False, compare=False)

    def change_state(self, state: State, reason: str | None = None) -> None:
        """The one way an instance changes state: an illegal move raises (a gpud bug)."""
        old = self.state
        if not legal(old, state):
            raise IllegalTransition(self.key, old, state)
        if state != old:
            self.state_since = time.time()
        self.answered_at = time.monotonic()
        self.state = state
        if reason is not None:
            self.reason = reason
        if state == State.AWAKE:
            self.awake.set()
        else:
            self.awake.clear()
            self.wake_sent.clear()
        self.changed.set()
        self.changed = asyncio.Event()
        if state != old and self.on_change is not None:
            self.on_change(self, old)

    @property
    def base_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None


def fresh_start(inst: Instance, spec_hash: str) -> None:
    """Forget the crash loop of a spec the file no longer asks for."""
    log.info("%s: spec changed (%s -> %s): starting it now, with a fresh restart count",
             inst.key, inst.spec_hash, spec_hash)
    inst.backoff = RestartPolicy()
    inst.restarts, inst.retry_at = 0, 0.0


@dataclass
class ModelTraffic:
    inflight: int = 0
    last_request: float = 0.0
    requests: int = 0


class Reconciler:
    """Owns instances, overrides and the schedule's view; executes plans."""

    def __init__(self, loaded: LoadedConfig, events: EventBus, *, state_dir: Path,
                 runtime_dir: Path, clock: Callable[[], datetime] | None = None,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.loaded = loaded
        self._mono = mono  # the clock of traffic, backoff and demand (a fake one in tests)
        self.events = events
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.log_dir = state_dir / "logs"
        self.instances: dict[str, Instance] = {}
        self.overrides: dict[str, Override] = {}
        self.forced_profile: ForcedProfile | None = None
        self.intents: dict[str, Intent] = {}
        self.demand: dict[str, float] = {}
        self.traffic: dict[str, ModelTraffic] = {}
        self.last_pass: float = 0.0
        self.last_pass_seconds: float | None = None
        self.max_tick: float | None = None  # set by the daemon from the systemd watchdog
        self.gpus: dict[int, GpuMemory] = {}  # from NVML, set by the daemon; empty without
        self.footprints = FootprintStore(state_dir / "footprints.json")
        self._estimates: dict[str, Footprint | None] = {}
        self.blocked: dict[str, str] = {}
        self.fit_notes: dict[str, str] = {}
        self.pass_count = 0
        self.last_plan: Plan = Plan()
        self.last_decision: Decision | None = None
        self.stalled = False  # set by tests/admin to prove the watchdog watches the loop
        self._clock = clock or (lambda: datetime.now(zone_of(self.loaded.config)))
        self._trigger = asyncio.Event()
        self._urgent = False  # the next pass serves a waiting request: skip observe()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self._wake_flight: SingleFlight[str, None] = SingleFlight()
        self._routes: dict[str, ModelRoute] = {}
        self.outstanding: dict[str, int] = {}
        self._turns: dict[str, int] = {}
        self._drained: dict[str, asyncio.Event] = {}
        self._routes_key: object = None
        self.schedule: Schedule | None = None
        self.last_profile: str | None = None
        self.policy_status: list[dict[str, Any]] = []
        self.on_pass: list[Callable[[], None]] = []
        self._apply_config(loaded)

    # --- configuration ------------------------------------------------------------------

    def _apply_config(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.schedule = schedule_of(loaded.config.schedule, zone_of(loaded.config))
        self._routes_key = None

    def set_config(self, loaded: LoadedConfig) -> None:
        self._apply_config(loaded)
        self.trigger()

    @property
    def config(self) -> Any:
        return self.loaded.config

    def now(self) -> datetime:
        return self._clock()

    # --- the layers (pure: gpud.desired.compose; expiry happens in the loop) --------------

    def layer_inputs(self, mono: float | None = None) -> LayerInputs:
        mono = self._mono() if mono is None else mono
        wall = time.time()
        awake_since = {i.model: mono - (wall - i.state_since) for i in self.instances.values()
                       if i.replica == 0 and i.state == State.AWAKE}
        return LayerInputs(forced=self.forced_profile, intents=dict(self.intents),
                           overrides=dict(self.overrides), demand=dict(self.demand),
                           traffic=dict(self.traffic), awake_since=awake_since)

    def composed(self, now: datetime | None = None) -> Composed:
        return compose(self.config, self.schedule, self.layer_inputs(), now or self.now(),
                       self._mono())

    def active_profile(self, now: datetime) -> tuple[str | None, str]:
        """The profile in force and why (forced by an operator, or the schedule)."""
        return active_profile(self.schedule, self.forced_profile, now)

    def next_boundary(self, now: datetime) -> Boundary | None:
        return self.schedule.next_boundary(now) if self.schedule else None

    def layers(self, now: datetime) -> tuple[Layers, Mapping[str, str]]:
        """The layers above the file, and notes for status (pre-wake)."""
        c = self.composed(now)
        return c.layers, c.notes

    def quiet_for(self, model: str, mono: float) -> float | None:
        return quiet_for(self.layer_inputs(mono), model, mono)

    def desired(self, now: datetime | None = None) -> dict[str, DesiredModel]:
        now = now or self.now()
        return effective(self.config, self.composed(now).layers, now)

    def expire(self, now: datetime, mono: float) -> None:
        """Drop what has run out (a forced profile, overrides, request demand) and say so.
        Only the loop calls this; reads ignore expired entries until then."""
        if self.forced_profile is not None and not self.forced_profile.active(now):
            self.forced_profile = None
            self.events.publish("profile", profile=None, reason="forced profile expired")
        for k in [k for k, v in self.overrides.items() if not v.active(now)]:
            del self.overrides[k]
            self.events.publish("override", model=k, reason="override expired")
        inputs = self.layer_inputs(mono)
        for name in [n for n in self.demand
                     if not demand_holds(self.config, inputs, n, mono)]:
            del self.demand[name]

    def decide(self, now: datetime | None = None, mono: float | None = None) -> Decision:
        """What the loop would do now: the one pipeline (gpud.decide) on this loop's data."""
        mono = self._mono() if mono is None else mono
        memory = Memory(self.gpus, self._footprints) if self.gpus else None
        return decide(self.config, self.schedule, self.layer_inputs(mono), self.observed(),
                      now or self.now(), mono, memory)

    # --- the loop -----------------------------------------------------------------------

    def trigger(self) -> None:
        self._trigger.set()

    async def run(self) -> None:
        while True:
            # The watchdog needs a completed pass at least every ping interval.
            tick = self.config.daemon.tick.total_seconds()
            if self.max_tick is not None:
                tick = min(tick, self.max_tick)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trigger.wait(), timeout=tick)
            self._trigger.clear()
            while self.stalled:  # a test hook: a stuck loop must stop the watchdog pings
                time.sleep(0.05)
            try:
                # A request waits on this pass (wake-on-request): plan at once. Asking every
                # engine /is_sleeping first would add a round trip to that request's first
                # token (the H100 run budgets gpud 5% over a raw ~0.1 s wake); the next
                # pass observes as usual.
                urgent, self._urgent = self._urgent, False
                if not urgent:
                    await self.observe()
                self.pass_once()
            except Exception:
                log.exception("reconcile pass failed; retrying on the next tick")

    def _instance(self, key: str, model: str, replica: int) -> Instance:
        def changed(inst: Instance, previous: State) -> None:
            self.events.publish("state", model=inst.key, state=inst.state.value,
                                previous=previous.value, reason=inst.reason)

        return Instance(key, model, replica, on_change=changed)

    def observed(self) -> dict[str, ObservedModel]:
        out = {}
        for key, inst in self.instances.items():
            t = self.traffic.get(inst.model)
            out[key] = ObservedModel(inst.state, inst.spec_hash, inst.gpu,
                                     busy=bool(t and t.inflight))
        return out

    def pass_once(self) -> Plan:
        t_pass = self._mono()
        now = self.now()
        self.expire(now, t_pass)
        profile, why = self.active_profile(now)
        if profile != self.last_profile:
            self.events.publish("profile", profile=profile, previous=self.last_profile,
                                reason=why)
            log.info("profile %s -> %s (%s)", self.last_profile, profile, why)
            self.last_profile = profile
        for key, d in effective(self.config, self.composed(now).layers, now).items():
            if key not in self.instances:
                self.instances[key] = self._instance(key, d.model, d.replica)
        decision = self.decide(now, t_pass)
        desired = decision.desired
        self.blocked = dict(decision.blocked)
        self.fit_notes = dict(decision.fit_notes)
        result = decision.plan
        self.last_plan = result
        self.last_decision = decision
        mono = self._mono()
        chains: dict[str, list[Action]] = {}
        for action in result.actions:
            chains.setdefault(action.model, []).append(action)
        # On one GPU, memory is freed before it is taken: takes wait for this plan's frees.
        frees: dict[int | None, list[asyncio.Task[None]]] = {}
        for key, actions in chains.items():
            inst = self.instances[key]
            if key in self._tasks:
                continue
            want = desired.get(key)
            crashed = inst.backoff.consecutive or inst.backoff.failed
            if want is not None and crashed and inst.proc is None \
                    and inst.spec_hash != want.spec_hash:
                fresh_start(inst, want.spec_hash)  # a new spec: the old one's crashes say nothing
            if actions[0].action in ("load", "restart") and inst.retry_at > mono:
                continue  # crash backoff; the tick brings us back
            first = actions[0]
            after = [] if first.action in ("sleep", "unload") or first.gpu is None else \
                list(frees.get(first.gpu, []))
            inst.state_before = inst.state
            if first.action == "restart" and inst.state == State.AWAKE and inst.gpu != \
                    desired[key].gpu:
                inst.change_state(State.MOVING, f"moving to GPU {desired[key].gpu}: starting "
                                  "the new engine")
            else:
                inst.change_state(DURING[first.action], first.reason)
            task = asyncio.create_task(
                self._run_chain(inst, actions, desired.get(key), after=after))
            self._tasks[key] = task
            if first.action in ("sleep", "unload"):
                frees.setdefault(first.gpu, []).append(task)
        for key, why in self.blocked.items():
            if key in self.instances and key not in self._tasks:
                self.instances[key].reason = f"does not fit: {why}"
        for key, inst in self.instances.items():
            want = desired.get(key)
            if want is not None and key not in self._tasks and inst.state == want.state:
                inst.reason = want.reason
        for key in [k for k, i in self.instances.items()
                    if k not in desired and i.state == State.UNLOADED and k not in self._tasks]:
            del self.instances[key]
        self.last_pass = self._mono()
        self.last_pass_seconds = self.last_pass - t_pass
        self.pass_count += 1
        for hook in self.on_pass:
            hook()
        return result

    async def _run_chain(self, inst: Instance, actions: list[Action],
                         d: DesiredModel | None, after: list[asyncio.Task[None]] | None = None,
                         ) -> None:
        try:
            if after:
                await asyncio.wait(after)
            for action in actions:
                started = time.monotonic()
                if action is not actions[0]:
                    inst.change_state(DURING[action.action], action.reason)
                self.events.publish("action_started", action=action.action, model=inst.key,
                                    reason=action.reason)
                ok = await self._execute(inst, action, d)
                self.events.publish(
                    "action", action=action.action, model=inst.key, reason=action.reason,
                    ok=ok, duration=round(time.monotonic() - started, 3), error=inst.last_error,
                )
                if not ok:
                    break
        except Exception as exc:
            log.exception("%s: %s failed", inst.key, actions[0].action)
            inst.last_error = f"{type(exc).__name__}: {exc}"
            inst.change_state(State.FAILED if inst.proc is None else inst.state, inst.last_error)
        finally:
            self._tasks.pop(inst.key, None)
            self.trigger()

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

    async def _execute(self, inst: Instance, action: Action, d: DesiredModel | None) -> bool:
        if action.action == "load":
            if d is None:
                return False
            inst.gpu = d.gpu
            async with self._gpu_lock(inst, d):
                return await self._load(inst, d)
        if action.action == "restart":
            if (d is not None and inst.state_before == State.AWAKE and inst.proc is not None
                    and inst.gpu != d.gpu):
                return await self._move(inst, d)
            await self._unload(inst, "restarting: its spec changed")
            if d is None:
                return False
            inst.change_state(State.STARTING, action.reason)
            inst.gpu = d.gpu
            async with self._gpu_lock(inst, d):
                return await self._load(inst, d)
        if action.action == "sleep":
            return await self._sleep(inst, action.level or 1, action.reason)
        if action.action == "wake":
            return await self._wake(inst, action.reason)
        if action.action == "unload":
            m = self.config.models.get(inst.model)
            timeout = m.drain_timeout.total_seconds() if m else 60.0
            if inst.base_url and self.outstanding.get(inst.base_url):
                inst.reason = f"draining {self.outstanding[inst.base_url]} request(s)"
                await self.drain(inst.base_url, timeout)
            await self._unload(inst, action.reason)
            return True
        raise ValueError(f"unknown action {action.action!r}")

    def _footprints(self, desired: Mapping[str, DesiredModel]) -> dict[str, Footprint]:
        """Each instance's footprint for the fit check: measured where gpud saw the engine
        run, else estimated from the model's config.json (read once per spec)."""
        fps: dict[str, Footprint] = {}
        for key, d in desired.items():
            if d.gpu is None:
                continue
            m = self.config.models[d.model]
            cache_key = FootprintStore.key(d.model, d.gpu, d.spec_hash)
            if cache_key not in self._estimates:
                total = self.gpus[d.gpu].total if d.gpu in self.gpus else None
                self._estimates[cache_key] = estimate_for(self.config, d.model, total)
            fp = self.footprints.best(cache_key, self._estimates[cache_key])
            if fp is not None:
                if not self.config.engines[m.engine].sleep_mode:
                    fp = replace(fp, sleeping=fp.awake)  # no sleep mode: a sleep frees nothing
                fps[key] = fp
        return fps

    def _fit(self, result: Plan, desired: Mapping[str, DesiredModel],
             observed: Mapping[str, ObservedModel]) -> FitResult:
        """The fit check of one action outside a pass (wake-on-request's fast path)."""
        if not self.gpus:
            return FitResult(result.actions)
        mono = self._mono()
        busy = {k for k, i in self.instances.items()
                if (t := self.traffic.get(i.model)) is not None and t.inflight}
        idle = {k: mono - t.last_request for k, i in self.instances.items()
                if (t := self.traffic.get(i.model)) is not None and t.last_request}
        return fit(result, desired, observed, self.gpus, self._footprints(desired),
                   self.config.daemon.gpu_headroom, busy, idle=idle)

    def record_footprints(self, per_key: Mapping[str, int]) -> None:
        """Remember what settled engines really take (NVML), for later fit checks."""
        if not self.gpus:
            return
        for key, used in per_key.items():
            inst = self.instances.get(key)
            if inst is None or inst.spec_hash is None or inst.key in self._tasks:
                continue
            m = self.config.models.get(inst.model)
            if m is None or inst.state not in RUNNING:
                continue
            kv = m.kv_cache if m.kv_cache is not None else (m.kv_max or 0)
            fkey = FootprintStore.key(inst.model, inst.gpu, inst.spec_hash)
            old = self.footprints.get(fkey)
            if inst.state == State.AWAKE:
                asleep = old.sleeping if old is not None else None
                new = measured_footprint(used, kv, asleep=asleep)
            elif old is not None and old.source == "measured":
                new = replace(old, sleeping=used)
            else:
                continue
            if old != new:
                self.footprints.record(fkey, new)

    # --- engine operations ----------------------------------------------------------------

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
        inst.port, inst.spec_hash, inst.gpu = port, d.spec_hash, d.gpu
        inst.sleep_level = d.sleep_level
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = build_argv(spec, port)
        env = self._tagged(build_env(spec, dict(os.environ)), inst.key, port, d.spec_hash)
        log.info("%s: starting engine on port %d: %s", inst.key, port, " ".join(argv))
        started = time.monotonic()
        try:
            proc = EngineProcess.spawn(inst.key, argv, env, self.log_dir)
        except EngineError as exc:
            self._failed_start(inst, str(exc))
            return False
        inst.proc, inst.expect_exit = proc, False
        inst.client = VllmClient(inst.base_url or "", self.session)
        inst.started_at = time.time()
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
            proc = EngineProcess.spawn(inst.key, build_argv(spec, port), env, self.log_dir)
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
        inst.proc = None
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

    # --- observation ----------------------------------------------------------------------

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

    # --- manual actions -------------------------------------------------------------------

    def set_override(self, model: str, state: str | None, until: datetime | None, reason: str,
                     gpu: int | None = None, level: int | None = None) -> None:
        old = self.overrides.get(model)
        if gpu is None and state is not None and old is not None and old.gpu is not None:
            gpu = old.gpu  # a sleep/wake keeps an earlier move
        self.overrides[model] = Override(state=state, reason=reason, until=until, gpu=gpu,
                                         level=level)
        self.demand.pop(model, None)  # an operator's word replaces a request's
        for inst in self.instances.values():
            if inst.model == model and inst.state == State.FAILED and state != State.UNLOADED:
                inst.change_state(State.UNLOADED, "manual retry")
                inst.backoff.reset()
                inst.spec_hash = None
        self.events.publish("override", model=model, state=state, reason=reason,
                            until=until.isoformat() if until else None)
        self.trigger()

    def force_profile(self, name: str, until: datetime | None, reason: str) -> None:
        self.forced_profile = ForcedProfile(name, until, reason)
        self.events.publish("profile", profile=name, reason="forced by an operator",
                            until=until.isoformat() if until else None)
        self.trigger()

    def release_profile(self) -> None:
        self.forced_profile = None
        self.events.publish("profile", profile=None, reason="back to the schedule")
        self.trigger()

    def clear_override(self, model: str) -> None:
        if self.overrides.pop(model, None) is not None:
            self.events.publish("override", model=model, state=None, reason="override cleared")
        self.trigger()

    # --- policies ---------------------------------------------------------------------------

    def policy_view(self) -> Any:
        """The read-only snapshot a policy decides on."""
        from gpud.policies.api import ModelView, View

        now = self.now()
        profile, _ = self.active_profile(now)
        base = effective(self.config, Layers(profile=profile), now)
        mono = self._mono()
        views = []
        for key, d in base.items():
            if d.replica:
                continue
            inst = self.instances.get(key)
            m = self.config.models[d.model]
            t = self.traffic.get(d.model)
            idle = mono - t.last_request if t and t.last_request and not t.inflight else 0.0
            views.append(ModelView(
                name=d.model, state=inst.state if inst else State.UNLOADED,
                desired=d.state,  # type: ignore[arg-type]
                priority=d.priority, gpus=() if d.gpu is None else (d.gpu,),
                sleep_level=d.sleep_level, idle_seconds=idle,
                in_flight=t.inflight if t else 0,
                idle_sleep_after=m.idle_sleep_after.total_seconds() if m.idle_sleep_after else None,
                kv_budget_bytes=m.kv_cache if m.kv_cache is not None else m.kv_max,
            ))
        return View(now=now, active_profile=profile, models=tuple(views))

    def set_policy_intents(self, intents: list[Any]) -> None:
        new: dict[str, Intent] = {}
        for it in intents:
            state = getattr(it, "state", None)
            if state is None:
                continue  # SetKvBudget: applied by the KV pool, not the planner
            new[it.model] = Intent(state, it.reason, policy=getattr(it, "policy", ""),
                                   level=getattr(it, "level", None))
        if new != self.intents:
            self.intents = new
            self.trigger()

    # --- the proxy's backend ----------------------------------------------------------------

    def routes(self) -> Mapping[str, ModelRoute]:
        key = (self.loaded.revision, tuple((k, i.state) for k, i in self.instances.items()))
        if key != self._routes_key:
            self._routes = {
                name: ModelRoute(
                    name=name, aliases=tuple(m.aliases),
                    max_concurrency=m.max_concurrency or max_num_seqs(m.args),
                    max_queue=m.max_queue, request_timeout=m.request_timeout.total_seconds(),
                    load_on_demand=m.load_on_demand,
                    state=self.instances[name].state if name in self.instances else State.UNLOADED,
                )
                for name, m in self.config.models.items()
            }
            self._routes_key = key
        return self._routes

    def _serving(self, model: str) -> list[Instance]:
        # `awake` is cleared during the warm-up sleep/wake after a load: the state says
        # "awake" then, but the engine is asleep for a moment and must not get requests.
        # A moving engine serves from its old place until the new one takes over.
        return [i for i in self.instances.values()
                if i.model == model and i.port and (
                    (i.state == State.AWAKE and i.awake.is_set()) or i.state == State.MOVING)]

    async def ready_upstream(self, model: str) -> str:
        ready = self._serving(model)
        if ready:
            return self._pick(model, ready)
        await self._wake_flight.run(model, lambda: self._bring_up(model))
        ready = self._serving(model)
        if not ready:
            raise ModelUnavailable(f"model {model!r} is not ready", retry_after=5)
        return self._pick(model, ready)

    def _pick(self, model: str, ready: list[Instance]) -> str:
        # Least outstanding requests across replicas; ties take turns (round robin), so
        # requests that come one at a time still spread over every replica.
        out = self.outstanding
        turn = self._turns[model] = self._turns.get(model, 0) + 1
        n = len(ready)
        best = min(ready, key=lambda i: (out.get(i.base_url or "", 0),
                                         (i.replica - turn) % n if n > 1 else 0))
        url = best.base_url or ""
        out[url] = out.get(url, 0) + 1
        return url

    def waking_upstreams(self, model: str) -> list[str]:
        insts = [i for i in self.instances.values() if i.model == model]
        if any(i.state == State.AWAKE and i.awake.is_set() for i in insts):
            return []
        return [i.base_url for i in sorted(insts, key=lambda i: i.replica)
                if i.base_url and i.state in (State.ASLEEP, State.WAKING)]

    async def early_upstream(self, model: str) -> str | None:
        """The engine a request may be sent to before its wake ends: asleep (or waking) at
        level 1, with its scheduler paused (`queues_asleep`), so vLLM tokenizes and queues
        the request while the weights come back and schedules it the moment it is awake.
        Returns once the engine was sent its `/wake_up`: on the H100 the request sent
        after the wake gave the first token soonest (bench/gpu `raw_order`), sent before it
        slowed the wake of a 1.8 GB model by ~10%. Not at level 2 (vLLM resumes scheduling
        at `/wake_up`, before `reload_weights`), not for a model an operator holds asleep
        or unloaded, not while any replica serves."""
        inst = self._early_candidate(model)
        if inst is None:
            return None
        await inst.wake_sent.wait()
        return inst.base_url if inst.state in (State.WAKING, State.AWAKE) else None

    def _early_candidate(self, model: str) -> Instance | None:
        insts = [i for i in self.instances.values() if i.model == model]
        if any(i.state == State.AWAKE and i.awake.is_set() for i in insts):
            return None
        if self._held_down(model) is not None:
            return None
        # the engine being woken, else the one `_wake_now` wakes: the first by replica
        inst = min([i for i in insts if i.state == State.WAKING] or insts,
                   key=lambda i: i.replica, default=None)
        if (inst is not None and inst.state in (State.ASLEEP, State.WAKING) and inst.queues_asleep
                and inst.sleep_level == 1 and inst.client is not None and inst.base_url):
            return inst
        return None

    def _held_down(self, model: str) -> Override | None:
        """The operator's override holding `model` asleep or unloaded now, if any."""
        ov = self.overrides.get(model)
        if ov is not None and ov.state in (State.ASLEEP, State.UNLOADED) and ov.active(self.now()):
            return ov
        return None

    def upstream_released(self, model: str, base: str) -> None:
        """The proxy is done with `base`: counts drive balancing and draining."""
        left = self.outstanding.get(base, 0) - 1
        if left > 0:
            self.outstanding[base] = left
        else:
            self.outstanding.pop(base, None)
            drained = self._drained.pop(base, None)
            if drained is not None:
                drained.set()

    async def drain(self, url: str | None, timeout: float) -> bool:
        """Wait until no request is outstanding on `url` (up to `timeout`); True if drained."""
        if not url or not self.outstanding.get(url):
            return True
        event = self._drained.setdefault(url, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _bring_up(self, model: str) -> None:
        m = self.config.models.get(model)
        if m is None:
            raise ModelUnavailable(f"model {model!r} is not configured", code="model_not_found")
        insts = [i for i in self.instances.values() if i.model == model]
        if any(i.state == State.FAILED for i in insts) and not any(
                i.state in RUNNING | {State.STARTING, State.WAKING} for i in insts):
            reason = next(i.reason for i in insts if i.state == State.FAILED)
            raise ModelUnavailable(f"model {model!r} has failed: {reason}", retry_after=30)
        loaded = any(i.state not in (State.UNLOADED, State.FAILED) for i in insts)
        if not loaded and not m.load_on_demand:
            raise ModelUnavailable(
                f"model {model!r} is unloaded and does not allow load_on_demand", retry_after=60,
                code="model_unloaded")
        ov = self._held_down(model)
        if ov is not None:
            raise ModelUnavailable(f"model {model!r} is held {ov.state} by an operator "
                                   f"({ov.reason})", retry_after=60, code="model_held")
        self.demand[model] = self._mono()
        self.events.publish("demand", model=model, reason="woken by a request")
        if not self._wake_now(model):
            self._urgent = True
            self.trigger()
        while not self._serving(model):
            insts = [i for i in self.instances.values() if i.model == model]
            waiters: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(i.changed.wait()) for i in insts
            ] or [asyncio.ensure_future(asyncio.sleep(0.05))]
            _, pending = await asyncio.wait(waiters, timeout=1.0,
                                            return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            failed = [i for i in insts if i.state == State.FAILED]
            if failed and not self._serving(model):
                raise ModelUnavailable(f"model {model!r} failed: {failed[0].reason}",
                                       retry_after=30)

    def _wake_now(self, model: str) -> bool:
        """Wake-on-request's fast path: start the wake here, not a loop pass later.

        Only for a sleeping engine with nothing under way, and only when the fit check
        lets the wake run alone (no other model must sleep first); otherwise the pass does it.
        """
        insts = sorted((i for i in self.instances.values() if i.model == model),
                       key=lambda i: i.replica)
        inst = next((i for i in insts if i.state == State.ASLEEP and i.client is not None
                     and i.key not in self._tasks), None)
        if inst is None:
            return False
        desired = self.desired()
        d = desired.get(inst.key)
        if d is None or d.state != State.AWAKE:
            return False
        action = Action("wake", inst.key, d.reason, inst.gpu)
        fitted = self._fit(Plan((action,)), desired, self.observed())
        if fitted.actions != (action,):
            return False
        inst.state_before = inst.state
        inst.change_state(State.WAKING, d.reason)
        self._tasks[inst.key] = asyncio.create_task(self._run_chain(inst, [action], d))
        return True

    def request_started(self, model: str) -> None:
        t = self.traffic.setdefault(model, ModelTraffic())
        t.inflight += 1
        t.requests += 1
        t.last_request = self._mono()

    def request_finished(self, model: str) -> None:
        t = self.traffic.setdefault(model, ModelTraffic())
        t.inflight = max(0, t.inflight - 1)
        t.last_request = self._mono()

    # --- status ---------------------------------------------------------------------------

    def model_status(self, key: str, desired: Mapping[str, DesiredModel],
                     notes: Mapping[str, str]) -> dict[str, Any]:
        inst = self.instances.get(key) or Instance(key, key.split("#")[0])
        d = desired.get(key)
        t = self.traffic.get(inst.model, ModelTraffic())
        reason = inst.reason or (d.reason if d else "")
        if inst.key in notes and inst.state != State.AWAKE:
            reason = notes[inst.key]
        elif d is not None and inst.state in RUNNING and inst.state == d.state:
            reason = d.reason
        return {
            "state": inst.state,
            "desired": d.state if d else State.UNLOADED,
            "reason": reason,
            "pid": inst.proc.pid if inst.proc else None,
            "port": inst.port,
            "gpu": inst.gpu if inst.gpu is not None else (d.gpu if d else None),
            "restarts": inst.restarts,
            "model": inst.model,
            "replica": inst.replica,
            "layer": d.layer if d else None,
            "inflight": t.inflight,
            "idle_seconds": round(self._mono() - t.last_request, 1) if t.last_request else None,
            "last_error": inst.last_error,
            "state_since": datetime.fromtimestamp(inst.state_since).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.time() - inst.started_at, 1) if inst.started_at
            and inst.proc else None,
            "spec_hash": inst.spec_hash,
        }

    def status_models(self) -> dict[str, dict[str, Any]]:
        now = self.now()
        layers, notes = self.layers(now)
        desired = effective(self.config, layers, now)
        keys = sorted(set(desired) | set(self.instances))
        return {k: self.model_status(k, desired, notes) for k in keys}
