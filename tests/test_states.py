"""The engine-instance state machine: one enum, one table, one way to change state."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest

from gpud.config.schema import ModelState as FileState
from gpud.events import EventBus
from gpud.policies.api import ModelState
from gpud.reconcile import Instance
from gpud.states import (
    DESIRABLE,
    RUNNING,
    STABLE,
    TRANSITIONAL,
    TRANSITIONS,
    DesiredState,
    IllegalTransition,
    State,
    legal,
)
from gpud.web.metrics import MODEL_STATES
from gpud.web.page import STATE_ATTRS

GPUD = Path(__file__).resolve().parent.parent / "gpud"
NAMES = {s.value for s in State}


def test_illegal_transitions_are_refused_and_leave_the_state_alone() -> None:
    inst = Instance("chat", "chat")
    with pytest.raises(IllegalTransition, match="chat: illegal state change unloaded -> waking"):
        inst.change_state(State.WAKING, "a wake of an engine that does not run")
    assert inst.state == State.UNLOADED and inst.reason == ""
    inst.change_state(State.STARTING, "load")
    inst.change_state(State.AWAKE, "healthy")
    with pytest.raises(IllegalTransition, match="awake -> waking"):
        inst.change_state(State.WAKING)
    inst.change_state(State.STOPPING, "unload")
    with pytest.raises(IllegalTransition, match="stopping -> awake"):
        inst.change_state(State.AWAKE)
    assert inst.state == State.STOPPING


def test_every_legal_move_publishes_one_state_event() -> None:
    events = EventBus()
    seen: list[tuple[str, str]] = []

    def changed(inst: Instance, previous: State) -> None:
        seen.append((previous.value, inst.state.value))
        events.publish("state", model=inst.key, state=inst.state.value)

    inst = Instance("chat", "chat", on_change=changed)
    for s in (State.STARTING, State.AWAKE, State.AWAKE, State.SLEEPING, State.ASLEEP,
              State.WAKING, State.AWAKE):
        inst.change_state(s, "test")
    assert seen == [("unloaded", "starting"), ("starting", "awake"), ("awake", "sleeping"),
                    ("sleeping", "asleep"), ("asleep", "waking"), ("waking", "awake")]
    assert [e["state"] for e in events.history()] == [b for _, b in seen]


def test_the_table_covers_every_state_and_every_state_is_reachable() -> None:
    assert set(TRANSITIONS) == set(State)
    reachable = {State.UNLOADED}
    todo = [State.UNLOADED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert reachable == set(State)
    # Every running state can crash to unloaded (a retry) or failed.
    for s in State:
        if s not in (State.UNLOADED, State.FAILED):
            assert legal(s, State.UNLOADED) and legal(s, State.FAILED), s
    assert set(State) == STABLE | TRANSITIONAL and not STABLE & TRANSITIONAL
    assert RUNNING <= STABLE


def test_every_list_of_state_names_derives_from_the_enum() -> None:
    assert tuple(s.value for s in State) == MODEL_STATES
    assert set(STATE_ATTRS["transitional"].split()) == {s.value for s in TRANSITIONAL}
    assert "moving" in STATE_ATTRS["transitional"]
    assert ModelState is State
    assert set(get_args(DesiredState)) == {s.value for s in DESIRABLE}
    assert FileState is DesiredState


def _state_lists(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 2:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(values) == len(node.elts) and all(v in NAMES for v in values):
                lines.append(node.lineno)
    return lines


def test_no_other_list_of_state_names_in_the_sources() -> None:
    """grep-proof: a tuple/list/set of two or more state names outside gpud/states.py (or a
    JavaScript array of them) is a second source that will drift."""
    found = []
    for path in GPUD.rglob("*.py"):
        if path.name == "states.py":
            continue
        tree = ast.parse(path.read_text())
        found += [f"{path.relative_to(GPUD)}:{n}" for n in _state_lists(tree)]
    for path in GPUD.rglob("*.js"):
        names = "|".join(NAMES)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(rf'\[\s*"({names})"\s*,\s*"({names})"', line):
                found.append(f"{path.relative_to(GPUD)}:{n}")
    assert found == []
