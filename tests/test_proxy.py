"""The OpenAI-compatible endpoint against a real loopback upstream that acts like an engine.

No real engine here: an aiohttp server on 127.0.0.1 answers as vLLM would,
and a small in-test Backend plays the daemon (routes, wake, idle tracking).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gpud.proxy import (
    ApiKey,
    KeyRing,
    ModelGate,
    ModelRoute,
    ModelUnavailable,
    Proxy,
    QueueFull,
    SingleFlight,
    check_key_file,
    check_key_hash,
    hash_key,
)
from gpud.proxy.app import _ModelRename

# -- an upstream that answers like a vLLM engine -------------------------------------


@dataclass
class Upstream:
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)  # request bodies, in arrival order
    raw: list[bytes] = field(default_factory=list)  # the same, as the bytes that came
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets "hold" requests go on
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0


# Deliberately odd spacing: relayed bodies must reach the client byte for byte.
CHAT_BODY = (
    b'{"id":"chatcmpl-1",  "object":"chat.completion","created":1,"model":"%s",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi there"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
)


def _chunk(model: str, i: int, final: bool = False) -> bytes:
    data = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": {} if final else {"content": f"t{i} "},
                "finish_reason": "stop" if final else None,
            }
        ],
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def make_upstream_app(up: Upstream) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        up.raw.append(await request.read())
        body = await request.json()
        up.seen.append(body)
        model = body["model"]
        hold = body.get("hold")  # test control: wait for `release` (after n chunks when streaming)
        up.running += 1
        try:
            if not body.get("stream"):
                if hold is not None:
                    await up.release.wait()
                return web.Response(
                    body=CHAT_BODY % model.encode(),
                    content_type="application/json",
                    headers={"X-Request-Id": request.headers.get("X-Request-Id", "none")},
                )
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = int(body.get("chunks", 3))
            for i in range(n):
                await resp.write(_chunk(model, i))
                if body.get("crash_after") == i + 1:
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.abort()  # the engine dies mid-stream
                    await asyncio.sleep(1)
                if hold is not None and i + 1 == hold:
                    await up.release.wait()
            await resp.write(_chunk(model, n, final=True))
            await resp.write(b"data: [DONE]\n\n")
            up.finished.set()
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            up.cancelled.set()
            raise
        finally:
            up.running -= 1

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        up.seen.append(body)
        data = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {"index": 0, "text": " world", "logprobs": None, "finish_reason": "length"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return web.json_response(data)

    async def embeddings(request: web.Request) -> web.Response:
        # What vLLM answers for a generative model: the engine's own error, passed through.
        up.seen.append(await request.json())
        err = {
            "error": {
                "message": "The model does not support Embeddings API",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        }
        return web.json_response(err, status=400)

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        up.seen.append(body)
        return web.json_response({"count": 2, "max_model_len": 128, "tokens": [1, 2]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/tokenize", tokenize)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


# -- a backend that plays the daemon ----------------------------------------------


class FakeBackend:
    def __init__(self, upstream: str, routes: Mapping[str, ModelRoute]) -> None:
        self.upstream = upstream
        self._routes = dict(routes)
        self.awake = {name: r.state == "awake" for name, r in routes.items()}
        self.wake_delay = 0.1
        self.wake_gate: asyncio.Event | None = None  # when set: the wake ends when it is set
        self.unavailable: dict[str, str] = {}
        self.wakes: SingleFlight[str, str] = SingleFlight()
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.released: dict[str, int] = {}
        self.early: dict[str, str] = {}  # models whose "engine" queues requests while asleep
        self.fail_wake: dict[str, str] = {}

    def routes(self) -> Mapping[str, ModelRoute]:
        return self._routes

    def reload(self, **changes: ModelRoute) -> None:
        self._routes = {**self._routes, **changes}  # a new mapping, as a config reload gives

    def serving_upstream(self, model: str) -> str | None:
        if model in self.unavailable or not self.awake[model]:
            return None
        return self.upstream

    async def ready_upstream(self, model: str) -> str:
        if model in self.unavailable:
            raise ModelUnavailable(self.unavailable[model], retry_after=7)
        if self.awake[model]:
            return self.upstream
        return await self.wakes.run(model, lambda: self._wake(model))

    async def _wake(self, model: str) -> str:
        if self.wake_gate is not None:
            await self.wake_gate.wait()
        else:
            await asyncio.sleep(self.wake_delay)
        if model in self.fail_wake:
            raise ModelUnavailable(self.fail_wake[model], retry_after=3)
        self.awake[model] = True
        return self.upstream

    async def early_upstream(self, model: str) -> str | None:
        return self.early.get(model)

    def waking_upstreams(self, model: str) -> list[str]:
        return [] if self.awake.get(model, True) else [self.upstream]

    def upstream_released(self, model: str, base: str) -> None:
        assert base == self.upstream
        self.released[model] = self.released.get(model, 0) + 1

    def request_started(self, model: str) -> None:
        self.started[model] = self.started.get(model, 0) + 1

    def request_finished(self, model: str) -> None:
        self.finished[model] = self.finished.get(model, 0) + 1


class Recorder:
    def __init__(self) -> None:
        self.done: list[tuple[str, str, int, float, float | None]] = []

    def request_done(
        self, model: str, endpoint: str, status: int, duration: float, ttft: float | None
    ) -> None:
        self.done.append((model, endpoint, status, duration, ttft))


ROUTES = {
    "chat": ModelRoute("chat", aliases=("gpt-4o", "default"), max_concurrency=8, max_queue=8),
    "small": ModelRoute("small", max_concurrency=2, max_queue=2, request_timeout=5),
    "sleepy": ModelRoute("sleepy", state="asleep", request_timeout=5),
}


@dataclass
class Env:
    up: Upstream
    backend: FakeBackend
    proxy: Proxy
    url: str
    http: aiohttp.ClientSession
    observer: Recorder

    async def post(self, path: str, body: dict[str, Any], **kw: Any) -> aiohttp.ClientResponse:
        return await self.http.post(self.url + path, json=body, **kw)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    up = Upstream()
    up_runner, up.url = await serve(make_upstream_app(up))
    backend = FakeBackend(up.url, ROUTES)
    observer = Recorder()
    proxy = Proxy(backend, observer=observer)
    runner, url = await serve(proxy.make_app())
    async with aiohttp.ClientSession() as http:
        yield Env(up, backend, proxy, url, http, observer)
    up.release.set()
    await runner.cleanup()
    await up_runner.cleanup()


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def wait_until(cond: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- routing ------------------------------------------------------------------------


async def test_routes_by_model_and_relays_the_body_byte_for_byte(env: Env) -> None:
    r = await env.post("/v1/chat/completions", chat_body("chat"), headers={"X-Request-Id": "r1"})
    assert r.status == 200
    assert await r.read() == CHAT_BODY % b"chat"
    assert r.headers["X-Request-Id"] == "r1"
    assert env.up.seen[-1]["model"] == "chat"


async def test_a_long_prompt_passes(env: Env) -> None:
    r = await env.post("/v1/completions", {"model": "chat", "prompt": "x" * (3 << 20)})
    assert r.status == 200  # beyond aiohttp's default 1 MiB body limit
    assert len(env.up.seen[-1]["prompt"]) == 3 << 20


async def test_alias_routes_to_the_model(env: Env) -> None:
    r = await env.post("/v1/chat/completions", chat_body("gpt-4o", temperature=0.5))
    assert r.status == 200
    # the engine serves one name: it is asked by that name, the client sees its alias
    assert env.up.seen[-1] == chat_body("chat", temperature=0.5)
    assert (await r.json())["model"] == "gpt-4o"
    assert env.proxy.stats()["chat"]["last_request"] is not None


async def test_alias_streams_answer_with_the_alias(env: Env) -> None:
    r = await env.post("/v1/chat/completions", chat_body("default", stream=True))
    assert r.status == 200
    events = [line for line in (await r.read()).split(b"\n") if line.startswith(b"data: {")]
    assert len(events) >= 2
    assert {json.loads(e[6:])["model"] for e in events} == {"default"}
    assert env.up.seen[-1]["model"] == "chat"


@given(st.lists(st.integers(1, 40), max_size=30), st.sampled_from([":", ": "]))
def test_alias_rename_finds_the_key_across_any_split(cuts: list[int], sep: str) -> None:
    """However the engine's stream is cut into reads, every `model` key is rewritten and
    nothing else changes (a quoted `"model":"chat"` inside content stays)."""
    event = ('data: {"id":"x","model"' + sep + '"chat","choices":[{"delta":{"content":'
             '"say \\"model\\":\\"chat\\""}}]}\n\n')
    stream = (event * 3 + "data: [DONE]\n\n").encode()
    rename = _ModelRename("chat", "gpt-4o")
    out, pos = b"", 0
    for n in cuts:
        out += rename.chunk(stream[pos:pos + n])
        pos += n
    out += rename.chunk(stream[pos:]) + rename.rest()
    assert out == stream.replace(f'"model"{sep}"chat"'.encode(), f'"model"{sep}"gpt-4o"'.encode())
    assert out.count(b'\\"model\\":\\"chat\\"') == 3


async def test_canonical_name_is_relayed_byte_for_byte_both_ways(env: Env) -> None:
    raw = b'{"model":  "chat",   "messages":[{"role":"user","content":"hi"}]}'
    r = await env.http.post(env.url + "/v1/chat/completions", data=raw,
                            headers={"Content-Type": "application/json"})
    assert await r.read() == CHAT_BODY % b"chat"
    assert env.up.raw[-1] == raw


async def test_unknown_model_is_404_in_openai_shape_listing_known_names(env: Env) -> None:
    r = await env.post("/v1/chat/completions", chat_body("nope"))
    assert r.status == 404
    err = (await r.json())["error"]
    assert err["code"] == "gpud_model_not_found"
    assert err["type"] == "invalid_request_error" and err["param"] == "model"
    assert "'nope'" in err["message"] and "chat, sleepy, small" in err["message"]
    assert env.up.seen == []


async def test_bad_json_and_missing_model_are_400(env: Env) -> None:
    r = await env.http.post(env.url + "/v1/completions", data=b"{not json")
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "gpud_invalid_json"
    r = await env.post("/v1/completions", {"prompt": "x"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "gpud_model_required"


async def test_models_lists_desired_models_with_state(env: Env) -> None:
    r = await env.http.get(env.url + "/v1/models")
    body = await r.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"chat", "small", "sleepy"}
    assert by_id["sleepy"]["state"] == "asleep" and by_id["sleepy"]["object"] == "model"
    assert by_id["chat"]["aliases"] == ["gpt-4o", "default"]


async def test_engine_errors_are_passed_through(env: Env) -> None:
    r = await env.post("/v1/embeddings", {"model": "chat", "input": "x"})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["message"] == "The model does not support Embeddings API"
    assert err["code"] == 400  # the engine's, not a gpud_ code


async def test_tokenize_without_model_uses_the_only_model(env: Env) -> None:
    env.backend.reload()
    env.backend._routes = {"chat": ROUTES["chat"]}
    r = await env.post("/tokenize", {"prompt": "hello"})
    assert r.status == 200
    assert (await r.json())["tokens"] == [1, 2]


async def test_unreachable_engine_is_502(env: Env) -> None:
    env.backend.upstream = "http://127.0.0.1:9"  # discard port: nobody listens
    r = await env.post("/v1/completions", {"model": "chat", "prompt": "x"})
    assert r.status == 502
    assert (await r.json())["error"]["code"] == "gpud_upstream_unreachable"
    assert env.proxy.stats()["chat"]["inflight"] == 0


# -- streaming ------------------------------------------------------------------------


async def test_stream_chunks_arrive_before_the_upstream_finishes(env: Env) -> None:
    body = chat_body("chat", stream=True, chunks=5, hold=1)
    r = await env.post("/v1/chat/completions", body)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 3)
    assert first.startswith(b"data: ") and b"t0 " in first
    assert not env.up.finished.is_set()  # the upstream is still holding the rest
    env.up.release.set()
    rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b"data: ") == 6
    await wait_until(lambda: env.observer.done)
    model, endpoint, status, duration, ttft = env.observer.done[-1]
    assert (model, endpoint, status) == ("chat", "/v1/chat/completions", 200)
    assert ttft is not None and ttft < duration


async def test_timing_marks_say_where_a_requests_time_went(env: Env) -> None:
    """The test hook behind bench/gpu/gpu_truth.py's split of a slow first token."""
    import collections

    env.proxy.timings = collections.deque(maxlen=8)
    env.backend.wake_delay = 0.05
    r = await env.post("/v1/chat/completions", chat_body("sleepy", stream=True, chunks=2))
    assert r.status == 200
    await r.read()
    await wait_until(lambda: len(env.proxy.timings or ()) == 1)
    (m,) = env.proxy.timings or ()
    assert (m["model"], m["path"], m["status"]) == ("sleepy", "/v1/chat/completions", 200)
    order = ["routed_ms", "upstream_ready_ms", "upstream_head_ms", "upstream_first_chunk_ms",
             "first_chunk_written_ms"]
    values = [m[k] for k in order]
    assert values == sorted(values)
    assert m["upstream_ready_ms"] >= 50  # the wake is in it


