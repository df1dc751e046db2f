"""Adoption records: what a gpud writes about each engine it runs, so the next gpud (after a
crash, `kill -9` or an upgrade) can take the engine over instead of reloading the model.

One JSON file per model in the runtime dir (`MODEL.json`), written atomically. The same
record also travels in the engine's own environment (`GPUD_ENGINE_RECORD`, with the state
dir of the gpud that started it), so engines are found in /proc when the runtime dir is gone
(`rm -rf`, a tmpfs remounted). A record is only a claim: `adopt` believes it when the pid is
alive with the same start time (pids are reused; pid + start time are not), and removes it
otherwise. Whether the adopted engine still matches the desired spec is the caller's
decision (`record.spec_hash`).
It never signals a process itself: `process.py` does (`stop_duplicate` asks it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpud.engines.process import EngineProcess, proc_group_and_start

log = logging.getLogger("gpud.engine")

RECORD_VERSION = 1
ENV_RECORD = "GPUD_ENGINE_RECORD"


@dataclass(frozen=True)
class EngineRecord:
    model: str
    pid: int
    pgid: int
    start_time: int
    """/proc/PID/stat field 22: clock ticks after boot."""
    port: int
    spec_hash: str
    log_path: str
    started_at: float
    """Wall-clock seconds (time.time()) when the engine was started."""

    @classmethod
    def of(cls, proc: EngineProcess, port: int, spec_hash: str) -> EngineRecord:
        return cls(
            model=proc.model,
            pid=proc.pid,
            pgid=proc.pgid,
            start_time=proc.start_time,
            port=port,
            spec_hash=spec_hash,
            log_path=str(proc.log_path),
            started_at=proc.started_at,
        )

    def to_json(self) -> str:
        return json.dumps({"version": RECORD_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise ValueError(f"not a version-{RECORD_VERSION} engine record")
        try:
            return cls(
                model=str(data["model"]),
                pid=int(data["pid"]),
                pgid=int(data["pgid"]),
                start_time=int(data["start_time"]),
                port=int(data["port"]),
                spec_hash=str(data["spec_hash"]),
                log_path=str(data["log_path"]),
                started_at=float(data["started_at"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad engine record: {e}") from e


def tag_env(env: dict[str, str], state_dir: Path, model: str, port: int, spec_hash: str,
            log_path: Path) -> dict[str, str]:
    """`env` plus the tag that lets a later gpud find this engine in /proc."""
    tag = {"state_dir": str(state_dir.resolve()), "model": model, "port": port,
           "spec_hash": spec_hash, "log_path": str(log_path), "started_at": time.time()}
    return {**env, ENV_RECORD: json.dumps(tag, separators=(",", ":"))}


def _environ_tag(pid: int) -> dict[str, Any] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:  # gone, or someone else's
        return None
    prefix = ENV_RECORD.encode() + b"="
    for var in raw.split(b"\0"):
        if var.startswith(prefix):
            with contextlib.suppress(ValueError):
                tag = json.loads(var[len(prefix):])
                return tag if isinstance(tag, dict) else None
    return None


def tagged_records(state_dir: Path) -> list[EngineRecord]:
    """Records of the engines in /proc that a gpud on `state_dir` started: leaders of their
    own process group (the engine's children inherit the tag), newest first."""
    ours = str(state_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        ids = proc_group_and_start(pid)
        if ids is None or ids[0] != pid:
            continue
        tag = _environ_tag(pid)
        if tag is None or tag.get("state_dir") != ours:
            continue
        try:
            found.append(EngineRecord(
                model=str(tag["model"]), pid=pid, pgid=pid, start_time=ids[1],
                port=int(tag["port"]), spec_hash=str(tag["spec_hash"]),
                log_path=str(tag["log_path"]), started_at=float(tag["started_at"]),
            ))
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring engine pid %d: unreadable %s", pid, ENV_RECORD)
    return sorted(found, key=lambda r: r.start_time, reverse=True)


def find_records(runtime_dir: Path, state_dir: Path) -> tuple[list[EngineRecord],
                                                               list[EngineRecord]]:
    """(one record per model, engines found twice for a model): the runtime dir's records,
    then tagged engines in /proc for the models it has no record of (the newest wins)."""
    chosen = {}
    for rec in read_records(runtime_dir):
        if proc_group_and_start(rec.pid) == (rec.pgid, rec.start_time):
            chosen[rec.model] = rec
        else:
            log.info("model %r: engine pid %d from the last run is gone; removing its record",
                     rec.model, rec.pid)
            remove_record(runtime_dir, rec.model)
    pids = {r.pid for r in chosen.values()}
    extra = []
    for rec in tagged_records(state_dir):
        if rec.pid in pids:
            continue
        if rec.model in chosen:
            extra.append(rec)
        else:
            log.info("model %r: found engine pid %d in /proc (no record in %s)", rec.model,
                     rec.pid, runtime_dir)
            chosen[rec.model] = rec
            pids.add(rec.pid)
    return [chosen[m] for m in sorted(chosen)], extra


def record_path(runtime_dir: Path, model: str) -> Path:
    return runtime_dir / f"{model}.json"


def write_record(runtime_dir: Path, record: EngineRecord) -> Path:
    """Write (or replace) the model's record; never leaves a half-written file."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(runtime_dir, record.model)
    fd, tmp = tempfile.mkstemp(prefix=f".{record.model}.", suffix=".tmp", dir=runtime_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_record(runtime_dir: Path, model: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(runtime_dir, model).unlink()


def read_record(runtime_dir: Path, model: str) -> EngineRecord | None:
    """The model's record, or None when there is none or it cannot be read (logged)."""
    path = record_path(runtime_dir, model)
    try:
        return EngineRecord.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable engine record %s: %s", path, e)
        return None


def read_records(runtime_dir: Path) -> list[EngineRecord]:
    """All readable records, sorted by model name."""
    if not runtime_dir.is_dir():
        return []
    records = []
    for path in sorted(runtime_dir.glob("*.json")):
        rec = read_record(runtime_dir, path.stem)
        if rec is not None and rec.model == path.stem:
            records.append(rec)
    return records


def adopt(
    record: EngineRecord, runtime_dir: Path, *, crash_grace: float = 2.0
) -> EngineProcess | None:
    """Watch the engine the record names, if it is still that engine; otherwise remove
    the stale record and return None. Needs a running event loop."""
    proc = EngineProcess.adopt(
        record.model,
        record.pid,
        record.pgid,
        record.start_time,
        Path(record.log_path),
        crash_grace=crash_grace,
    )
    if proc is None:
        log.info(
            "model %r: engine pid %d from the last run is gone; removing its record",
            record.model,
            record.pid,
        )
        remove_record(runtime_dir, record.model)
    else:
        proc.started_at = record.started_at
    return proc


async def stop_duplicate(record: EngineRecord, grace: float = 30.0) -> None:
    """Stop a second engine of a model that already has one (left by a gpud killed while it
    moved the model, or a runtime dir lost in between): it holds memory and a port, and no
    gpud would ever route to it. Only a tagged engine of our state dir gets here."""
    proc = EngineProcess.adopt(record.model, record.pid, record.pgid, record.start_time,
                               Path(record.log_path), log_to_logger=False)
    if proc is not None:
        log.warning("model %r: stopping engine pid %d, a second engine of this model left "
                    "by an earlier gpud", record.model, record.pid)
        await proc.stop(grace)
