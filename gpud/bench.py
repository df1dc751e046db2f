"""`gpud bench`: latency and throughput of models as clients see them, stored run by run.

Sends streaming chat completions (through gpud's /v1, or `--direct` to one engine), one or
several models at once (contention), with a fixed concurrency per model; measures time to
first token (TTFT), time per output token (TPOT: the mean gap after the first token), the
gaps between tokens (ITL), end-to-end latency and tokens per second; prints p50/p90/p99 and
goodput (the share of requests meeting both --slo-ttft and --slo-tpot). Every run is stored
in SQLite (`<state_dir>/bench.sqlite`); `--list` shows them, `--compare A B` diffs two.

A client of the OpenAI API only: it never imports the daemon's internals or touches engines.
Tokens: the server's usage count (requested with stream_options.include_usage), else SSE
chunks with content; ITL is the gap between chunks. `ignore_eos` keeps every answer at
--max-tokens, so runs compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp

METRICS = ("ttft", "tpot", "itl", "e2e")
PCTS = (50, 90, 99)
WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "river", "stone", "cloud", "light",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL,
    finished TEXT,
    target TEXT NOT NULL,
    models TEXT NOT NULL,
    args TEXT NOT NULL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS requests (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    n INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    start REAL NOT NULL,
    ttft REAL,
    tpot REAL,
    e2e REAL,
    tokens INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    usage_tokens INTEGER,
    itl TEXT
);
CREATE INDEX IF NOT EXISTS requests_run ON requests(run_id);
"""


# --- one request -----------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    n: int
    start: float  # seconds after the run began
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunks: int = 0  # SSE chunks with content
    usage_tokens: int | None = None  # the server's own count, when it sends usage
    itl: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        # vLLM sends one chunk per step, but a chunk may carry several tokens (or none of
        # the text a token only completes later): its usage count is the truth when present.
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)

    def meets(self, slo_ttft: float, slo_tpot: float) -> bool:
        tpot = self.tpot
        return (self.ok and self.ttft is not None and self.ttft <= slo_ttft
                and (tpot is None or tpot <= slo_tpot))


def make_prompt(words: int, seed: int) -> str:
    """About `words` tokens of text; a per-request seed keeps prefix caches from answering."""
    rng = random.Random(seed)
    body = " ".join(rng.choice(WORDS) for _ in range(max(1, words - 8)))
    return f"Request {seed}. Repeat these words back: {body}"


async def one_request(session: aiohttp.ClientSession, url: str, model: str, n: int,
                      prompt: str, max_tokens: int, headers: dict[str, str],
                      t0: float) -> Result:
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    res = Result(model, n, started - t0)
    last = started
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {text}"
                return res
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        raise ValueError(f"error in stream: {msg}")
                    usage = event.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        res.usage_tokens = int(usage["completion_tokens"])
                    if not _has_content(event):
                        continue
                    now = time.perf_counter()
                    if res.chunks == 0:
                        res.ttft = now - started
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.chunks += 1
        res.e2e = time.perf_counter() - started
        res.ok = res.tokens > 0
        if res.ttft is None and res.ok:
            res.ttft = res.e2e  # tokens without visible text: the answer is the first token
        if not res.ok:
            res.error = "the stream held no tokens"
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


