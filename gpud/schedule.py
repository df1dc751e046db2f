"""Time windows that pick the active profile: ``active_profile(now)`` and the next boundary.

Purpose: turn the ``[[schedule]]`` entries of the desired-state file into answers to
"which profile is active at this instant?" and "when does that change next, and to
what?", in the configured timezone and correct across daylight-saving changes. The
daemon asks on start, on reload and on every tick, so this module is the source of
truth; APScheduler only wakes the loop at the instant ``next_boundary`` names.

It must never do I/O, read the clock or import asyncio/aiohttp/subprocess/cuda (an
import-linter contract checks): ``now`` is always passed in, so every answer is a pure
function of (entries, timezone, now) and tests can walk a whole year in seconds.

What an operator writes in ``when``::

    "mon-fri 08:00-20:00"      Monday to Friday, 08:00 until 20:00
    "sat,sun 10:00-16:00"      days are names, lists and ranges (fri-mon wraps)
    "22:00-06:00"              every day; crosses midnight. A window belongs to the day
                               it starts: "fri 22:00-06:00" runs Fri 22:00 to Sat 06:00
    "sat,sun 00:00-24:00"      24:00 is allowed as an end: the whole day
    "otherwise"                whenever no other window is active (at most one entry)
    "cron: 0 8 * * mon-fri for 12h"
                               cron says when a window starts (minute, hour, then '*'
                               for day-of-month and month, then weekday *names*), and
                               "for" says how long it lasts (30m, 12h, 1h30m, 2d; at
                               most 7d). "cron: 0,30 9-17 * * mon-fri for 10m" opens a
                               ten-minute window every half hour of office hours.

Weekdays are names (mon..sun, or monday..sunday), never numbers: cron implementations
disagree on whether 0 and 7 mean Sunday, and a wrong guess moves a window by a day.

Rules, all in wall-clock time of the schedule's timezone:

- Windows are half-open: "08:00-20:00" is active at 08:00 and no longer at 20:00. A
  length ("for 12h") is wall-clock too: it ends when the clock reads start + 12h, so it
  is still "08:00-20:00" on the days the clocks change.
- A boundary that falls in the spring-forward gap (a wall time that does not exist that
  day) happens at the first valid instant after the gap; one that falls in the fall-back
  overlap (a wall time that happens twice) happens at its first occurrence.
- Where windows overlap, the entry with the higher ``priority`` wins; at equal priority
  the earlier entry wins, and ``Schedule.overlaps()`` reports the pair so that ``gpud
  check`` can refuse the file. "otherwise" never overlaps anything.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from gpud.config.schema import ScheduleConfig

__all__ = [
    "Boundary",
    "Schedule",
    "ScheduleEntry",
    "Window",
    "parse_when",
]

MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
# A cron window longer than a week would cover every instant; refuse it as a likely typo.
MAX_CRON_LENGTH_MINUTES = MINUTES_PER_WEEK
# How far next_boundary looks ahead. Two weeks plus a day: every weekly window occurs at
# least twice in that span, so a change is found even when a DST gap swallows one
# occurrence of a short window.
LOOKAHEAD_DAYS = 15

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_INDEX = {name: i for i, name in enumerate(DAY_NAMES)} | {
    name: i for i, name in enumerate(_FULL_DAY_NAMES)
}
_ALL_DAYS = frozenset(range(7))

_EXAMPLES = (
    "'mon-fri 08:00-20:00', 'sat,sun 10:00-16:00', '22:00-06:00', 'otherwise' "
    "or 'cron: 0 8 * * mon-fri for 12h'"
)
_WEEKDAY_HELP = "mon, tue, wed, thu, fri, sat, sun"


@dataclass(frozen=True)
class Window:
    """A parsed ``when``: on ``days`` (0 = Monday), a window opens at each of ``starts``
    (minutes after local midnight) and stays open for ``length`` minutes of wall-clock
    time. ``otherwise`` windows have no days and cover what no other window covers."""

    text: str
    days: frozenset[int] = frozenset()
    starts: tuple[int, ...] = ()
    length: int = 0
    otherwise: bool = False

    def weekly_minutes(self) -> list[tuple[int, int]]:
        """Merged half-open [start, end) minute ranges within one week (Monday 00:00 = 0),
        wrapped at the week's end; used to find overlaps between entries."""
        if self.otherwise:
            return []
        if self.length >= MINUTES_PER_WEEK:
            return [(0, MINUTES_PER_WEEK)]
        spans: list[tuple[int, int]] = []
        for day in self.days:
            for start in self.starts:
                begin = day * MINUTES_PER_DAY + start
                end = begin + self.length
                if end <= MINUTES_PER_WEEK:
                    spans.append((begin, end))
                else:
                    spans.append((begin, MINUTES_PER_WEEK))
                    spans.append((0, end - MINUTES_PER_WEEK))
        return _merge(spans)