async def test_client_disconnect_cancels_the_upstream_request(env: Env) -> None:
    r = await env.post("/v1/chat/completions", chat_body("chat", stream=True, chunks=5, hold=1))
    await r.content.readuntil(b"\n\n")
    assert env.up.running == 1
    r.close()  # the client goes away mid-stream
    await asyncio.wait_for(env.up.cancelled.wait(), 3)
    await wait_until(lambda: env.up.running == 0 and env.proxy.stats()["chat"]["inflight"] == 0)
    assert env.backend.started["chat"] == env.backend.finished["chat"] == 1
    assert env.backend.released["chat"] == 1
    await wait_until(lambda: bool(env.observer.done))
    assert env.observer.done[-1][2] == 499  # the client closed the request


async def test_disconnect_is_found_without_aiohttp_handler_cancellation(env: Env) -> None:
    proxy = Proxy(env.backend, disconnect_check=0.05)
    runner = web.AppRunner(proxy.make_app(), handler_cancellation=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    r = await env.http.post(
        url + "/v1/chat/completions", json=chat_body("chat", stream=True, chunks=5, hold=1)
    )
    await r.content.readuntil(b"\n\n")
    r.close()
    await asyncio.wait_for(env.up.cancelled.wait(), 3)
    await wait_until(lambda: proxy.stats()["chat"]["inflight"] == 0)
    await runner.cleanup()


async def test_client_disconnect_while_waiting_for_a_whole_body(env: Env) -> None:
    task = asyncio.create_task(env.post("/v1/chat/completions", chat_body("chat", hold=0)))
    await wait_until(lambda: env.up.running == 1)
    task.cancel()  # closes the client's connection
    await asyncio.wait_for(env.up.cancelled.wait(), 3)
    await wait_until(lambda: env.proxy.stats()["chat"]["inflight"] == 0)


async def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"chunks": 5, "crash_after": 2},
    )
    got = []
    with pytest.raises(openai.APIError, match="broke off"):
        async for c in stream:
            got.append(c.choices[0].delta.content)
    assert got == ["t0 ", "t1 "]
    await client.close()


