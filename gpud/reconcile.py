"""The reconcile loop: the one owner of observed state.

Level-triggered: every config change, engine event, API action and tick leads to a pass that
computes the effective desired state, plans with the pure planner and starts the actions.
Actions run as tasks (one chain per engine instance; on one GPU one at a time where memory is
measured); their outcome lands back here and the next pass sees it. Nothing else writes
observed state: the proxy and the API read snapshots and send requests.

The one Reconciler object is assembled from its parts, one module each: the loop and the
layers (here), engine operations and supervision (engine_ops.py), observation and adoption
(observe.py), the proxy's backend (backend.py), status views and footprint books (views.py);
the instance and what the parts share, in instance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from gpud.backend import ProxyBackend
from gpud.config import LoadedConfig, zone_of
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
from gpud.engine_ops import EngineOps
from gpud.events import EventBus
from gpud.fit import Footprint, GpuMemory
from gpud.footprints import FootprintStore
from gpud.instance import DURING, Instance, ModelTraffic, fresh_start
from gpud.observe import Observation
from gpud.plan import Action, ObservedModel, Plan
from gpud.proxy.affinity import AffinityTable
from gpud.proxy.api import ModelRoute
from gpud.proxy.singleflight import SingleFlight
from gpud.schedule import Boundary, Schedule, schedule_of
from gpud.states import State
from gpud.views import Views

__all__ = ["Instance", "ModelTraffic", "Reconciler"]

log = logging.getLogger("gpud.reconcile")

class Reconciler(EngineOps, Observation, ProxyBackend, Views):
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
        # Run before each pass; the test backend's stall hook (GPUD_TEST_HOOKS) blocks here.
        self.before_pass: list[Callable[[], None]] = []
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
        self.affinity = AffinityTable()  # prefix routing: where conversations went
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

    def set_max_tick(self, seconds: float | None) -> None:
        """The systemd watchdog needs a completed pass at least this often."""
        self.max_tick = seconds

    def set_gpus(self, gpus: dict[int, GpuMemory]) -> None:
        """GPU memory as NVML measured it (empty without NVML): the fit check's input."""
        self.gpus = gpus

    def set_policy_status(self, status: list[dict[str, Any]]) -> None:
        self.policy_status = status

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
            for hook in self.before_pass:
                hook()
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
        """One pass: expire, decide (pure), dispatch the actions, tidy the reasons."""
        t_pass = self._mono()
        now = self.now()
        self.expire(now, t_pass)
        self._note_profile(now)
        for key, d in effective(self.config, self.composed(now).layers, now).items():
            if key not in self.instances:
                self.instances[key] = self._instance(key, d.model, d.replica)
        decision = self.decide(now, t_pass)
        self.blocked = dict(decision.blocked)
        self.fit_notes = dict(decision.fit_notes)
        self.last_plan = decision.plan
        self.last_decision = decision
        self._dispatch(decision.plan, decision.desired, self._mono())
        self._tidy(decision.desired)
        self.last_pass = self._mono()
        self.last_pass_seconds = self.last_pass - t_pass
        self.pass_count += 1
        for hook in self.on_pass:
            hook()
        return decision.plan

    def _note_profile(self, now: datetime) -> None:
        profile, why = self.active_profile(now)
        if profile != self.last_profile:
            self.events.publish("profile", profile=profile, previous=self.last_profile,
                                reason=why)
            log.info("profile %s -> %s (%s)", self.last_profile, profile, why)
            self.last_profile = profile

    def _dispatch(self, result: Plan, desired: Mapping[str, DesiredModel], mono: float) -> None:
        """Start one task per instance for its chain of actions (none while one runs, none
        inside a crash backoff)."""
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

    def _tidy(self, desired: Mapping[str, DesiredModel]) -> None:
        """Reasons for what did not move, and instances that are gone from the file."""
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
                            until=until.isoformat(timespec="seconds") if until else None)
        self.trigger()

    def force_profile(self, name: str, until: datetime | None, reason: str) -> None:
        self.forced_profile = ForcedProfile(name, until, reason)
        self.events.publish("profile", profile=name, reason="forced by an operator",
                            until=until.isoformat(timespec="seconds") if until else None)
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



