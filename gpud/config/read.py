"""Read a config file as hostile input: regular files only, size-limited, nesting bounded.

A FIFO must never block a reload (it would hold the reload lock forever), `/dev/zero` must
never be read without end, and a file nested thousands deep must not reach the recursive
TOML parser. Pure apart from reading the one file it is given; never raises anything but
`ReadProblem`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 1024 * 1024  # a config with every bound at its maximum fits in ~200 KiB
MAX_DEPTH = 16  # gpud's deepest key (profiles.NAME.MODEL.state) is 4 levels down
BOM = "\ufeff"

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class ReadProblem(Exception):
    """Why the file cannot be taken; `line`/`col` when a place in it is to blame."""

    def __init__(self, message: str, line: int = 0, col: int = 0) -> None:
        super().__init__(message)
        self.message, self.line, self.col = message, line, col


def read_limited(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (symlinks followed)."""
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ReadProblem(f"cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise ReadProblem(f"is {kind}, not a regular file; gpud reads config from "
                              "regular files only")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise ReadProblem(f"cannot read: {exc.strerror}") from None
    if len(data) > limit:
        raise ReadProblem(f"is larger than {limit // 1024} KiB, the most gpud reads "
                          "from one config file")
    return data


def decode(raw: bytes) -> str:
    """UTF-8 text; a leading byte-order mark (Windows editors write one) is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReadProblem(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.removeprefix(BOM)


def too_deep(text: str, limit: int = MAX_DEPTH) -> tuple[int, int] | None:
    """Line and column of the first `[` or `{` opened more than `limit` deep, else None."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            i = _string_end(text, i + len(quote), quote)
            continue
        if ch in "[{":
            depth += 1
            if depth > limit:
                return text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)
        elif ch in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return None


def _string_end(text: str, i: int, quote: str) -> int:
    """Index just past the closing quote (or the end of the text: tomllib reports that)."""
    escapes = quote[0] == '"'
    while i < len(text):
        if escapes and text[i] == "\\":
            i += 2
            continue
        if text.startswith(quote, i):
            return i + len(quote)
        if len(quote) == 1 and text[i] == "\n":
            return i
        i += 1
    return len(text)


def deepest(data: Any) -> tuple[int, tuple[str | int, ...]]:
    """How deep parsed data nests, and the path to its deepest value (no recursion)."""
    best: tuple[int, tuple[str | int, ...]] = (0, ())
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > best[0]:
            best = (len(path), path)
        items = (value.items() if isinstance(value, dict)
                 else enumerate(value) if isinstance(value, list) else ())
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append((child, (*path, key)))
    return best