@dataclass(frozen=True)
class ScheduleEntry:
    """One ``[[schedule]]`` table: ``profile`` is active while ``when`` says so."""

    profile: str
    when: str
    prewake: timedelta = timedelta(0)
    priority: int = 0


@dataclass(frozen=True)
class Boundary:
    """The next instant the active profile changes, the profile from then on (None: no
    profile, the models' defaults), and the prewake of the entry that opens then."""

    at: datetime
    profile: str | None
    prewake: timedelta = timedelta(0)


# --------------------------------------------------------------------------- parsing


def parse_when(text: str) -> Window:
    """Parse one ``when`` string; raise ValueError saying what is wrong and what is allowed."""
    if not isinstance(text, str):
        raise ValueError(f"'when' must be a string such as {_EXAMPLES}; got {text!r}")
    stripped = text.strip()
    lowered = stripped.lower()
    if not stripped:
        raise ValueError(f"'when' is empty; write a window such as {_EXAMPLES}")
    if lowered == "otherwise":
        return Window(text=stripped, otherwise=True)
    if lowered == "cron" or lowered.startswith(("cron:", "cron ")):
        return _parse_cron(stripped, stripped[4:].lstrip(":").strip())
    return _parse_range(stripped)


_RANGE_RE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


def _parse_range(text: str) -> Window:
    tokens = text.split()
    if len(tokens) == 1:
        days, times = _ALL_DAYS, tokens[0]
    elif len(tokens) == 2:
        days, times = _parse_days(tokens[0], text), tokens[1]
    else:
        raise ValueError(
            f"cannot read window {text!r}: write optional days then HH:MM-HH:MM with no "
            f"spaces inside either, e.g. {_EXAMPLES}"
        )
    match = _RANGE_RE.match(times)
    if match is None:
        raise ValueError(
            f"{times!r} in window {text!r} is not a time range: write HH:MM-HH:MM in 24-hour "
            "time, e.g. 08:00-20:00 (or 22:00-06:00 to cross midnight)"
        )
    start = _minutes(int(match[1]), int(match[2]), times, text, may_be_24=False)
    end = _minutes(int(match[3]), int(match[4]), times, text, may_be_24=True)
    if start == end:
        raise ValueError(
            f"window {text!r} starts and ends at the same time; for a whole day write 00:00-24:00"
        )
    length = end - start if end > start else end + MINUTES_PER_DAY - start
    return Window(text=text, days=days, starts=(start,), length=length)


def _minutes(hour: int, minute: int, times: str, text: str, *, may_be_24: bool) -> int:
    if may_be_24 and hour == 24 and minute == 0:
        return MINUTES_PER_DAY
    if hour > 23 or minute > 59:
        limit = "00:00 to 23:59, or 24:00 as an end" if may_be_24 else "00:00 to 23:59"
        raise ValueError(
            f"{hour:02d}:{minute:02d} in window {text!r} is not a time of day; times go "
            f"from {limit}"
        )
    return hour * 60 + minute


def _parse_days(spec: str, text: str) -> frozenset[int]:
    lowered = spec.lower()
    if lowered in ("daily", "*"):
        return _ALL_DAYS
    days: set[int] = set()
    for item in lowered.split(","):
        if not item:
            raise ValueError(
                f"empty weekday in {spec!r} (window {text!r}); separate names with single "
                "commas, e.g. sat,sun"
            )
        if "-" in item:
            first_name, _, last_name = item.partition("-")
            first, last = _day(first_name, text), _day(last_name, text)
            # Ranges may wrap the week's end: fri-mon is fri, sat, sun, mon.
            span = (last - first) % 7
            days.update((first + i) % 7 for i in range(span + 1))
        else:
            days.add(_day(item, text))
    return frozenset(days)


