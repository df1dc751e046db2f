"""`gpud bench` against a real local HTTP server that streams SSE the way vLLM does.

The server is a real aiohttp app on a loopback port (in a thread): one chunk per token, a
first-token delay per model, EOS after a few tokens unless the request says ignore_eos. The
CLI runs as a real process; results land in a real SQLite file.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gpud.bench import Progress, percentile

REPO = Path(__file__).resolve().parents[1]
FIRST_TOKEN_DELAY = {"fast": 0.005, "slow": 0.15}


class Engine:
    """An engine-shaped SSE server; remembers what it was asked."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        model = body["model"]
        if model not in FIRST_TOKEN_DELAY:
            return web.json_response({"error": {"message": f"model {model} not found"}},
                                     status=404)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIRST_TOKEN_DELAY[model])
        n = body["max_tokens"] if body.get("ignore_eos") else min(3, body["max_tokens"])

        def event(data: object) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        await resp.write(event({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""}}]}))
        for i in range(n):
            await resp.write(event({"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}))
            await asyncio.sleep(0.002)
        await resp.write(event({"choices": [{"index": 0, "delta": {},
                                             "finish_reason": "length"}]}))
        if body.get("stream_options", {}).get("include_usage"):  # type: ignore[union-attr]
            await resp.write(event({"choices": [], "usage": {"completion_tokens": n}}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> Engine:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine() as e:
        yield e


def bench(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpud.cli", "bench", "--db", str(db), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_run_is_measured_stored_and_printed(engine: Engine, tmp_path: Path) -> None:
    db = tmp_path / "bench.sqlite"
    engine.bodies.clear()
    out = bench("--direct", engine.url, "--model", "fast", "--model", "slow", "--requests", "6",
                "--concurrency", "3", "--prompt-tokens", "40", "--max-tokens", "8",
                "--slo-ttft", "0.1", "--slo-tpot", "0.05", db=db)
    assert out.returncode == 0, out.stderr
    # Both models under load at once, fixed output length, prompts of about the asked size.
    assert len(engine.bodies) == 12
    assert all(b["ignore_eos"] and b["stream"] for b in engine.bodies)
    words = [len(b["messages"][0]["content"].split()) for b in engine.bodies]  # type: ignore[index]
    assert all(35 <= w <= 45 for w in words), words
    # The table: one block per model and one for all, p50/p90/p99 per metric, goodput.
    text = out.stdout
    assert text.startswith("run 1: ")
    assert "fast: 6 requests, 0 failed" in text and "goodput 100%" in text
    assert "slow: 6 requests, 0 failed" in text and "goodput 0%" in text  # 150 ms > 100 ms SLO
    assert "all: 12 requests" in text
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "p50", "p90", "p99"]
    ttft_fast = float(text.split("fast:")[1].split("TTFT")[1].split()[0])
    ttft_slow = float(text.split("slow:")[1].split("TTFT")[1].split()[0])
    assert ttft_fast < 100 < ttft_slow  # ms
    # Not a terminal: progress comes as plain lines on stderr, ending with the total.
    assert "bench: 12/12 requests done" in out.stderr and "\r" not in out.stderr
    # Stored: the run with its arguments and summary, and every request with 8 tokens.
    con = sqlite3.connect(db)
    run = con.execute("SELECT models, args, summary FROM runs").fetchall()
    assert len(run) == 1 and run[0][0] == "fast,slow"
    args = json.loads(run[0][1])
    assert args["requests"] == 6 and args["concurrency"] == 3 and args["direct"] is True
    assert json.loads(run[0][2])["fast"]["goodput"] == 1.0
    rows = con.execute("SELECT model, ok, tokens, chunks, ttft, tpot FROM requests").fetchall()
    assert len(rows) == 12 and all(r[1] == 1 and r[2] == 8 and r[3] == 8 for r in rows)
    assert all(r[4] > 0 and r[5] > 0 for r in rows)


def test_list_and_compare_two_runs(engine: Engine, tmp_path: Path) -> None:
    db = tmp_path / "bench.sqlite"
    common = ("--direct", engine.url, "--requests", "4", "--concurrency", "2",
              "--max-tokens", "5")
    assert bench("--model", "fast", *common, db=db).returncode == 0
    assert bench("--model", "slow", "--model", "fast", *common, db=db).returncode == 0
    listed = bench("--list", db=db)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STARTED", "MODELS"]
    assert lines[1].split()[0] == "1" and "fast" in lines[1]
    assert lines[2].split()[0] == "2" and "slow,fast" in lines[2]
    cmp = bench("--compare", "1", "2", db=db)
    assert cmp.returncode == 0, cmp.stderr
    assert cmp.stdout.startswith("A = run 1")
    rows = [line.split() for line in cmp.stdout.splitlines()[2:]]
    assert rows[0] == ["model", "metric", "A", "B", "B-A", "%"]
    by_metric = {r[1]: r for r in rows[1:] if r[0] == "fast"}
    assert {"tok_s", "goodput", "ttft_p50", "ttft_p99", "tpot_p90", "e2e_p50"} <= set(by_metric)
    ttft = by_metric["ttft_p50"]  # ['fast', 'ttft_p50', a, 'ms', b, 'ms', diff, 'ms', pct]
    a, b, diff = float(ttft[2]), float(ttft[4]), float(ttft[6])
    assert abs((b - a) - diff) < 0.11
    assert ttft[-1].endswith("%")
    assert all(r[0] == "fast" for r in rows[1:])  # slow ran only in B: nothing to compare
    missing = bench("--compare", "1", "9", db=db)
    assert missing.returncode == 1 and "no run 9" in missing.stderr


def test_failures_are_counted_and_reported(engine: Engine, tmp_path: Path) -> None:
    db = tmp_path / "bench.sqlite"
    out = bench("--direct", engine.url, "--model", "nope", "--requests", "2", db=db)
    assert out.returncode == 1  # every request failed
    assert "nope: 2 requests, 2 failed" in out.stdout
    assert "HTTP 404" in out.stdout and "model nope not found" in out.stdout
    assert bench("--model", "fast", "--direct", "http://127.0.0.1:9", "--requests", "1",
                 db=db).returncode == 1
    assert bench("--db", str(db), db=db).returncode == 2  # no --model


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_percentiles() -> None:
    out = Tty()
    bar = Progress(10, out)
    for i in range(10):
        bar.step(ok=i != 3)
    frames = out.getvalue().split("\r")
    assert frames[4] == "[############..................] 4/10 (1 failed)"
    assert frames[-1] == "[##############################] 10/10 (1 failed)\n"
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None
