"""KV limits for engines that run the kvcached library, from the pool's budgets.

kvcached (github.com/ovg-project/kvcached) gives an engine elastic KV memory
and reads its limit from a 24-byte record in /dev/shm named by
``KVCACHED_IPC_NAME``. gpud starts such engines with
``ENABLE_KVCACHED=true KVCACHED_IPC_NAME=gpud_<model>``, writes the limit the
ledger allows, and reads back how much the engine uses.

The record, as kvcached reads and writes it (checked against its source at
commit 3fbf04864d2a70ca31bb85c4cc7f1f35fa1db93e):
- kvcached/cli/utils.py, ``MemInfoStruct``: three numpy int64 in native byte
  order, ``[total_size (the limit), used_size, prealloc_size]``, in bytes,
  ``SHM_SIZE = 8 * 3``; ``RwLockedShm``: the file ``/dev/shm/<name>`` is
  opened "r+b", guarded with ``fcntl.flock`` (LOCK_SH to read, LOCK_EX to
  write) on the whole file, and mmapped.
- kvcached/utils.py, ``_obtain_default_ipc_name`` / ``_sanitize_segment``:
  the name is ``KVCACHED_IPC_NAME`` with every character other than
  letters, digits, "_" and "-" replaced by "-", cut to 64 characters.
- kvcached/mem_info_tracker.py, ``MemInfoTracker.__init__``: the engine
  writes ``[its own total, 0, 0]`` when it starts, so gpud writes its limit
  again after the engine is up (the reconcile loop re-applies it anyway);
  the engine then only updates ``used`` and ``prealloc``.

This module must never import asyncio or CUDA; it touches only these files.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# Native byte order, as numpy's int64 in kvcached.
_RECORD = struct.Struct("=qqq")
RECORD_SIZE = _RECORD.size  # 24


class KvcachedRecordError(OSError):
    """The limit record could not be read or written."""


@dataclass(frozen=True)
class KvcachedUsage:
    """One reading of an engine's kvcached record, in bytes."""

    limit: int
    used: int
    prealloc: int


def ipc_name(model: str) -> str:
    """The KVCACHED_IPC_NAME gpud gives a model's engine, as kvcached will spell it."""
    raw = f"gpud_{model}"
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in raw)[:64]


def record_path(model: str, shm_dir: Path = SHM_DIR) -> Path:
    return shm_dir / ipc_name(model)


def engine_env(model: str) -> dict[str, str]:
    """Environment for an engine that runs kvcached under gpud's limits."""
    return {"ENABLE_KVCACHED": "true", "KVCACHED_IPC_NAME": ipc_name(model)}


def write_limit(model: str, limit_bytes: int, shm_dir: Path = SHM_DIR, mode: int = 0o600) -> Path:
    """Set a model's KV limit; keeps ``used`` and ``prealloc`` as the engine wrote them."""
    if limit_bytes < 0:
        raise ValueError(f"model {model!r}: a KV limit of {limit_bytes} bytes is negative")
    path = record_path(model, shm_dir)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    except OSError as e:
        raise KvcachedRecordError(
            e.errno, f"model {model!r}: cannot open kvcached's limit record {path}: {e.strerror}"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = os.pread(fd, RECORD_SIZE, 0)
        _limit, used, prealloc = _RECORD.unpack(data) if len(data) == RECORD_SIZE else (0, 0, 0)
        os.pwrite(fd, _RECORD.pack(limit_bytes, used, prealloc), 0)
        if os.fstat(fd).st_size != RECORD_SIZE:
            os.ftruncate(fd, RECORD_SIZE)
    finally:
        os.close(fd)  # also drops the flock
    return path


def read_usage(model: str, shm_dir: Path = SHM_DIR) -> KvcachedUsage | None:
    """What the engine reports; None when it has no record (not started, or not kvcached)."""
    path = record_path(model, shm_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KvcachedRecordError(
            e.errno, f"model {model!r}: cannot read kvcached's limit record {path}: {e.strerror}"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = os.pread(fd, RECORD_SIZE, 0)
    finally:
        os.close(fd)
    if len(data) != RECORD_SIZE:
        raise KvcachedRecordError(
            f"model {model!r}: kvcached's record {path} has {len(data)} bytes, "
            f"expected {RECORD_SIZE}; is another program using that name?"
        )
    return KvcachedUsage(*_RECORD.unpack(data))


def remove_record(model: str, shm_dir: Path = SHM_DIR) -> bool:
    """Delete a model's record once its engine is gone. Returns whether there was one."""
    try:
        record_path(model, shm_dir).unlink()
    except FileNotFoundError:
        return False
    return True
