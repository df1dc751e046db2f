"""The effective desired state: file defaults < active profile < policy intents < overrides.

Pure: takes the config and the layers as data, returns one `DesiredModel` per engine instance
(a model with `replicas = 2` gives `chat` and `chat#1`), each with the reason for its state.
`compose` builds the layers themselves (profile, pre-wake, idle sleep, on-demand, intents,
overrides) from data and a time argument; it never reads a clock and never changes its input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from gpud.config.schema import GpudConfig, ModelConfig
from gpud.config.units import format_duration
from gpud.schedule import Boundary, Schedule
from gpud.states import DESIRABLE, State


@dataclass(frozen=True)
class Override:
    """A manual override from the CLI or API, possibly expiring."""

    state: str | None = None
    replicas: int | None = None
    gpu: int | None = None
    level: int | None = None  # sleep level for a manual sleep (else the model's own)
    reason: str = "manual override"
    until: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True)
class Intent:
    """What a policy wants for one model (the policy layer, below manual overrides)."""

    state: str
    reason: str
    policy: str = ""
    level: int | None = None


@dataclass(frozen=True)
class DesiredModel:
    key: str
    model: str
    replica: int
    state: str
    reason: str
    spec_hash: str
    gpu: int | None
    priority: int = 0
    pinned: bool = False
    sleep_level: int = 1
    layer: str = "file"

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model, "replica": self.replica, "state": self.state,
            "reason": self.reason, "gpu": self.gpu, "spec_hash": self.spec_hash,
            "layer": self.layer,
        }


@dataclass(frozen=True)
class Layers:
    profile: str | None = None
    intents: Mapping[str, Intent] = field(default_factory=dict)
    overrides: Mapping[str, Override] = field(default_factory=dict)


def instance_key(model: str, replica: int) -> str:
    return model if replica == 0 else f"{model}#{replica}"


def spec_hash(cfg: GpudConfig, name: str, gpu: int | None) -> str:
    """Identity of what an engine process is: changes here need a restart, state changes don't."""
    m = cfg.models[name]
    engine = cfg.engines[m.engine]
    payload = {
        "engine": {"command": engine.command, "env": engine.env, "sleep_mode": engine.sleep_mode},
        "source": m.source, "gpu": gpu, "max_model_len": m.max_model_len,
        "kv_cache": m.kv_cache, "kv_max": m.kv_max, "kv_pool": m.uses_pool,
        "gmu": m.gpu_memory_utilization, "args": m.args, "env": m.env, "port": m.port,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def replica_gpu(m: ModelConfig, replica: int) -> int | None:
    if m.gpus:
        return m.gpus[replica % len(m.gpus)]
    return m.gpu


def effective(cfg: GpudConfig, layers: Layers, now: datetime) -> dict[str, DesiredModel]:
    """One DesiredModel per instance key, with the layer and reason that decided it."""
    out: dict[str, DesiredModel] = {}
    profile_entries = cfg.profiles.get(layers.profile or "", {})
    for name, m in cfg.models.items():
        state: str = m.state
        replicas = m.replicas
        level: int = m.sleep_level
        reason, layer = f"file says {m.state}", "file"
        gpu_override: int | None = None
        entry = profile_entries.get(name)
        if entry is not None:
            if entry.state is not None:
                state = entry.state
                reason, layer = f"profile {layers.profile} says {entry.state}", "profile"
            if entry.replicas is not None:
                replicas = entry.replicas
                if entry.state is None:
                    reason, layer = f"profile {layers.profile} sets {replicas} replicas", "profile"
        intent = layers.intents.get(name)
        if intent is not None and intent.state in DESIRABLE:
            state, layer = intent.state, "policy"
            level = intent.level or level
            reason = f"policy {intent.policy}: {intent.reason}" if intent.policy else intent.reason
        ov = layers.overrides.get(name)
        if ov is not None and ov.active(now):
            if ov.state is not None:
                state = ov.state
            level = ov.level or level
            if ov.replicas is not None:
                replicas = ov.replicas
            gpu_override = ov.gpu
            until = f" until {ov.until.isoformat(timespec='minutes')}" if ov.until else ""
            reason, layer = f"{ov.reason}{until}", "override"
        if replicas == 0:
            state = State.UNLOADED
        for r in range(max(replicas, 1)):
            gpu = gpu_override if gpu_override is not None else replica_gpu(m, r)
            key = instance_key(name, r)
            out[key] = DesiredModel(
                key=key, model=name, replica=r, state=state, reason=reason,
                spec_hash=spec_hash(cfg, name, gpu), gpu=gpu, priority=m.priority,
                pinned=m.pinned, sleep_level=level, layer=layer,
            )
    return out


# --- the layers above the file, composed from data ------------------------------------------

# A request keeps a model awake this long when the model has no idle_sleep_after.
DEMAND_TTL = timedelta(minutes=10)


@dataclass(frozen=True)
class ForcedProfile:
    """An operator's `gpud profile NAME [--for D]`: replaces the schedule until `until`."""

    name: str
    until: datetime | None = None
    reason: str = "forced by an operator"

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until


class Traffic(Protocol):
    """A model's requests as the proxy reports them (monotonic seconds; 0: never)."""

    @property
    def inflight(self) -> int: ...
    @property
    def last_request(self) -> float: ...


@dataclass(frozen=True)
class LayerInputs:
    """Everything above the file that decides a model's state, as data. `demand` and
    `awake_since` are monotonic instants (a request woke the model; it became awake)."""

    forced: ForcedProfile | None = None
    intents: Mapping[str, Intent] = field(default_factory=dict)
    overrides: Mapping[str, Override] = field(default_factory=dict)
    demand: Mapping[str, float] = field(default_factory=dict)
    traffic: Mapping[str, Traffic] = field(default_factory=dict)
    awake_since: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Composed:
    """The profile in force and why, the next boundary, the layers and status notes."""

    profile: str | None
    source: str  # "schedule", "no schedule", or the forced profile's reason
    boundary: Boundary | None
    layers: Layers
    notes: Mapping[str, str]  # per model: pre-wake


def active_profile(schedule: Schedule | None, forced: ForcedProfile | None,
                   now: datetime) -> tuple[str | None, str]:
    """The profile in force at `now` and why: a forced profile that has not expired, else
    the schedule's."""
    if forced is not None and forced.active(now):
        return forced.name, forced.reason
    if schedule is None:
        return None, "no schedule"
    return schedule.active_profile(now), "schedule"


def quiet_for(inputs: LayerInputs, model: str, mono: float) -> float | None:
    """Seconds since the model's last request or since it woke, whichever is later (None:
    neither happened)."""
    t = inputs.traffic.get(model)
    last = max(t.last_request if t else 0.0, inputs.awake_since.get(model, 0.0))
    return mono - last if last else None


def demand_holds(cfg: GpudConfig, inputs: LayerInputs, model: str, mono: float) -> bool:
    """A request woke `model`: it stays awake while busy and until idle again."""
    since = inputs.demand.get(model)
    m = cfg.models.get(model)
    if since is None or m is None:
        return False
    t = inputs.traffic.get(model)
    ttl = (m.idle_sleep_after or DEMAND_TTL).total_seconds()
    return bool(t and t.inflight) or mono - max(since, t.last_request if t else 0.0) < ttl


def compose(cfg: GpudConfig, schedule: Schedule | None, inputs: LayerInputs, now: datetime,
            mono: float) -> Composed:
    """Layer precedence, lowest first: the file, the profile, pre-wake, idle sleep,
    on-demand (a request woke it), policy intents, manual overrides. Pure: `now` is the
    schedule's clock, `mono` the one traffic is timed on; nothing expires here (the loop
    drops what expired, and until then expired entries are ignored)."""
    profile, source = active_profile(schedule, inputs.forced, now)
    base = effective(cfg, Layers(profile=profile), now)
    intents = _idle_sleep(cfg, inputs, base, mono)
    forced = inputs.forced is not None and inputs.forced.active(now)
    boundary = schedule.next_boundary(now) if schedule is not None and not forced else None
    prewake = _prewake(cfg, base, boundary, now)
    intents.update(prewake)
    intents.update(inputs.intents)
    for name in inputs.demand:
        if demand_holds(cfg, inputs, name, mono):
            intents[name] = Intent(State.AWAKE, "woken by a request")
    overrides = {k: v for k, v in inputs.overrides.items() if v.active(now)}
    notes = {k: v.reason for k, v in prewake.items()}
    return Composed(profile, source, boundary,
                    Layers(profile=profile, intents=intents, overrides=overrides), notes)


def _idle_sleep(cfg: GpudConfig, inputs: LayerInputs, base: Mapping[str, DesiredModel],
                mono: float) -> dict[str, Intent]:
    """A model awake by file or profile sleeps after idle_sleep_after without requests."""
    out: dict[str, Intent] = {}
    for name, m in cfg.models.items():
        t = inputs.traffic.get(name)
        if m.idle_sleep_after is None or (t and t.inflight):
            continue
        idle = quiet_for(inputs, name, mono)
        d = base.get(name)
        if idle is not None and idle >= m.idle_sleep_after.total_seconds() and d \
                and d.state == State.AWAKE:
            out[name] = Intent(State.ASLEEP, f"idle for {format_duration(m.idle_sleep_after)}")
    return out


def _prewake(cfg: GpudConfig, base: Mapping[str, DesiredModel], boundary: Boundary | None,
             now: datetime) -> dict[str, Intent]:
    """Models the coming profile wants awake wake `prewake` before the boundary."""
    if boundary is None or not boundary.prewake or now < boundary.at - boundary.prewake:
        return {}
    coming = effective(cfg, Layers(profile=boundary.profile), now)
    at = boundary.at.strftime("%H:%M")
    out: dict[str, Intent] = {}
    for key, d in coming.items():
        cur = base.get(key)
        if d.state == State.AWAKE and cur and cur.state == State.ASLEEP:
            out[d.model] = Intent(State.AWAKE, f"pre-waking for profile {boundary.profile} at {at}")
    return out
