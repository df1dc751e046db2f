"""`gpud plan --file` and the daemon's `GET /api/v1/plan` are one pipeline (gpud.decide):
for the same file, instant, intents and overrides they say the same thing, pre-wake included.

The daemon is assembled as `gpud run` does (its app on a real loopback socket, no engines:
the loop is not running and no model is loaded); its clock is set to the instant, the
override goes through the real API, the intent through the policy layer's entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from aiohttp.test_utils import TestClient, TestServer
from test_api_routes import _port, build_app

from gpud.config import load_config
from gpud.daemon import Daemon
from gpud.policies.api import Wake
from gpud.states import State

ROOT = Path(__file__).resolve().parents[1]

FILE = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
timezone = "Europe/Paris"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]

[models.chat]
source = "nonexistent/chat"
state = "asleep"
[models.batch]
source = "nonexistent/batch"
state = "asleep"
[models.code]
source = "nonexistent/code"
state = "awake"

[profiles.day]
chat = "awake"
[profiles.night]
chat = "asleep"

[[schedule]]
profile = "day"
when = "mon-fri 08:00-20:00"
prewake = "90s"
[[schedule]]
profile = "night"
when = "otherwise"
"""

AT = "2026-03-30T07:59:00"  # Monday, 60 s before the day opens: inside chat's pre-wake
OBSERVED = {"chat": "asleep", "batch": "asleep", "code": "awake"}
SAME = ("profile", "profile_source", "next_boundary", "desired", "reasons", "layers",
        "prewake", "actions", "fit_checked", "blocked", "notes")


def cli_plan(path: Path) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-m", "gpud.cli", "plan", "--file", str(path), "--at", AT,
         "--observed", json.dumps(OBSERVED), "--override", "code=asleep",
         "--intent", "batch=awake", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


async def test_the_daemon_and_gpud_plan_agree(tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text(FILE.format(port=_port(), tmp=tmp_path))
    daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
    daemon.set_clock(datetime.fromisoformat(AT).replace(tzinfo=ZoneInfo("Europe/Paris")))
    client = TestClient(TestServer(build_app(daemon)))
    await client.start_server()
    try:
        r = daemon.reconciler
        r.pass_once()  # as `serve` does: instances exist (the actions start no engine here)
        for task in list(r._tasks.values()):
            task.cancel()
        r._tasks.clear()
        # what the engines would report: the CLI is told the same with --observed
        desired = r.desired()
        for key, state in OBSERVED.items():
            inst = r.instances[key]
            inst.change_state(State.UNLOADED)
            inst.change_state(State(state), "as adopted")
            inst.spec_hash = desired[key].spec_hash
        resp = await client.post("/api/v1/models/code/sleep", json={})
        assert resp.status == 200, await resp.text()
        r.set_policy_intents([Wake("batch", "asked in the dry run", policy="--intent")])
        resp = await client.get("/api/v1/plan")
        daemon_plan = await resp.json()
    finally:
        await client.close()
    cli = cli_plan(path)
    assert {k: daemon_plan[k] for k in SAME} == {k: cli[k] for k in SAME}
    assert cli["at"] == "2026-03-30T07:59:00+02:00"
    assert daemon_plan["at"].startswith("2026-03-30T07:59:00")  # its clock has moved on a little
    # and what they agree on is what the layers promise
    assert cli["desired"] == {"chat": "awake", "batch": "awake", "code": "asleep"}
    assert cli["layers"] == {"chat": "policy", "batch": "policy", "code": "override"}
    assert cli["prewake"] == {"chat": "pre-waking for profile day at 08:00"}
    assert [(a["action"], a["model"]) for a in cli["actions"]] == [  # type: ignore[index]
        ("sleep", "code"), ("wake", "batch"), ("wake", "chat")]
