"""Logging setup for gpud: one record per event on stderr, journald-aware.

Under systemd (JOURNAL_STREAM names our stderr) every record becomes exactly
one journal entry: a `<N>` syslog priority prefix lets journald file it at the
right level (`journalctl -p warning` works), no timestamp (journald has one),
and newlines in the message or traceback are escaped, because journald starts
a new entry at every newline. Anywhere else the format is the usual
`time level name: message` with tracebacks as Python prints them.

This module must never write anywhere but the given stream (stderr): no files,
no syslog socket; journald and the operator's supervisor own storage.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["JournalFormatter", "PlainFormatter", "journal_stream_matches", "setup_logging"]

# sd-daemon(3) prefixes: <2> crit, <3> err, <4> warning, <5> notice, <6> info, <7> debug
_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def _priority(levelno: int) -> int:
    for threshold, priority in _PRIORITY:
        if levelno >= threshold:
            return priority
    return 7


def _fold(text: str) -> str:
    # Escape rather than drop: `journalctl -o cat | sed 's/\\n/\n/g'` restores it.
    return text.replace("\\", "\\\\").replace("\r", "").replace("\n", "\\n")


class JournalFormatter(logging.Formatter):
    """`<N>logger: message` on one line, traceback and stack folded in."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return f"<{_priority(record.levelno)}>{_fold(text)}"


class PlainFormatter(logging.Formatter):
    """`2024-05-01 12:00:00 INFO gpud.reconcile: message` for terminals and files (to the
    second: what a person reads; the journal keeps its own precise times)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s",
                         datefmt="%Y-%m-%d %H:%M:%S")


def journal_stream_matches(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True if JOURNAL_STREAM (`dev:inode`) is the file `stream` writes to.

    systemd sets JOURNAL_STREAM for the service's own stdout/stderr; a child
    that inherited the variable but whose stderr was redirected (a pipe, a
    file) must not emit priority prefixes, hence the dev:inode comparison.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        # pytest's capture and io.StringIO have no usable fileno()
        return False


class _GpudHandler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Send all logging to `stream` (default stderr) at `level` ("debug", "INFO", 20...).

    Safe to call again (e.g. after a reload changed the level): the handler
    installed before is replaced, others are left alone.
    """
    out = sys.stderr if stream is None else stream
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(
                f"unknown log level {level!r}: use debug, info, warning, error or critical"
            )
        level = resolved
    handler = _GpudHandler(out)
    if journal_stream_matches(out):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(PlainFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _GpudHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def tail_lines(path: Path, lines: int, window: int = 256 * 1024) -> list[str]:
    """The last `lines` lines of a log file (read from its last `window` bytes); [] if none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - window))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []
