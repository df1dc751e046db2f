"""Adoption records: what a gpud writes about each engine it runs, so the next gpud (after a
crash, `kill -9` or an upgrade) can take the engine over instead of reloading the model.

One JSON file per model in the runtime dir (`MODEL.json`), written atomically. A record is
only a claim: `adopt` believes it when the pid is alive with the same start time (pids are
reused; pid + start time are not), and removes it otherwise. Whether the adopted engine
still matches the desired spec is the caller's decision (`record.spec_hash`).
This module must never signal or kill a process: that is `process.py`'s job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gpud.engines.process import EngineProcess

log = logging.getLogger("gpud.engine")

RECORD_VERSION = 1


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