def _day(name: str, text: str) -> int:
    if name.isdigit():
        raise ValueError(
            f"weekday {name!r} in {text!r} is a number; write a name ({_WEEKDAY_HELP}): "
            "cron implementations disagree on whether 0 and 7 mean Sunday, and a wrong "
            "guess would move the window by a day"
        )
    try:
        return _DAY_INDEX[name]
    except KeyError:
        raise ValueError(
            f"{name!r} in {text!r} is not a weekday; use {_WEEKDAY_HELP} (or full names), "
            "lists (sat,sun) and ranges (mon-fri)"
        ) from None


_LENGTH_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?$")


def _parse_cron(text: str, body: str) -> Window:
    example = "'cron: 0 8 * * mon-fri for 12h'"
    tokens = body.split()
    lowered = [t.lower() for t in tokens]
    if "for" not in lowered:
        raise ValueError(
            f"{text!r} says when a window starts but not how long it lasts: add a length "
            f"after 'for', e.g. {example}"
        )
    at = lowered.index("for")
    fields, rest = tokens[:at], tokens[at + 1 :]
    if len(fields) != 5:
        raise ValueError(
            f"{text!r} has {len(fields)} cron field(s) before 'for'; a cron window has five "
            f"(minute hour day-of-month month weekday) and then a length, e.g. {example}"
        )
    if len(rest) != 1:
        raise ValueError(
            f"{text!r}: write one length after 'for' with no spaces, such as 30m, 12h, 1h30m or 2d"
        )
    minute_f, hour_f, dom_f, month_f, dow_f = fields
    minutes = _cron_numbers(minute_f, 0, 59, "minute", text)
    hours = _cron_numbers(hour_f, 0, 23, "hour", text)
    for value, what in ((dom_f, "day-of-month"), (month_f, "month")):
        if value not in ("*", "?"):
            raise ValueError(
                f"the {what} field of {text!r} is {value!r}; gpud schedules repeat every "
                "week, so write '*' there and choose days with weekday names in the fifth "
                "field"
            )
    if "/" in dow_f:
        raise ValueError(
            f"the weekday field of {text!r} has a step ({dow_f!r}); list the days by name "
            "instead, e.g. mon,wed,fri"
        )
    days = _ALL_DAYS if dow_f in ("*", "?") else _parse_days(dow_f, text)
    length = _length(rest[0], text)
    starts = tuple(sorted({h * 60 + m for h in hours for m in minutes}))
    return Window(text=text, days=days, starts=starts, length=length)


def _cron_numbers(spec: str, low: int, high: int, what: str, text: str) -> set[int]:
    values: set[int] = set()
    for item in spec.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(
                    f"the {what} field of {text!r} has step {step_text!r}; a step is a "
                    f"whole number of at least 1, as in */15"
                )
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first_text, _, last_text = base.partition("-")
            first = _cron_number(first_text, low, high, what, text)
            last = _cron_number(last_text, low, high, what, text)
            if last < first:
                raise ValueError(
                    f"the {what} range {base!r} in {text!r} runs backwards; write the lower "
                    f"number first"
                )
        else:
            first = _cron_number(base, low, high, what, text)
            last = high if slash else first
        values.update(range(first, last + 1, step))
    return values


def _cron_number(value: str, low: int, high: int, what: str, text: str) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise ValueError(
            f"{value!r} in the {what} field of {text!r} is not a {what}; use numbers "
            f"{low}-{high}, lists (0,30), ranges (9-17) and steps (*/15)"
        )
    return int(value)


def _length(value: str, text: str) -> int:
    match = _LENGTH_RE.match(value.lower())
    if not value or match is None:
        raise ValueError(
            f"{value!r} in {text!r} is not a length; write days, hours and minutes such as "
            "30m, 12h, 1h30m or 2d (minutes are the finest step)"
        )
    days, hours, minutes = (int(g) if g else 0 for g in match.groups())
    total = days * MINUTES_PER_DAY + hours * 60 + minutes
    if total == 0:
        raise ValueError(f"{text!r} lasts no time at all; give a length of at least 1m")
    if total > MAX_CRON_LENGTH_MINUTES:
        raise ValueError(
            f"{text!r} lasts longer than a week ({value}); a window repeats every week, so "
            "a longer one would never close: use at most 7d"
        )
    return total


# -------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class _Entry:
    number: int  # 1-based position in the file, for messages
    profile: str
    priority: int
    prewake: timedelta
    window: Window
    when: str = field(repr=False)


