"""Issue 19: every model-bearing route relayed, multipart forms streamed through, the 404 of
an unknown path, and SSE keep-alive comments to a streamed request held by a load or wake.

Against a real loopback aiohttp upstream that records the bytes it got (the engine
end-to-end tests are tests/test_e2e_routes.py); a small in-test Backend plays the daemon.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from test_proxy import CHAT_BODY, ROUTES, FakeBackend, Upstream, make_upstream_app, serve

from gpud.proxy import ApiKey, KeyRing, Proxy, hash_key
from gpud.proxy.paths import FORM_PATHS, JSON_PATHS


@dataclass
class Echo:
    """What the upstream saw of each request: path, Content-Type, body bytes, and when
    its first body bytes arrived (before the client finished sending, for a stream)."""

    seen: list[tuple[str, str, bytes]] = field(default_factory=list)
    first_bytes: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)


def echo_app(up: Upstream, echo: Echo) -> web.Application:
    """The chat upstream of test_proxy plus every new route, answering what it got."""
    app = make_upstream_app(up)

    async def relayed(request: web.Request) -> web.Response:
        chunks = []
        async for data in request.content.iter_any():
            chunks.append(data)
            echo.first_bytes.set()
        raw = b"".join(chunks)
        echo.seen.append((request.path, request.headers.get("Content-Type", ""), raw))
        if request.path.startswith("/v1/audio/"):
            return web.json_response({"text": f"{len(raw)} bytes"})
        return web.json_response({"path": request.path, "model": json.loads(raw)["model"]})

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        echo.seen.append((request.path, request.headers.get("Content-Type", ""),
                          json.dumps(body).encode()))
        if not body.get("stream"):
            return web.json_response({
                "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for kind, data in anthropic_events(body["model"]):
            await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def slow_first_token(request: web.Request) -> web.StreamResponse:
        """Headers at once, the first event only when the test lets it (a busy engine)."""
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        echo.slow_started.set()
        await up.release.wait()
        await resp.write(b'data: {"type": "response.completed"}\n\n')
        await resp.write_eof()
        return resp

    for path in JSON_PATHS + FORM_PATHS:
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                        "/tokenize", "/v1/messages", "/v1/responses"):
            app.router.add_post(path, relayed)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", slow_first_token)
    return app


def anthropic_events(model: str) -> list[tuple[str, dict[str, Any]]]:
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
           "content": [], "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": 1, "output_tokens": 0}}
    return [
        ("message_start", {"type": "message_start", "message": msg}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                              "stop_sequence": None},
                           "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"}),
    ]


@dataclass
class Env:
    up: Upstream
    echo: Echo
    backend: FakeBackend
    proxy: Proxy
    url: str
    http: aiohttp.ClientSession


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    up, echo = Upstream(), Echo()
    up_runner, up.url = await serve(echo_app(up, echo))
    backend = FakeBackend(up.url, ROUTES)
    proxy = Proxy(backend)
    runner, url = await serve(proxy.make_app())
    async with aiohttp.ClientSession() as http:
        yield Env(up, echo, backend, proxy, url, http)
    up.release.set()
    await runner.cleanup()
    await up_runner.cleanup()


# -- every model-bearing route --------------------------------------------------------


NEW_JSON = [p for p in JSON_PATHS if p not in (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/tokenize", "/detokenize", "/v1/messages")]


@pytest.mark.parametrize("path", NEW_JSON)
async def test_each_new_json_route_is_routed_by_model_and_relayed_byte_for_byte(
        env: Env, path: str) -> None:
    raw = b'{"model": "chat",  "query": "q", "documents": ["a", "b"], "input": "x"}'
    r = await env.http.post(env.url + path, data=raw,
                            headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    assert await r.json() == {"path": path, "model": "chat"}
    assert env.echo.seen[-1] == (path, "application/json", raw)


async def test_an_alias_on_a_new_route_reaches_the_engine_under_its_served_name(
        env: Env) -> None:
    r = await env.http.post(env.url + "/v1/rerank", json={"model": "gpt-4o", "query": "q"})
    assert json.loads(env.echo.seen[-1][2])["model"] == "chat"
    assert r.status == 200 and (await r.json())["model"] == "gpt-4o"  # the answer: the alias


async def test_unknown_v1_path_is_404_naming_the_supported_routes(env: Env) -> None:
    r = await env.http.post(env.url + "/v1/no/such/thing", json={"model": "chat"})
    assert r.status == 404
    err = (await r.json())["error"]
    assert err["code"] == "gpud_unknown_path"
    for path in ("/v1/messages", "/v1/rerank", "/pooling", "/v1/audio/transcriptions",
                 "/v1/chat/completions"):
        assert path in err["message"]
    r = await env.http.get(env.url + "/v1/chat/completions")
    assert r.status == 405 and r.headers["Allow"] == "POST"
    assert (await env.http.get(env.url + "/v1/models")).status == 200  # still served


async def test_anthropic_client_streams_and_not_through_the_proxy_with_x_api_key(
        env: Env) -> None:
    env.proxy.set_keys(KeyRing([ApiKey.from_hash("claude", hash_key("sk-claude"))]))
    c = anthropic.AsyncAnthropic(base_url=env.url, api_key="sk-claude", max_retries=0)
    msg = await c.messages.create(model="chat", max_tokens=8,
                                  messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].type == "text" and msg.model == "chat"
    kinds = []
    async with c.messages.stream(model="chat", max_tokens=8,
                                 messages=[{"role": "user", "content": "hi"}]) as s:
        async for event in s:
            kinds.append(event.type)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    bad = anthropic.AsyncAnthropic(base_url=env.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await bad.messages.create(model="chat", max_tokens=8,
                                  messages=[{"role": "user", "content": "hi"}])


# -- multipart forms ----------------------------------------------------------------


def form(model: str, audio: bytes, boundary: str = "b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            f"{model}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + audio + \
        f"\r\n--{boundary}--\r\n".encode()


FORM_TYPE = "multipart/form-data; boundary=b0undary"


@pytest.mark.parametrize("path", FORM_PATHS)
async def test_a_form_is_routed_by_its_model_field_and_relayed_byte_for_byte(
        env: Env, path: str) -> None:
    raw = form("chat", bytes(range(256)) * 64)
    r = await env.http.post(env.url + path, data=raw, headers={"Content-Type": FORM_TYPE})
    assert r.status == 200, await r.text()
    assert env.echo.seen[-1] == (path, FORM_TYPE, raw)


async def test_a_forms_alias_is_rewritten_in_the_model_field_only(env: Env) -> None:
    audio = b'name="model"\r\n\r\ngpt-4o' * 100  # the field's pattern inside the file too
    r = await env.http.post(env.url + "/v1/audio/transcriptions", data=form("gpt-4o", audio),
                            headers={"Content-Type": FORM_TYPE})
    assert r.status == 200, await r.text()
    assert env.echo.seen[-1][2] == form("chat", audio)


async def test_the_openai_clients_transcription_reaches_the_engine(env: Env) -> None:
    c = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="none", max_retries=0)
    audio = b"RIFF" + bytes(4000)
    got = await c.audio.transcriptions.create(model="chat", file=("a.wav", audio))
    assert got.text.endswith("bytes")
    path, ctype, raw = env.echo.seen[-1]
    assert path == "/v1/audio/transcriptions" and ctype.startswith("multipart/form-data")
    assert audio in raw and b'name="model"\r\n\r\nchat\r\n' in raw


async def test_a_form_streams_to_the_engine_before_the_client_finished_sending(
        env: Env) -> None:
    """A chunked upload whose end the client holds back until the engine saw its start:
    the proxy cannot have buffered it whole."""
    head, tail = form("chat", b"A" * 300_000).split(b"A" * 1000, 1)
    go_on = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield head
        await go_on.wait()
        yield b"A" * 1000 + tail

    async def release_when_started() -> None:
        await asyncio.wait_for(env.echo.first_bytes.wait(), 10)
        go_on.set()

    waiter = asyncio.create_task(release_when_started())
    r = await env.http.post(env.url + "/v1/audio/transcriptions", data=body(),
                            headers={"Content-Type": FORM_TYPE})
    await waiter
    assert r.status == 200, await r.text()
    assert env.echo.seen[-1][2] == form("chat", b"A" * 300_000)


async def test_bad_forms_are_400_naming_what_is_missing(env: Env) -> None:
    r = await env.http.post(env.url + "/v1/audio/transcriptions", json={"model": "chat"})
    assert r.status == 400 and (await r.json())["error"]["code"] == "gpud_not_multipart"
    no_model = form("chat", b"x").replace(b'name="model"', b'name="language"')
    r = await env.http.post(env.url + "/v1/audio/transcriptions", data=no_model,
                            headers={"Content-Type": FORM_TYPE})
    assert r.status == 400 and (await r.json())["error"]["code"] == "gpud_model_required"
    r = await env.http.post(env.url + "/v1/audio/transcriptions", data=form("nope", b"x"),
                            headers={"Content-Type": FORM_TYPE})
    assert r.status == 404 and (await r.json())["error"]["code"] == "gpud_model_not_found"


# -- keep-alive comments while a model loads ------------------------------------------


def held(env: Env, interval: float) -> asyncio.Event:
    """Make `sleepy` wait for its wake until the returned event is set."""
    env.backend.reload(sleepy=replace(ROUTES["sleepy"], stream_keepalive=interval,
                                      request_timeout=30))
    env.backend.wake_gate = asyncio.Event()
    return env.backend.wake_gate


async def read_lines(resp: aiohttp.ClientResponse, until_comments: int,
                     then: asyncio.Event) -> list[bytes]:
    lines, comments = [], 0
    async for line in resp.content:
        lines.append(line)
        if line.startswith(b": keep-alive"):
            comments += 1
            if comments == until_comments:
                then.set()  # the wake ends once the client saw that many comments
    return lines


async def test_a_streamed_request_held_by_a_wake_gets_comments_then_the_stream(
        env: Env) -> None:
    gate = held(env, 0.2)
    r = await env.http.post(env.url + "/v1/chat/completions",
                            json={"model": "sleepy", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    lines = await read_lines(r, 3, gate)
    comments = [ln for ln in lines if ln.startswith(b":")]
    assert len(comments) >= 3
    assert comments[0].startswith(b": keep-alive waking sleepy ")
    data = [ln for ln in lines if ln.startswith(b"data: ")]
    assert data[-1] == b"data: [DONE]\n" and len(data) >= 3
    assert lines.index(comments[-1]) < lines.index(data[0])  # comments, then the stream


async def test_comments_go_on_until_the_engines_first_byte(env: Env) -> None:
    """After a load the engine may take long for its first token (a busy box): the
    comments go on after the wait for the engine ended, until the answer's first byte."""
    gate = held(env, 0.1)
    r = await env.http.post(env.url + "/v1/responses",
                            json={"model": "sleepy", "stream": True, "input": "hi"})
    assert r.status == 200
    assert (await r.content.readline()).startswith(b": keep-alive")
    gate.set()  # the wait for the engine ends; the engine holds its first event back

    async def comments(n: int) -> None:
        while n:
            n -= (await r.content.readline()).startswith(b": keep-alive")

    await asyncio.wait_for(comments(3), 10)  # (before the change: none after the wait)
    await asyncio.wait_for(env.echo.slow_started.wait(), 10)
    await asyncio.wait_for(comments(2), 10)  # and while the engine has the request
    env.up.release.set()
    rest = [ln async for ln in r.content]
    done = b'data: {"type": "response.completed"}\n'
    assert done in rest and not [ln for ln in rest[rest.index(done):] if ln.startswith(b":")]


