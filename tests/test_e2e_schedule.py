"""Issue 5 end to end: a schedule flips profiles on real engines, with pre-wake before 08:00.

The box's daemon accepts a test clock (GPUD_TEST_HOOKS=1): the test stands it at 07:59:30 on a
Monday, so the boundary comes 30 s later in real time, and pre-wake 20 s before it.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from box_fixture import Box
from gpudproc import wait_for

pytestmark = pytest.mark.engine

SCHEDULE = """
[profiles.day]
chat = "asleep"
batch = "awake"

[profiles.night]
chat = "awake"
batch = "asleep"

[[schedule]]
profile = "day"
when = "mon-fri 08:00-20:00"
prewake = "20s"

[[schedule]]
profile = "night"
when = "otherwise"
"""


def now_of(box: Box) -> datetime:
    return datetime.fromisoformat(box.gpud.status()["now"])


def test_profile_flips_and_prewake_happens_before_the_boundary(box: Box) -> None:
    box.gpud.cli("profile", "--auto")
    box.gpud.request("POST", "/api/v1/debug/clock", {"now": "2026-11-23T07:59:30+00:00"})
    box.write({"chat": "awake", "batch": "asleep"}, SCHEDULE.replace(
        "[profiles.day]", "[profiles.day]", 1))
    wait_for(lambda: box.gpud.status()["profile"] == "night", 5, "the night profile")
    status = box.gpud.status()
    assert status["schedule"]["next_boundary"]["profile"] == "day"
    assert status["schedule"]["next_boundary"]["at"].startswith("2026-11-23T08:00:00")

    woke = box.gpud.wait_states({"batch": "awake"}, timeout=40)
    t_wake = now_of(box)
    assert t_wake < datetime.fromisoformat("2026-11-23T08:00:00+00:00"), t_wake
    assert woke["batch"]["reason"] == "pre-waking for profile day at 08:00"
    assert woke["chat"]["state"] == "awake"  # the current profile still wants it
    assert box.gpud.status()["profile"] == "night"

    after = box.gpud.wait_states({"chat": "asleep", "batch": "awake"}, timeout=40)
    assert box.gpud.status()["profile"] == "day"
    assert after["chat"]["reason"] == "profile day says asleep"
    assert now_of(box) >= datetime.fromisoformat("2026-11-23T08:00:00+00:00")
    # the timer's keep-warm requests to the pre-woken model, from 1.5 s before the switch up
    # to it: the warm-up set, then a 1-token request every quarter second
    warm = [e for e in box.gpud.events() if e["kind"] == "keep_warm" and e["model"] == "batch"]
    assert warm and warm[-1]["requests"] >= 1 and warm[-1]["duration"] >= 1.0, warm


def test_forced_profile_with_expiry_and_back_to_the_schedule(box: Box) -> None:
    r = box.gpud.cli("profile", "night", "--for", "1h", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["profile"] == "night" and data["forced"]["until"]
    box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=30)
    assert "forced" in box.gpud.cli("profile").stdout
    r = box.gpud.cli("profile", "--auto", "--json")
    assert json.loads(r.stdout)["forced"] is None
    box.gpud.wait_states({"chat": "asleep", "batch": "awake"}, timeout=30)
    # back to the box's base state for the next tests
    box.base_models()
    box.gpud.wait_states({"chat": "awake", "batch": "asleep"}, timeout=30)
