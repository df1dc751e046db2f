"""What the activity log costs a request: gpud's proxy with and without it, same run.

Two proxies in front of one upstream that answers at once (bench/proxy_overhead.py's), one
with an `ActivityLog` on a real SQLite file in a temporary directory, one without. Reports
latency at 1 request in flight (p50, p99; batches alternated to cancel drift), the highest
request rate (32 connections; the median of 5 alternated rounds) and the proxy's CPU per
request (its writer thread included), each with its ratio to the proxy without the log, and
checks that every request sent through the logging proxy became a row.
Prints a table, writes bench/results/activity_overhead.json.

    .venv/bin/python bench/activity_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy_overhead import (
    MODEL,
    _cpu,
    _max_rate,
    _ms,
    _pct,
    _run_upstream,
    _start,
    latency_c1,
)

RESULTS = Path(__file__).resolve().parent / "results" / "activity_overhead.json"


def _run_proxy(conn: Any, upstream: str, db: str) -> None:
    from aiohttp import web

    from gpud.activity import ActivityLog
    from gpud.proxy import ModelRoute, Proxy

    class StaticBackend:
        def __init__(self) -> None:
            self._routes = {MODEL: ModelRoute(MODEL, max_concurrency=100_000,
                                              max_queue=100_000)}

        def routes(self) -> Mapping[str, ModelRoute]:
            return self._routes

        def serving_upstream(self, model: str) -> str | None:
            return upstream

        async def ready_upstream(self, model: str) -> str:
            return upstream

        def upstream_released(self, model: str, base: str) -> None: ...
        def waking_upstreams(self, model: str) -> list[str]:
            return []

        async def early_upstream(self, model: str) -> str | None:
            return None

        def request_started(self, model: str) -> None: ...
        def request_finished(self, model: str) -> None: ...

    async def main() -> None:
        log = ActivityLog(Path(db)) if db else None
        if log is not None:
            log.start()
        proxy = Proxy(StaticBackend(), activity=log)
        runner = web.AppRunner(proxy.make_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        assert site._server is not None
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


def _rows(db: Path) -> int:
    with sqlite3.connect(db, timeout=30) as c:
        return int(c.execute("SELECT count(*) FROM activity").fetchone()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    mp.set_start_method("fork")
    tmp = Path(tempfile.mkdtemp(prefix="gpud-activity-bench-"))
    db = tmp / "activity.sqlite3"
    _up, up_port = _start(_run_upstream, "asyncio", {"ttft": 0.02, "rate": 30.0,
                                                     "tokens": 8.0}, str(tmp / "up.sock"))
    upstream = f"http://127.0.0.1:{up_port}"
    plain, plain_port = _start(_run_proxy, upstream, "")
    logged, logged_port = _start(_run_proxy, upstream, str(db))
    n = 2000 if args.quick else 10000
    lat: dict[str, list[float]] = {"off": [], "on": []}
    cpu = {"off": 0.0, "on": 0.0}
    for _ in range(5):
        for name, proc, port in (("off", plain, plain_port), ("on", logged, logged_port)):
            c0 = _cpu(proc.pid or 0)
            lat[name] += latency_c1(port, n // 5, 200)
            cpu[name] += _cpu(proc.pid or 0) - c0
    time.sleep(1.0)  # the writer's last batch
    sent = 5 * (n // 5 + 200)
    rows = _rows(db)
    secs = 2.0 if args.quick else 5.0
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(5):  # alternated, like the latency batches: the machine's load drifts
        rates["off"].append(asyncio.run(_max_rate(plain_port, 32, secs / 5)))
        rates["on"].append(asyncio.run(_max_rate(logged_port, 32, secs / 5)))
    rate = {k: sorted(v)[2] for k, v in rates.items()}  # the median round
    res: dict[str, Any] = {"requests_per_arm": len(lat["on"]), "cpus": os.cpu_count(),
                           "latency_requests_sent_to_logging_proxy": sent,
                           "rows_written_for_them": rows}
    for name in ("off", "on"):
        res[name] = {"p50_ms": _ms(_pct(lat[name], 50)), "p99_ms": _ms(_pct(lat[name], 99)),
                     "max_rate_rps": round(rate[name]),
                     "cpu_us_per_request": round(cpu[name] / (n + 1000) * 1e6, 1)}
    res["ratio_on_over_off"] = {k: round(res["on"][k] / res["off"][k], 3) if res["off"][k]
                                else None for k in res["on"]}
    for p in (_up, plain, logged):
        p.kill()
    print(f"{'':24}{'without log':>14}{'with log':>14}{'ratio':>9}")
    for k, label in (("p50_ms", "latency p50 (ms)"), ("p99_ms", "latency p99 (ms)"),
                     ("max_rate_rps", "max rate (req/s)"),
                     ("cpu_us_per_request", "proxy CPU (us/req)")):
        print(f"{label:24}{res['off'][k]:>14}{res['on'][k]:>14}"
              f"{res['ratio_on_over_off'][k]:>9}")
    print(f"rows written by the logging proxy for its {sent} latency requests: {rows}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