# (opens at, closes at, entry number): POSIX seconds, so that lookups compare integers.
_Interval = tuple[int, int, int]


class Schedule:
    """The ``[[schedule]]`` entries of one file, evaluated in one timezone.

    Construction validates every entry and raises ValueError naming the entry and what to
    fix; overlapping windows are not an error here (``overlaps()`` lists them) so that a
    daemon can still run a file that ``gpud check`` warns about.
    """

    def __init__(self, entries: Sequence[ScheduleEntry], tz: ZoneInfo) -> None:
        self.tz = tz
        self._entries: list[_Entry] = []
        self._otherwise: _Entry | None = None
        for number, entry in enumerate(entries, start=1):
            where = f"schedule entry #{number} (profile {entry.profile!r})"
            if not entry.profile or not isinstance(entry.profile, str):
                raise ValueError(f"schedule entry #{number} has no profile name")
            try:
                window = parse_when(entry.when)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            if entry.prewake < timedelta(0):
                raise ValueError(f"{where}: prewake {entry.prewake} is negative; use 0 or more")
            compiled = _Entry(
                number, entry.profile, entry.priority, entry.prewake, window, entry.when
            )
            if window.otherwise:
                if self._otherwise is not None:
                    raise ValueError(
                        f"{where}: 'otherwise' is already used by entry "
                        f"#{self._otherwise.number} (profile {self._otherwise.profile!r}); "
                        "only one entry can cover the rest of the time"
                    )
                self._otherwise = compiled
            else:
                self._entries.append(compiled)
        self._by_number = {e.number: e for e in self._entries}
        # How many days back a window that covers an instant may have opened.
        longest = max((max(e.window.starts) + e.window.length for e in self._entries), default=0)
        self._lookback = math.ceil(longest / MINUTES_PER_DAY)
        self._day_cache: dict[int, tuple[_Interval, ...]] = {}
        self._midnight_cache: dict[int, int] = {}
        self._segment_cache: dict[int, tuple[list[int], list[_Entry | None]]] = {}
        # The day of the last lookup, as [first midnight, next midnight): the daemon and
        # the tests ask about nearby instants, so most lookups skip the date conversion.
        self._last_day: tuple[float, float, int] = (0.0, 0.0, 0)

    # ---------------------------------------------------------------- public answers

    def active_profile(self, now: datetime) -> str | None:
        """The profile active at ``now`` (tz-aware), or None where no window and no
        'otherwise' applies (the models' defaults from the file)."""
        entry = self._entry_at(_timestamp(now))
        return entry.profile if entry is not None else None

    def next_boundary(self, now: datetime) -> Boundary | None:
        """The first instant strictly after ``now`` at which the active profile changes.

        None when the profile does not change within the next two weeks, which for a
        weekly schedule means never (one profile, or 'otherwise' alone).
        """
        ts = _timestamp(now)
        if not self._entries:
            return None
        current = self._entry_at(ts)
        current_profile = current.profile if current is not None else None
        today = self._day_of(ts)
        for day in range(today, today + LOOKAHEAD_DAYS + 1):
            starts, winners = self._segments(day)
            for instant, entry in zip(starts, winners, strict=True):
                if instant <= ts:
                    continue
                profile = entry.profile if entry is not None else None
                if profile != current_profile:
                    return Boundary(
                        at=datetime.fromtimestamp(instant, self.tz),
                        profile=profile,
                        prewake=entry.prewake if entry is not None else timedelta(0),
                    )
        return None

    def overlaps(self) -> list[str]:
        """Messages for pairs of entries whose windows overlap with nothing to order them
        (same priority, different profiles); 'otherwise' never overlaps."""
        messages: list[str] = []
        weekly = {e.number: e.window.weekly_minutes() for e in self._entries}
        for i, first in enumerate(self._entries):
            for second in self._entries[i + 1 :]:
                if first.priority != second.priority or first.profile == second.profile:
                    continue
                shared = _intersect(weekly[first.number], weekly[second.number])
                if not shared:
                    continue
                more = f" and {len(shared) - 1} more time(s) a week" if len(shared) > 1 else ""
                messages.append(
                    f"schedule entries #{first.number} (profile {first.profile!r}, when "
                    f"{first.when!r}) and #{second.number} (profile {second.profile!r}, when "
                    f"{second.when!r}) overlap on {_describe_span(*shared[0])}{more} with the "
                    f"same priority {first.priority}; give one of them a higher priority to "
                    "say which profile wins"
                )
        return messages

    # ---------------------------------------------------------------------- internals

    def _entry_at(self, ts: float) -> _Entry | None:
        starts, winners = self._segments(self._day_of(ts))
        return winners[bisect.bisect_right(starts, ts) - 1]

    def _segments(self, ordinal: int) -> tuple[list[int], list[_Entry | None]]:
        """Local day ``ordinal`` cut where the winner changes: ``winners[i]`` holds from
        ``starts[i]`` to the next start (the first start is the day's midnight)."""
        cached = self._segment_cache.get(ordinal)
        if cached is not None:
            return cached
        low, high = self._midnight(ordinal), self._midnight(ordinal + 1)
        intervals = [
            interval
            for back in range(self._lookback + 1)
            for interval in self._intervals(ordinal - back)
            if interval[0] < high and interval[1] > low
        ]
        cuts = sorted({low} | {t for i in intervals for t in i[:2] if low < t < high})
        starts: list[int] = []
        winners: list[_Entry | None] = []
        for cut in cuts:
            best: _Entry | None = None
            for opens, closes, number in intervals:
                if opens <= cut < closes:
                    entry = self._by_number[number]
                    # Higher priority wins; at equal priority the earlier entry wins.
                    if best is None or (entry.priority, -entry.number) > (
                        best.priority,
                        -best.number,
                    ):
                        best = entry
            winner = best if best is not None else self._otherwise
            if not winners or winners[-1] is not winner:
                starts.append(cut)
                winners.append(winner)
        if len(self._segment_cache) > 4096:  # bound memory for a long-running daemon
            self._segment_cache.clear()
        self._segment_cache[ordinal] = (starts, winners)
        return starts, winners

    def _day_of(self, ts: float) -> int:
        """The local day whose (first) midnight is the last one at or before ``ts``.

        Not simply the date the clock shows: were the clocks to fall back across midnight
        (00:30 back to 23:30, say), the clock would show yesterday again after today's
        windows had opened, and those windows must still be found.
        """
        low, high, ordinal = self._last_day
        if low <= ts < high:
            return ordinal
        ordinal = datetime.fromtimestamp(ts, self.tz).date().toordinal()
        if ts >= self._midnight(ordinal + 1):
            ordinal += 1
        self._last_day = (self._midnight(ordinal), self._midnight(ordinal + 1), ordinal)
        return ordinal

    def _intervals(self, ordinal: int) -> tuple[_Interval, ...]:
        """Absolute intervals of the windows that open on local day ``ordinal``."""
        cached = self._day_cache.get(ordinal)
        if cached is not None:
            return cached
        day = date.fromordinal(ordinal)
        midnight = datetime.combine(day, time())
        intervals: list[_Interval] = []
        for entry in self._entries:
            if day.weekday() not in entry.window.days:
                continue
            for start in entry.window.starts:
                wall_open = midnight + timedelta(minutes=start)
                wall_close = wall_open + timedelta(minutes=entry.window.length)
                opens, closes = self._resolve(wall_open), self._resolve(wall_close)
                # A window inside a spring-forward gap opens and closes at the same
                # instant: it does not happen that day.
                if closes > opens:
                    intervals.append((opens, closes, entry.number))
        result = tuple(intervals)
        if len(self._day_cache) > 4096:  # bound memory for a long-running daemon
            self._day_cache.clear()
        self._day_cache[ordinal] = result
        return result

    def _midnight(self, ordinal: int) -> int:
        cached = self._midnight_cache.get(ordinal)
        if cached is None:
            if len(self._midnight_cache) > 4096:
                self._midnight_cache.clear()
            cached = self._resolve(datetime.combine(date.fromordinal(ordinal), time()))
            self._midnight_cache[ordinal] = cached
        return cached

    def _resolve(self, wall: datetime) -> int:
        """The instant a naive wall-clock time happens: its first occurrence in a
        fall-back overlap, the end of the gap when it falls in a spring-forward gap."""
        first = wall.replace(tzinfo=self.tz, fold=0)
        ts = int(first.timestamp())
        if datetime.fromtimestamp(ts, self.tz).replace(tzinfo=None) == wall:
            return ts
        # In a gap, fold=0 reads the time with the offset from before the jump (an instant
        # after it) and fold=1 with the offset from after (an instant before it); the jump
        # lies between. Bisect on the offset to find it, to the second.
        late = ts
        early = int(wall.replace(tzinfo=self.tz, fold=1).timestamp())
        after = self.tz.utcoffset(datetime.fromtimestamp(late, self.tz))
        while late - early > 1:
            middle = (early + late) // 2
            if self.tz.utcoffset(datetime.fromtimestamp(middle, self.tz)) == after:
                late = middle
            else:
                early = middle
        return late