# -- limits ---------------------------------------------------------------------------


async def test_concurrency_limit_then_fifo_queue_then_429(env: Env) -> None:
    async def send(i: int) -> aiohttp.ClientResponse:
        return await env.post("/v1/chat/completions", chat_body("small", hold=0, i=i))

    held = [asyncio.create_task(send(i)) for i in range(2)]
    await wait_until(lambda: env.up.running == 2)
    queued = []
    for i in (2, 3):  # one at a time so the queue order is known
        queued.append(asyncio.create_task(send(i)))
        await wait_until(lambda n=i: env.proxy.stats()["small"]["queued"] == n - 1)
    assert env.proxy.stats()["small"] == {
        "inflight": 2,
        "queued": 2,
        "last_request": env.proxy.stats()["small"]["last_request"],
    }
    r = await send(4)
    assert r.status == 429
    assert r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["code"] == "gpud_queue_full"
    assert env.proxy.busy("small")
    env.up.release.set()
    statuses = [(await t).status for t in held + queued]
    assert statuses == [200] * 4
    assert [b["i"] for b in env.up.seen][2:] == [2, 3]  # FIFO
    assert not env.proxy.busy("small")


async def test_queue_wait_past_request_timeout_is_503_with_retry_after(env: Env) -> None:
    env.backend.reload(small=replace(ROUTES["small"], max_concurrency=1, request_timeout=0.3))
    held = asyncio.create_task(env.post("/v1/chat/completions", chat_body("small", hold=0)))
    await wait_until(lambda: env.up.running == 1)
    t = time.monotonic()
    r = await env.post("/v1/chat/completions", chat_body("small"))
    assert r.status == 503
    assert 0.25 < time.monotonic() - t < 2
    assert int(r.headers["Retry-After"]) >= 1
    err = (await r.json())["error"]
    assert err["code"] == "gpud_request_timeout" and "0.3 s" in err["message"]
    assert env.proxy.stats()["small"]["queued"] == 0
    env.up.release.set()
    assert (await held).status == 200


