"""What a policy script sees and what it may ask for: the read-only ``View`` and the intents.

A policy is a Python file in the policies directory with one function::

    from gpud.policies.api import Sleep, View

    def decide(view: View) -> list[Sleep]:
        return [Sleep(m.name, 1, "idle") for m in view.models if m.idle_seconds > 900]

gpud calls ``decide`` with a fresh snapshot every few seconds, in a separate process and
with a time limit, and layers the intents it returns above the active profile and below
manual overrides.

This module is the whole contract between gpud and user scripts, so it must stay small,
stable and pure: plain frozen dataclasses, no I/O, nothing from the daemon's internals
(user scripts import it in their own process). Everything here pickles, because views
travel to the policy's worker process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from gpud.states import DesiredState, State

__all__ = [
    "GpuView",
    "Intent",
    "Load",
    "ModelState",
    "ModelView",
    "SetKvBudget",
    "Sleep",
    "Unload",
    "View",
    "Wake",
]

ModelState = State  # a str: `m.state == "awake"` holds


@dataclass(frozen=True)
class ModelView:
    """One model (one engine instance) as gpud sees it at the snapshot's instant."""

    name: str
    state: ModelState  # what the engine is doing now
    desired: DesiredState  # what the file and the active profile want, before policies
    priority: int = 0  # from the file; higher is more important
    gpus: tuple[int, ...] = ()  # GPU indices it runs on
    sleep_level: int = 1  # the level the file asks for when it sleeps
    idle_seconds: float = 0.0  # since its last request finished; 0 while busy
    in_flight: int = 0  # requests being served
    queued: int = 0  # requests waiting in gpud's proxy for it
    gpu_bytes: int = 0  # GPU memory it holds now, on each of its GPUs
    awake_gpu_bytes: int = 0  # GPU memory it needs awake, on each of its GPUs (estimate)
    idle_sleep_after: float | None = None  # seconds, from the file's idle_sleep_after
    kv_budget_bytes: int | None = None  # its KV cache budget now, where the pool sets one

    @property
    def busy(self) -> bool:
        """Serving or with requests waiting: a model a policy should not put to sleep."""
        return self.in_flight > 0 or self.queued > 0


@dataclass(frozen=True)
class GpuView:
    """One GPU's memory at the snapshot's instant."""

    index: int
    total_bytes: int
    free_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


@dataclass(frozen=True)
class View:
    """The snapshot a policy decides on. Read-only: changing it changes nothing."""

    now: datetime  # timezone-aware, in the daemon's timezone
    active_profile: str | None
    models: tuple[ModelView, ...] = ()
    gpus: tuple[GpuView, ...] = ()

    @property
    def model_names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.models)

    def model(self, name: str) -> ModelView:
        """The model called ``name``; KeyError naming the known models otherwise."""
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(sorted(self.model_names)) or "none"
        raise KeyError(f"no model {name!r} in this view (known: {known})")

    def gpu(self, index: int) -> GpuView:
        """GPU ``index``; KeyError naming the known GPUs otherwise."""
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        known = ", ".join(str(g.index) for g in self.gpus) or "none"
        raise KeyError(f"no GPU {index} in this view (known: {known})")


# ------------------------------------------------------------------------------ intents
# Each intent names one model and says why, in words the status page shows. ``policy`` is
# filled in by gpud with the script's name; a script leaves it empty.


def _check_common(kind: str, model: object, reason: object) -> None:
    if not isinstance(model, str) or not model:
        raise ValueError(f"{kind}(): model must be a model name (a non-empty str), not {model!r}")
    if not isinstance(reason, str):
        raise ValueError(f"{kind}({model!r}): reason must be a str, not {reason!r}")


@dataclass(frozen=True)
class Wake:
    """Wake a sleeping model."""

    state: ClassVar[DesiredState] = "awake"
    model: str
    reason: str
    policy: str = ""

    def __post_init__(self) -> None:
        _check_common("Wake", self.model, self.reason)


@dataclass(frozen=True)
class Sleep:
    """Put a model to sleep at ``level`` 1 (weights to CPU memory) or 2 (weights dropped)."""

    state: ClassVar[DesiredState] = "asleep"
    model: str
    level: int
    reason: str
    policy: str = ""

    def __post_init__(self) -> None:
        _check_common("Sleep", self.model, self.reason)
        if self.level not in (1, 2) or isinstance(self.level, bool):
            raise ValueError(f"Sleep({self.model!r}): level must be 1 or 2, not {self.level!r}")


@dataclass(frozen=True)
class Load:
    """Start a model's engine (it ends awake)."""

    state: ClassVar[DesiredState] = "awake"
    model: str
    reason: str
    policy: str = ""

    def __post_init__(self) -> None:
        _check_common("Load", self.model, self.reason)


@dataclass(frozen=True)
class Unload:
    """Stop a model's engine and free all its memory."""

    state: ClassVar[DesiredState] = "unloaded"
    model: str
    reason: str
    policy: str = ""

    def __post_init__(self) -> None:
        _check_common("Unload", self.model, self.reason)


@dataclass(frozen=True)
class SetKvBudget:
    """Set a model's KV cache budget to ``bytes`` (where the KV pool manages it)."""

    state: ClassVar[DesiredState | None] = None
    model: str
    bytes: int
    reason: str
    policy: str = ""

    def __post_init__(self) -> None:
        _check_common("SetKvBudget", self.model, self.reason)
        if not isinstance(self.bytes, int) or isinstance(self.bytes, bool) or self.bytes < 0:
            raise ValueError(
                f"SetKvBudget({self.model!r}): bytes must be a whole number of bytes >= 0, "
                f"not {self.bytes!r}"
            )


Intent = Wake | Sleep | Load | Unload | SetKvBudget
INTENT_TYPES: tuple[type[Intent], ...] = (Wake, Sleep, Load, Unload, SetKvBudget)
