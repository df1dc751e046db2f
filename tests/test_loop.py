"""The reconcile loop driven on data: a fake clock, engine operations as bookkeeping.

What is under test is the loop itself (layers, expiry, planning, dispatch, backoff, the
state machine, wake-on-request), not vLLM: `DataLoop` replaces only the four engine
operations with what a healthy (or a scripted failing) engine would leave behind, and the
two clocks (the schedule's wall clock, the monotonic one of traffic and backoff) are values
the test moves. Real engines drive the same loop in tests/test_e2e_*.py.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from gpud.config import load_config
from gpud.desired import DesiredModel
from gpud.events import EventBus
from gpud.reconcile import Instance, Reconciler
from gpud.states import State

PARIS = ZoneInfo("Europe/Paris")

FILE = """
[daemon]
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
timezone = "Europe/Paris"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]
restart_backoff = "2s"
restart_backoff_max = "30s"
max_restarts = 3

[models.chat]
source = "/m/chat"
state = "asleep"

[profiles.day]
chat = "awake"

[[schedule]]
profile = "day"
when = "mon-fri 08:00-20:00"
prewake = "60s"
"""


class Clock:
    def __init__(self, at: datetime) -> None:
        self.wall, self.mono = at, 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


class DataLoop(Reconciler):
    """The real loop; its engines are data. `fail_loads` scripts failed starts."""

    def __init__(self, tmp: Path, clock: Clock, file: str = FILE) -> None:
        path = tmp / "gpud.toml"
        path.write_text(file.format(tmp=tmp))
        super().__init__(load_config(path, check_files=False), EventBus(),
                         state_dir=tmp / "state", runtime_dir=tmp / "run",
                         clock=lambda: clock.wall, mono=lambda: clock.mono)
        self.fail_loads = 0
        self.calls: list[tuple[str, str]] = []

    async def _load(self, inst: Instance, d: DesiredModel) -> bool:
        self.calls.append(("load", inst.key))
        inst.spec_hash, inst.gpu = d.spec_hash, d.gpu  # as the real load, before the spawn
        if self.fail_loads:
            self.fail_loads -= 1
            self._failed_start(inst, "exit code 1")  # what the real load reports
            return False
        inst.port = 18000 + len(self.calls)
        inst.client = object()  # type: ignore[assignment]  # "an engine answers"
        inst.backoff.succeeded()
        inst.change_state(State.AWAKE, d.reason)
        return True

    async def _sleep(self, inst: Instance, level: int, reason: str) -> bool:
        self.calls.append(("sleep", inst.key))
        inst.change_state(State.ASLEEP, reason)
        return True

    async def _wake(self, inst: Instance, reason: str) -> bool:
        self.calls.append(("wake", inst.key))
        inst.change_state(State.AWAKE, reason)
        return True

    async def _unload(self, inst: Instance, reason: str) -> None:
        self.calls.append(("unload", inst.key))
        inst.proc, inst.client, inst.port, inst.spec_hash = None, None, None, None
        inst.change_state(State.UNLOADED, reason)

    async def settle(self) -> None:
        """One pass, and every action it started run to its end."""
        self.pass_once()
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def state(self, key: str = "chat") -> State:
        return self.instances[key].state

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events.history()]


def at(text: str) -> Clock:
    return Clock(datetime.fromisoformat(text).replace(tzinfo=PARIS))


async def test_a_profile_boundary_with_pre_wake(tmp_path: Path) -> None:
    clock = at("2026-03-30T07:58:00")  # a Monday, the day profile opens at 08:00
    loop = DataLoop(tmp_path, clock)
    await loop.settle()
    assert loop.state() == State.ASLEEP and loop.calls == [("load", "chat"), ("sleep", "chat")]
    clock.advance(30)  # 07:58:30: not yet inside the 60 s pre-wake
    await loop.settle()
    assert loop.state() == State.ASLEEP and len(loop.calls) == 2
    clock.advance(40)  # 07:59:10
    await loop.settle()
    assert loop.state() == State.AWAKE and loop.calls[-1] == ("wake", "chat")
    assert loop.instances["chat"].reason == "pre-waking for profile day at 08:00"
    assert loop.last_profile is None  # the profile itself has not switched yet
    clock.advance(60)  # 08:00:10: the profile holds it awake now; nothing more to do
    await loop.settle()
    assert loop.last_profile == "day" and len(loop.calls) == 3
    assert loop.instances["chat"].reason == "profile day says awake"


async def test_an_override_expires_in_the_loop_not_on_a_read(tmp_path: Path) -> None:
    clock = at("2026-03-30T10:00:00")  # day: chat awake
    loop = DataLoop(tmp_path, clock)
    await loop.settle()
    assert loop.state() == State.AWAKE
    loop.set_override("chat", "asleep", clock.wall + timedelta(minutes=10), "sleep by an operator")
    await loop.settle()
    assert loop.state() == State.ASLEEP
    clock.advance(11 * 60)
    # reads see the override gone, and change nothing
    assert loop.desired()["chat"].state == "awake"
    loop.status_models()
    loop.decide()
    assert "chat" in loop.overrides and "override expired" not in str(loop.events.history())
    await loop.settle()
    assert "chat" not in loop.overrides
    assert any(e["kind"] == "override" and e["reason"] == "override expired"
               for e in loop.events.history())
    assert loop.state() == State.AWAKE and loop.calls[-1] == ("wake", "chat")


async def test_a_failed_start_backs_off_and_recovers(tmp_path: Path) -> None:
    clock = at("2026-03-30T10:00:00")
    loop = DataLoop(tmp_path, clock)
    loop.fail_loads = 2
    await loop.settle()
    inst = loop.instances["chat"]
    assert inst.state == State.UNLOADED and inst.reason == "exit code 1; retry 1/3 in 2s"
    await loop.settle()  # inside the backoff: no new start
    assert loop.calls == [("load", "chat")]
    clock.advance(2)
    await loop.settle()
    assert loop.calls == [("load", "chat")] * 2 and inst.reason.endswith("retry 2/3 in 4s")
    clock.advance(3)
    await loop.settle()
    assert len(loop.calls) == 2  # 4 s, not 2, this time
    clock.advance(1)
    await loop.settle()
    assert inst.state == State.AWAKE and loop.calls == [("load", "chat")] * 3
    assert inst.backoff.consecutive == 0  # recovered: the next crash waits 2 s again
    states = [(e["previous"], e["state"]) for e in loop.events.history() if e["kind"] == "state"]
    assert states == [("unloaded", "starting"), ("starting", "unloaded")] * 2 + [
        ("unloaded", "starting"), ("starting", "awake")]


async def test_gives_up_after_max_restarts_and_an_operator_retries(tmp_path: Path) -> None:
    clock = at("2026-03-30T10:00:00")
    loop = DataLoop(tmp_path, clock)
    loop.fail_loads = 99
    for _ in range(6):
        await loop.settle()
        clock.advance(60)
    inst = loop.instances["chat"]
    assert inst.state == State.FAILED and "gave up after 4 tries" in inst.reason
    assert len(loop.calls) == 4 and "failed" in loop.kinds()
    loop.fail_loads = 0
    loop.set_override("chat", "awake", None, "load by an operator")
    await loop.settle()
    assert inst.state == State.AWAKE


async def test_a_request_waits_on_a_sleeping_model(tmp_path: Path) -> None:
    clock = at("2026-03-30T21:00:00")  # night: no profile, the file says asleep
    loop = DataLoop(tmp_path, clock)
    await loop.settle()
    assert loop.state() == State.ASLEEP
    request = asyncio.create_task(loop.ready_upstream("chat"))
    url = await asyncio.wait_for(request, 5)
    inst = loop.instances["chat"]
    assert url == inst.base_url and inst.state == State.AWAKE
    assert inst.reason == "woken by a request" and loop.calls[-1] == ("wake", "chat")
    assert "demand" in loop.kinds()
    loop.upstream_released("chat", url)
    # the request keeps it awake for the demand TTL (no idle_sleep_after: 10 min) ...
    await loop.settle()
    assert loop.state() == State.AWAKE
    clock.advance(11 * 60)
    # ... then the file's word is back: it sleeps, and the loop dropped the demand
    await loop.settle()
    assert loop.state() == State.ASLEEP and "chat" not in loop.demand


async def test_a_request_for_a_failed_model_is_answered_not_held(tmp_path: Path) -> None:
    from gpud.proxy.api import ModelUnavailable

    clock = at("2026-03-30T10:00:00")
    loop = DataLoop(tmp_path, clock)
    loop.fail_loads = 99
    for _ in range(5):
        await loop.settle()
        clock.advance(60)
    assert loop.state() == State.FAILED
    try:
        await asyncio.wait_for(loop.ready_upstream("chat"), 5)
    except ModelUnavailable as exc:
        answer: Any = exc
    assert "has failed" in str(answer)


async def test_a_request_during_a_crash_backoff_is_told_the_model_restarts(
        tmp_path: Path) -> None:
    """Not 'unloaded ... load_on_demand': the client hears the engine stopped and when the
    next start is, and a Retry-After that covers it."""
    from gpud.backend import ModelUnavailable

    clock = at("2026-03-30T10:00:00")
    loop = DataLoop(tmp_path, clock)
    loop.fail_loads = 1
    await loop.settle()
    assert loop.instances["chat"].state == State.UNLOADED
    try:
        await loop.ready_upstream("chat")
    except ModelUnavailable as exc:
        assert "is restarting after its engine stopped" in str(exc), exc
        assert "load_on_demand" not in str(exc)
        assert exc.code == "model_restarting" and exc.retry_after >= 2
    else:
        raise AssertionError("a model in its crash backoff was served")
    clock.advance(2)
    await loop.settle()
    assert loop.state() == State.AWAKE
    assert await loop.ready_upstream("chat")
