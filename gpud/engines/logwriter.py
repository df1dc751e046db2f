"""The engine log writer: an engine's stdout/stderr, capped, rotated and without gpud's polls.

Run as `python -m gpud.engines.logwriter PATH MAX_BYTES FILES` with the engine's output on
stdin (a pipe). It is its own process in its own session, not gpud's and not the engine's
group, so that it outlives a gpud restart (the engine keeps a reader, gpud adopts it later)
and a stop of the engine's group (it drains what the engine wrote last). It ends when every
process holding the pipe's write end is gone (EOF), and ignores the signals that end those.

Why a process and not gpud rotating the file: only the writer can keep a cap that holds at
every instant (`PATH` plus `PATH.1` .. `PATH.{FILES-1}` never exceed MAX_BYTES * FILES, what
`engine_log_size` and `engine_log_files` promise), also while gpud is down, and only the
writer can leave gpud's own `/health` and `/is_sleeping` polls out of the file.

It must never import the rest of gpud (it starts once per engine and should cost little)
and never write anywhere but PATH and its rotated siblings.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys

# uvicorn's access lines for gpud's own polls of an engine, answered 200: one line per engine
# per tick that says nothing to an operator (a failing poll, 503, stays).
OWN_POLL = re.compile(
    rb'127\.0\.0\.1:\d+ - "GET /(?:is_sleeping|is_paused|health|metrics) HTTP/1\.[01]" 200')
READ_SIZE = 64 * 1024
MAX_LINE = 64 * 1024  # a longer "line" (no newline in sight) is written in pieces


class CappedLog:
    """PATH opened for appending, moved to PATH.1 (and so on) before a write would make it
    larger than `max_bytes`; at most `files` files in all."""

    def __init__(self, path: str, max_bytes: int, files: int) -> None:
        if max_bytes < 1 or files < 1:
            raise ValueError(f"{path}: a log needs max_bytes >= 1 and files >= 1")
        self.path, self.max_bytes, self.files = path, max_bytes, files
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size
        if self.size > max_bytes:
            self.rotate()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def rotate(self) -> None:
        os.close(self.fd)
        if self.files == 1:
            os.truncate(self.path, 0)
        else:
            for k in range(self.files - 1, 0, -1):
                older = f"{self.path}.{k}"
                if k == self.files - 1:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(older)
                src = self.path if k == 1 else f"{self.path}.{k - 1}"
                with contextlib.suppress(FileNotFoundError):
                    os.replace(src, older)
        self.fd = self._open()
        self.size = 0

    def write(self, data: bytes) -> None:
        while data:
            if self.size + len(data) > self.max_bytes:
                if self.size:
                    self.rotate()
                if len(data) > self.max_bytes:  # longer than a whole file: its end
                    data = data[-self.max_bytes:]
            n = os.write(self.fd, data)
            self.size += n
            data = data[n:]


def pump(src: int, log: CappedLog) -> None:
    """Copy SRC to LOG line by line until EOF, leaving out gpud's own polls."""
    partial = b""
    while True:
        try:
            chunk = os.read(src, READ_SIZE)
        except InterruptedError:
            continue
        if not chunk:
            break
        data = partial + chunk
        cut = data.rfind(b"\n") + 1
        lines, partial = data[:cut], data[cut:]
        if len(partial) > MAX_LINE:
            lines, partial = data, b""
        if lines:
            log.write(b"".join(ln for ln in lines.splitlines(keepends=True)
                               if not OWN_POLL.search(ln)))
    if partial and not OWN_POLL.search(partial):
        log.write(partial)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m gpud.engines.logwriter PATH MAX_BYTES FILES", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the engine's end is our EOF
    path, max_bytes, files = argv[0], int(argv[1]), int(argv[2])
    pump(sys.stdin.fileno(), CappedLog(path, max_bytes, files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