async def test_queued_requests_survive_a_reload_and_see_new_limits(env: Env) -> None:
    env.backend.reload(small=replace(ROUTES["small"], max_concurrency=1))
    held = asyncio.create_task(env.post("/v1/chat/completions", chat_body("small", hold=0)))
    await wait_until(lambda: env.up.running == 1)
    waiting = asyncio.create_task(env.post("/v1/completions", {"model": "small", "prompt": "x"}))
    await wait_until(lambda: env.proxy.stats()["small"]["queued"] == 1)
    env.backend.reload(small=replace(ROUTES["small"], max_concurrency=4))  # a config reload
    r = await env.post("/v1/completions", {"model": "small", "prompt": "y"})
    assert r.status == 200  # the new limit lets it and the queued one in
    assert (await asyncio.wait_for(waiting, 3)).status == 200
    env.up.release.set()
    assert (await held).status == 200


# -- wake on request --------------------------------------------------------------


async def test_request_to_an_asleep_model_wakes_it_once_for_twenty(env: Env) -> None:
    env.backend.wake_delay = 0.2
    rs = await asyncio.gather(
        *(env.post("/v1/completions", {"model": "sleepy", "prompt": "x"}) for _ in range(20))
    )
    assert [r.status for r in rs] == [200] * 20
    assert env.backend.wakes.started == 1
    assert env.backend.started["sleepy"] == env.backend.finished["sleepy"] == 20
    assert env.backend.released["sleepy"] == 20


