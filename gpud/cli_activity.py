"""`gpud activity`: the proxy's recent requests, read from the daemon's activity log.

A tail, oldest first, like `gpud events`; `--json` prints the API's answer as it is (newest
first). Reads `GET /api/v1/activity` (admins only: loopback or the admin token).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from datetime import datetime
from typing import Any

from gpud.cli import _api
from gpud.cli_fmt import table

HEADER = ("TIME", "MODEL", "KEY", "ENDPOINT", "STATUS", "TTFT", "DURATION", "TOKENS")


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}s"


def row_cells(r: dict[str, Any]) -> list[str]:
    """One request for people: the model with the alias asked, tokens in→out."""
    model = r["model"] or "–"
    if r.get("asked"):
        model += f" ({r['asked']})"
    tokens = "–"
    if r.get("tokens_in") is not None or r.get("tokens_out") is not None:
        tokens = f"{r.get('tokens_in') or 0}→{r.get('tokens_out') or 0}"
    endpoint = r["endpoint"] + (" stream" if r.get("stream") else "")
    at = datetime.fromtimestamp(float(r["at"])).strftime("%m-%d %H:%M:%S")
    return [at, model, r.get("key") or "–", endpoint, str(r["status"]), _seconds(r.get("ttft")),
            _seconds(r.get("duration")), tokens]


def cmd_activity(args: argparse.Namespace) -> int:
    if not 0 < args.limit <= 10_000:
        print("gpud: --limit must be between 1 and 10000", file=sys.stderr)
        return 2
    query = {"limit": str(args.limit)}
    if args.model:
        query["model"] = args.model
    if args.key:
        query["key"] = args.key
    data = _api("GET", "/api/v1/activity?" + urllib.parse.urlencode(query), args)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = list(reversed(data.get("rows", [])))
    if not rows:
        print("No requests recorded yet" + (f" for {args.model}" if args.model else "") + ".")
        return 0
    for line in table([list(HEADER)] + [row_cells(r) for r in rows]):
        print(line)
    if data.get("dropped"):
        print(f"({data['dropped']} requests were not recorded: the log's writer fell behind)")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("activity", help="recent requests through the proxy (the activity log)")
    s.add_argument("--model", help="only this model's requests (its own name)")
    s.add_argument("--key", help="only this API key's requests (the key's name)")
    s.add_argument("-n", "--limit", type=int, default=50, help="requests to show (default 50)")
    s.add_argument("--json", action="store_true",
                   help="the API's JSON: {rows (newest first), cap, dropped}")
    s.set_defaults(func=cmd_activity)
