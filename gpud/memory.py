"""Memory per GPU (NVML) and per engine (host RSS), for the status page, the API and /metrics.

Reads only: NVML and /proc. It never calls an engine (a scrape must not wake a model) and
never invents numbers: without NVML the answer says "no GPU" and shows host memory instead.
A process is attributed to a model through its engine's process group (vLLM's EngineCore and
workers share the API server's group), so the whole engine is counted, not just the leader.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from gpud.engines.process import proc_group_and_start

log = logging.getLogger("gpud.memory")

# After NVML failed to start, try again this much later rather than on every scrape.
NVML_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class Engine:
    """What memory accounting needs to know about one engine instance."""

    key: str  # the instance key ("chat", "chat#1")
    model: str
    pgid: int
    gpu: int | None


class _Nvml:
    """A lazily started NVML session; pynvml is imported on first use only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mod: Any = None
        self._failed_at: float | None = None
        self.error: str | None = None

    def module(self) -> Any:
        with self._lock:
            if self._mod is not None:
                return self._mod
            failed_at = self._failed_at
            if failed_at is not None and time.monotonic() - failed_at < NVML_RETRY_SECONDS:
                return None
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # no library, no driver, no device: all "no GPU"
                self._failed_at = time.monotonic()
                self.error = f"{type(exc).__name__}: {exc}"
                return None
            self._mod = pynvml
            self.error = None
            return pynvml


_NVML = _Nvml()


def _process_groups() -> dict[int, int]:
    """pid -> process group of every live process (one pass over /proc)."""
    groups: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return groups
    for entry in entries:
        if not entry.isdigit():
            continue
        live = proc_group_and_start(int(entry))
        if live is not None:
            groups[int(entry)] = live[0]
    return groups


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def host_memory() -> dict[str, int]:
    """MemTotal and MemAvailable of the host, in bytes."""
    out = {"total": 0, "available": 0}
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    out["total"] = int(line.split()[1]) * 1024
                elif line.startswith(b"MemAvailable:"):
                    out["available"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _nvml_gpus(nvml: Any, pid_model: dict[int, str]) -> list[dict[str, Any]]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        procs: list[Any] = []
        for getter in ("nvmlDeviceGetComputeRunningProcesses",
                       "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs.extend(getattr(nvml, getter)(handle))
            except Exception:  # not supported on this device/driver
                continue
        models: dict[str, int] = {}
        seen: set[int] = set()
        other = 0
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            used = p.usedGpuMemory
            if not isinstance(used, int) or used < 0:  # NVML_VALUE_NOT_AVAILABLE in containers
                continue
            model = pid_model.get(p.pid)
            if model is None:
                other += used
            else:
                models[model] = models.get(model, 0) + used
        attributed = sum(models.values()) + other
        # Memory no listed process accounts for (the driver, processes of other namespaces).
        other += max(0, int(info.used) - attributed)
        gpus.append({
            "index": index,
            "name": str(name),
            "total": int(info.total),
            "used": int(info.used),
            "free": int(info.free),
            "models": models,
            "other": other,
        })
    return gpus


def measure(engines: list[Engine]) -> dict[str, Any]:
    """Memory per GPU and per engine; safe to run in a worker thread (no daemon state).

    ``gpus``: one entry per GPU with total/used/free, ``models`` (bytes by instance key)
    and ``other`` (everything else, the driver's reserve included); empty with ``note``
    "no GPU" when NVML is unavailable. ``host``: MemTotal/MemAvailable and each engine's
    resident memory (the sum of VmRSS over its process group).
    """
    groups = _process_groups() if engines else {}
    by_pgid = {e.pgid: e for e in engines}
    pid_model: dict[int, str] = {}
    rss: dict[str, dict[str, Any]] = {
        e.key: {"model": e.model, "rss": 0, "processes": 0, "pgid": e.pgid} for e in engines
    }
    for pid, pgid in groups.items():
        engine = by_pgid.get(pgid)
        if engine is None:
            continue
        pid_model[pid] = engine.key
        rss[engine.key]["rss"] += _rss_bytes(pid)
        rss[engine.key]["processes"] += 1
    out: dict[str, Any] = {"gpus": [], "note": None,
                           "host": {**host_memory(), "engines": rss}}
    nvml = _NVML.module()
    if nvml is None:
        out["note"] = "no GPU"
        return out
    try:
        out["gpus"] = _nvml_gpus(nvml, pid_model)
    except Exception as exc:  # a driver hiccup must not break the status page
        log.warning("NVML query failed: %s", exc)
        out["note"] = f"NVML query failed: {exc}"
        return out
    if not out["gpus"]:
        out["note"] = "no GPU"
    return out


def model_bytes(memory: dict[str, Any]) -> dict[str, int]:
    """Memory per instance key: GPU bytes where a GPU holds it, else host RSS."""
    out: dict[str, int] = {}
    for gpu in memory.get("gpus", []):
        for key, used in gpu.get("models", {}).items():
            out[key] = out.get(key, 0) + int(used)
    if not memory.get("gpus"):
        for key, e in memory.get("host", {}).get("engines", {}).items():
            out[key] = int(e.get("rss", 0))
    return out
