"""What gpud's whole daemon path adds on top of an engine, beside nginx, in one run.

`gpud run` is started with one model whose engine is bench/synthetic_engine.py (SYNTHETIC,
not vLLM: it answers at once or on a fixed token clock, so the figures are the proxies'
own; see that file for why). gpud starts it like any engine; the direct path talks to
that same engine process, and nginx (Debian's nginx-light, started by the bench: one
worker, `proxy_buffering off`, a keepalive upstream) proxies to it too. Measured:

  1. concurrency 1, direct/gpud/nginx requests interleaved one by one: added p50 and p99;
  2. a closed loop of 64 connections: CPU a request (gpud's own process alone: its engine
     is its own process group and is not counted; nginx: master + worker);
  3. 256 concurrent streams with the shipped defaults (no max_concurrency): streamed
     tokens/s over direct, added time to first token p50/p99, CPU a streamed token;
  4. 1,000 concurrent streams through gpud: errors, complete streams, gpud's RSS
     before/after.

Prints a table; writes bench/results/proxy_daemon.json. A few minutes at most:

    flock /tmp/gpud-heavy.lock .venv/bin/python bench/proxy_daemon.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from proxy_overhead import (  # noqa: E402  (a sibling script, not a package)
    _cpu,
    _pct,
    _read_response,
    _request,
    _streams,
)

RESULTS = BENCH / "results" / "proxy_daemon.json"
MODEL = "bench"
TOKENS, RATE, TTFT = 64, 50.0, 0.020  # the synthetic engine's stream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


# -- the three paths -----------------------------------------------------------------------


@contextlib.contextmanager
def gpud(tmp: Path, loop: str) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`gpud run` with the synthetic engine; yields (gpud's process, its port, the engine's)."""
    port = _free_port()
    engine = [sys.executable, str(BENCH / "synthetic_engine.py"), "--ttft", str(TTFT),
              "--rate", str(RATE), "--tokens", str(TOKENS)]
    cfg = tmp / "gpud.toml"
    cfg.write_text(
        f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{tmp / "state"}"\n'
        f'runtime_dir = "{tmp / "run"}"\n\n'
        f"[engines.vllm]\ncommand = {json.dumps(engine)}\nsleep_mode = false\n"
        'warm_sleep = false\nstartup_timeout = "60s"\n\n'
        f'[models.{MODEL}]\nsource = "synthetic"\nstate = "awake"\n')
    env = {**os.environ, "GPUD_LOOP": loop}
    log = (tmp / "gpud.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gpud.cli", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gpud did not serve; see {tmp / 'gpud.log'}:\n"
                                 + (tmp / "gpud.log").read_text()[-2000:])
            with contextlib.suppress(OSError, ValueError):
                m = _get(f"http://127.0.0.1:{port}/api/v1/status")["models"].get(MODEL, {})
                if m.get("state") == "awake" and m.get("port"):
                    break
            time.sleep(0.2)
        yield proc, port, int(m["port"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


NGINX_CONF = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    upstream engine {{ server 127.0.0.1:{engine}; keepalive 1024; keepalive_requests 1000000; }}
    # nginx closes a client connection after 1,000 requests by default: the bench's clients
    # keep theirs open (as gpud does), so a longer run would see nginx hang up.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(tmp: Path, engine_port: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, engine=engine_port, port=port))
    proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nginx did not start: " + (tmp / "nginx-error.log").read_text())
            time.sleep(0.05)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(10)


# -- measurements ----------------------------------------------------------------------------


def interleaved_c1(ports: dict[str, int], n: int) -> dict[str, list[float]]:
    """One request at a time, paths taking turns request by request (drift hits all alike)."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    conns = {}
    for name, port in ports.items():
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns[name] = (s, bytearray(), _request("/v1/completions", body, port))
    out: dict[str, list[float]] = {name: [] for name in ports}
    names = list(ports)
    for i in range(n + 200):
        for name in names[i % len(names):] + names[:i % len(names)]:
            s, buf, req = conns[name]
            t = time.perf_counter()
            s.sendall(req)
            try:
                status = _read_response(s, buf)
            except ConnectionError as e:
                raise SystemExit(f"{name} closed the connection after {i} requests") from e
            if status != 200:
                raise SystemExit(f"{name}: not 200")
            if i >= 200:
                out[name].append(time.perf_counter() - t)
    for s, _, _ in conns.values():
        s.close()
    return out


async def closed_loop(port: int, conns: int, seconds: float) -> int:
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    req = _request("/v1/completions", body, port)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"status {head[:40]!r}")
            done += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return done


async def many_streams(port: int, streams: int, spread: float) -> dict[str, int]:
    """`streams` streams at once (connections opened over `spread` s): errors, complete."""
    body = json.dumps({"model": MODEL, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = _request("/v1/chat/completions", body, port)
    errors = complete = 0

    async def one(i: int) -> None:
        nonlocal errors, complete
        await asyncio.sleep(spread * i / streams)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
                return
            data = b""
            while True:
                size = int((await reader.readline()).strip(), 16)
                data += await reader.readexactly(size + 2)
                if size == 0:
                    break
            writer.close()
            if data.count(b"data: {") == TOKENS and b"data: [DONE]" in data:
                complete += 1
            else:
                errors += 1
        except (OSError, ValueError, asyncio.IncompleteReadError):
            errors += 1

    await asyncio.gather(*(one(i) for i in range(streams)))
    return {"streams": streams, "errors": errors, "complete": complete}


def _profile(out: Path | None, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy (if asked: --profile FILE) on gpud during its closed loop, collapsed stacks.
    Its own sampling costs gpud a little: compare figures from runs without it."""
    if out is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250",
                             "-f", "raw", "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ms(x: float) -> float:
    return round(x * 1000, 3)


def _cpus(pids: list[int]) -> float:
    return sum(_cpu(p) for p in pids)


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "gpud_loop": args.loop,
        "loadavg_1m_before": os.getloadavg()[0],
        "engine": f"SYNTHETIC (bench/synthetic_engine.py, not vLLM): instant completions; "
                  f"streams of {TOKENS} tokens, {TTFT * 1000:.0f} ms to the first, {RATE:g}/s",
    }}
    with gpud(tmp, args.loop) as (gp, g_port, e_port), nginx(tmp, e_port) as (ng, n_port):
        ng_pids = [ng.pid, *_children(ng.pid)]
        ports = {"direct": e_port, "gpud": g_port, "nginx": n_port}
        # 1. latency, one in flight
        lat = interleaved_c1(ports, args.requests)
        c1: dict[str, Any] = {"requests_per_path": args.requests}
        for q in (50, 99):
            d = _pct(lat["direct"], q)
            c1[f"direct_p{q}_ms"] = _ms(d)
            for name in ("gpud", "nginx"):
                c1[f"{name}_added_p{q}_ms"] = _ms(_pct(lat[name], q) - d)
        res["c1_latency"] = c1
        # 2. closed loop of 64: CPU a request
        cl: dict[str, Any] = {"connections": 64, "seconds": args.seconds}
        for name, pids in (("direct", []), ("gpud", [gp.pid]), ("nginx", ng_pids)):
            c0 = _cpus(pids)
            t = time.perf_counter()
            spy = _profile(args.profile, gp.pid, args.seconds) if name == "gpud" else None
            done = asyncio.run(closed_loop(ports[name], 64, args.seconds))
            if spy is not None:
                spy.wait(30)
            cl[f"{name}_rps"] = round(done / (time.perf_counter() - t))
            if pids:
                cl[f"{name}_cpu_us_per_request"] = round((_cpus(pids) - c0) / done * 1e6, 1)
        res["closed_loop"] = cl
        # 3. 256 streams, shipped defaults
        st: dict[str, Any] = {"streams": args.streams, "rounds": args.rounds}
        runs: dict[str, Any] = {}
        for name, pids in (("direct", []), ("gpud", [gp.pid]), ("nginx", ng_pids)):
            c0 = _cpus(pids)
            r = asyncio.run(_streams(ports[name], args.streams, args.rounds, TOKENS / RATE))
            runs[name] = r
            st[f"{name}_tokens_per_s"] = round(r["tokens"] / r["wall"], 1)
            if pids:
                st[f"{name}_cpu_us_per_token"] = round((_cpus(pids) - c0) / r["tokens"] * 1e6, 1)
        for name in ("gpud", "nginx"):
            st[f"{name}_tokens_ratio"] = round(
                st[f"{name}_tokens_per_s"] / st["direct_tokens_per_s"], 4)
            st[f"{name}_tokens_complete"] = runs[name]["tokens"] == runs["direct"]["tokens"]
            for q in (50, 99):
                st[f"{name}_added_ttft_p{q}_ms"] = _ms(
                    _pct(runs[name]["warm"], q) - _pct(runs["direct"]["warm"], q))
        res["streams_256"] = st
        # 4. 1,000 concurrent streams through gpud
        rss0 = _rss_kib(gp.pid)
        many = asyncio.run(many_streams(g_port, args.many, 1.0))
        many |= {"gpud_rss_kib_before": rss0, "gpud_rss_kib_after": _rss_kib(gp.pid)}
        many["rss_ratio"] = round(many["gpud_rss_kib_after"] / rss0, 3)
        res["streams_1000"] = many
    res["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    return res


def goals(res: dict[str, Any]) -> dict[str, bool]:
    c1, cl, st, m = res["c1_latency"], res["closed_loop"], res["streams_256"], res["streams_1000"]
    return {
        "1 added p50 <= nginx + 0.2 ms":
            c1["gpud_added_p50_ms"] <= c1["nginx_added_p50_ms"] + 0.2,
        "1 added p99 <= nginx + 1 ms":
            c1["gpud_added_p99_ms"] <= c1["nginx_added_p99_ms"] + 1.0,
        "2 CPU a request <= 2x nginx":
            cl["gpud_cpu_us_per_request"] <= 2 * cl["nginx_cpu_us_per_request"],
        "2 CPU a token <= 2x nginx":
            st["gpud_cpu_us_per_token"] <= 2 * st["nginx_cpu_us_per_token"],
        "3 256 streams tokens/s >= 0.99x": st["gpud_tokens_ratio"] >= 0.99,
        "3 256 streams added TTFT p99 < 5 ms": st["gpud_added_ttft_p99_ms"] < 5.0,
        "4 1000 streams: 0 errors, all complete":
            m["errors"] == 0 and m["complete"] == m["streams"],
        "4 1000 streams: RSS after < 1.5x": m["rss_ratio"] < 1.5,
    }


def table(res: dict[str, Any]) -> str:
    c1, cl, st, m = res["c1_latency"], res["closed_loop"], res["streams_256"], res["streams_1000"]
    rows = [
        ("added latency p50, 1 in flight (ms)", c1["gpud_added_p50_ms"], c1["nginx_added_p50_ms"]),
        ("added latency p99, 1 in flight (ms)", c1["gpud_added_p99_ms"], c1["nginx_added_p99_ms"]),
        ("CPU a request, closed loop 64 (us)", cl["gpud_cpu_us_per_request"],
         cl["nginx_cpu_us_per_request"]),
        ("requests/s, closed loop 64 (direct " + str(cl["direct_rps"]) + ")", cl["gpud_rps"],
         cl["nginx_rps"]),
        (f"CPU a streamed token, {st['streams']} streams (us)", st["gpud_cpu_us_per_token"],
         st["nginx_cpu_us_per_token"]),
        (f"tokens/s over direct, {st['streams']} streams", st["gpud_tokens_ratio"],
         st["nginx_tokens_ratio"]),
        ("added TTFT p50 (ms)", st["gpud_added_ttft_p50_ms"], st["nginx_added_ttft_p50_ms"]),
        ("added TTFT p99 (ms)", st["gpud_added_ttft_p99_ms"], st["nginx_added_ttft_p99_ms"]),
    ]
    lines = [f"gpud daemon path vs nginx; {res['machine']['engine']}",
             f"{'figure':<48}{'gpud':>10}{'nginx':>10}"]
    lines += [f"{name:<48}{g:>10}{n:>10}" for name, g, n in rows]
    lines.append(f"{m['streams']} concurrent streams via gpud: {m['errors']} errors, "
                 f"{m['complete']} complete, RSS {m['gpud_rss_kib_before'] // 1024} -> "
                 f"{m['gpud_rss_kib_after'] // 1024} MiB (x{m['rss_ratio']})")
    lines += [f"goal {k}: {'met' if v else 'NOT met'}" for k, v in res["goals"].items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (fewer requests)")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop",
                    help="gpud's event loop (GPUD_LOOP; uvloop is the shipped default)")
    ap.add_argument("--requests", type=int, default=3000, help="per path, 1 in flight")
    ap.add_argument("--seconds", type=float, default=5.0, help="closed loop, per path")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="streams per connection (256 streams)")
    ap.add_argument("--many", type=int, default=1000, help="concurrent streams, figure 4")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--profile", type=Path, help="py-spy's collapsed stacks of gpud during "
                    "the closed loop (pip install py-spy); the figures of such a run are not "
                    "the ones to quote")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.seconds, args.rounds = 500, 2.0, 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    with tempfile.TemporaryDirectory(prefix="gpud-bench-") as tmp:
        os.chmod(tmp, 0o755)
        res = run(args, Path(tmp))
    res["goals"] = goals(res)
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
