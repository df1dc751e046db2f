"""The planner: (effective desired, observed, memory) -> ordered actions with reasons.

Pure and deterministic: the same inputs give the same plan, and applying a plan then planning
again gives nothing to do. It never performs an action; the reconciler does, and `gpud plan`
prints the same plan as a dry run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from gpud.desired import DesiredModel
from gpud.states import RUNNING, STABLE, TRANSITIONAL, State

__all__ = ["STABLE", "TRANSITIONAL", "Action", "ObservedModel", "Plan", "apply", "plan"]
FREES = ("sleep", "unload")
ORDER = {"sleep": 0, "unload": 0, "restart": 1, "wake": 2, "load": 2}


@dataclass(frozen=True)
class ObservedModel:
    state: str = State.UNLOADED
    spec_hash: str | None = None
    gpu: int | None = None
    busy: bool = False


@dataclass(frozen=True)
class Action:
    action: str  # load | wake | sleep | unload | restart
    model: str
    reason: str
    gpu: int | None = None
    level: int | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"action": self.action, "model": self.model, "reason": self.reason}
        if self.gpu is not None:
            out["gpu"] = self.gpu
        if self.level is not None:
            out["level"] = self.level
        return out


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    waiting: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.actions)


def _for_model(d: DesiredModel | None, o: ObservedModel, key: str) -> list[Action]:
    if o.state in TRANSITIONAL:
        return []
    if d is None:
        if o.state == State.UNLOADED:
            return []
        return [Action("unload", key, "no longer in the desired state", o.gpu)]
    running = o.state in RUNNING
    if o.state == State.FAILED:
        if o.spec_hash == d.spec_hash or d.state == State.UNLOADED:
            return []  # the supervisor gave up; a new spec or a manual load retries
        running = False
    if d.state == State.UNLOADED:
        return [Action("unload", key, d.reason, o.gpu)] if running else []
    if running and o.spec_hash != d.spec_hash:
        actions = [Action("restart", key, "its spec changed in the file", d.gpu)]
        if d.state == State.ASLEEP:
            actions.append(Action("sleep", key, d.reason, d.gpu, d.sleep_level))
        return actions
    if not running:
        actions = [Action("load", key, d.reason, d.gpu)]
        if d.state == State.ASLEEP:
            actions.append(Action("sleep", key, d.reason, d.gpu, d.sleep_level))
        return actions
    if d.state == State.AWAKE and o.state == State.ASLEEP:
        return [Action("wake", key, d.reason, d.gpu)]
    if d.state == State.ASLEEP and o.state == State.AWAKE:
        return [Action("sleep", key, d.reason, d.gpu, d.sleep_level)]
    return []


def plan(
    desired: Mapping[str, DesiredModel],
    observed: Mapping[str, ObservedModel],
    memory: object | None = None,
) -> Plan:
    """Ordered actions: per GPU, memory is freed (sleep, unload) before it is taken."""
    del memory  # fit checks hook in here (see gpud.fit)
    per_model: list[tuple[int, list[Action]]] = []
    waiting: dict[str, str] = {}
    priorities = {k: d.priority for k, d in desired.items()}
    for key in sorted(set(desired) | set(observed)):
        o = observed.get(key, ObservedModel())
        if o.state in TRANSITIONAL:
            waiting[key] = o.state
        acts = _for_model(desired.get(key), o, key)
        if acts:
            per_model.append((priorities.get(key, 0), acts))
    # A model's own actions stay in sequence (load then sleep); models are ordered by the
    # phase of their first action, GPU, then priority (higher first), then name.
    per_model.sort(
        key=lambda pa: (
            ORDER[pa[1][0].action],
            -1 if pa[1][0].gpu is None else pa[1][0].gpu,
            -pa[0],
            pa[1][0].model,
        )
    )
    return Plan(tuple(a for _, acts in per_model for a in acts), waiting)


def apply(observed: Mapping[str, ObservedModel], actions: tuple[Action, ...],
          desired: Mapping[str, DesiredModel]) -> dict[str, ObservedModel]:
    """What observed becomes when every action succeeds (for tests and dry runs)."""
    out = dict(observed)
    for a in actions:
        d = desired.get(a.model)
        o = out.get(a.model, ObservedModel())
        if a.action == "unload":
            out[a.model] = ObservedModel(State.UNLOADED, None, None)
        elif a.action in ("load", "restart") and d is not None:
            out[a.model] = ObservedModel(State.AWAKE, d.spec_hash, d.gpu)
        elif a.action == "wake":
            out[a.model] = replace(o, state=State.AWAKE)
        elif a.action == "sleep":
            out[a.model] = replace(o, state=State.ASLEEP)
    return {k: v for k, v in out.items() if v.state != State.UNLOADED or k in desired}