async def test_the_openai_client_reads_through_the_comments(env: Env) -> None:
    gate = held(env, 0.1)
    c = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="none", max_retries=0)
    stream = await c.chat.completions.create(model="sleepy", stream=True,
                                             messages=[{"role": "user", "content": "hi"}])
    await asyncio.sleep(0.5)  # several comment intervals pass while the wake is held
    gate.set()
    chunks = [ch async for ch in stream]
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "stop"


async def test_a_non_streamed_request_gets_nothing_extra(env: Env) -> None:
    gate = held(env, 0.1)
    task = asyncio.create_task(env.http.post(env.url + "/v1/chat/completions",
                                             json={"model": "sleepy", "messages": []}))
    await asyncio.sleep(0.5)
    gate.set()
    r = await task
    assert r.status == 200 and await r.read() == CHAT_BODY % b"sleepy"


async def test_keepalive_off_per_model_sends_no_comment(env: Env) -> None:
    gate = held(env, 0.0)
    task = asyncio.create_task(env.http.post(
        env.url + "/v1/chat/completions", json={"model": "sleepy", "stream": True}))
    await asyncio.sleep(0.5)
    gate.set()
    r = await task
    lines = [ln async for ln in r.content]
    assert not [ln for ln in lines if ln.startswith(b":")] and lines[-2] == b"data: [DONE]\n"