async def test_the_engine_socket_is_opened_while_the_model_wakes(env: Env) -> None:
    """The wake's time is used to connect, so the request is sent the moment it ends."""
    env.backend.wake_gate = gate = asyncio.Event()
    req = asyncio.create_task(env.post("/v1/completions", {"model": "sleepy", "prompt": "x"}))
    assert env.proxy._client is not None
    pools = env.proxy._client._pools
    await wait_until(lambda: env.up.url in pools and len(pools[env.up.url].idle) == 1)
    assert not env.backend.awake["sleepy"]  # connected while the engine still wakes
    connected = next(iter(pools[env.up.url].idle))
    gate.set()
    r = await req
    assert r.status == 200
    assert list(pools[env.up.url].idle) == [connected]  # that socket carried the request


async def test_a_request_is_sent_while_the_engine_wakes_when_it_queues_meanwhile(
    env: Env,
) -> None:
    """An engine that queues requests while asleep (vLLM 0.17+) gets the request as its wake
    starts; the answer is relayed once the wake is over, byte for byte."""
    env.backend.wake_gate = gate = asyncio.Event()
    env.backend.early["sleepy"] = env.up.url
    req = asyncio.create_task(env.post("/v1/chat/completions", chat_body("sleepy", stream=True)))
    await wait_until(lambda: len(env.up.seen) == 1)
    assert not env.backend.awake["sleepy"]  # the engine has it, and is still waking
    gate.set()
    r = await req
    assert r.status == 200
    text = await r.text()
    assert text.count("data: {") == 4 and text.endswith("data: [DONE]\n\n")
    assert env.backend.wakes.started == 1 and len(env.up.seen) == 1  # sent once
    assert env.backend.released["sleepy"] == 1


