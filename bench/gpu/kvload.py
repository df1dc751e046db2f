"""Issue 22's load phases for bench/gpu/kvplugin.py: timed arrivals, TTFT/e2e/SLO figures, and
the three scenarios (pooled and fixed always in the same run, the same arrival schedule):

  solo     Must-show 2, no contention: one engine and its own burst, the pool as big as the
           fixed reservation. An untimed warm-up burst on both engines (the pooled one grows
           in it), then timed bursts alternating which engine goes first; the pooled engine
           keeps its pages between them, as it does under gpud while no other model asks
           (``--solo-trim``: trimmed to its floor before each, the after-an-idle-spell case).
  share2   Must-show 3, item 7 re-run: B serves a load and idles, then A bursts; one pool of
           the total vs two fixed halves.
  contend  Must-show 1, kvcached's shape: three engines of the same model on one GPU, the
           same total KV bytes as three equal fixed reservations or one pool; each model
           bursts in turn (Poisson arrivals), prompts long enough that a burst needs more
           than its fixed share.

Prompts are token ids (exact lengths, a unique random head per request so no two share a
cached prefix). The bench process plays gpud's part for activity: a model is awake from
its first request of a burst until its last answer, then idle (gpud's kv_idle_after, at 0).
The engines are reached directly, not through gpud's proxy.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SLO_TTFT_S = 1.0
VOCAB = (600, 31000)  # the recipe's large model: ids past its 512 BPE merges decode as words


@dataclass(frozen=True)
class Req:
    at: float  # seconds after the schedule's start
    model: str
    prompt: tuple[int, ...]
    max_tokens: int


def token_prompt(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(*VOCAB) for _ in range(n))


def poisson_burst(rng: random.Random, model: str, start: float, seconds: float, rate: float,
                  prompt_tokens: int, max_tokens: int) -> list[Req]:
    """Poisson arrivals at ``rate`` per second for ``seconds``, from ``start``."""
    out, t = [], start
    while True:
        t += rng.expovariate(rate)
        if t >= start + seconds:
            return out
        out.append(Req(t, model, token_prompt(rng, prompt_tokens), max_tokens))


def at_once(rng: random.Random, model: str, start: float, n: int, prompt_tokens: int,
            max_tokens: int) -> list[Req]:
    return [Req(start, model, token_prompt(rng, prompt_tokens), max_tokens) for _ in range(n)]


def stream(url: str, req: Req, timeout: float = 300) -> dict[str, Any]:
    """One streamed completion: seconds to first token and to the end, or the error."""
    body = {"model": req.model, "prompt": list(req.prompt), "max_tokens": req.max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.monotonic()
    ttft = None
    chunks = 0
    try:
        r = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                   {"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if ttft is None:
                    ttft = time.monotonic() - t0
                chunks += 1
    except urllib.error.HTTPError as e:
        return {"model": req.model, "ok": False,
                "error": f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"}
    except Exception as e:
        return {"model": req.model, "ok": False, "error": repr(e)[:300]}
    return {"model": req.model, "ok": ttft is not None, "ttft": ttft,
            "e2e": time.monotonic() - t0, "chunks": chunks}


def run_schedule(urls: dict[str, str], reqs: Sequence[Req],
                 on_start: Callable[[str], None] | None = None,
                 on_idle: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Send each request at its time (a thread each); ``on_start(model)`` before a model's
    first request after it was idle, ``on_idle(model)`` once its last one in flight ends."""
    results: list[dict[str, Any]] = [{} for _ in reqs]
    inflight: dict[str, int] = {m: 0 for m in urls}
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(i: int, req: Req) -> None:
        try:
            results[i] = {**stream(urls[req.model], req), "at": req.at}
        finally:
            with lock:
                inflight[req.model] -= 1
                idle = inflight[req.model] == 0
            if idle and on_idle is not None:
                on_idle(req.model)

    threads = []
    for i, req in sorted(enumerate(reqs), key=lambda x: x[1].at):
        wait = t0 + req.at - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # the arrival schedule itself, not a synchronisation
        with lock:
            inflight[req.model] += 1
            first = inflight[req.model] == 1
        if first and on_start is not None:
            on_start(req.model)
        th = threading.Thread(target=one, args=(i, req), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return results


def pct(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 4)


def summarize(results: Sequence[dict[str, Any]], slo: float = SLO_TTFT_S) -> dict[str, Any]:
    ok = [r for r in results if r.get("ok")]
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    return {
        "n": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.get("error", "") for r in results if not r.get("ok")})[:3],
        "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
        "ttft_mean": round(statistics.fmean(ttft), 4) if ttft else None,
        "e2e_p50": pct(e2e, 0.5), "e2e_p99": pct(e2e, 0.99),
        # A failed request misses the SLO too.
        "slo_attainment": round(sum(t < slo for t in ttft) / len(results), 4) if results else None,
    }


