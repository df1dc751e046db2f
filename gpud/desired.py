"""The effective desired state: file defaults < active profile < policy intents < overrides.

Pure: takes the config and the layers as data, returns one `DesiredModel` per engine instance
(a model with `replicas = 2` gives `chat` and `chat#1`), each with the reason for its state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from gpud.config.schema import GpudConfig, ModelConfig
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
