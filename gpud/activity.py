"""The activity log: one row per request through the proxy, in SQLite under the state dir.

The proxy hands each finished request to `ActivityLog.record` on the event loop; that is an
append to a deque and nothing else. A writer thread of its own takes what piled up every
`flush_every` seconds (or sooner when a batch fills), parses token counts from the answer's
tail, writes the batch in one transaction and drops the oldest rows past the cap. So the disk
never sits on a request's path, and a stalled disk costs rows (counted in `dropped`), never
latency. Never stores a prompt, a completion or a key's secret: only the key's name.
"""

from __future__ import annotations

import collections
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from gpud.proxy.api import RequestFinished as Finished

log = logging.getLogger("gpud.activity")

DEFAULT_ROWS: Final = 100_000
MAX_LIMIT: Final = 10_000  # rows one query may return
_PENDING_MAX: Final = 100_000  # requests waiting for the writer before new ones are dropped
_BATCH: Final = 512  # wake the writer early once this many wait
_CHUNK: Final = 128  # rows between two releases of the GIL by the writer (the loop waits else)
_TAIL: Final = 2048  # bytes of an answer's end kept to find its `usage`

COLUMNS: Final = ("id", "at", "model", "asked", "key", "endpoint", "status", "stream",
                  "ttft", "duration", "tokens_in", "tokens_out")
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    model TEXT NOT NULL,
    asked TEXT,
    key TEXT,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    ttft REAL,
    duration REAL NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER
);
"""


# Inside the last `"usage":{...}`: OpenAI's (prompt/completion) or Anthropic's (input/output)
# counts. A regex, not a JSON parse: the writer shares the GIL with the event loop.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')  # one nested level
_TOKENS_IN = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_TOKENS_OUT = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')


def usage_of(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) from the last `"usage":{...}` in an answer's tail."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None, None
    m = _USAGE_OBJECT.match(tail, at)
    if m is None:
        return None, None
    usage = m.group(1)
    tin, tout = _TOKENS_IN.search(usage), _TOKENS_OUT.search(usage)
    return (int(tin.group(1)) if tin else None), (int(tout.group(1)) if tout else None)


def _row(f: Finished) -> tuple[Any, ...]:
    tokens_in, tokens_out = usage_of(f.tail) if f.tail else (None, None)
    return (f.at, f.model, f.asked, f.key, f.endpoint, f.status, int(f.stream),
            None if f.ttft is None else round(f.ttft, 6), round(f.duration, 6),
            tokens_in, tokens_out)


class ActivityLog:
    """The proxy's activity sink and the store `GET /api/v1/activity` reads.

    `record` is for the event loop; `query`, `flush` and `close` block and belong in a worker
    thread (`asyncio.to_thread`). `cap` may be changed at any time (a config reload).
    """

    def __init__(self, path: Path, cap: int = DEFAULT_ROWS, *, flush_every: float = 0.25,
                 pending_max: int = _PENDING_MAX) -> None:
        self.path = path
        self.cap = cap
        self.flush_every = flush_every
        self.pending_max = pending_max
        self.dropped = 0  # requests not recorded because the writer fell behind
        self.written = 0
        self._pending: collections.deque[Finished] = collections.deque()
        self._wake = threading.Event()
        self._flushed: list[threading.Event] = []
        self._lock = threading.Lock()  # guards _flushed and _totals
        self._totals: dict[str, list[int]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:  # not a database (a torn or foreign file)
            aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
            log.error("the activity log %s cannot be read (%s); moved to %s, starting anew",
                      path, exc, aside)
            path.replace(aside)
            self._create()

    def _create(self) -> None:
        db = self._connect()
        try:
            db.executescript(_SCHEMA)
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    # --- the event loop's side ---------------------------------------------------------

    def request_done(self, finished: Finished) -> None:
        """One request ended. O(1), no I/O, no lock: the writer thread does the rest."""
        pending = self._pending
        if len(pending) >= self.pending_max:
            self.dropped += 1
            return
        pending.append(finished)
        if len(pending) == _BATCH:
            self._wake.set()

    def totals(self) -> dict[str, dict[str, int]]:
        """Per key name ("" without auth): requests, tokens in and out, since gpud started."""
        with self._lock:
            return {k: {"requests": v[0], "tokens_in": v[1], "tokens_out": v[2]}
                    for k, v in self._totals.items()}

    # --- the writer thread -------------------------------------------------------------

    def start(self) -> Callable[[], None]:
        """Start the writer thread; returns `close`, the stop to run at shutdown."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpud-activity",
                                            daemon=True)
            self._thread.start()
        return self.close

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending and stop the writer."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every request recorded before this call is written (or at timeout)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return
        done = threading.Event()
        with self._lock:
            self._flushed.append(done)
        self._wake.set()
        done.wait(timeout)

    def _run(self) -> None:
        db = self._connect()
        try:
            while True:
                self._wake.wait(self.flush_every)
                self._wake.clear()
                with self._lock:
                    waiting, self._flushed = self._flushed, []
                try:
                    self._write(db)
                except sqlite3.Error:
                    log.exception("writing the activity log %s failed", self.path)
                for ev in waiting:
                    ev.set()
                if self._stop:
                    return
        finally:
            db.close()

    def _take(self) -> list[Finished]:
        pending, out = self._pending, []
        while pending:
            out.append(pending.popleft())
        return out

    def _write(self, db: sqlite3.Connection) -> None:
        batch = self._take()
        if not batch:
            return
        rows = []
        with db:
            for i in range(0, len(batch), _CHUNK):
                chunk = [_row(f) for f in batch[i:i + _CHUNK]]
                db.executemany(
                    "INSERT INTO activity (at, model, asked, key, endpoint, status, stream, "
                    "ttft, duration, tokens_in, tokens_out) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    chunk)
                rows += chunk
                time.sleep(0)  # let the event loop have the GIL between chunks
            # ids only ever grow and only the oldest go, so the newest `cap` rows are the
            # ones above max(id) - cap.
            db.execute("DELETE FROM activity WHERE id <= (SELECT max(id) FROM activity) - ?",
                       (max(1, int(self.cap)),))
        self.written += len(rows)
        self._count(rows)

    def _count(self, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            for r in rows:
                t = self._totals.setdefault(r[3] or "", [0, 0, 0])
                t[0] += 1
                t[1] += r[9] or 0
                t[2] += r[10] or 0

    # --- reads (a worker thread) -------------------------------------------------------

    def query(self, *, model: str | None = None, key: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` rows (newest first), optionally of one model and/or key.

        Flushes first, so a request answered before the call is in the answer."""
        self.flush()
        where, args = [], []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if key is not None:
            where.append("key = ?")
            args.append(key)
        sql = f"SELECT {', '.join(COLUMNS)} FROM activity"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(str(max(0, min(limit, MAX_LIMIT))))
        db = self._connect()
        try:
            cur = db.execute(sql, args)
            return [_as_json(r) for r in cur.fetchall()]
        finally:
            db.close()

    def count(self) -> int:
        self.flush()
        db = self._connect()
        try:
            return int(db.execute("SELECT count(*) FROM activity").fetchone()[0])
        finally:
            db.close()


def _as_json(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(COLUMNS, row, strict=True))
    out["stream"] = bool(out["stream"])
    return out
