"""Engine process supervision: spawn, follow, detect exit, stop, and explain a crash.

An engine must outlive gpud (a daemon restart must not cost minutes of model loading), so
each engine runs in its own session and process group, writes stdout/stderr into a pipe
read by its own log writer (`logwriter.py`: a small process of its own that caps, rotates
and outlives gpud; a pipe to gpud would break, and can kill the engine, the moment gpud
dies) into a log file that gpud follows, and is watched through a pidfd, which works the
same for a child gpud spawned and for an engine it adopted after a restart. vLLM's
EngineCore and workers live in the engine's process group, so stopping or losing the leader
takes the whole group.
This module must never run a shell string, never signal a process group it cannot tie to
an engine (pgid <= 1, gpud's own group), and never reap children it did not spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

log = logging.getLogger("gpud.engine")
# uvicorn's access line for gpud's own polls of an engine, answered 200
_OWN_POLL = re.compile(r'127\.0\.0\.1:\d+ - "GET /(is_sleeping|health) HTTP/1\.1" 200')

LOG_RING_LINES = 2000
# The defaults of [daemon] engine_log_size and engine_log_files: 256 MiB per engine at most.
LOG_FILE_BYTES = 64 * 1024 * 1024
LOG_FILES = 4
# After the leader exits, its last words may still be in the log writer's pipe: the log is
# read once it stopped growing for this long (at most LOG_SETTLE_MAX), then the crash named.
LOG_SETTLE = 0.03
LOG_SETTLE_MAX = 1.0
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._#-]{0,127}$")


class HealthProbe(Protocol):
    """What `wait_healthy` needs from an engine client (`VllmClient` is one)."""

    async def health(self) -> bool: ...


class EngineError(Exception):
    """An engine could not be started or did not become healthy."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"model {model!r}: {message}")
        self.model = model


class EngineSpawnError(EngineError):
    """The engine's command could not be executed at all (missing, not executable)."""


class EngineExited(EngineError):
    """The engine's main process exited; `cause` is one of CRASH_CAUSES."""

    def __init__(self, model: str, returncode: int | None, cause: str, detail: str) -> None:
        code = "an unknown status" if returncode is None else _describe_status(returncode)
        super().__init__(model, f"engine exited with {code}: {cause}: {detail}")
        self.returncode = returncode
        self.cause = cause
        self.detail = detail


class EngineStartTimeout(EngineError):
    """The engine is alive but did not answer /health in time."""


# --- /proc helpers -----------------------------------------------------------------------


