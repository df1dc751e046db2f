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
