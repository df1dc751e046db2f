"""The listener against hostile clients (issue 21 items 5 and 11), on a real `gpud run`:
slowloris heads and idle keep-alive connections are closed after their timeouts, 5,000 idle
connections leave /healthz answering and the log small, and a DNS-rebinding page (its own
Host, a matching Origin) cannot touch a model. No engines: the model is declared unloaded.

Timing figures (how fast /healthz answers under 5,000 idle sockets) are in
bench/idle_connections.py; here only what a client notices: answers, closes, refusals.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpudproc import Gpud, free_port

CONFIG = """\
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
header_timeout = "1s"
idle_timeout = "2s"
allowed_hosts = ["gpu-box.lan"]

[engines.vllm]
command = ["/bin/false"]

[models.chat]
source = "org/tiny-chat"
state = "unloaded"
load_on_demand = false
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpud]:
    tmp = tmp_path_factory.mktemp("listener")
    port = free_port()
    cfg = tmp / "gpud.toml"
    cfg.write_text(CONFIG.format(port=port, tmp=tmp))
    g = Gpud(cfg, port, log=tmp / "gpud.log").start()
    yield g
    assert g.stop() == 0


def _request(g: Gpud, method: str, path: str, host: str, origin: str | None = None,
             body: bytes | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{g.port}{path}", data=body, method=method)
    req.add_header("Host", host)
    if origin:
        req.add_header("Origin", origin)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        assert e.headers.get_content_type() == "application/json"
        return e.code, json.loads(e.read())


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes the connection (EOF; a 408 head first is fine)."""
    sock.settimeout(within)
    try:
        while chunk := sock.recv(4096):
            assert chunk.startswith(b"HTTP/1.1 4") or b"\r\n" in chunk
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_rebinding_page_cannot_unload_a_model(daemon: Gpud) -> None:
    evil = f"attacker.example:{daemon.port}"
    status, body = _request(daemon, "POST", "/api/v1/models/chat/load", evil,
                            origin=f"http://{evil}", body=b"{}")
    assert status == 403
    assert body["error"]["code"] == "gpud_host_not_allowed"  # type: ignore[index]
    assert "allowed_hosts" in body["error"]["message"]  # type: ignore[index]
    chat = daemon.models()["chat"]
    assert chat["desired"] == "unloaded" and chat["layer"] != "override", chat
    # The page and status also refuse to be read under a foreign name.
    assert _request(daemon, "GET", "/api/v1/status", evil)[0] == 403
    # By IP, localhost or a configured name: answered.
    for host in (f"127.0.0.1:{daemon.port}", f"localhost:{daemon.port}", "gpu-box.lan"):
        assert _request(daemon, "GET", "/api/v1/status", host)[0] == 200, host


def test_a_slowloris_head_is_closed_after_header_timeout(daemon: Gpud) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _closed_by_server(s, within=15), "a partial head was kept open"


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(daemon: Gpud) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(10)
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        assert _closed_by_server(s, within=15), "an idle keep-alive connection stayed open"


def test_5000_idle_connections_leave_healthz_answering(daemon: Gpud) -> None:
    log_before = daemon.log.stat().st_size
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(5000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", daemon.port))
            socks.append(s)
            if i % 1000 == 999:  # while they pile up, gpud still answers
                assert _request(daemon, "GET", "/healthz", "127.0.0.1")[0] == 200
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        assert _request(daemon, "GET", "/healthz", "127.0.0.1")[0] == 200
        # Each idle one is closed by gpud after header_timeout (1 s here).
        open_ = set(socks)
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if not data:
                    sel.unregister(s)
                    open_.discard(s)
        assert not open_, f"{len(open_)} of 5000 idle connections still open after 60 s"
        assert _request(daemon, "GET", "/healthz", "127.0.0.1")[0] == 200
    finally:
        for s in socks:
            s.close()
        sel.close()
    grown = daemon.log.stat().st_size - log_before
    assert grown < 1024**2, f"the log grew by {grown} bytes for 5,000 idle connections"


def test_its_own_errors_are_openai_shaped(daemon: Gpud) -> None:
    for method, path, want in (("GET", "/no/such/route", 404), ("DELETE", "/healthz", 405)):
        status, body = _request(daemon, method, path, "127.0.0.1")
        assert status == want
        assert isinstance(body["error"]["message"], str)  # type: ignore[index]


def test_the_log_says_nothing_per_connection(daemon: Gpud) -> None:
    text = Path(daemon.log).read_text()
    assert "Traceback" not in text