async def test_a_wake_that_fails_after_the_stream_opened_ends_it_with_an_error_event(
        env: Env) -> None:
    gate = held(env, 0.1)
    env.backend.fail_wake["sleepy"] = "the engine of 'sleepy' failed to start"
    c = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="none", max_retries=0)
    stream = await c.chat.completions.create(model="sleepy", stream=True,
                                             messages=[{"role": "user", "content": "hi"}])
    gate.set()
    with pytest.raises(openai.APIError, match="failed to start"):
        async for _ in stream:
            pass


async def test_anthropic_stream_held_by_a_wake_gets_comments_and_errors_in_band(
        env: Env) -> None:
    gate = held(env, 0.1)
    c = anthropic.AsyncAnthropic(base_url=env.url, api_key="none", max_retries=0)
    kinds = []
    async with c.messages.stream(model="sleepy", max_tokens=8,
                                 messages=[{"role": "user", "content": "hi"}]) as s:
        gate.set()
        async for event in s:
            kinds.append(event.type)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    env.backend.awake["sleepy"] = False
    env.backend.wake_gate = asyncio.Event()
    env.backend.fail_wake["sleepy"] = "no room for 'sleepy'"
    with pytest.raises(anthropic.APIStatusError, match="no room"):
        async with c.messages.stream(model="sleepy", max_tokens=8,
                                     messages=[{"role": "user", "content": "hi"}]) as s:
            env.backend.wake_gate.set()
            async for _ in s:
                pass


async def test_a_quick_wake_changes_nothing(env: Env) -> None:
    """A wait shorter than the first comment's delay: no comment, the engine's own head."""
    env.backend.reload(sleepy=replace(ROUTES["sleepy"], stream_keepalive=5.0))
    env.backend.wake_delay = 0.01
    r = await env.http.post(env.url + "/v1/chat/completions",
                            json={"model": "sleepy", "stream": True})
    lines = [ln async for ln in r.content]
    assert not [ln for ln in lines if ln.startswith(b":")]
