"""What request rules (issue 19) cost the proxy, and that a model without rules pays nothing.

In one run, against one upstream that answers at once (bench/proxy_overhead.py's), the same
requests at 1 in flight, one to each path in turn (direct, then each proxy), through three
proxies of their own:

  - base: the proxy of a commit before rules (`--base REV`, default: the parent of the
    commit that added gpud/proxy/rules.py; extracted with `git archive` to a temporary
    directory);
  - no-rules: this checkout's proxy, the model without rules (the path every model without
    `[models.NAME.rules]` takes);
  - rules: this checkout's proxy, the model with a default, a force, a strip and a cap that
    all change the body (so it is parsed, changed and re-encoded).

Goal: no-rules adds no latency over base (its p50 within 2% or 5 µs of base's). Prints a
table; writes bench/results/rules_overhead.json. A minute or two:

    .venv/bin/python bench/rules_overhead.py [--quick] [--base REV]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from proxy_overhead import (  # noqa: E402
    _pct,
    _read_response,
    _request,
    _run_upstream,
    _start,
    _use_loop,
)

RESULTS = BENCH / "results" / "rules_overhead.json"
MODEL = "bench"  # proxy_overhead's upstream answers any completion
# A chat-sized request: a few KB of prompt, as parsing costs by the byte.
BODY = json.dumps({"model": MODEL, "prompt": "hello there, " * 300, "max_tokens": 1,
                   "temperature": 0.2}).encode()
RULES: dict[str, Any] = {"default": {"top_p": 0.9}, "force": {"seed": 1}, "strip": ["temperature"],
         "cap": {"max_tokens": 16}}


def _run_proxy(conn: Any, code: str, upstream: str, rules: bool) -> None:
    """A proxy process importing gpud from `code` (forked before anything imported gpud)."""
    sys.path.insert(0, code)
    _use_loop("asyncio")
    import asyncio

    from aiohttp import web

    from gpud.proxy import ModelRoute, Proxy

    kw: dict[str, Any] = {}
    if rules:
        from gpud.proxy.rules import RequestRules

        kw["rules"] = RequestRules(default=RULES["default"], force=RULES["force"],
                                   strip=tuple(RULES["strip"]), cap=RULES["cap"])
    routes = {MODEL: ModelRoute(MODEL, max_concurrency=100_000, max_queue=100_000, **kw)}

    class StaticBackend:
        def routes(self) -> Mapping[str, ModelRoute]:
            return routes

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
        runner = web.AppRunner(Proxy(StaticBackend()).make_app(),
                               handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


def interleaved(ports: dict[str, int], n: int, warmup: int) -> dict[str, list[float]]:
    """Latency at 1 in flight, one request to each path in turn (a burst of other work on
    the shared machine hits every path alike), over one keep-alive connection each."""
    socks = {}
    for name, port in ports.items():
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks[name] = (sock, bytearray(), _request("/v1/completions", BODY, port))
    times: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for i in range(n + warmup):
            for name, (sock, buf, req) in socks.items():
                t = time.perf_counter()
                sock.sendall(req)
                if _read_response(sock, buf) != 200:
                    raise SystemExit(f"{name}: not 200")
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    finally:
        for sock, _buf, _req in socks.values():
            sock.close()
    return times


def _base_rev(asked: str | None) -> str:
    if asked:
        return asked
    # the commit before the one that added the rules
    done = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "-1", "HEAD", "--",
                           "gpud/proxy/rules.py"], cwd=REPO, capture_output=True, text=True)
    added = done.stdout.strip()
    if done.returncode != 0 or not added:
        raise SystemExit("no commit adds gpud/proxy/rules.py: give --base REV")
    return subprocess.run(["git", "rev-parse", added + "~"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()


def _extract(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", rev, "gpud"], cwd=REPO, capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def _ms(x: float) -> float:
    return round(x * 1000, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--base", help="the commit whose proxy is the baseline")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    mp.set_start_method("fork")
    rev = _base_rev(args.base)
    n = 2000 if args.quick else 8000
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gpud-base-") as tmp:
        _extract(rev, Path(tmp))
        _up, up_port = _start(_run_upstream, "asyncio",
                              {"ttft": 0.02, "rate": 30.0, "tokens": 8.0},
                              f"{tmp}/upstream.sock")
        upstream = f"http://127.0.0.1:{up_port}"
        procs = {
            "base": _start(_run_proxy, tmp, upstream, False),
            "no-rules": _start(_run_proxy, str(REPO), upstream, False),
            "rules": _start(_run_proxy, str(REPO), upstream, True),
        }
        ports = {"direct": up_port, **{k: port for k, (_p, port) in procs.items()}}
        try:
            times = interleaved(ports, n, warmup=300)
        finally:
            for p, _port in [*procs.values(), (_up, 0)]:
                p.kill()
    res = _results(times, rev, load_before)
    _print(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


def _results(times: dict[str, list[float]], rev: str, load_before: tuple[float, ...]
             ) -> dict[str, Any]:
    d50, d99 = _pct(times["direct"], 50), _pct(times["direct"], 99)
    paths = {
        name: {"p50_ms": _ms(_pct(xs, 50)), "p99_ms": _ms(_pct(xs, 99)),
               "added_p50_ms": _ms(_pct(xs, 50) - d50), "added_p99_ms": _ms(_pct(xs, 99) - d99),
               "requests": len(xs)}
        for name, xs in times.items()
    }
    base, plain = _pct(times["base"], 50), _pct(times["no-rules"], 50)
    diff = plain - base
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                    "note": "shared 2-core machine: upstream, proxies and load generator "
                            "share the cores"},
        "base_commit": rev,
        "body_bytes": len(BODY),
        "rules": RULES,
        "paths": paths,
        "no_rules_minus_base_p50_ms": _ms(diff),
        "rules_minus_no_rules_p50_ms": _ms(_pct(times["rules"], 50) - plain),
        "goals": {"no_rules_adds_nothing": diff <= max(0.02 * base, 5e-6)},
    }


def _print(res: dict[str, Any]) -> None:
    print(f"request rules: proxy latency at 1 in flight, {res['body_bytes']}-byte body, "
          f"base {res['base_commit'][:12]}; load {res['machine']['loadavg_before'][0]:.2f}")
    print(f"{'path':10}  {'p50':>9}  {'p99':>9}  {'added p50':>10}  {'added p99':>10}")
    for name, p in res["paths"].items():
        print(f"{name:10}  {p['p50_ms']:>7.3f}ms  {p['p99_ms']:>7.3f}ms  "
              f"{p['added_p50_ms']:>8.3f}ms  {p['added_p99_ms']:>8.3f}ms")
    print(f"no-rules - base p50: {res['no_rules_minus_base_p50_ms'] * 1000:+.1f} µs; "
          f"rules - no-rules p50: {res['rules_minus_no_rules_p50_ms'] * 1000:+.1f} µs")
    print("goals:", ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                              for k, v in res["goals"].items()))


if __name__ == "__main__":
    main()