def _timestamp(now: datetime) -> float:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(
            f"{now.isoformat()} has no timezone; pass an aware datetime, e.g. "
            "datetime.now(tz) or one with an offset such as 2025-03-30T08:00:00+02:00"
        )
    return now.timestamp()


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    shared: list[tuple[int, int]] = []
    for a_begin, a_end in a:
        for b_begin, b_end in b:
            begin, end = max(a_begin, b_begin), min(a_end, b_end)
            if begin < end:
                shared.append((begin, end))
    return _merge(shared)


def _describe_span(begin: int, end: int) -> str:
    def moment(minute: int) -> tuple[str, str]:
        day, rest = divmod(minute % MINUTES_PER_WEEK, MINUTES_PER_DAY)
        return DAY_NAMES[day].capitalize(), f"{rest // 60:02d}:{rest % 60:02d}"

    first_day, first_time = moment(begin)
    last_day, last_time = moment(end)
    if end - begin < MINUTES_PER_DAY and (first_day == last_day or last_time == "00:00"):
        last_time = "24:00" if last_time == "00:00" else last_time
        return f"{first_day} {first_time}-{last_time}"
    return f"{first_day} {first_time} to {last_day} {last_time}"


def schedule_of(entries: Sequence[ScheduleConfig], tz: ZoneInfo) -> Schedule | None:
    """The file's ``[[schedule]]`` tables as a Schedule (None without any): the one place a
    Schedule is built from config (daemon, `gpud plan`, `gpud check`, the page)."""
    if not entries:
        return None
    return Schedule([ScheduleEntry(e.profile, e.when, e.prewake, e.priority) for e in entries],
                    tz)


