"""One gpud per state and runtime dir: an exclusive flock on a lock file in each.

Two daemons on the same dirs would adopt each other's engines and stop them on exit, so the
second one refuses to start and names the holder's pid. The lock is the kernel's: a gpud that
dies (kill -9, OOM) drops it at once, with no stale file to clean; the engines never hold it
(gpud's fds are close-on-exec). This module must never remove or signal anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "gpud.lock"


class DirLocked(Exception):
    """Another process holds the lock on one of the dirs."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        who = f"another gpud (pid {pid})" if pid else "another gpud"
        super().__init__(
            f"{who} is already running on {directory} (lock {directory / LOCK_NAME}); stop it "
            "first, or give this one its own daemon.state_dir and daemon.runtime_dir")
        self.directory = directory
        self.pid = pid


def holder(directory: Path) -> int | None:
    """The pid written by the lock's holder, if it can be read."""
    try:
        text = (directory / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DirLocked(directory, holder(directory)) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def hold(*dirs: Path) -> Iterator[None]:
    """Lock every dir (one lock where two are the same) for the block; DirLocked if taken."""
    fds: list[int] = []
    seen: set[Path] = set()
    try:
        for d in dirs:
            real = d.resolve()
            if real not in seen:
                seen.add(real)
                fds.append(_lock(real))
        yield
    finally:
        for fd in fds:
            os.close(fd)
