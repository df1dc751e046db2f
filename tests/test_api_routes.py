"""The documented HTTP surface is the real one, and bad input never gets a 500.

Fast: the daemon's application as `gpud run` assembles it (proxy, API, page, /metrics) on a
real loopback socket, for a config whose one model stays unloaded and whose reconcile loop
is not running, so no engine is ever started. docs/openapi.json is read as a client would.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from gpudproc import free_port

from gpud.config import load_config
from gpud.daemon import Daemon

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
METHODS = {"get", "post", "put", "delete", "patch"}

Client = TestClient[web.Request, web.Application]


_port = free_port  # the one free-port helper (tests/gpudproc.py)


CONFIG = """
[daemon]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/state"
runtime_dir = "{tmp}/run"
timezone = "UTC"

[engines.vllm]
command = ["/nonexistent/vllm", "serve"]

[models.chat]
source = "nonexistent/chat"
state = "unloaded"

[profiles.day]
chat = "unloaded"

[[schedule]]
profile = "day"
when = "otherwise"
"""


def build_app(daemon: Daemon) -> web.Application:
    """The application `Daemon.serve` runs (without test hooks): its middlewares included."""
    return daemon.make_app()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Client, Daemon]]:
    path = tmp_path / "gpud.toml"
    path.write_text(CONFIG.format(port=_port(), tmp=tmp_path))
    daemon = Daemon(load_config(path), path, stop_engines_on_exit=True)
    c = TestClient(TestServer(build_app(daemon)))
    await c.start_server()
    daemon.reconciler.pass_once()  # as `serve` does: instances exist; nothing to start
    try:
        yield c, daemon
    finally:
        await c.close()


@pytest.fixture
def client(served: tuple[Client, Daemon]) -> Client:
    return served[0]


def _documented() -> set[tuple[str, str]]:
    doc = json.loads(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.1")
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m in METHODS}


def _routed(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        if "prefix" in info:  # a static directory
            path = str(info["prefix"]).rstrip("/") + "/{path}"
        else:
            path = str(info.get("path") or info.get("formatter"))
            path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)
        out.add((route.method, path))
    return out


async def test_every_documented_route_exists_and_every_route_is_documented(
        client: Client) -> None:
    documented, routed = _documented(), _routed(client.app)
    assert documented - routed == set(), "documented but not served"
    assert routed - documented == set(), "served but not documented in docs/openapi.json"
    # docs/api.md names every route too
    api_md = (OPENAPI.parent / "api.md").read_text()
    for method, path in documented:
        assert f"{method} {path}" in api_md, f"{method} {path} missing from docs/api.md"


async def test_documented_reads_answer(client: Client) -> None:
    for method, path in sorted(_documented()):
        if method != "GET" or path in ("/api/v1/events", "/v1/{tail}"):  # {tail}: a 404
            continue
        url = path.replace("{name}", "chat").replace("{path}", "page.css")
        resp = await client.get(url)
        assert resp.status == 200, (url, resp.status, await resp.text())
    async with client.get("/api/v1/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")


# (method, path, raw body or JSON, expected status)
BAD: list[tuple[str, str, Any, int]] = [
    ("POST", "/api/v1/models/chat/sleep", b"{not json", 400),
    ("POST", "/api/v1/models/chat/sleep", [1, 2], 400),
    ("POST", "/api/v1/models/chat/sleep", "just a string", 400),
    ("POST", "/api/v1/models/chat/sleep", {"for": "soon"}, 422),
    ("POST", "/api/v1/models/chat/sleep", {"for": ["5m"]}, 422),
    ("POST", "/api/v1/models/chat/sleep", {"level": 3}, 422),
    ("POST", "/api/v1/models/chat/sleep", {"level": "2"}, 422),
    ("POST", "/api/v1/models/chat/sleep", {"level": True}, 422),
    ("POST", "/api/v1/models/chat/sleep", {"for": "99999999999d"}, 422),
    ("POST", "/api/v1/models/chat/sleep", {"for": 1e300}, 422),
    ("POST", "/api/v1/models/chat/move", {"gpu": 7}, 422),
    ("POST", "/api/v1/models/chat/move", {"gpu": True}, 422),
    ("POST", "/api/v1/models/chat/move", {"gpu": -1}, 422),
    ("POST", "/api/v1/models/chat/sleep", b"[" * 100_000, 400),
    ("POST", "/api/v1/reload", b"[" * 100_000 + b"]" * 100_000, 400),
    ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),
    ("POST", "/v1/completions", b'{"model": ' + b"[" * 100_000, 400),
    ("GET", "/no/such/route", None, 404),
    ("DELETE", "/healthz", None, 405),
    ("PUT", "/v1/chat/completions", {}, 405),
    ("POST", "/api/v1/models/chat/sleep", b"\xff\xfe", 400),
    ("POST", "/api/v1/models/chat/explode", {}, 404),
    ("POST", "/api/v1/models/nope/sleep", {}, 404),
    ("POST", "/api/v1/models/%3Cscript%3E/wake", {}, 404),
    ("PUT", "/api/v1/profile", b"", 422),  # no body: the profile field is missing
    ("PUT", "/api/v1/profile", b"{not json", 400),
    ("PUT", "/api/v1/profile", {}, 422),
    ("PUT", "/api/v1/profile", {"profile": "nope"}, 422),
    ("PUT", "/api/v1/profile", {"profile": 7}, 422),
    ("PUT", "/api/v1/profile", {"profile": ["day"]}, 422),
    ("PUT", "/api/v1/profile", {"profile": "day", "for": "forever"}, 422),
    ("PUT", "/api/v1/profile", {"profile": "day", "for": -5}, 422),
    ("PUT", "/api/v1/profile", [], 400),
    ("DELETE", "/api/v1/profile", b"{not json", None),
    ("POST", "/api/v1/reload", b"{not json", 400),
    ("POST", "/api/v1/reload", [], 400),
    ("GET", "/api/v1/models/chat/logs?lines=lots", None, 400),
    ("GET", "/api/v1/models/chat/logs?lines=0", None, 400),
    ("GET", "/api/v1/models/chat/logs?lines=999999", None, 400),
    ("GET", "/api/v1/models/nope/logs", None, 404),
    ("GET", "/api/v1/models/nope", None, 404),
]


@pytest.mark.parametrize(("method", "path", "body", "want"), BAD,
                         ids=[f"{m} {p} {b!r:.24}" for m, p, b, _ in BAD])
async def test_bad_input_gets_a_clear_4xx_never_a_500(
        client: Client, method: str, path: str, body: Any, want: int | None) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    resp = await client.request(method, path, **kwargs)
    text = await resp.text()
    assert resp.status < 500, (resp.status, text)
    if want is None:  # a route that ignores its body: fine as long as it is not a 500
        return
    assert resp.status == want, text
    assert resp.content_type == "application/json", text
    data = json.loads(text)
    message = data["error"]["message"]
    assert isinstance(message, str) and len(message) > 10
    assert data["error"]["code"].startswith("gpud_")


async def test_a_reload_of_an_invalid_file_is_a_located_422(
        client: Client, tmp_path: Path) -> None:
    path = tmp_path / "gpud.toml"
    path.write_text(path.read_text().replace('state = "unloaded"', 'state = "sideways"'))
    resp = await client.post("/api/v1/reload", json={})
    assert resp.status == 422
    data = await resp.json()
    assert data["valid"] is False and f"{path}:" in data["error"]


async def test_the_page_escapes_what_it_shows(served: tuple[Client, Daemon]) -> None:
    client, daemon = served
    evil = '<img src=x onerror="alert(1)">'
    daemon.reconciler.set_override("chat", "unloaded", None, evil)
    daemon.events.publish("override", model="chat", reason=evil)
    resp = await client.get("/")
    html = await resp.text()
    assert resp.status == 200
    assert evil not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