# --------------------------------------------------------------------------- `gpud plan --at`

AT_FORMS = ("HH:MM", "today HH:MM", "tomorrow [HH:MM]", "mon..sun HH:MM",
            "ISO 8601 with or without an offset (without: the schedule's zone)")


def parse_at(text: str, now: datetime) -> datetime:
    """An instant for `gpud plan --at`, on the wall clock of `now`'s zone (the schedule's):
    `10:00` (today), `tomorrow 07:55`, `fri 19:30` (the next Friday, today included if still
    ahead), `tomorrow` (this time tomorrow), or ISO 8601 (an offset is honoured; without one
    the time is local). A local time that does not exist (the spring-forward gap) moves
    forward by the gap, as a clock would. ValueError names the accepted forms."""
    tz = now.tzinfo
    words = text.strip().lower().split()
    try:
        if len(words) == 1 and ":" in words[0] and "-" not in words[0]:
            return _local(now.date(), _clock(words[0]), tz)
        if words and words[0] in ("today", "tomorrow") and len(words) <= 2:
            day = now.date() + timedelta(days=words[0] == "tomorrow")
            at = _clock(words[1]) if len(words) == 2 else now.time().replace(tzinfo=None)
            return _local(day, at, tz)
        if len(words) == 2 and words[0][:3] in _DAY_NAMES_AT:
            at = _clock(words[1])
            ahead = (_DAY_NAMES_AT.index(words[0][:3]) - now.weekday()) % 7
            moment = _local(now.date() + timedelta(days=ahead), at, tz)
            return moment if moment >= now else _local(moment.date() + timedelta(days=7), at, tz)
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        pass
    else:
        if moment.tzinfo is None:
            return _local(moment.date(), moment.time(), tz)
        return moment.astimezone(tz)
    raise ValueError(f"--at {text!r}: not a time gpud reads; use one of: {', '.join(AT_FORMS)}")


_DAY_NAMES_AT = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _clock(text: str) -> time:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(text)
    h, m, sec = (int(p) for p in [*parts, "0"][:3])
    return time(h, m, sec)


def _local(day: date, at: time, tz: Any) -> datetime:
    wall = datetime.combine(day, at, tzinfo=tz)
    return wall.astimezone(UTC).astimezone(tz)  # normalises a time in a DST gap