async def test_a_request_sent_ahead_of_a_wake_that_fails_is_withdrawn(env: Env) -> None:
    """The wake fails: the client gets gpud's 503, and the engine's connection is closed so
    vLLM drops the request it queued (nothing runs later for a client that is gone)."""
    env.backend.wake_delay = 0.3
    env.backend.early["sleepy"] = env.up.url
    env.backend.fail_wake["sleepy"] = "engine died while waking"
    body = chat_body("sleepy", stream=True, chunks=2, hold=1)  # the "engine" would wait
    req = asyncio.create_task(env.post("/v1/chat/completions", body))
    await wait_until(lambda: len(env.up.seen) == 1)
    r = await req
    assert r.status == 503
    assert (await r.json())["error"]["message"] == "engine died while waking"
    await asyncio.wait_for(env.up.cancelled.wait(), 3)  # its connection was closed
    assert env.backend.released.get("sleepy", 0) == 0


async def test_wake_past_request_timeout_is_503_and_the_wake_goes_on(env: Env) -> None:
    env.backend.wake_delay = 0.5
    env.backend.reload(sleepy=replace(ROUTES["sleepy"], request_timeout=0.1))
    r = await env.post("/v1/completions", {"model": "sleepy", "prompt": "x"})
    assert r.status == 503 and "Retry-After" in r.headers
    assert (await r.json())["error"]["code"] == "gpud_request_timeout"
    await wait_until(lambda: env.backend.awake["sleepy"])  # shielded: not cancelled
    assert env.backend.wakes.started == 1


async def test_unavailable_model_is_503_with_the_backends_reason(env: Env) -> None:
    env.backend.unavailable["chat"] = "The model 'chat' failed to start: out of memory."
    r = await env.post("/v1/completions", {"model": "chat", "prompt": "x"})
    assert r.status == 503
    assert r.headers["Retry-After"] == "7"
    err = (await r.json())["error"]
    assert err["code"] == "gpud_model_unavailable" and "out of memory" in err["message"]


# -- API keys ---------------------------------------------------------------------------


@pytest.fixture
def keyed(env: Env) -> Env:
    env.proxy.set_keys(
        KeyRing(
            [
                ApiKey.from_hash("ops", hash_key("sk-ops")),
                ApiKey.from_hash("support", hash_key("sk-support"), models=["chat"]),
            ]
        )
    )
    return env


async def test_keys_401_403_200(keyed: Env) -> None:
    body = {"model": "chat", "prompt": "x"}
    r = await keyed.post("/v1/completions", body)
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "gpud_invalid_api_key"
    r = await keyed.post("/v1/completions", body, headers={"Authorization": "Bearer sk-wrong"})
    assert r.status == 401
    sup = {"Authorization": "Bearer sk-support"}
    r = await keyed.post("/v1/completions", {"model": "small", "prompt": "x"}, headers=sup)
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "gpud_model_not_allowed"
    r = await keyed.post("/v1/completions", {"model": "default", "prompt": "x"}, headers=sup)
    assert r.status == 200  # an alias of an allowed model
    r = await keyed.post("/v1/completions", body, headers={"Authorization": "Bearer sk-ops"})
    assert r.status == 200
    assert [d[2] for d in keyed.observer.done] == [401, 401, 403, 200, 200]


async def test_models_list_shows_only_the_keys_models(keyed: Env) -> None:
    r = await keyed.http.get(keyed.url + "/v1/models")
    assert r.status == 401
    r = await keyed.http.get(
        keyed.url + "/v1/models", headers={"Authorization": "Bearer sk-support"}
    )
    assert [m["id"] for m in (await r.json())["data"]] == ["chat"]


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "support"
    f.write_text("sk-support\n")
    os.chmod(f, 0o644)
    msg = check_key_file(f)
    assert msg is not None and "0644" in msg and "chmod 600" in msg
    assert "sk-support" not in msg
    with pytest.raises(ValueError, match="support"):
        ApiKey.from_file("support", f)
    os.chmod(f, 0o600)
    assert check_key_file(f) is None
    key = ApiKey.from_file("support", f, models=["chat"])
    assert KeyRing([key]).authenticate("Bearer sk-support") is key
    assert "sk-support" not in repr(key)
    assert check_key_file(tmp_path / "missing") is not None
    assert check_key_hash("abc") is not None
    assert check_key_hash(hash_key("x")) is None


