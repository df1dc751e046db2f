"""`gpud plan --file F --at TIME`: check a file's schedule before deploying it, no daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FILE = """
[daemon]
timezone = "Europe/Paris"
[models.chat]
source = "/m/chat"
[models.batch]
source = "/m/batch"
state = "asleep"
[profiles.day]
chat = "awake"
batch = "asleep"
[profiles.night]
chat = "asleep"
batch = "awake"
[[schedule]]
profile = "day"
when = "mon-fri 08:00-20:00"
prewake = "60s"
[[schedule]]
profile = "night"
when = "otherwise"
"""


def plan(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gpud.toml"
    path.write_text(FILE)
    return subprocess.run([sys.executable, "-m", "gpud.cli", "plan", "--file", str(path), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_plan_at_an_instant_reports_profile_boundary_and_desired(tmp_path: Path) -> None:
    r = plan(tmp_path, "--at", "2026-03-27T19:30:00+01:00", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["profile"] == "day"
    assert data["desired"] == {"chat": "awake", "batch": "asleep"}
    assert data["next_boundary"] == {"at": "2026-03-27T20:00:00+01:00", "profile": "night"}
    assert [(a["action"], a["model"]) for a in data["actions"]] == [
        ("load", "batch"), ("sleep", "batch"), ("load", "chat")]
    # across the spring-forward weekend: Monday 08:00 is now +02:00
    r = plan(tmp_path, "--at", "2026-03-28T12:00:00+01:00", "--json")
    data = json.loads(r.stdout)
    assert data["profile"] == "night"
    assert data["next_boundary"]["at"] == "2026-03-30T08:00:00+02:00"


def test_plan_with_observed_state_and_people_output(tmp_path: Path) -> None:
    r = plan(tmp_path, "--at", "2026-03-27T21:00:00+01:00",
             "--observed", '{"chat": "awake", "batch": "asleep"}')
    assert r.returncode == 0, r.stderr
    assert "profile night" in r.stdout
    lines = [line.split() for line in r.stdout.splitlines() if line.strip()[:2] in ("1.", "2.")]
    assert lines[0][1:3] == ["sleep", "chat"] and lines[1][1:3] == ["wake", "batch"]


def test_at_without_offset_is_refused(tmp_path: Path) -> None:
    r = plan(tmp_path, "--at", "2026-03-27T21:00:00")
    assert r.returncode == 2 and "offset" in r.stderr
