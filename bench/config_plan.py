"""Load + validate + plan for a 50-model, 10-profile file; the median against a baseline.

The baseline is tomllib parsing the same file alone (measured in the same run), so the ratio
shows what gpud's validation and planning add to reading TOML. Goal: median under 20 ms.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpud.config import load_config, zone_of  # noqa: E402
from gpud.desired import Layers, effective  # noqa: E402
from gpud.plan import ObservedModel, plan  # noqa: E402
from gpud.schedule import Schedule, ScheduleEntry  # noqa: E402

RUNS = 50


def make_file(models: int = 50, profiles: int = 10) -> str:
    lines = ['[daemon]\nlisten = "127.0.0.1:8080"\ntimezone = "Europe/Paris"\n']
    for i in range(models):
        state = ("awake", "asleep", "unloaded")[i % 3]
        lines.append(
            f'[models.m{i:02d}]\nsource = "models/m{i:02d}"\ngpu = {i % 4}\nstate = "{state}"\n'
            f'max_model_len = 8192\nkv_cache = "2GiB"\npriority = {i}\n'
            f'idle_sleep_after = "15m"\nargs = ["--enable-prefix-caching"]\n')
    for p in range(profiles):
        entries = ", ".join(f'm{i:02d} = "{("awake", "asleep")[(i + p) % 2]}"'
                            for i in range(0, models, 2))
        lines.append(f"[profiles.p{p}]\n" + entries.replace(", ", "\n") + "\n")
    for p in range(profiles - 1):
        window = f"mon-sun {p*2:02d}:00-{p*2+2:02d}:00"
        lines.append(f'[[schedule]]\nprofile = "p{p}"\nwhen = "{window}"\nprewake = "60s"\n')
    lines.append('[[schedule]]\nprofile = "p9"\nwhen = "otherwise"\n')
    return "\n".join(lines)


def main() -> None:
    text = make_file()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gpud.toml"
        path.write_text(text)
        loaded = load_config(path)
        observed = {k: ObservedModel("awake", "x", 0) for k in list(loaded.config.models)[:20]}
        base_times, times = [], []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            tomllib.loads(path.read_text())
            base_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cfg = load_config(path).config
            sched = Schedule([ScheduleEntry(e.profile, e.when, e.prewake, e.priority)
                              for e in cfg.schedule], zone_of(cfg))
            now = datetime.now(UTC).astimezone(zone_of(cfg))
            desired = effective(cfg, Layers(profile=sched.active_profile(now)), now)
            result = plan(desired, observed)
            times.append(time.perf_counter() - t0)
    med, base = statistics.median(times), statistics.median(base_times)
    p90 = sorted(times)[int(0.9 * len(times))]
    rows = [
        ("file", f"{len(text)/1024:.0f} KiB, 50 models, 10 profiles, 10 windows"),
        ("tomllib.loads alone (baseline), median", f"{base*1000:.2f} ms"),
        ("load + validate + schedule + plan, median", f"{med*1000:.2f} ms"),
        ("load + validate + schedule + plan, p90", f"{p90*1000:.2f} ms"),
        ("ratio to the baseline", f"{med/base:.1f}x"),
        ("actions planned", str(len(result.actions))),
        ("goal: median under 20 ms", "met" if med < 0.020 else "NOT met"),
    ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    out = ROOT / "bench/results/config_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "runs": RUNS, "median_ms": med * 1000, "p90_ms": p90 * 1000,
        "baseline_tomllib_median_ms": base * 1000, "ratio": med / base,
        "goal_ms": 20, "met": med < 0.020,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
