"""An engine instance as the loop observes it, and the loop's shared state for its parts.

`Instance` is one engine (a model, or one replica of it); its state changes only through
`change_state` (gpud/states.py's table). `LoopState` names what the reconciler's parts
(engine operations, observation, the proxy's backend, status views) share: they are mixins
of the one `Reconciler` object, the one owner of this state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from gpud.config import LoadedConfig
from gpud.decide import Decision
from gpud.desired import (
    DesiredModel,
    Intent,
    Layers,
    Override,
)
from gpud.engines.phases import LoadPhases
from gpud.engines.process import (
    EngineProcess,
)
from gpud.engines.restart import RestartPolicy
from gpud.engines.vllm import (
    VllmClient,
)
from gpud.events import EventBus
from gpud.fit import FitResult, Footprint, GpuMemory
from gpud.footprints import FootprintStore
from gpud.plan import Action, ObservedModel, Plan
from gpud.proxy.affinity import AffinityTable
from gpud.proxy.api import ModelRoute
from gpud.proxy.singleflight import SingleFlight
from gpud.states import IllegalTransition, State, legal

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
    restarts: int = 0  # unexpected exits of engines of one spec (crashed_spec)
    crashed_spec: str | None = None
    backoff: RestartPolicy = field(default_factory=RestartPolicy)
    retry_at: float = 0.0
    reason: str = ""
    last_error: str | None = None
    state_since: float = field(default_factory=time.time)
    started_at: float | None = None
    load: LoadPhases | None = None  # the phases of the load under way (time.time())
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



class LoopState:
    """The attributes and loop methods the reconciler's parts use (types only)."""

    loaded: LoadedConfig
    events: EventBus
    state_dir: Path
    runtime_dir: Path
    log_dir: Path
    instances: dict[str, Instance]
    overrides: dict[str, Override]
    intents: dict[str, Intent]
    demand: dict[str, float]
    traffic: dict[str, ModelTraffic]
    gpus: dict[int, GpuMemory]
    footprints: FootprintStore
    _estimates: dict[str, Footprint | None]
    _mono: Callable[[], float]
    _urgent: bool
    _tasks: dict[str, asyncio.Task[None]]
    _gpu_locks: dict[int, asyncio.Lock]
    _session: aiohttp.ClientSession | None
    _wake_flight: SingleFlight[str, None]
    _routes: dict[str, ModelRoute]
    outstanding: dict[str, int]
    _turns: dict[str, int]
    affinity: AffinityTable
    _drained: dict[str, asyncio.Event]
    _routes_key: object

    if TYPE_CHECKING:
        @property
        def config(self) -> Any: ...
        def now(self) -> datetime: ...
        def trigger(self) -> None: ...
        def active_profile(self, now: datetime) -> tuple[str | None, str]: ...
        def layers(self, now: datetime) -> tuple[Layers, Mapping[str, str]]: ...
        def desired(self, now: datetime | None = None) -> dict[str, DesiredModel]: ...
        def observed(self) -> dict[str, ObservedModel]: ...
        def decide(self, now: datetime | None = None, mono: float | None = None
                   ) -> Decision: ...
        def _instance(self, key: str, model: str, replica: int) -> Instance: ...
        @property
        def session(self) -> aiohttp.ClientSession: ...
        def _watch_exit(self, inst: Instance, proc: EngineProcess) -> None: ...
        async def _queues_asleep(self, inst: Instance) -> bool: ...
        async def _unload(self, inst: Instance, reason: str) -> None: ...
        async def drain(self, url: str | None, timeout: float) -> bool: ...
        def _fit(self, result: Plan, desired: Mapping[str, DesiredModel],
                 observed: Mapping[str, ObservedModel]) -> FitResult: ...
        async def _run_chain(self, inst: Instance, actions: list[Action],
                             d: DesiredModel | None,
                             after: list[asyncio.Task[None]] | None = None) -> None: ...