def by_model(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    models = sorted({r["model"] for r in results if "model" in r})
    return {m: summarize([r for r in results if r.get("model") == m]) for m in models}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def compare(pooled: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """pooled / fixed for the latency figures (below 1: the pool is faster)."""
    out: dict[str, Any] = {k: ratio(pooled.get(k), fixed.get(k))
                           for k in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")}
    out["slo_pooled"], out["slo_fixed"] = pooled.get("slo_attainment"), fixed.get("slo_attainment")
    return out


def contention_schedule(seed: int, models: Sequence[str], rounds: int, burst_s: float,
                        gap_s: float, rate: float, prompt_tokens: int,
                        max_tokens: int) -> list[Req]:
    """Each model bursts in turn (``rounds`` times each), Poisson arrivals inside a burst."""
    rng = random.Random(seed)
    out: list[Req] = []
    t = 0.0
    for _ in range(rounds):
        for m in models:
            out += poisson_burst(rng, m, t, burst_s, rate, prompt_tokens, max_tokens)
            t += burst_s + gap_s
    return out


def preemptions(metrics: dict[str, float]) -> float:
    return metrics.get("vllm:num_preemptions_total", metrics.get("vllm:num_preemptions", 0.0))


# -- Markdown ---------------------------------------------------------------------------

_COLS = ("n", "failed", "ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "slo_attainment",
         "preemptions")


def _row(label: str, r: dict[str, Any]) -> str:
    return "| " + " | ".join([label] + [str(r.get(c, "")) for c in _COLS]) + " |"


def table(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    head = "| | " + " | ".join(c.replace("_", " ") for c in _COLS) + " |"
    return [head, "|" + "---|" * (len(_COLS) + 1)] + [_row(k, r) for k, r in rows]


def render(phase: str, r: dict[str, Any]) -> str:
    """One phase's tables (seconds; SLO: TTFT < 1 s; ratios pooled / fixed)."""
    out = [f"### {phase}", ""]
    if "error" in r or "skipped" in r:
        return "\n".join([*out, f"not measured: {r.get('error') or r.get('skipped')}", ""])
    fixed = r.get("fixed") or {}
    runs = [(k, label, r[k]) for k, label in (("pooled", "pooled"), ("pool", "pooled"),
                                              ("kvcached", "kvcached")) if r.get(k)]
    rows = [("fixed", fixed)] + [(label, run) for _, label, run in runs]
    for name in sorted(fixed.get("per_model", {})):
        rows.append((f"fixed {name}", fixed["per_model"][name]))
        for _, label, run in runs:
            mine = {k: v for k, v in run.get("per_model", {}).items() if name.endswith(k)}
            rows += [(f"{label} {k}", v) for k, v in mine.items()]
    out += table(rows)
    for key, label in (("pooled_over_fixed", "pooled"), ("pool_over_fixed", "pooled"),
                       ("kvcached_over_fixed", "kvcached")):
        if r.get(key):
            out += ["", f"{label} / fixed: " + ", ".join(f"{k} {v}" for k, v in r[key].items())]
    out.append("")
    return "\n".join(out)
