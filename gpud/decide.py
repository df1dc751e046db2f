"""One decision: the layers, the effective desired state, the plan and its fit check.

The loop acts on it, `GET /api/v1/plan` shows the daemon's, and `gpud plan --file` builds
one from a file with the same function, so a dry run says what the daemon would do. Pure:
every input is data (footprints come through a lookup the caller passes), `now` and `mono`
are arguments; no clock, no file, no engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gpud.config.schema import GpudConfig
from gpud.desired import Composed, DesiredModel, LayerInputs, compose, effective
from gpud.fit import FitResult, Footprint, GpuMemory, fit
from gpud.plan import ObservedModel, Plan, plan
from gpud.schedule import Schedule

FIT_NOT_CHECKED = "fit not checked: no GPU memory known (NVML unavailable, or --gpus not given)"


@dataclass(frozen=True)
class Memory:
    """What the fit check needs: each GPU's memory, and each instance's footprint for the
    desired state (a lookup: the desired GPU decides which footprint applies)."""

    gpus: Mapping[int, GpuMemory]
    footprints: Callable[[Mapping[str, DesiredModel]], Mapping[str, Footprint]]


@dataclass(frozen=True)
class Decision:
    at: datetime
    composed: Composed
    desired: Mapping[str, DesiredModel]
    plan: Plan  # after the fit check: what the loop runs
    fit: FitResult | None = None  # None: not checked
    observed: Mapping[str, ObservedModel] = field(default_factory=dict)

    @property
    def profile(self) -> str | None:
        return self.composed.profile

    @property
    def blocked(self) -> Mapping[str, str]:
        return self.fit.blocked if self.fit is not None else {}

    @property
    def fit_notes(self) -> Mapping[str, str]:
        return self.fit.notes if self.fit is not None else {}

    def to_json(self) -> dict[str, Any]:
        """The shape of `GET /api/v1/plan` and `gpud plan --json`."""
        c = self.composed
        nb = c.boundary
        return {
            "at": self.at.isoformat(timespec="seconds"),
            "profile": c.profile,
            "profile_source": c.source,
            "next_boundary": {"at": nb.at.isoformat(timespec="seconds"), "profile": nb.profile,
                              "prewake_seconds": nb.prewake.total_seconds()} if nb else None,
            "desired": {k: str(d.state) for k, d in self.desired.items()},
            "reasons": {k: d.reason for k, d in self.desired.items()},
            "layers": {k: d.layer for k, d in self.desired.items()},
            "prewake": dict(c.notes),
            "actions": [a.to_json() for a in self.plan.actions],
            "waiting": dict(self.plan.waiting),
            "fit_checked": self.fit is not None,
            "blocked": dict(self.blocked),
            "notes": dict(self.fit_notes),
        }


def decide(cfg: GpudConfig, schedule: Schedule | None, inputs: LayerInputs,
           observed: Mapping[str, ObservedModel], now: datetime, mono: float,
           memory: Memory | None = None) -> Decision:
    """Layers -> desired -> plan -> fit, for the instant `now` (`mono` on the traffic clock)."""
    composed = compose(cfg, schedule, inputs, now, mono)
    desired = effective(cfg, composed.layers, now)
    planned = plan(desired, observed)
    if memory is None or not memory.gpus:
        return Decision(now, composed, desired, planned, None, observed)
    busy, idle = set(), {}
    for key in observed:
        t = inputs.traffic.get(key.split("#", 1)[0])
        if t is not None and t.inflight:
            busy.add(key)
        if t is not None and t.last_request:
            idle[key] = mono - t.last_request
    fitted = fit(planned, desired, observed, memory.gpus, memory.footprints(desired),
                 cfg.daemon.gpu_headroom, busy, idle=idle)
    return Decision(now, composed, desired, Plan(fitted.actions, planned.waiting), fitted,
                    observed)
