"""The activity log's store on a real SQLite file with its real writer thread: rows as the
proxy hands them over, the row cap, token counts from the answer's tail, reads that see every
request answered before them, and a broken file moved aside rather than lost."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from gpud.activity import ActivityLog, usage_of
from gpud.proxy.api import RequestFinished

CHAT_BODY = json.dumps({"id": "cmpl-1", "choices": [{"text": "x"}], "model": "chat",
                        "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                  "total_tokens": 10}}).encode()
SSE_TAIL = (b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":16,'
            b'"total_tokens":21}}\n\ndata: [DONE]\n\n')


def done(i: int, *, model: str = "chat", key: str | None = "alice", tail: bytes = b"",
         stream: bool = False) -> RequestFinished:
    return RequestFinished(at=time.time(), endpoint="/v1/completions", model=model,
                           asked="gpt-4o-mini" if i % 2 else None, key=key, status=200,
                           stream=stream, duration=0.01 * i, ttft=0.005 if stream else None,
                           tail=tail)


def test_rows_carry_what_the_proxy_saw_newest_first(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "activity.sqlite3")
    log.start()
    try:
        for i in range(10):
            log.request_done(done(i, key="alice" if i < 6 else "bob", tail=CHAT_BODY))
        log.request_done(done(10, model="batch", key=None, tail=SSE_TAIL, stream=True))
        rows = log.query(limit=100)
    finally:
        log.close()
    assert [r["id"] for r in rows] == list(range(11, 0, -1))
    last = rows[0]
    assert last["model"] == "batch" and last["key"] is None and last["stream"] is True
    assert (last["tokens_in"], last["tokens_out"]) == (5, 16)
    assert last["ttft"] == 0.005
    first = rows[-1]
    assert first["asked"] is None and rows[-2]["asked"] == "gpt-4o-mini"
    assert (first["tokens_in"], first["tokens_out"]) == (7, 3)
    assert set(first) == {"id", "at", "model", "asked", "key", "endpoint", "status", "stream",
                          "ttft", "duration", "tokens_in", "tokens_out"}


def test_filters_by_model_and_key_and_limit(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "a.sqlite3")
    log.start()
    try:
        for i in range(30):
            log.request_done(done(i, model="chat" if i % 3 else "embed",
                                  key="alice" if i % 2 else "bob"))
        chat = log.query(model="chat", limit=1000)
        alice_chat = log.query(model="chat", key="alice", limit=1000)
        three = log.query(limit=3)
        totals = log.totals()
    finally:
        log.close()
    assert len(chat) == 20 and {r["model"] for r in chat} == {"chat"}
    assert {(r["model"], r["key"]) for r in alice_chat} == {("chat", "alice")}
    assert len(alice_chat) == 10
    assert [r["id"] for r in three] == [30, 29, 28]
    assert totals["alice"]["requests"] == 15 and totals["bob"]["requests"] == 15


def test_the_cap_holds_and_the_oldest_go(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    log = ActivityLog(path, cap=50)
    log.start()
    try:
        for i in range(120):
            log.request_done(done(i))
            if i % 40 == 39:
                log.flush()  # several batches, so the cap is applied more than once
        assert log.count() == 50
        ids = [r["id"] for r in log.query(limit=1000)]
        assert ids == list(range(120, 70, -1))
        log.cap = 20  # a reload lowered it: the next batch trims to it
        log.request_done(done(120))
        assert log.count() == 20
    finally:
        log.close()
    # and on disk, as another reader sees it
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*), min(id), max(id) FROM activity").fetchone() == (
            20, 102, 121)


def test_recording_never_waits_for_the_disk(tmp_path: Path) -> None:
    """Without a writer (a stalled disk, say) requests pile up to a bound and then are
    counted as dropped; request_done itself never blocks."""
    log = ActivityLog(tmp_path / "a.sqlite3", pending_max=100)
    for i in range(150):
        log.request_done(done(i))
    assert log.dropped == 50
    log.start()
    try:
        assert log.count() == 100
    finally:
        log.close()


def test_rows_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    log = ActivityLog(path)
    log.start()
    log.request_done(done(1))
    log.close()  # writes what is pending
    again = ActivityLog(path)
    again.start()
    try:
        again.request_done(done(2))
        assert [r["id"] for r in again.query(limit=10)] == [2, 1]
    finally:
        again.close()


def test_a_broken_file_is_moved_aside_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "activity.sqlite3"
    path.write_bytes(b"this is not a database, but someone's bytes" * 100)
    log = ActivityLog(path)
    log.start()
    try:
        log.request_done(done(1))
        assert log.count() == 1
    finally:
        log.close()
    aside = list(tmp_path.glob("activity.sqlite3.broken-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")


def test_usage_from_answers_tails() -> None:
    assert usage_of(CHAT_BODY) == (7, 3)
    assert usage_of(SSE_TAIL) == (5, 16)
    assert usage_of(b'{"usage":{"input_tokens":4,"output_tokens":9}}') == (4, 9)  # Anthropic
    assert usage_of(b'{"usage": null}') == (None, None)
    assert usage_of(b'..."usage":{"prompt_tok') == (None, None)  # cut off
    assert usage_of(b'{"data":[1,2]}') == (None, None)
    assert usage_of(b'{"usage":{"prompt_tokens":true}}') == (None, None)
    assert usage_of(b'"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4},'
                    b'"completion_tokens":2}}') == (9, 2)
    assert usage_of(b'"usage":{"cache_read_input_tokens":8,"output_tokens":3}') == (None, 3)