def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if the process is gone.
    The command name (field 2) may hold spaces and parentheses: split after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:  # gone (or, for a foreign pid, unreadable)
        return None
    return raw[raw.rindex(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Start time of PID in clock ticks after boot (/proc/PID/stat field 22): with the pid,
    it names one process for the life of the machine, whatever pids are reused."""
    fields = read_stat(pid)
    return int(fields[19]) if fields is not None else None


def proc_group_and_start(pid: int) -> tuple[int, int] | None:
    """(process group, start time) of a live, non-zombie PID; None if it is gone."""
    fields = read_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[2]), int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is PGID."""
    if pgid <= 1:
        return []
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # someone else's processes are in it: look closer
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = read_stat(int(entry))
        # fields[0] is the state (field 3), fields[2] the pgrp (field 5)
        if fields is not None and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"signal {-returncode} ({name})"
    return f"exit code {returncode}"


# --- crash classification ----------------------------------------------------------------

CRASH_CAUSES = (
    "out of memory", "model not found", "port in use", "import error", "kv plugin refused",
    "other",
)

_CAUSE_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    # gpud's own KV plugin refusing a setup it does not support yet (one line, by design).
    ("kv plugin refused", re.compile(r"gpud-kv: refused:")),
    (
        "out of memory",
        re.compile(
            r"out of memory|OutOfMemoryError|\bMemoryError\b|Cannot allocate memory"
            r"|No available memory for the cache blocks"
            r"|larger than the available KV cache memory"
            r"|less than requested memory for kv"
            r"|less than desired GPU memory utilization"
            r"|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation",
            re.IGNORECASE,
        ),
    ),
    (
        "port in use",
        re.compile(r"Address already in use|\[Errno 98\]|EADDRINUSE"),
    ),
    (
        "model not found",
        re.compile(
            r"Repo id must be in the form|is not a local folder and is not a valid model"
            r"|RepositoryNotFoundError|GatedRepoError|RevisionNotFoundError"
            r"|couldn't connect to 'https://huggingface\.co'"
            r"|does not appear to have (a file|any of the files) named"
            r"|Invalid repository ID or local directory"
            r"|No such file or directory:.*(config\.json|\.safetensors|tokenizer)"
            r"|Can't load (the )?(configuration|tokenizer) for",
            re.IGNORECASE,
        ),
    ),
    (
        "import error",
        re.compile(
            r"^\s*(ModuleNotFoundError|ImportError)\b|No module named"
            r"|undefined symbol|cannot import name"
            r"|error while loading shared libraries",
        ),
    ),
]

# Log lines that mention errors without being one: vLLM's INFO/WARNING lines ("failed to
# import triton", "Found ulimit ... with error") and Python's warnings.
_NOT_AN_ERROR = re.compile(
    r"\b(INFO|WARNING|DEBUG)\s+\d\d-\d\d \d\d:\d\d:\d\d"
    r"|^\[W\d{4}|\b\w*Warning:|^\s*warnings\.warn"
)
_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b.*")


def classify_crash(log_tail: Sequence[str], returncode: int | None = None) -> tuple[str, str]:
    """(cause, detail) of an engine's death from the last lines of its log.

    The latest line that names a known cause wins (a wrapper exception such as "Engine core
    initialization failed" follows the root cause). `detail` is that line, or the last
    exception line, or the exit status: what a person reads first in `gpud status`."""
    lines = [ln.strip() for ln in log_tail if ln.strip()]
    candidates = [ln for ln in lines if not _NOT_AN_ERROR.search(ln)]
    for line in reversed(candidates):
        for cause, pattern in _CAUSE_PATTERNS:
            if pattern.search(line):
                return cause, _clip(line)
    for line in reversed(candidates):
        if _EXCEPTION_LINE.match(line):
            return "other", _clip(line)
    if returncode is not None:
        detail = _describe_status(returncode)
        if returncode == -signal.SIGKILL:
            detail += "; killed from outside (the kernel's OOM killer or a person)"
        return "other", detail
    return "other", f"last output: {_clip(lines[-1])}" if lines else "no output"


def _clip(line: str, limit: int = 400) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- ports -------------------------------------------------------------------------------


class NoFreePort(Exception):
    pass


def allocate_port(lo: int, hi: int, taken: Collection[int] = (), host: str = "127.0.0.1") -> int:
    """The lowest port in [lo, hi] that is neither in `taken` nor bound by anyone now.
    Binding is the only true test; another process may still take it before the engine
    does, which the engine then reports as "port in use" and the next start moves on."""
    if not 0 < lo <= hi < 65536:
        raise ValueError(f"bad port range {lo}-{hi}")
    for port in range(lo, hi + 1):
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # as uvicorn does, so a port left in TIME_WAIT by a stopped engine counts as free
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return port
    raise NoFreePort(f"no free port in {lo}-{hi} on {host} ({len(taken)} taken by gpud)")


# --- log following -----------------------------------------------------------------------


class _LogFollower:
    """Tails an engine's log file into a ring buffer and gpud's log. Files cannot be
    polled with epoll, so it reads what is new every `interval`."""

    def __init__(
        self,
        model: str,
        path: Path,
        offset: int,
        ring: deque[str],
        *,
        to_logger: bool = True,
        interval: float = 0.2,
    ) -> None:
        self.model = model
        self.path = path
        self._ring = ring
        self._to_logger = to_logger
        self._interval = interval
        self._partial = b""
        self._file: IO[bytes] | None = None
        self._offset = offset
        self._inode: int | None = None  # the file the offset is in (None: the one there)
        self._task: asyncio.Task[None] | None = None
        self.on_line: Callable[[str], None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"gpud-engine-log-{self.model}"
        )

    async def _run(self) -> None:
        while True:
            try:
                self.drain()
            except OSError as e:
                log.warning("model %r: cannot read engine log %s: %s", self.model, self.path, e)
            await asyncio.sleep(self._interval)

    def drain(self, limit: int = 4 * 1024 * 1024) -> None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (lives as long as self)
            except FileNotFoundError:
                return
            if self._inode is None or os.fstat(self._file.fileno()).st_ino == self._inode:
                self._file.seek(self._offset)
        data = self._file.read(limit)
        if not data:
            self._follow_rotation()
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            self._emit(raw)

    def _follow_rotation(self) -> None:
        """At the end of the file: if the log writer moved it to .1, go on in the new one."""
        if self._file is None:
            return
        try:
            now = os.stat(self.path).st_ino
        except FileNotFoundError:
            return
        if now != os.fstat(self._file.fileno()).st_ino:
            self._file.close()
            self._file, self._inode, self._offset = None, None, 0
            self.drain()

    def fingerprint(self) -> tuple[int, int]:
        """(inode, size) of the log file now: changes while the writer writes."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0, 0
        return st.st_ino, st.st_size

    def _emit(self, raw: bytes) -> None:
        # progress bars rewrite one line with \r: keep what was last shown
        text = raw.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1]
        self._ring.append(text)
        if self.on_line is not None:
            self.on_line(text)
        # gpud's own health and sleep-state polls stay in the engine's log and the ring, not
        # in gpud's (the journal): one line per engine per tick says nothing to an operator.
        if self._to_logger and not _OWN_POLL.search(text):
            log.info("[%s] %s", self.model, text, extra={"model": self.model})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(OSError):
            self.drain(limit=64 * 1024 * 1024)
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if self._file is not None:
            self._file.close()
            self._file = None


def _backfill(path: Path, ring: deque[str], max_bytes: int = 512 * 1024) -> int:
    """Fill the ring with the end of an adopted engine's log; returns the end offset."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - max_bytes))
            data = f.read(end - f.tell())
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")
    if end > max_bytes:
        lines = lines[1:]  # the first one is cut
    if lines and lines[-1] == b"":
        lines.pop()
    for raw in lines[-ring.maxlen if ring.maxlen else 0 :]:
        ring.append(raw.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1])
    return end


