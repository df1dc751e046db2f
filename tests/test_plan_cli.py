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
source = "m/chat"
[models.batch]
source = "m/batch"
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
    assert data["next_boundary"] == {"at": "2026-03-27T20:00:00+01:00", "profile": "night",
                                     "prewake_seconds": 0.0}
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


def test_at_takes_local_times_on_the_schedule_clock(tmp_path: Path) -> None:
    """`--at` without an offset is the file's timezone (Europe/Paris), not an error."""
    r = plan(tmp_path, "--at", "2026-03-27T21:00:00", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["at"] == "2026-03-27T21:00:00+01:00"
    for at in ("10:00", "tomorrow 07:55", "tomorrow", "fri 19:30", "2026-03-30T07:59"):
        r = plan(tmp_path, "--at", at, "--json")
        assert r.returncode == 0, (at, r.stderr)
        got = json.loads(r.stdout)["at"]
        assert got.endswith(("+01:00", "+02:00")), (at, got)  # Paris, winter or summer
    tomorrow = json.loads(plan(tmp_path, "--at", "tomorrow 07:55", "--json").stdout)
    assert "T07:55:00" in tomorrow["at"]


def test_at_that_gpud_cannot_read_names_the_forms_it_takes(tmp_path: Path) -> None:
    r = plan(tmp_path, "--at", "noonish")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'noonish'" in r.stderr and "tomorrow" in r.stderr and "ISO 8601" in r.stderr


def test_text_output_shows_pre_wake_and_that_fit_was_not_checked(tmp_path: Path) -> None:
    """Monday 07:59:30 is inside the day profile's 60 s pre-wake: chat is asleep by night and
    wakes before 08:00; the text says so, and says the fit was not checked (no --gpus)."""
    r = plan(tmp_path, "--at", "2026-03-30T07:59:30", "--observed",
             '{"chat": "asleep", "batch": "awake"}')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pre-wake 60s before" in out
    assert "pre-wake: chat: pre-waking for profile day at 08:00" in out
    assert [line.split()[1:3] for line in out.splitlines() if line.strip().startswith("1.")] == [
        ["wake", "chat"]]
    assert "fit not checked" in out


def test_overrides_and_intents_are_layered_as_the_daemon_layers_them(tmp_path: Path) -> None:
    r = plan(tmp_path, "--at", "2026-03-27T12:00", "--intent", "batch=awake",
             "--override", "chat=asleep", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["desired"] == {"chat": "asleep", "batch": "awake"}
    assert data["layers"] == {"chat": "override", "batch": "policy"}
    assert data["reasons"]["chat"] == "sleep by an operator"
    bad = plan(tmp_path, "--override", "nope=asleep")
    assert bad.returncode == 2 and "no model 'nope'" in bad.stderr


FIT = """
[models.chat]
source = "{big}"
gpu = 0
kv_cache = "8GiB"
priority = 10
{pinned}
[models.code]
source = "{big}"
gpu = 0
kv_cache = "8GiB"
priority = 20
"""


def big_model(tmp_path: Path) -> Path:
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({  # an 8B Llama shape: ~16 GB in bf16
        "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "torch_dtype": "bfloat16"}))
    return d


def fit_plan(tmp_path: Path, gpus: str, pinned: bool = False) -> dict[str, object]:
    path = tmp_path / "fit.toml"
    path.write_text(FIT.format(big=big_model(tmp_path) if not (tmp_path / "big").exists()
                               else tmp_path / "big", pinned="pinned = true" if pinned else ""))
    r = subprocess.run([sys.executable, "-m", "gpud.cli", "plan", "--file", str(path),
                        "--observed", '{"chat": "awake"}', "--gpus", gpus, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_plan_frees_a_lower_priority_model_to_fit_and_reports_what_cannot(tmp_path: Path) -> None:
    roomy = fit_plan(tmp_path, '{"0": {"total": "80GiB", "free": "60GiB"}}')
    assert [(a["action"], a["model"]) for a in roomy["actions"]] == [("load", "code")]
    tight = fit_plan(tmp_path, '{"0": {"total": "48GiB", "free": "10GiB"}}')
    assert [(a["action"], a["model"]) for a in tight["actions"]] == [
        ("sleep", "chat"), ("load", "code")]
    assert tight["actions"][0]["reason"] == "making room for code on GPU 0"
    pinned = fit_plan(tmp_path, '{"0": {"total": "48GiB", "free": "10GiB"}}', pinned=True)
    assert pinned["actions"] == []
    assert "code" in pinned["blocked"] and "spared: chat (pinned)" in pinned["blocked"]["code"]
    small = fit_plan(tmp_path, '{"0": {"total": "24GiB", "free": "2GiB"}}')
    assert small["actions"] == [] and "needs" in small["blocked"]["code"]