def _has_content(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
        if choice.get("text"):
            return True
    return False


# --- a run -----------------------------------------------------------------------------------


class Progress:
    """`[#####.....] 40/100` on a terminal; otherwise a line per 10% (at most one per 2 s,
    at least one per 10 s while requests complete) and one at the end."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.done, self.failed = total, stream, 0, 0
        self.tty = stream.isatty()
        self._last_line = time.monotonic()
        self._last_step = -1

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        fail = f" ({self.failed} failed)" if self.failed else ""
        if self.tty:
            width = 30
            filled = width * self.done // max(1, self.total)
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total}{fail}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            tenth = 10 * self.done // max(1, self.total)
            now = time.monotonic()
            due = tenth != self._last_step and now - self._last_line >= 2
            if due or now - self._last_line >= 10 or self.done == self.total:
                self._last_step, self._last_line = tenth, now
                self.stream.write(f"bench: {self.done}/{self.total} requests done{fail}\n")
        self.stream.flush()


@dataclass(frozen=True)
class BenchSpec:
    url: str  # base URL, /v1/chat/completions is appended
    models: tuple[str, ...]
    requests: int
    concurrency: int
    prompt_tokens: int
    max_tokens: int
    timeout: float
    api_key: str | None = None


async def run_bench(spec: BenchSpec, progress: Callable[[bool], None] | None = None,
                    ) -> tuple[list[Result], float]:
    """Every model's requests at once, `concurrency` in flight per model; (results, wall s)."""
    url = spec.url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    timeout = aiohttp.ClientTimeout(total=spec.timeout, sock_connect=10)
    conn = aiohttp.TCPConnector(limit=spec.concurrency * len(spec.models) + 4)
    results: list[Result] = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        async def worker(model: str, queue: list[int]) -> None:
            while queue:
                n = queue.pop()
                prompt = make_prompt(spec.prompt_tokens, random.getrandbits(24))
                res = await one_request(session, url, model, n, prompt, spec.max_tokens,
                                        headers, t0)
                results.append(res)
                if progress:
                    progress(res.ok)

        tasks = []
        for model in spec.models:
            queue = list(range(spec.requests - 1, -1, -1))
            tasks += [worker(model, queue) for _ in range(min(spec.concurrency, spec.requests))]
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: (spec.models.index(r.model), r.n))
    return results, wall


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: Sequence[Result], wall: float, slo_ttft: float,
              slo_tpot: float) -> dict[str, dict[str, Any]]:
    """Per model and "all": count, failed, percentiles per metric, tok/s, req/s, goodput."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.model, []).append(r)
    if len(groups) > 1:
        groups["all"] = list(results)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in groups.items():
        ok = [r for r in rs if r.ok]
        # A model's own span: under contention one model may finish long before the other.
        ends = [r.start + r.e2e for r in rs if r.e2e is not None]
        span = (max(ends) - min(r.start for r in rs)) if ends and name != "all" else wall
        values = {
            "ttft": [r.ttft for r in ok if r.ttft is not None],
            "tpot": [t for r in ok if (t := r.tpot) is not None],
            "itl": [g for r in ok for g in r.itl],
            "e2e": [r.e2e for r in ok if r.e2e is not None],
        }
        s: dict[str, Any] = {
            "requests": len(rs), "failed": len(rs) - len(ok),
            "tokens": sum(r.tokens for r in ok),
            "tok_s": sum(r.tokens for r in ok) / span if span > 0 else 0.0,
            "req_s": len(ok) / span if span > 0 else 0.0,
            "goodput": sum(r.meets(slo_ttft, slo_tpot) for r in rs) / len(rs) if rs else 0.0,
        }
        for metric, vals in values.items():
            for p in PCTS:
                s[f"{metric}_p{p}"] = percentile(vals, p)
        errors = sorted({r.error for r in rs if r.error})
        if errors:
            s["errors"] = errors[:5]
        out[name] = s
    return out


# --- storage ---------------------------------------------------------------------------------


def default_db(args: argparse.Namespace) -> Path:
    """<state_dir>/bench.sqlite: the config's state dir when it is readable and writable by
    us, else ~/.local/state/gpud (XDG_STATE_HOME honoured)."""
    if getattr(args, "db", None):
        return Path(args.db)
    from gpud.cli import _config_path
    from gpud.config import ConfigError, load_config

    try:
        loaded = load_config(_config_path(getattr(args, "config", None)), check_files=False)
        state = loaded.config.daemon.state_dir
        if not loaded.embedded and (state.is_dir() and os.access(state, os.W_OK)):
            return state / "bench.sqlite"
    except (ConfigError, OSError):
        pass
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "gpud" / "bench.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    db.executescript(SCHEMA)
    return db


def store_run(db: sqlite3.Connection, target: str, args: dict[str, Any], started: datetime,
              results: Sequence[Result], summary: dict[str, Any]) -> int:
    with db:
        cur = db.execute(
            "INSERT INTO runs (started, finished, target, models, args, summary) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (started.isoformat(timespec="seconds"),
             datetime.now(UTC).isoformat(timespec="seconds"), target,
             ",".join(args["models"]), json.dumps(args, sort_keys=True), json.dumps(summary)),
        )
        run_id = int(cur.lastrowid or 0)
        db.executemany(
            "INSERT INTO requests (run_id, model, n, ok, error, start, ttft, tpot, e2e, tokens,"
            " chunks, usage_tokens, itl) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run_id, r.model, r.n, int(r.ok), r.error, r.start, r.ttft, r.tpot, r.e2e,
              r.tokens, r.chunks, r.usage_tokens, json.dumps([round(g, 6) for g in r.itl]))
             for r in results],
        )
    return run_id


def load_run(db: sqlite3.Connection, run_id: int) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    return row


# --- output ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _table(rows: list[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                 enumerate(zip(r, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")


def print_summary(run_id: int, summary: dict[str, dict[str, Any]], slo_ttft: float,
                  slo_tpot: float, wall: float, out: TextIO) -> None:
    out.write(f"run {run_id}: {wall:.1f} s; latencies in ms; goodput = share of requests with "
              f"TTFT <= {slo_ttft * 1000:g} ms and TPOT <= {slo_tpot * 1000:g} ms\n")
    for name, s in summary.items():
        out.write(f"\n{name}: {s['requests']} requests, {s['failed']} failed, "
                  f"{s['tok_s']:.1f} tok/s, {s['req_s']:.2f} req/s, "
                  f"goodput {s['goodput'] * 100:.0f}%\n")
        rows: list[Sequence[str]] = [("metric", "p50", "p90", "p99")]
        for metric in METRICS:
            rows.append((metric.upper(), *(_ms(s.get(f"{metric}_p{p}")) for p in PCTS)))
        _table(rows, out)
        for err in s.get("errors", []):
            out.write(f"  error: {err}\n")


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, float | None,
                                                                      float | None]]:
    """(model, metric, value in A, value in B) for every metric both runs have."""
    rows = []
    keys = ["tok_s", "req_s", "goodput", "failed"] + [f"{m}_p{p}" for m in METRICS for p in PCTS]
    for model in [m for m in a if m in b]:
        for k in keys:
            rows.append((model, k, a[model].get(k), b[model].get(k)))
    return rows


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric.endswith(tuple(f"_p{p}" for p in PCTS)):
        return f"{v * 1000:.1f} ms"
    if metric == "goodput":
        return f"{v * 100:.0f}%"
    if metric == "failed":
        return str(int(v))
    return f"{v:.2f}"


def print_compare(ra: sqlite3.Row, rb: sqlite3.Row, out: TextIO) -> None:
    a, b = json.loads(ra["summary"] or "{}"), json.loads(rb["summary"] or "{}")
    out.write(f"A = run {ra['id']} ({ra['started']}, {ra['models']} via {ra['target']})\n"
              f"B = run {rb['id']} ({rb['started']}, {rb['models']} via {rb['target']})\n")
    common = [m for m in a if m in b]
    if not common:
        out.write("no model in common: nothing to compare\n")
        return
    rows: list[Sequence[str]] = [("model", "metric", "A", "B", "B-A", "%")]
    for model, metric, va, vb in compare_rows(a, b):
        if va is None and vb is None:
            continue
        if va is None or vb is None:
            diff, pct = "-", "-"
        else:
            d = vb - va
            diff = ("+" if d >= 0 else "-") + _fmt(metric, abs(d))
            pct = f"{d / va * 100:+.1f}%" if va else "-"
        rows.append((model, metric, _fmt(metric, va), _fmt(metric, vb), diff, pct))
    _table(rows, out)


def print_list(db: sqlite3.Connection, out: TextIO, limit: int) -> None:
    runs = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    if not runs:
        out.write("no runs yet\n")
        return
    rows: list[Sequence[str]] = [("RUN", "STARTED", "MODELS", "TARGET", "REQ", "FAILED",
                                  "TOK/S", "TTFT p50", "TPOT p50", "GOODPUT")]
    for r in reversed(runs):
        summary = json.loads(r["summary"] or "{}")
        s: dict[str, Any] = summary.get("all") or next(iter(summary.values()), {})
        rows.append((str(r["id"]), r["started"], r["models"], r["target"],
                     str(s.get("requests", "-")), str(s.get("failed", "-")),
                     f"{s.get('tok_s', 0):.1f}", _ms(s.get("ttft_p50")), _ms(s.get("tpot_p50")),
                     f"{s.get('goodput', 0) * 100:.0f}%"))
    _table(rows, out)


# --- the verb --------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        db = connect(default_db(args))
    except (OSError, sqlite3.Error) as exc:
        print(f"gpud bench: cannot open the results database: {exc} (try --db PATH)",
              file=sys.stderr)
        return 2
    try:
        if args.list:
            print_list(db, sys.stdout, args.limit)
            return 0
        if args.compare:
            rows = [load_run(db, n) for n in args.compare]
            for n, row in zip(args.compare, rows, strict=True):
                if row is None:
                    print(f"gpud bench: no run {n} in the database (see gpud bench --list)",
                          file=sys.stderr)
                    return 1
            assert rows[0] is not None and rows[1] is not None
            print_compare(rows[0], rows[1], sys.stdout)
            return 0
        return _run(args, db)
    finally:
        db.close()


def _run(args: argparse.Namespace, db: sqlite3.Connection) -> int:
    if not args.model:
        print("gpud bench: name at least one model: --model NAME (repeat for contention)",
              file=sys.stderr)
        return 2
    if args.direct:
        target = args.direct.rstrip("/")
    else:
        from gpud.cli import _base_url

        target = _base_url(args)
    spec = BenchSpec(
        url=target, models=tuple(args.model), requests=args.requests,
        concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens, timeout=args.timeout,
        api_key=args.api_key or os.environ.get("GPUD_API_KEY") or os.environ.get("OPENAI_API_KEY"),
    )
    total = spec.requests * len(spec.models)
    print(f"gpud bench: {', '.join(spec.models)} via {target}: {spec.requests} requests per model,"
          f" {spec.concurrency} at a time each, ~{spec.prompt_tokens} prompt tokens,"
          f" {spec.max_tokens} output tokens", file=sys.stderr)
    bar = Progress(total, sys.stderr)
    started = datetime.now(UTC)
    results, wall = asyncio.run(run_bench(spec, bar.step))
    summary = summarize(results, wall, args.slo_ttft, args.slo_tpot)
    record = {k: v for k, v in asdict(spec).items() if k not in ("api_key", "url")}
    record.update(models=list(spec.models), direct=bool(args.direct), slo_ttft=args.slo_ttft,
                  slo_tpot=args.slo_tpot, wall=round(wall, 3))
    run_id = store_run(db, target, record, started, results, summary)
    if args.json:
        print(json.dumps({"run": run_id, "wall": wall, "summary": summary}, indent=2))
    else:
        print_summary(run_id, summary, args.slo_ttft, args.slo_tpot, wall, sys.stdout)
    failed = sum(not r.ok for r in results)
    return 1 if failed == total else 0


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value
    return parse


def register(sub: Any) -> None:
    s = sub.add_parser(
        "bench", help="measure TTFT, inter-token latency, tokens/s; store and compare runs",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    s.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="model to load with requests; repeat to run several at once")
    s.add_argument("--direct", metavar="URL",
                   help="send to this engine's base URL instead of through gpud")
    s.add_argument("--requests", type=_positive(int), default=20, help="per model (default 20)")
    s.add_argument("--concurrency", type=_positive(int), default=4,
                   help="requests in flight per model (default 4)")
    s.add_argument("--prompt-tokens", type=_positive(int), default=128,
                   help="prompt length, approximated in words (default 128)")
    s.add_argument("--max-tokens", type=_positive(int), default=64,
                   help="output tokens per request, fixed with ignore_eos (default 64)")
    s.add_argument("--slo-ttft", type=_positive(float), default=0.5, metavar="SECONDS",
                   help="goodput SLO on time to first token (default 0.5)")
    s.add_argument("--slo-tpot", type=_positive(float), default=0.05, metavar="SECONDS",
                   help="goodput SLO on time per output token (default 0.05)")
    s.add_argument("--timeout", type=_positive(float), default=300.0,
                   help="per request, seconds (default 300)")
    s.add_argument("--api-key", help="for gpud's [auth] (default GPUD_API_KEY / OPENAI_API_KEY)")
    s.add_argument("--db", help="results database (default <state_dir>/bench.sqlite, "
                   "else ~/.local/state/gpud/bench.sqlite)")
    s.add_argument("--list", action="store_true", help="list stored runs")
    s.add_argument("--limit", type=_positive(int), default=20, help="runs shown by --list")
    s.add_argument("--compare", nargs=2, type=int, metavar="RUN",
                   help="difference per metric between two stored runs (B minus A)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_bench)
