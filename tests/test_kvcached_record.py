"""kvcached's limit record: gpud writes the limit, kvcached reads it and reports use."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import uuid
from pathlib import Path

import pytest

from gpud.kvpool import kvcached


def engine_side_read(path: Path) -> tuple[int, int, int]:
    """Read the record the way kvcached's RwLockedShm does: open r+b, flock LOCK_SH, mmap."""
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        with mmap.mmap(f.fileno(), 24, access=mmap.ACCESS_READ) as m:
            return struct.unpack("=qqq", m[:24])


def engine_side_report(path: Path, used: int, prealloc: int) -> None:
    """kvcached's MemInfoTracker.update_memory_usage: LOCK_EX, write used and prealloc."""
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with mmap.mmap(f.fileno(), 24, access=mmap.ACCESS_WRITE) as m:
            limit = struct.unpack_from("=q", m, 0)[0]
            m[:24] = struct.pack("=qqq", limit, used, prealloc)


def test_limit_written_is_what_kvcached_reads_and_its_usage_comes_back(tmp_path: Path) -> None:
    path = kvcached.write_limit("chat", 8 << 30, shm_dir=tmp_path)
    assert path == tmp_path / "gpud_chat" and path.stat().st_size == 24
    assert engine_side_read(path) == (8 << 30, 0, 0)

    engine_side_report(path, used=3 << 30, prealloc=64 << 20)
    assert kvcached.read_usage("chat", shm_dir=tmp_path) == kvcached.KvcachedUsage(
        limit=8 << 30, used=3 << 30, prealloc=64 << 20
    )
    # Lowering the limit keeps what the engine reported.
    kvcached.write_limit("chat", 4 << 30, shm_dir=tmp_path)
    assert engine_side_read(path) == (4 << 30, 3 << 30, 64 << 20)


def test_names_are_spelled_as_kvcached_sanitizes_them() -> None:
    assert kvcached.ipc_name("qwen3.8b/instruct") == "gpud_qwen3-8b-instruct"
    assert len(kvcached.ipc_name("m" * 100)) == 64
    assert kvcached.engine_env("chat") == {
        "ENABLE_KVCACHED": "true",
        "KVCACHED_IPC_NAME": "gpud_chat",
    }


def test_no_record_reads_as_none_and_a_wrong_size_is_an_error(tmp_path: Path) -> None:
    assert kvcached.read_usage("absent", shm_dir=tmp_path) is None
    (tmp_path / "gpud_odd").write_bytes(b"\0" * 16)
    with pytest.raises(kvcached.KvcachedRecordError, match="has 16 bytes, expected 24"):
        kvcached.read_usage("odd", shm_dir=tmp_path)


def test_the_writer_waits_for_the_engines_lock(tmp_path: Path) -> None:
    path = kvcached.write_limit("chat", 1 << 30, shm_dir=tmp_path)
    started, done = threading.Event(), threading.Event()

    def write() -> None:
        started.set()
        kvcached.write_limit("chat", 2 << 30, shm_dir=tmp_path)
        done.set()

    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the engine is in the middle of an update
        t = threading.Thread(target=write)
        t.start()
        started.wait()
        assert not done.wait(0.2), "gpud wrote the limit while kvcached held the lock"
        fcntl.flock(f, fcntl.LOCK_UN)
    t.join(5)
    assert done.is_set() and engine_side_read(path)[0] == 2 << 30


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")
def test_the_real_record_lives_in_dev_shm() -> None:
    model = f"test-{uuid.uuid4().hex[:8]}"
    try:
        path = kvcached.write_limit(model, 123)
        assert path == Path("/dev/shm") / f"gpud_{model}"
        usage = kvcached.read_usage(model)
        assert usage is not None and usage.limit == 123
    finally:
        assert kvcached.remove_record(model)
