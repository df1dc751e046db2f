"""Run the real `gpud run` as a subprocess on a loopback port, for end-to-end tests.

The daemon is the installed console script in gpud's virtualenv; the test talks to it over
real HTTP. `stop()` sends SIGTERM like systemd would; `kill9()` is for crash tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GPUD = [sys.executable, "-m", "gpud.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value; the value. Fails the test with `what`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def tagged_pids(model_name: str, state_dir: Path) -> list[int]:
    """Leaders of engine groups in /proc that a gpud on `state_dir` tagged with this model."""
    want = [f'"model":"{model_name}"'.encode(), f'"state_dir":"{state_dir.resolve()}"'.encode()]
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat") as f:
                pgrp = int(f.read().rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError):
            continue
        if pgrp == int(entry) and all(w in env for w in want):
            pids.append(int(entry))
    return pids


class Gpud:
    def __init__(self, config: Path, port: int, *, env: dict[str, str] | None = None,
                 log: Path | None = None, args: tuple[str, ...] = ()) -> None:
        self.config, self.port = config, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log or config.with_suffix(".log")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID"):
            self.env.pop(k, None)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Gpud:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*GPUD, "run", "--config", str(self.config), *self.args], cwd=REPO, env=self.env,
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        if wait:
            wait_for(self.healthy, 30, f"gpud on {self.url} (log {self.log})")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"gpud exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return bool(self.get("/healthz")["ok"])
        except (OSError, urllib.error.URLError):
            return False

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path, timeout=5)

    def status(self) -> dict[str, Any]:
        return self.get("/api/v1/status")  # type: ignore[no-any-return]

    def models(self) -> dict[str, Any]:
        return self.status()["models"]  # type: ignore[no-any-return]

    def wait_states(self, want: dict[str, str], timeout: float = 180) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            models = self.models()
            ok = all(models.get(k, {}).get("state") == v for k, v in want.items())
            return models if ok else None

        try:
            return wait_for(check, timeout, f"states {want}", interval=0.2)  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nnow: {json.dumps(self.models(), indent=1)}\n"
                                 f"log:\n{self.log_text()}") from None

    def events(self) -> list[dict[str, Any]]:
        """The daemon's event history (the SSE stream's backlog, then closed)."""
        with urllib.request.urlopen(self.url + "/api/v1/events?history=only", timeout=10) as r:
            return [json.loads(line[6:]) for line in r.read().decode().splitlines()
                    if line.startswith("data: ")]

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GPUD, "--url", self.url, *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=check, env=self.env)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
