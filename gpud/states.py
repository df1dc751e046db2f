"""The states of an engine instance and the moves between them: the one list of state names.

Pure data in the manner of supervisor's `process.py`: `State` names every state an instance
can be in, `TRANSITIONS` every legal move. The page, page.js (through the page's `data-`
attributes), /metrics, the planner and the policies API all take their lists from here, so a
new state cannot be forgotten in one of them. Never import I/O here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class State(StrEnum):
    """An engine instance's state, as status, the page and /metrics show it."""

    UNLOADED = "unloaded"
    STARTING = "starting"
    AWAKE = "awake"
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"
    STOPPING = "stopping"
    MOVING = "moving"  # blue-green: a new engine starts elsewhere while this one serves
    FAILED = "failed"


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in gpud, never the operator's doing."""

    def __init__(self, key: str, old: State, new: State) -> None:
        super().__init__(f"{key}: illegal state change {old} -> {new}")
        self.key, self.old, self.new = key, old, new


S = State
# Crashes and failed starts may end any running state (-> unloaded for a retry, or failed);
# an adopted engine goes straight from unloaded to what its API says.
_ENDS = (S.UNLOADED, S.FAILED)
TRANSITIONS: dict[State, frozenset[State]] = {
    S.UNLOADED: frozenset({S.STARTING, S.AWAKE, S.ASLEEP, S.FAILED}),
    S.STARTING: frozenset({S.AWAKE, S.ASLEEP, *_ENDS}),
    S.AWAKE: frozenset({S.SLEEPING, S.STOPPING, S.STARTING, S.MOVING, S.ASLEEP, *_ENDS}),
    S.SLEEPING: frozenset({S.ASLEEP, S.AWAKE, *_ENDS}),
    S.ASLEEP: frozenset({S.WAKING, S.STOPPING, S.STARTING, S.AWAKE, *_ENDS}),
    S.WAKING: frozenset({S.AWAKE, S.ASLEEP, *_ENDS}),
    S.STOPPING: frozenset(_ENDS),
    S.MOVING: frozenset({S.AWAKE, *_ENDS}),
    S.FAILED: frozenset({S.UNLOADED, S.STARTING, S.STOPPING}),
}

# A model in one of these is usable or settled; the planner acts only on these.
STABLE: frozenset[State] = frozenset({S.UNLOADED, S.AWAKE, S.ASLEEP, S.FAILED})
# An action is under way: the planner waits, the page marks the row as moving.
TRANSITIONAL: frozenset[State] = frozenset(State) - STABLE
# Has an engine process that answers (the fit check counts its memory, status counts it ready).
RUNNING: frozenset[State] = frozenset({S.AWAKE, S.ASLEEP})
# Is, or is about to be, awake: its KV pages are in use (the KV pool's ledger).
ACTIVE: frozenset[State] = frozenset({S.AWAKE, S.MOVING, S.WAKING, S.STARTING})
# The states the operator can ask for (the file, profiles, overrides, policy intents); the
# schema and the policies API type them with `DesiredState` (a test keeps the two equal).
DESIRABLE: tuple[State, ...] = (S.AWAKE, S.ASLEEP, S.UNLOADED)
DesiredState = Literal["awake", "asleep", "unloaded"]


def legal(old: State, new: State) -> bool:
    """Staying in a state (a new reason) is always legal."""
    return old == new or new in TRANSITIONS[old]


def ordered(states: frozenset[State]) -> list[str]:
    """`states` in the enum's order, as plain names (for JSON, HTML attributes, metrics)."""
    return [s.value for s in State if s in states]
