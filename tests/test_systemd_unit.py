"""gpud.service as shipped, checked by a real systemd 252 (PID 1 of private namespaces).

`systemd-analyze verify` with nothing printed, the security exposure under the
goal, sysusers/tmpfiles applied to a scratch root, and the unit itself run with
all its hardening (user gpud, directories, watchdog, reload, stop) around a
stand-in daemon that speaks through gpud.systemd. The real daemon under the
same unit is tests/test_systemd_e2e.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdbox import SystemdBox, unavailable

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "gpud.service"
SYSUSERS = REPO / "systemd" / "gpud.sysusers"
TMPFILES = REPO / "systemd" / "gpud.tmpfiles"
EXPOSURE = REPO / "scripts" / "security-exposure"
STANDIN = REPO / "tests" / "sdbox" / "standin_daemon.py"

pytestmark = pytest.mark.systemd


def _directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every directive line."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def test_unit_says_what_the_issue_asks() -> None:
    d = _directives(UNIT.read_text())
    single = {k: v for s, k, v in d if s == "Service"}
    for key, value in {
        "Type": "notify",
        "ExecStart": "/usr/bin/gpud run",
        "ExecReload": "/usr/bin/gpud reload",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "KillMode": "process",
        "User": "gpud",
        "StateDirectory": "gpud",
        "RuntimeDirectory": "gpud",
        "RuntimeDirectoryPreserve": "yes",
        "ConfigurationDirectory": "gpud",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
        "SupplementaryGroups": "video render",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "UMask": "0077",
    }.items():
        assert single.get(key) == value, key
    assert "@system-service" in [v for s, k, v in d if k == "SystemCallFilter"]
    allowed = {v.split()[0] for s, k, v in d if k == "DeviceAllow"}
    assert {"char-nvidiactl", "char-nvidia-uvm", "char-nvidia-frontend", "char-nvidia"} <= allowed
    # these would cut the GPU off
    assert "PrivateDevices" not in single and "MemoryDenyWriteExecute" not in single
    # systemd has no inline comments: "WatchdogSec=30 # x" is a bad value
    for _section, k, v in d:
        assert "#" not in v, f"inline comment in {k}={v}"
    assert int(single["TimeoutStopSec"]) >= 60


@pytest.mark.gpu
def test_device_allow_names_match_this_nvidia_driver() -> None:
    """DeviceAllow=char-NAME resolves through /proc/devices: a name the driver does not
    register silently allows nothing. Measured on the lent H100 (driver with CUDA 13):
    195 nvidia, 195 nvidiactl, 238 nvidia-uvm, 241 nvidia-caps (older drivers: nvidia-frontend).
    """
    devices = Path("/proc/devices").read_text()
    names = {line.split()[1] for line in devices.splitlines() if line[:1].strip().isdigit()}
    if not any(n.startswith("nvidia") for n in names):
        pytest.skip("no NVIDIA driver loaded here")
    allowed = {
        v.split()[0].removeprefix("char-")
        for _, k, v in _directives(UNIT.read_text())
        if k == "DeviceAllow"
    }
    assert "nvidia-uvm" in names and "nvidia-uvm" in allowed
    # the device nodes /dev/nvidiaN and /dev/nvidiactl (major 195) are covered
    assert {"nvidia", "nvidiactl"} & names & allowed or "nvidia-frontend" in names & allowed


@pytest.fixture(scope="module")
def box() -> Iterator[SystemdBox]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with SystemdBox.boot(users=["gpud"]) as b:
        yield b


def _unit_with(binary: str) -> str:
    return UNIT.read_text().replace("/usr/bin/gpud", binary)


def test_verify_prints_nothing(box: SystemdBox) -> None:
    """`systemd-analyze verify`, inside the namespace (on the host it writes /run)."""
    stub = box.state / "gpud"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = box.state / "verify" / "gpud.service"
    unit.parent.mkdir()
    unit.write_text(_unit_with(str(stub)))
    r = box.run("systemd-analyze", "verify", str(unit), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    # and it does notice a broken unit
    bad = box.state / "verify-bad" / "gpud.service"
    bad.parent.mkdir()
    bad.write_text(_unit_with(str(stub)).replace("WatchdogSec=30", "WatchdogSec=30 # comment"))
    r = box.run("systemd-analyze", "verify", str(bad), check=False)
    assert "Failed to parse sec value, ignoring: 30 # comment" in r.stdout + r.stderr


def test_security_exposure_at_most_4(box: SystemdBox) -> None:
    r = box.run(str(EXPOSURE), str(UNIT), "4.0", check=False)
    sys.stdout.write(r.stdout[-400:])
    m = re.search(r"exposure ([0-9.]+) \(goal", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 4.0
    assert r.returncode == 0


def test_sysusers_and_tmpfiles_on_a_scratch_root() -> None:
    with tempfile.TemporaryDirectory() as root:
        Path(root, "etc").mkdir()
        subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)], check=True)
        passwd = Path(root, "etc/passwd").read_text()
        assert re.search(
            r"^gpud:x:\d+:\d+:gpud daemon:/var/lib/gpud:/usr/sbin/nologin$", passwd, re.M
        )
        subprocess.run(
            ["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)], check=True
        )
        st = Path(root, "var/lib/gpud").stat()
        uid = int(re.search(r"^gpud:x:(\d+):", passwd, re.M).group(1))  # type: ignore[union-attr]
        assert st.st_uid == uid and oct(st.st_mode & 0o777) == "0o750"


def _standin_dropin() -> str:
    # The venv's interpreter lives under /root (pyenv), which ProtectHome=yes
    # hides and mode 0700 forbids to user gpud: show only that prefix, read-only.
    base = Path(sys.base_prefix).resolve()
    return (
        "[Service]\n"
        "ProtectHome=tmpfs\n"
        f"BindReadOnlyPaths={base}\n"
        # this checkout, wherever CI cloned it (PrivateTmp= hides /tmp, ProtectHome= /home)
        f"BindReadOnlyPaths={REPO}\n"
        f"Environment=PYTHONPATH={REPO}\n"
        "Environment=STANDIN_DELAY=1.5\n"
        "WatchdogSec=3\n"
        "RestartSec=0.5\n"
        "TimeoutAbortSec=5\n"
    )


@pytest.fixture
def standin(box: SystemdBox) -> Iterator[SystemdBox]:
    exe = f"{sys.executable} -u {STANDIN}"
    text = _unit_with("/usr/bin/gpud").replace("ExecStart=/usr/bin/gpud run", f"ExecStart={exe}")
    text = text.replace(
        "ExecReload=/usr/bin/gpud reload", "ExecReload=/bin/kill -HUP $MAINPID"
    )
    box.write("/etc/gpud/gpud.toml", "# as shipped by the package\n")
    box.install_unit("gpud.service", text, {"test.conf": _standin_dropin()})
    try:
        yield box
    finally:
        box.ctl("stop", "gpud.service", check=False)
        box.ctl("reset-failed", "gpud.service", check=False)


def test_packaged_unit_runs_hardened_with_notify_and_watchdog(standin: SystemdBox) -> None:
    box = standin
    t0 = time.monotonic()
    r = box.ctl("start", "gpud.service", check=False)
    started = time.monotonic() - t0
    assert r.returncode == 0, r.stderr + box.journal("gpud.service")
    assert started >= 1.4, "start must wait for READY=1"
    assert box.prop("gpud.service", "ActiveState") == "active"
    status = box.ctl("status", "gpud.service", check=False).stdout
    assert 'Status: "profile day · no models · config a1b2c3-0"' in status, status

    probe = json.loads(box.ns_path("/run/gpud/probe.json").read_text())
    assert probe["uid"] != 0
    assert probe["state_writable"] and probe["runtime_writable"] and probe["tmp_writable"]
    assert not probe["etc_writable"] and not probe["etc_gpud_writable"]
    assert not probe["usr_writable"]
    assert probe["config_dir"] == "/etc/gpud"
    assert probe["umask"] == "0o77"
    assert probe["journal_stream"] and not probe["env_notify"]

    # the watchdog (3 s) is kept fed across several periods by the live loop
    pid = box.prop("gpud.service", "MainPID")
    time.sleep(7)
    assert box.prop("gpud.service", "MainPID") == pid
    assert box.prop("gpud.service", "NRestarts") == "0"

    # journald priorities and one entry per traceback
    log = box.run("journalctl", "--no-pager", "-o", "json", "-u", "gpud.service").stdout
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    msgs = {
        e.get("MESSAGE"): e.get("PRIORITY") for e in entries if isinstance(e.get("MESSAGE"), str)
    }
    folded = [m for m in msgs if m.startswith("gpud.standin: folded traceback test")]
    assert folded and "Traceback" in folded[0] and "RuntimeError: a traceback" in folded[0]
    assert msgs[folded[0]] == "3"
    assert msgs.get("gpud.standin: ready") == "6"

    # reload: RELOADING/READY through the protocol, same MainPID
    box.ctl("reload", "gpud.service")
    assert box.wait(lambda: "config a1b2c3-1" in box.prop("gpud.service", "StatusText"), 5)
    assert box.prop("gpud.service", "MainPID") == pid

    # a hung reconcile loop: no more pings, systemd kills and restarts
    box.ctl("kill", "--kill-who=main", "-s", "SIGUSR1", "gpud.service")
    assert box.wait(lambda: box.prop("gpud.service", "NRestarts") == "1", 15)
    assert box.wait(lambda: box.prop("gpud.service", "ActiveState") == "active", 10)
    assert box.prop("gpud.service", "MainPID") != pid
    journal = box.journal("gpud.service")
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal

    # stop: STOPPING, clean exit
    box.ctl("stop", "gpud.service")
    assert box.prop("gpud.service", "ActiveState") == "inactive"
    assert box.prop("gpud.service", "Result") == "success"
