"""sd_notify against a real NOTIFY_SOCKET: an AF_UNIX datagram socket this test owns.

First the Notifier alone (what systemd would read, byte for byte), then the
real daemon (`gpud run`) as a subprocess talking to the same kind of socket:
READY once it serves, STATUS, RELOADING/MONOTONIC_USEC/READY around a reload,
STOPPING on SIGTERM, and WATCHDOG pings that stop when its loop is blocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpud.systemd import Notifier, engine_env, run_watchdog, status_line

REPO = Path(__file__).resolve().parent.parent


class NotifySocket:
    """The manager's end: bound datagram socket, messages parsed as systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), **extra}

    def recv(self, timeout: float = 2.0) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        # systemd rejects non-UTF-8 STATUS=: decoding strictly proves we send UTF-8
        text = data.decode("utf-8")
        msg = dict(line.split("=", 1) for line in text.split("\n") if line)
        self.messages.append(msg)
        return msg

    def drain(self, seconds: float) -> list[dict[str, str]]:
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None:
                out.append(msg)
        return out

    def wait_for(
        self, key: str, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
    ) -> dict[str, str]:
        """The next message with KEY; fails at once if `proc` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(min(left, 0.25))
            if msg is not None and key in msg:
                return msg
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"gpud exited ({proc.returncode}) before {key}")
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages[-10:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- the Notifier alone ------------------------------------------------------


def test_ready_and_status_reach_the_socket(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    assert n.enabled
    line = status_line("day", 3, 4, {"chat": "waking"}, "a1b2c3")
    assert n.ready(status=line)
    assert notify_socket.recv() == {"READY": "1", "STATUS": line}
    assert n.status("profile night · 0/4 models ready")
    # "·" arrives as UTF-8 (sdnotify alone would send Latin-1, which systemd drops)
    assert notify_socket.recv() == {"STATUS": "profile night · 0/4 models ready"}


def test_status_is_one_line(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    n.status("config error\nmodels.chat.kv_cache: not a size")
    msg = notify_socket.recv()
    assert msg == {"STATUS": "config error models.chat.kv_cache: not a size"}


def test_reloading_carries_monotonic_usec_then_ready(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    before = _monotonic_usec()
    n.reloading()
    after = _monotonic_usec()
    n.ready()
    first, second = notify_socket.recv(), notify_socket.recv()
    assert first is not None and first["RELOADING"] == "1"
    assert before <= int(first["MONOTONIC_USEC"]) <= after
    assert second == {"READY": "1"}


def test_stopping(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env())
    n.stopping(status="stopping 2 engines")
    assert notify_socket.recv() == {"STOPPING": "1", "STATUS": "stopping 2 engines"}


def test_abstract_socket_address() -> None:
    name = f"gpud-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert server.recv(4096) == b"READY=1"


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert not n.status("x")
    assert n.watchdog_interval() is None
    assert not n.ping_if_alive(time.monotonic(), time.monotonic())


def test_missing_socket_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not n.enabled
    assert not n.ready()


def test_watchdog_interval_is_half_and_honours_watchdog_pid(notify_socket: NotifySocket) -> None:
    assert Notifier(notify_socket.env(WATCHDOG_USEC="30000000")).watchdog_interval() == 15.0
    mine = notify_socket.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid()))
    assert Notifier(mine).watchdog_interval() == 1.0
    # inherited from a parent that is the real main process: not ours to ping
    theirs = notify_socket.env(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getppid()))
    assert Notifier(theirs).watchdog_interval() is None
    assert Notifier(notify_socket.env(WATCHDOG_USEC="junk")).watchdog_interval() is None
    assert Notifier(notify_socket.env(WATCHDOG_USEC="0")).watchdog_interval() is None
    assert Notifier(notify_socket.env()).watchdog_interval() is None


def test_ping_only_when_the_loop_passed_recently(notify_socket: NotifySocket) -> None:
    n = Notifier(notify_socket.env(WATCHDOG_USEC="2000000"))
    now = time.monotonic()
    assert n.ping_if_alive(now - 0.5, now)
    assert notify_socket.recv() == {"WATCHDOG": "1"}
    assert not n.ping_if_alive(now - 1.5, now)  # older than the 1 s interval
    assert not n.ping_if_alive(None, now)  # no pass yet
    assert n.ping_if_alive(now - 1.5, now, max_age=2.0)
    assert notify_socket.recv() == {"WATCHDOG": "1"}
    assert notify_socket.recv(timeout=0.2) is None


def test_watchdog_task_stops_pinging_when_loop_is_stuck_or_blocked(
    notify_socket: NotifySocket,
) -> None:
    """A real asyncio loop: a reconcile task completing passes keeps pings coming;
    a reconcile task stuck on an await, or a blocked event loop, stops them."""
    n = Notifier(notify_socket.env(WATCHDOG_USEC="200000"))  # ping every 0.1 s
    stuck = False
    last_pass: float | None = None
    counts: dict[str, int] = {}

    async def reconcile() -> None:
        nonlocal last_pass
        while True:
            if stuck:
                await asyncio.Event().wait()  # forever: the loop runs, reconcile does not
            last_pass = time.monotonic()
            await asyncio.sleep(0.02)

    async def main() -> None:
        nonlocal stuck
        tasks = [
            asyncio.create_task(reconcile()),
            asyncio.create_task(run_watchdog(n, lambda: last_pass)),
        ]
        await asyncio.sleep(0.6)
        counts["alive"] = len(notify_socket.drain(0.01))
        stuck = True
        await asyncio.sleep(0.25)  # a pass up to one interval old still counts
        counts["grace"] = len(notify_socket.drain(0.01))
        await asyncio.sleep(0.6)
        counts["stuck"] = len(notify_socket.drain(0.01))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert 4 <= counts["alive"] <= 8, counts
    assert counts["grace"] <= 2, counts
    assert counts["stuck"] == 0, counts
    assert all(m == {"WATCHDOG": "1"} for m in notify_socket.messages)

    # a blocked event loop: the timer task cannot run, so no ping after the first
    async def blocked() -> None:
        task = asyncio.create_task(run_watchdog(n, time.monotonic))
        await asyncio.sleep(0)  # the first ping
        time.sleep(0.5)  # the whole loop is blocked for five intervals
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(blocked())
    assert len(notify_socket.drain(0.2)) == 1


def test_engine_env_strips_what_belongs_to_gpuds_unit() -> None:
    env = {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/gpud",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "42",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "api",
        "JOURNAL_STREAM": "8:1234",
        "VLLM_SERVER_DEV_MODE": "1",
    }
    assert engine_env(env) == {
        "PATH": "/usr/bin",
        "HOME": "/var/lib/gpud",
        "JOURNAL_STREAM": "8:1234",
        "VLLM_SERVER_DEV_MODE": "1",
    }
    assert env["NOTIFY_SOCKET"]  # the input is not modified


def test_unset_environment(monkeypatch: pytest.MonkeyPatch, notify_socket: NotifySocket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    n = Notifier(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_interval() == 1.0
    assert n.ready()
    assert notify_socket.recv() == {"READY": "1"}


def test_status_line_shapes() -> None:
    assert (
        status_line("day", 3, 4, {"chat": "waking"}, "a1b2c3")
        == "profile day · 3/4 models ready · chat waking · config a1b2c3"
    )
    assert status_line(None, 0, 0, {}, None) == "no profile · no models · no config"
    many = {f"m{i}": "starting" for i in range(5)}
    line = status_line("night", 0, 5, many, "0123456789abcdef0123")
    assert "m0 starting, m1 starting, m2 starting, +2 more" in line
    assert line.endswith("config 0123456789ab")


# -- the real daemon against the socket ---------------------------------------

GPUD = REPO / ".venv" / "bin" / "gpud"


def _daemon_available() -> str | None:
    if not (REPO / "gpud" / "daemon.py").exists():
        return "gpud/daemon.py not written yet"
    if not GPUD.exists():
        return ".venv/bin/gpud not installed (pip install -e .)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(port: int, state: Path, runtime: Path, comment: str = "") -> str:
    return (
        f"# {comment}\n"
        "[daemon]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f'state_dir = "{state}"\n'
        f'runtime_dir = "{runtime}"\n'
    )


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, config: Path) -> None:
        self.proc, self.port, self.config = proc, port, config

    def status(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.port}/api/v1/status"
        with urllib.request.urlopen(url, timeout=5) as r:
            data: dict[str, object] = json.load(r)
            return data

    def post(self, path: str) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=b"{}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=5):
            pass

    def revision(self) -> str:
        config = self.status()["config"]
        assert isinstance(config, dict)
        return str(config["revision"])


@pytest.fixture
def daemon(tmp_path: Path, notify_socket: NotifySocket) -> Iterator[Daemon]:
    reason = _daemon_available()
    if reason:
        pytest.skip(reason)
    port = _free_port()
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "etc" / "gpud.toml"
    config.parent.mkdir()
    config.write_text(_config(port, state, tmp_path / "run", "v1"))
    env = {
        **os.environ,
        **notify_socket.env(WATCHDOG_USEC="1000000"),  # ping every 0.5 s
        "GPUD_TEST_HOOKS": "1",
    }
    for key in ("JOURNAL_STREAM", "WATCHDOG_PID", "GPUD_CONFIG", "GPUD_URL"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [str(GPUD), "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield Daemon(proc, port, config)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0]
        sys.stdout.write(out.decode(errors="replace")[-3000:])


def test_daemon_ready_status_reload_watchdog_stopping(
    daemon: Daemon, notify_socket: NotifySocket
) -> None:
    t0 = time.monotonic()
    ready = notify_socket.wait_for("READY", timeout=30, proc=daemon.proc)
    # no reload is announced before the first READY (the watcher's catch-up reload at start
    # once sent RELOADING=1 and READY=1 before the listener was bound)
    assert not any("RELOADING" in m for m in notify_socket.messages), notify_socket.messages
    # READY means it serves: the API answers right away
    assert daemon.status()["config"]
    assert time.monotonic() - t0 < 30
    statuses = [m["STATUS"] for m in notify_socket.messages if "STATUS" in m]
    assert statuses or "STATUS" in ready
    rev1 = daemon.revision()
    assert rev1[:6] in (statuses[-1] if statuses else ready["STATUS"])

    # watchdog pings keep coming while the loop runs
    pings = [m for m in notify_socket.drain(2.0) if "WATCHDOG" in m]
    assert len(pings) >= 2

    # reload on SIGHUP: RELOADING=1 + MONOTONIC_USEC, then READY=1, new revision
    daemon.config.write_text(daemon.config.read_text().replace("# v1", "# v2"))
    before = _monotonic_usec()
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) >= before
    notify_socket.wait_for("READY")
    assert daemon.revision() != rev1

    # SIGTERM: STOPPING=1 and a clean exit
    daemon.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING")
    assert daemon.proc.wait(timeout=60) == 0


def test_daemon_watchdog_stops_when_reconcile_loop_stalls(
    daemon: Daemon, notify_socket: NotifySocket
) -> None:
    """The reconcile loop stuck (GPUD_TEST_HOOKS' /api/v1/debug/stall): the pings stop,
    since they prove the loop, not the process."""
    notify_socket.wait_for("READY", timeout=30, proc=daemon.proc)
    assert [m for m in notify_socket.drain(1.5) if "WATCHDOG" in m]
    daemon.post("/api/v1/debug/stall")
    notify_socket.drain(1.0)  # a pass up to one interval old may still earn a ping
    stalled = [m for m in notify_socket.drain(2.0) if "WATCHDOG" in m]
    assert stalled == []
    assert daemon.proc.poll() is None  # alive, just not making progress


def test_daemon_watchdog_stops_when_process_frozen(
    daemon: Daemon, notify_socket: NotifySocket
) -> None:
    """SIGSTOP freezes the whole process: no ping while frozen, pings resume after."""
    notify_socket.wait_for("READY", timeout=30, proc=daemon.proc)
    assert [m for m in notify_socket.drain(1.5) if "WATCHDOG" in m]
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = [m for m in notify_socket.drain(2.0) if "WATCHDOG" in m]
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert frozen == []
    notify_socket.wait_for("WATCHDOG", timeout=5)
