"""Durations ("90s", "15m", "1h30m") and sizes ("8GiB", "512MiB") as typed values.

Parsed once at the edge of the config; the rest of gpud sees `timedelta` and `int` bytes.
Pure: never does I/O.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer

# Past these a value is a typo or an attack, never a setting (and `timedelta` overflows first).
MAX_DURATION = timedelta(days=366)
MAX_SIZE = 1024**5  # 1024TiB

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


def shown(value: Any, limit: int = 40) -> str:
    """A value as an error message quotes it: repr, cut to `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_duration(value: Any) -> timedelta:
    """'90s', '15m', '1h30m', '500ms' or a number of seconds -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"90s\", \"15m\" or \"1h30m\"")
    if isinstance(value, int | float):
        return _seconds(value, shown(value))
    if not isinstance(value, str):
        raise ValueError("expected a duration like \"90s\", \"15m\" or \"1h30m\"")
    text = value.strip().replace(" ", "")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_SECONDS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise ValueError(
            f"{value!r} is not a duration; write a number with a unit: "
            "ms, s, m, h or d (e.g. \"90s\", \"15m\", \"1h30m\")"
        )
    return _seconds(total, shown(value))


def _seconds(value: float, shown: str) -> timedelta:
    # Compared before any conversion: a huge int does not fit a float, inf not a timedelta.
    if value != value or value in (math.inf, -math.inf):
        raise ValueError(f"{shown} is not a finite duration")
    if value < 0:
        raise ValueError("a duration cannot be negative")
    if value > MAX_DURATION.total_seconds():
        raise ValueError(f"{shown} is longer than {format_duration(MAX_DURATION)}, "
                         "the longest duration gpud accepts")
    return timedelta(seconds=value)


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if whole or not parts:
        parts.append(f"{whole}s")
    return "".join(parts)


def parse_size(value: Any) -> int:
    """'8GiB', '512MiB', '2G' or a number of bytes -> int bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like \"8GiB\" or \"512MiB\"")
    if isinstance(value, int):
        return _bytes(value, shown(value))
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            factor = _SIZE_FACTOR.get(unit)
            if factor is not None:
                return _bytes(float(match.group(1)) * factor, repr(value))
    raise ValueError(
        f"{value!r} is not a size; write a number with a unit: B, KiB, MiB, GiB, TiB "
        "(or KB, MB, GB for powers of ten), e.g. \"8GiB\""
    )


def _bytes(value: float, shown: str) -> int:
    if value < 0:
        raise ValueError("a size cannot be negative")
    if not value <= MAX_SIZE:  # also inf, from a float too long to hold
        raise ValueError(f"{shown} is larger than {format_size(MAX_SIZE)}, "
                         "the largest size gpud accepts")
    return int(value)


def format_size(value: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]


def between(least: timedelta | None = None, most: timedelta | None = None) -> AfterValidator:
    """Bounds for one Duration setting: `Annotated[Duration, between(timedelta(seconds=1))]`."""

    def bounded(value: timedelta) -> timedelta:
        if least is not None and value < least:
            raise ValueError(f"must be at least {format_duration(least)} "
                             f"(got {format_duration(value)})")
        if most is not None and value > most:
            raise ValueError(f"must be at most {format_duration(most)} "
                             f"(got {format_duration(value)})")
        return value

    return AfterValidator(bounded)
