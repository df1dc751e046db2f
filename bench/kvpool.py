"""Benchmark of the VMM KV pool on a GPU, against raw driver calls on the same pages, one run.

Measures, per 2 MiB page unless said otherwise:
  1. in-process grant of a pre-created page: ledger + map + first cuMemSetAccess,
     vs raw cuMemMap + cuMemSetAccess;
  2. pool growth in GB/s of newly backed memory, pages created ahead (bulk grant +
     map + one access call per adjacent run), vs raw per-page map + access; and the
     same with pages created on demand (create + export + map + access);
  3. reclaim: unmap + ledger + release to the driver, vs raw cuMemUnmap + cuMemRelease;
  4. a 64-page grant to another process end to end (socket, fds, import, map,
     access), vs raw import + map + access of the same fds in that process.

Prints a table with ratios, writes JSON and a markdown table. Run on the GPU:
  python bench/kvpool.py --out-dir bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpud.kvpool import cuda
from gpud.kvpool.client import KVPoolClient
from gpud.kvpool.ledger import PoolLedger, TenantSpec
from gpud.kvpool.pool import KVPool
from gpud.kvpool.server import KVPoolServer

PAGE = 2 << 20
ns = time.perf_counter_ns


def med_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000.0


def raw_ok(result: Any, call: str) -> None:
    d = cuda.driver()
    err = result[0] if isinstance(result, tuple) else result
    if err != d.CUresult.CUDA_SUCCESS:
        raise cuda.CudaError(call, str(err))


def make_pool(pages: int, ahead: bool) -> tuple[KVPool, cuda.CudaBackend]:
    ledger = PoolLedger(gpu=0, total_pages=pages)
    ledger.add_tenant(TenantSpec("t", kv_max=pages, priority=1))
    backend = cuda.CudaBackend(0, PAGE)
    pool = KVPool(ledger, backend, spare_pages=pages)
    if ahead:
        pool.grow_ahead(pages)
    return pool, backend


def bench_inprocess(dev: cuda.Device, pages: int, rounds: int) -> dict[str, Any]:
    d = cuda.driver()
    pool, backend = make_pool(pages, ahead=True)
    mapper = cuda.PageMapper(dev, pages * PAGE, PAGE)
    handles = [backend.handle(p) for p in range(pages)]
    raw_s: list[int] = []
    gpud_s: list[int] = []

    def raw_round() -> None:
        # raw: the same pages, the same addresses
        for i, h in enumerate(handles):
            t0 = ns()
            ptr = d.CUdeviceptr(mapper.base_int + i * PAGE)
            raw_ok(d.cuMemMap(ptr, PAGE, 0, h, 0), "cuMemMap")
            raw_ok(d.cuMemSetAccess(ptr, PAGE, dev.access, 1), "cuMemSetAccess")
            raw_s.append(ns() - t0)
        for i in range(pages):
            raw_ok(d.cuMemUnmap(d.CUdeviceptr(mapper.base_int + i * PAGE), PAGE), "cuMemUnmap")

    def gpud_round() -> None:
        # gpud: ledger grant + map + first access, one page at a time
        for _i in range(pages):
            t0 = ns()
            (ref,) = pool.grant_now("t", 1)
            mapper.map_handle(ref.offset, backend.handle(ref.page))
            gpud_s.append(ns() - t0)
        mapper.unmap_all()
        pool.release_all("t")
        pool.ledger.check()

    for k in range(rounds):
        # Alternate which side goes first, so neither gains from the other's warm-up.
        for fn in (raw_round, gpud_round) if k % 2 == 0 else (gpud_round, raw_round):
            fn()
    mapper.close()
    pool.close()
    raw, ours = med_us(raw_s), med_us(gpud_s)
    return {"raw_us": raw, "gpud_us": ours, "ratio": ours / raw, "samples": len(gpud_s)}


def bench_growth(dev: cuda.Device, pages: int, rounds: int) -> dict[str, Any]:
    d = cuda.driver()
    pool, backend = make_pool(pages, ahead=True)
    mapper = cuda.PageMapper(dev, pages * PAGE, PAGE)
    handles = [backend.handle(p) for p in range(pages)]
    raw_t: list[int] = []
    gpud_t: list[int] = []
    demand_t: list[int] = []
    for _ in range(rounds):
        t0 = ns()
        for i, h in enumerate(handles):
            ptr = d.CUdeviceptr(mapper.base_int + i * PAGE)
            raw_ok(d.cuMemMap(ptr, PAGE, 0, h, 0), "cuMemMap")
            raw_ok(d.cuMemSetAccess(ptr, PAGE, dev.access, 1), "cuMemSetAccess")
        raw_t.append(ns() - t0)
        for i in range(pages):
            raw_ok(d.cuMemUnmap(d.CUdeviceptr(mapper.base_int + i * PAGE), PAGE), "cuMemUnmap")
        t0 = ns()
        refs = pool.grant_now("t", pages)
        mapper.map_handles([(r.offset, backend.handle(r.page)) for r in refs])
        gpud_t.append(ns() - t0)
        mapper.unmap_all()
        pool.release_all("t")
    pool.close()
    # Pages created on demand: create + export + map + access inside the grant.
    for _ in range(max(1, rounds // 2)):
        pool2, backend2 = make_pool(pages, ahead=False)
        t0 = ns()
        refs = pool2.grant_now("t", pages)
        mapper.map_handles([(r.offset, backend2.handle(r.page)) for r in refs])
        demand_t.append(ns() - t0)
        mapper.unmap_all()
        pool2.release_all("t")
        pool2.close()
    mapper.close()
    nbytes = pages * PAGE

    def gbps(t: list[int]) -> float:
        return nbytes / (statistics.median(t) / 1e9) / 1e9

    return {
        "pages": pages,
        "raw_gbps": gbps(raw_t),
        "gpud_gbps": gbps(gpud_t),
        "ratio": gbps(gpud_t) / gbps(raw_t),
        "on_demand_gbps": gbps(demand_t),
    }


def bench_reclaim(dev: cuda.Device, pages: int, rounds: int) -> dict[str, Any]:
    d = cuda.driver()
    mapper = cuda.PageMapper(dev, pages * PAGE, PAGE)
    raw_s: list[int] = []
    gpud_s: list[int] = []
    for _ in range(rounds):
        # Reclaim destroys the page, so each side gets fresh pages made the same way.
        pool, backend = make_pool(pages, ahead=True)
        refs = pool.grant_now("t", pages)
        handles = [(r.offset, backend.handle(r.page), backend.fd(r.page)) for r in refs]
        mapper.map_handles([(o, h) for o, h, _ in handles])
        # raw: unmap + release, on pages exactly like gpud's (exported fd closed too)
        for off, h, fd in handles:
            t0 = ns()
            raw_ok(d.cuMemUnmap(d.CUdeviceptr(mapper.base_int + off), PAGE), "cuMemUnmap")
            raw_ok(d.cuMemRelease(h), "cuMemRelease")
            assert fd is not None
            os.close(fd)
            raw_s.append(ns() - t0)
        mapper.mapped.clear()
        backend._handles.clear()  # released above by hand
        backend._fds.clear()
        pool.close()
        pool, backend = make_pool(pages, ahead=True)
        refs = pool.grant_now("t", pages)
        mapper.map_handles([(r.offset, backend.handle(r.page)) for r in refs])
        for r in refs:
            t0 = ns()
            mapper.unmap(r.offset)
            pool.reclaim("t", [r.page])
            gpud_s.append(ns() - t0)
        assert backend.live_pages == 0
        pool.close()
    mapper.close()
    raw, ours = med_us(raw_s), med_us(gpud_s)
    return {"raw_us": raw, "gpud_us": ours, "ratio": ours / raw, "samples": len(gpud_s)}


# -- cross-process ----------------------------------------------------------------


def child(sock: str, n: int, rounds: int) -> None:
    """The engine side: grant n pages end to end, and raw import + map + access of the same fds."""
    d = cuda.driver()
    sys.stdin.readline()
    client = KVPoolClient(sock, "t")
    dev = cuda.Device(0)
    mapper = cuda.PageMapper(dev, n * PAGE, PAGE)
    e2e: list[int] = []
    sock_part: list[int] = []
    raw: list[int] = []
    kept: list[int] = []
    for k in range(rounds + 1):
        t0 = ns()
        r = client.grant(n)
        ts = ns()
        if not kept:
            kept = [os.dup(g.fd) for g in r.pages if g.fd is not None]
        mapper.map_fds([(i * PAGE, g.fd) for i, g in enumerate(r.pages) if g.fd is not None])
        t1 = ns()
        if k:  # the first round warms the socket, the server's code paths and the driver
            e2e.append(t1 - t0)
            sock_part.append(ts - t0)
        assert len(r.pages) == n, r.reason
        mapper.unmap_all()
        client.give_back([g.page for g in r.pages])
        fds = [os.dup(f) for f in kept]
        handles = []
        t0 = ns()
        for i, fd in enumerate(fds):
            h = d.cuMemImportFromShareableHandle(fd, dev.fd_type)
            raw_ok(h, "cuMemImportFromShareableHandle")
            ptr = d.CUdeviceptr(mapper.base_int + i * PAGE)
            raw_ok(d.cuMemMap(ptr, PAGE, 0, h[1], 0), "cuMemMap")
            raw_ok(d.cuMemSetAccess(ptr, PAGE, dev.access, 1), "cuMemSetAccess")
            handles.append(h[1])
        t1 = ns()
        if k:
            raw.append(t1 - t0)
        for fd in fds:
            os.close(fd)
        for i in range(n):
            raw_ok(d.cuMemUnmap(d.CUdeviceptr(mapper.base_int + i * PAGE), PAGE), "cuMemUnmap")
        for h in handles:
            raw_ok(d.cuMemRelease(h), "cuMemRelease")
    mapper.close()
    client.close()
    print(json.dumps({"e2e_ns": e2e, "raw_ns": raw, "socket_ns": sock_part}), flush=True)


def bench_cross_process(n: int, rounds: int, tmp: Path) -> dict[str, Any]:
    pool, _backend = make_pool(2 * n, ahead=True)
    pids: set[int] = set()
    loop = asyncio.new_event_loop()
    server = KVPoolServer({0: pool}, tmp / "kv.sock", lambda p, t: p.pid in pids)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(server.path), str(n), str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        pids.add(proc.pid)
        out, _ = proc.communicate("go\n", timeout=300)
        if proc.returncode:
            raise RuntimeError(f"bench child failed with exit {proc.returncode}")
        res = json.loads(out.strip().splitlines()[-1])
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        pool.close()
    e2e, raw = med_us(res["e2e_ns"]), med_us(res["raw_ns"])
    return {
        "pages": n,
        "gpud_ms": e2e / 1000,
        "raw_import_map_access_ms": raw / 1000,
        "ratio": e2e / raw,
        "socket_part_ms": med_us(res["socket_ns"]) / 1000,
        "p90_ms": sorted(res["e2e_ns"])[int(0.9 * len(res["e2e_ns"]))] / 1e6,
        "samples": len(res["e2e_ns"]),
    }


def machine(dev: cuda.Device) -> dict[str, Any]:
    d = cuda.driver()
    version = cuda.check("cuDriverGetVersion", d.cuDriverGetVersion())
    try:
        from importlib.metadata import version as pkg_version

        bindings = pkg_version("cuda-bindings")
    except Exception:
        bindings = "?"
    _free, total = dev.mem_info()
    return {
        "gpu": dev.name,
        "driver_api": int(version),
        "cuda_bindings": bindings,
        "python": platform.python_version(),
        "gpu_total_gib": round(total / 2**30, 1),
        "page_size": PAGE,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("SOCK", "N", "ROUNDS"), help=argparse.SUPPRESS)
    ap.add_argument("--pages", type=int, default=256, help="pages per in-process round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--xp-rounds", type=int, default=30, help="cross-process grant rounds")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="kvpool-h100")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    dev = cuda.Device(0)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpud-kvbench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(dev)}
    results["inprocess_grant"] = bench_inprocess(dev, args.pages, args.rounds)
    results["growth"] = bench_growth(dev, 4 * args.pages, args.rounds)
    results["reclaim"] = bench_reclaim(dev, args.pages, args.rounds)
    results["cross_process_64"] = bench_cross_process(64, args.xp_rounds, tmp)
    ip, gr, rc, xp = (
        results["inprocess_grant"],
        results["growth"],
        results["reclaim"],
        results["cross_process_64"],
    )
    rows = [
        (
            "in-process grant per page (us)",
            ip["gpud_us"],
            ip["raw_us"],
            ip["ratio"],
            "<= 1.2x raw",
            ip["ratio"] <= 1.2,
        ),
        (
            f"growth, {gr['pages']} pages created ahead (GB/s)",
            gr["gpud_gbps"],
            gr["raw_gbps"],
            gr["ratio"],
            ">= 40 GB/s",
            gr["gpud_gbps"] >= 40,
        ),
        (
            "growth, pages created on demand (GB/s)",
            gr["on_demand_gbps"],
            gr["raw_gbps"],
            gr["on_demand_gbps"] / gr["raw_gbps"],
            "(info)",
            True,
        ),
        ("reclaim per page (us)", rc["gpud_us"], rc["raw_us"], rc["ratio"], "(info)", True),
        (
            "64-page cross-process grant (ms)",
            xp["gpud_ms"],
            xp["raw_import_map_access_ms"],
            xp["ratio"],
            "< 5 ms",
            xp["gpud_ms"] < 5,
        ),
    ]
    results["goals"] = {r[0]: {"goal": r[4], "met": r[5]} for r in rows}
    head = "| metric | gpud | raw driver | ratio | goal | met |\n|---|---:|---:|---:|---|---|\n"
    body = "".join(
        f"| {m} | {a:.2f} | {b:.2f} | {c:.2f}x | {g} | {'yes' if ok else 'NO'} |\n"
        for m, a, b, c, g, ok in rows
    )
    mach = results["machine"]
    title = (
        f"# KV pool on {mach['gpu']} (driver API {mach['driver_api']}, "
        f"cuda-bindings {mach['cuda_bindings']}), medians\n\n"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / f"{args.name}.md").write_text(title + head + body)
    print(title + head + body)


if __name__ == "__main__":
    main()
