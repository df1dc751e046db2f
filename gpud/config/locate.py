"""Find where a key path sits in a TOML text, so errors can say FILE:LINE:COL.

tomllib gives values without positions, so this small scanner indexes the text once: table
headers, arrays of tables (with their index), dotted keys and inline-table keys. Pure.
"""

from __future__ import annotations

import re

Path_ = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(text: str, start: int) -> tuple[list[str], int] | None:
    """Parse a dotted key at text[start:]; return its parts and the index after it."""
    parts: list[str] = []
    i = start
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text):
            return None
        ch = text[i]
        if ch in "\"'":
            end = text.find(ch, i + 1)
            if end < 0:
                return None
            parts.append(text[i + 1 : end])
            i = end + 1
        else:
            match = _BARE.match(text, i)
            if not match:
                return None
            parts.append(match.group(0))
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return parts, i


def _bracket_delta(value: str) -> int:
    """Net count of open [ and { in a value, ignoring those inside strings."""
    depth, quote = 0, ""
    i = 0
    while i < len(value):
        ch = value[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        i += 1
    return depth


class Locator:
    """Maps key paths to 1-based (line, column) in one TOML text."""

    def __init__(self, text: str) -> None:
        self.positions: dict[Path_, tuple[int, int]] = {}
        self._index(text)

    def _index(self, text: str) -> None:
        table: Path_ = ()
        counters: dict[Path_, int] = {}
        depth = 0
        in_multiline: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if in_multiline in line:
                    in_multiline = None
                continue
            if depth > 0:
                depth += _bracket_delta(line)
                continue
            stripped = line.lstrip()
            col0 = len(line) - len(stripped)
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("[["):
                parsed = _split_key(line, col0 + 2)
                if parsed:
                    key = tuple(parsed[0])
                    counters[key] = counters.get(key, -1) + 1
                    table = (*key, counters[key])
                    self.positions.setdefault(table, (lineno, col0 + 1))
                    self.positions.setdefault(key, (lineno, col0 + 1))
                continue
            if stripped.startswith("["):
                parsed = _split_key(line, col0 + 1)
                if parsed:
                    table = tuple(parsed[0])
                    # [a.b] under an array of tables [[a]] refers to its last element.
                    if table[:1] and (table[0],) in counters and len(table) > 1:
                        table = (table[0], counters[(table[0],)], *table[1:])
                    # [models.a] also places `models` (its first header), for errors on it.
                    for length in range(1, len(table) + 1):
                        self.positions.setdefault(table[:length], (lineno, col0 + 1))
                continue
            parsed = _split_key(line, col0)
            if not parsed or parsed[1] >= len(line) or line[parsed[1]] != "=":
                continue
            path = (*table, *parsed[0])
            self.positions.setdefault(path, (lineno, col0 + 1))
            value = line[parsed[1] + 1 :]
            for quote in ('"""', "'''"):
                if value.count(quote) == 1:
                    in_multiline = quote
            if value.lstrip().startswith("{"):
                self._inline(path, line, parsed[1] + 1, lineno)
            depth = max(_bracket_delta(value), 0)

    def _inline(self, path: Path_, line: str, start: int, lineno: int) -> None:
        i = line.index("{", start) + 1
        while i < len(line):
            parsed = _split_key(line, i)
            if not parsed:
                return
            parts, after = parsed
            if after < len(line) and line[after] == "=":
                key_col = len(line[:i]) + (len(line[i:]) - len(line[i:].lstrip()))
                self.positions.setdefault((*path, *parts), (lineno, key_col + 1))
            comma = line.find(",", after)
            if comma < 0:
                return
            i = comma + 1

    def find(self, path: Path_) -> tuple[tuple[int, int], int] | None:
        """Position of the longest prefix of `path` present, and that prefix's length."""
        for length in range(len(path), 0, -1):
            pos = self.positions.get(path[:length])
            if pos is not None:
                return pos, length
        return None