# --- the process -------------------------------------------------------------------------


def _reap_writer(writer: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait for a log writer whose pipe has no writer left (it is at EOF, or about to be)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        writer.wait(timeout)

ExitCallback = Callable[["EngineProcess"], None]


def _start_log_writer(log_dir: Path, model: str, header: str, max_bytes: int, files: int
                      ) -> tuple[Path, int, subprocess.Popen[bytes], int, int]:
    """HEADER appended to LOG_DIR/MODEL.log, then the file's writer (gpud.engines.logwriter)
    reading a new pipe: (path, the pipe's write end for the engine, the writer, the file's
    inode and size after the header: where the engine's output starts)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{model}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, header.encode())
        st = os.fstat(fd)
        inode, size = st.st_ino, st.st_size
    finally:
        os.close(fd)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    root = str(Path(__file__).resolve().parents[2])
    try:
        writer = subprocess.Popen(
            [sys.executable, "-m", "gpud.engines.logwriter", str(log_path), str(max_bytes),
             str(files)],
            stdin=read_end, stdout=subprocess.DEVNULL, close_fds=True,
            start_new_session=True,  # outlives gpud, and a stop of the engine's group
            env={"PYTHONPATH": root, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except OSError:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return log_path, write_end, writer, inode, size


class EngineProcess:
    """One engine's process group, spawned by this gpud or adopted from a previous one.

    Exit of the leader is seen through a pidfd on the event loop (no polling, no SIGCHLD
    handler shared with the rest of gpud), in milliseconds. Whatever ends the leader, the
    rest of its group is then terminated, so no EngineCore keeps a GPU's memory."""

    def __init__(
        self,
        model: str,
        pid: int,
        pgid: int,
        start_time: int,
        log_path: Path,
        pidfd: int,
        *,
        popen: subprocess.Popen[bytes] | None,
        log_offset: int,
        log_inode: int | None = None,
        writer: subprocess.Popen[bytes] | None = None,
        ring: deque[str] | None = None,
        crash_grace: float = 2.0,
        log_to_logger: bool = True,
    ) -> None:
        self.model = model
        self.pid = pid
        self.pgid = pgid
        self.start_time = start_time
        self.log_path = log_path
        self.adopted = popen is None
        self.started_at = time.time()
        self.returncode: int | None = None
        self.exited_at: float | None = None  # time.monotonic() of the leader's exit
        self._popen = popen
        self._pidfd: int | None = pidfd
        self._crash_grace = crash_grace
        self._ring: deque[str] = ring if ring is not None else deque(maxlen=LOG_RING_LINES)
        self._loop = asyncio.get_running_loop()
        self._leader_exited = asyncio.Event()
        self._done = asyncio.Event()
        self._callbacks: list[ExitCallback] = []
        self._terminating: asyncio.Task[None] | None = None
        self._stopping = False
        self._follower = _LogFollower(
            model, log_path, log_offset, self._ring, to_logger=log_to_logger
        )
        self._follower._inode = log_inode
        self._writer = writer
        self._follower.start()
        self._loop.add_reader(pidfd, self._on_pidfd_readable)

    # -- construction --

    @classmethod
    def spawn(
        cls,
        model: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_dir: Path,
        *,
        cwd: Path | None = None,
        crash_grace: float = 2.0,
        log_to_logger: bool = True,
        log_bytes: int = LOG_FILE_BYTES,
        log_files: int = LOG_FILES,
    ) -> EngineProcess:
        """Start `argv` in a new session, output appended to LOG_DIR/MODEL.log by its log
        writer (at most `log_files` files of `log_bytes`). Needs a running event loop.
        Raises EngineSpawnError if the command cannot be executed."""
        if not _MODEL_NAME.match(model):
            raise ValueError(f"model name {model!r} cannot name a log file")
        if not argv:
            raise ValueError(f"model {model!r}: empty engine argv")
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        shown = shlex.join(argv).replace("\n", "\\n")  # one line, whatever the argv holds
        header = f"--- gpud {stamp}: starting {model}: {shown}\n"
        log_path, fd, writer, inode, size = _start_log_writer(log_dir, model, header,
                                                              log_bytes, log_files)
        try:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    env=dict(env),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own session and group: no tty signals, killpg
                    close_fds=True,
                )
            except OSError as e:
                os.write(fd, f"--- gpud: cannot execute {argv[0]!r}: {e}\n".encode())
                raise EngineSpawnError(
                    model, f"cannot execute engine command {argv[0]!r}: {e.strerror or e}"
                ) from e
        finally:
            os.close(fd)  # the writer ends once every engine process closed it too
            if sys.exc_info()[0] is not None:
                _reap_writer(writer)
        # an unreaped child cannot be replaced by another process: this pidfd is surely it
        pidfd = os.pidfd_open(popen.pid)
        start_time = proc_start_time(popen.pid) or 0
        log.info("model %r: engine started, pid %d, log %s", model, popen.pid, log_path)
        return cls(model, popen.pid, popen.pid, start_time, log_path, pidfd, popen=popen,
                   log_offset=size, log_inode=inode or None, writer=writer,
                   crash_grace=crash_grace, log_to_logger=log_to_logger)

    @classmethod
    def adopt(
        cls,
        model: str,
        pid: int,
        pgid: int,
        start_time: int,
        log_path: Path,
        *,
        crash_grace: float = 2.0,
        log_to_logger: bool = True,
    ) -> EngineProcess | None:
        """Take over an engine started by an earlier gpud, or None when that process is
        gone (its pid may now be someone else's: the start time tells them apart)."""
        if pid <= 1 or pgid <= 1 or pgid == os.getpgrp():
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        # checked after opening: the pidfd pins the process we compare
        try:
            same = proc_start_time(pid) == start_time and os.getpgid(pid) == pgid
        except ProcessLookupError:
            same = False
        if not same:
            os.close(pidfd)
            return None
        ring: deque[str] = deque(maxlen=LOG_RING_LINES)
        offset = _backfill(log_path, ring)
        log.info("model %r: adopted engine pid %d, log %s", model, pid, log_path)
        return cls(
            model,
            pid,
            pgid,
            start_time,
            log_path,
            pidfd,
            popen=None,
            log_offset=offset,
            ring=ring,
            crash_grace=crash_grace,
            log_to_logger=log_to_logger,
        )

    # -- state --

    @property
    def running(self) -> bool:
        """The leader (the API server) has not exited."""
        return not self._leader_exited.is_set()

    @property
    def on_line(self) -> Callable[[str], None] | None:
        """Called on the loop with each new line of the engine's log (load phases)."""
        return self._follower.on_line

    @on_line.setter
    def on_line(self, callback: Callable[[str], None] | None) -> None:
        self._follower.on_line = callback

    def log_tail(self, n: int | None = None) -> list[str]:
        """The last `n` (default: all kept, up to 2000) lines of the engine's output."""
        lines = list(self._ring)
        return lines if n is None else lines[-n:]

    def crash_cause(self) -> tuple[str, str]:
        """`classify_crash` of this engine's log tail and exit status."""
        return classify_crash(self.log_tail(200), self.returncode)

    def add_exit_callback(self, callback: ExitCallback) -> None:
        """Called once, on the loop, as soon as the leader exits (the group's cleanup then
        runs in the background; `wait()` waits for it). Called at once if already exited."""
        if self._leader_exited.is_set():
            self._loop.call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    async def wait(self) -> int | None:
        """Wait for the leader's exit and the end of its whole group; the exit status
        (None for an adopted engine: only its parent could read it)."""
        await self._leader_exited.wait()
        await self._done.wait()
        return self.returncode

    async def wait_healthy(
        self, client: HealthProbe, timeout: float, interval: float = 0.5
    ) -> float:
        """Poll `client.health()` until it answers; seconds it took. Raises EngineExited
        (with the classified cause) if the engine dies first, EngineStartTimeout after
        `timeout` seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if not self.running:
                await self.wait()
                cause, detail = self.crash_cause()
                raise EngineExited(self.model, self.returncode, cause, detail)
            if await client.health():
                return time.monotonic() - t0
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineStartTimeout(
                    self.model, f"engine did not answer /health within {timeout:g}s"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._leader_exited.wait(), min(interval, left))

    # -- stopping --

    async def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the whole group, SIGKILL to what is left after `grace` seconds;
        returns when the group is gone. Safe to call more than once, and after a crash."""
        self._stopping = True
        if self._terminating is None:
            self._terminating = self._loop.create_task(self._terminate(grace))
        await asyncio.shield(self._terminating)
        return await self.wait()

    def kill(self) -> None:
        """SIGKILL the whole group now (tests, emergencies); `wait()` sees the rest."""
        self._signal_group(signal.SIGKILL)

    def close(self) -> None:
        """Stop watching without touching the engine (gpud exits, the engine lives on)."""
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._follower._task is not None:
            self._follower._task.cancel()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.pgid <= 1 or self.pgid == os.getpgrp():
            return  # never: that would be everyone, or gpud itself
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.error("model %r: cannot signal process group %d: %s", self.model, self.pgid, e)

    async def _terminate(self, grace: float) -> None:
        try:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self.running and not group_members(self.pgid):
                    break
                await asyncio.sleep(0.05)
            else:
                left = group_members(self.pgid)
                if left:
                    log.warning(
                        "model %r: %d engine processes still alive %gs after SIGTERM, "
                        "sending SIGKILL",
                        self.model,
                        len(left),
                        grace,
                    )
                self._signal_group(signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while (self.running or group_members(self.pgid)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.running or group_members(self.pgid):
                log.error(
                    "model %r: engine process group %d survived SIGKILL (uninterruptible "
                    "sleep in a driver?)",
                    self.model,
                    self.pgid,
                )
        finally:
            await self._writer_done()
            await self._follower.stop()
            self._done.set()

    def _on_pidfd_readable(self) -> None:
        if self._pidfd is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if self._popen is not None:
            self.returncode = self._popen.poll()  # reaps it: no zombie
        self.exited_at = time.monotonic()
        self._leader_exited.set()
        if self._stopping:
            self._run_callbacks()
        else:
            self._terminating = self._loop.create_task(self._crashed())

    async def _crashed(self) -> None:
        """The leader died on its own: name the cause from its last words, tell the exit
        callbacks, then end its EngineCore and workers (orphans now, holding memory)."""
        try:
            await self._settle_log()
            with contextlib.suppress(OSError):
                self._follower.drain()  # the leader's last words are the likely cause
            cause, detail = classify_crash(self.log_tail(200), self.returncode)
            log.warning(
                "model %r: engine pid %d exited (%s): %s: %s",
                self.model,
                self.pid,
                "unknown status" if self.returncode is None else _describe_status(self.returncode),
                cause,
                detail,
            )
        finally:
            self._run_callbacks()
            await self._terminate(self._crash_grace)

    async def _settle_log(self) -> None:
        """Until the log writer has written what the leader wrote before it died: the file
        stops growing (the pipe between says nothing else gpud could wait on)."""
        deadline = time.monotonic() + LOG_SETTLE_MAX
        last = self._follower.fingerprint()
        while time.monotonic() < deadline:
            await asyncio.sleep(LOG_SETTLE)
            now = self._follower.fingerprint()
            if now == last:
                return
            last = now

    async def _writer_done(self, timeout: float = 5.0) -> None:
        """Wait for our log writer's exit (EOF once the group is gone): the log is complete."""
        writer = self._writer
        if writer is None or writer.poll() is not None:
            return
        try:
            fd = os.pidfd_open(writer.pid)
        except ProcessLookupError:
            writer.poll()
            return
        gone = self._loop.create_future()
        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        self._loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(gone, timeout)
        except TimeoutError:
            log.warning("model %r: engine log writer pid %d still running %gs after the "
                        "engine ended", self.model, writer.pid, timeout)
        finally:
            self._loop.remove_reader(fd)
            os.close(fd)
            writer.poll()

    def _run_callbacks(self) -> None:
        for cb in self._callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("model %r: exit callback failed", self.model)
        self._callbacks.clear()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited({self.returncode})"
        kind = "adopted" if self.adopted else "child"
        return f"<EngineProcess {self.model} pid={self.pid} {kind} {state}>"