# -- the official OpenAI client ---------------------------------------------------------


async def test_openai_client_chat_completion_stream_models_and_errors(keyed: Env) -> None:
    client = openai.AsyncOpenAI(base_url=keyed.url + "/v1", api_key="sk-ops", max_retries=0)
    chat = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.choices[0].message.content == "hi there"
    comp = await client.completions.create(model="chat", prompt="hello", max_tokens=1)
    assert comp.choices[0].text == " world"
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "t0 t1 t2 "
    models = await client.models.list()
    assert {m.id for m in models.data} == {"chat", "small", "sleepy"}
    with pytest.raises(openai.BadRequestError, match="Embeddings API"):
        await client.embeddings.create(model="chat", input="x")
    with pytest.raises(openai.NotFoundError, match="Known models: chat") as nf:
        await client.completions.create(model="nope", prompt="x")
    assert nf.value.code == "gpud_model_not_found"
    bad = openai.AsyncOpenAI(base_url=keyed.url + "/v1", api_key="sk-bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    await client.close()
    await bad.close()


# -- the building blocks ------------------------------------------------------------------


async def test_single_flight_shares_one_call_and_survives_a_cancelled_waiter() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = 0

    async def wake() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    impatient = asyncio.create_task(flight.run("m", wake))
    others = [asyncio.create_task(flight.run("m", wake)) for _ in range(5)]
    await asyncio.sleep(0)
    impatient.cancel()
    assert await asyncio.gather(*others) == [1] * 5
    assert not flight.running("m")
    assert await flight.run("m", wake) == 2  # done calls are not cached

    async def fail() -> int:
        raise RuntimeError("no GPU memory")

    with pytest.raises(RuntimeError, match="no GPU memory"):
        await flight.run("m", fail)
    assert flight.started == 3


async def test_gate_is_fifo_and_hands_slots_over() -> None:
    gate = ModelGate()
    assert gate.try_acquire(1)
    order: list[int] = []

    async def wait(i: int) -> None:
        await gate.acquire(1, 2)
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await gate.acquire(1, 2)
    gate.release()
    await asyncio.sleep(0)
    assert order == [0] and gate.inflight == 1 and gate.queued == 1
    tasks[1].cancel()
    await asyncio.sleep(0)
    assert gate.queued == 0
    gate.release()
    assert gate.inflight == 0


async def test_upstream_client_parses_split_chunked_and_sized_bodies_and_reuses_sockets() -> None:
    from gpud.proxy.upstream import UpstreamClient

    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    sized = b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc"
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for answer in (chunked, sized):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert await reader.readexactly(length) == b"x" * length
            for i in range(len(answer)):  # one byte per packet: every split point
                writer.write(answer[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = UpstreamClient()
    r = await client.post(base, "/v1/chat/completions", b"x" * 70000)
    assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
    assert await r.read() == b"hello world"
    r = await client.post(base, "/v1/completions", b"x" * 3)
    assert (r.status, await r.read()) == (201, b"abc")
    assert connections == 1  # keep-alive: the second request reused the socket
    client.close()
    server.close()
    await server.wait_closed()


async def test_engine_on_a_unix_socket(tmp_path: Path) -> None:
    up = Upstream()
    runner = web.AppRunner(make_upstream_app(up), handler_cancellation=True)
    await runner.setup()
    sock = tmp_path / "engine.sock"
    await web.UnixSite(runner, str(sock)).start()
    backend = FakeBackend(f"unix:{sock}", ROUTES)
    proxy = Proxy(backend)
    prunner, url = await serve(proxy.make_app())
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    comp = await client.completions.create(model="chat", prompt="hello")
    assert comp.choices[0].text == " world"
    await client.close()
    await prunner.cleanup()
    await runner.cleanup()
