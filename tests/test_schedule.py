"""Tests of gpud.schedule: parsing, and a year of minutes against a brute-force oracle.

The oracle below shares no code with gpud.schedule. It reads the clock the way a person
watching it would: walking forward a minute at a time in real (UTC) time, a window opens
at the first minute whose wall-clock reading is at or past its opening time and closes
at the first minute whose reading is at or past its closing time. That one rule gives
both DST answers the design asks for: a time inside the spring-forward gap happens at the
first minute after the gap (the clock never shows it, the next reading is past it), and
a time inside the fall-back overlap happens at its first occurrence.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import cast
from zoneinfo import ZoneInfo

import pytest

from gpud.schedule import Boundary, Schedule, ScheduleEntry, parse_when

# ------------------------------------------------------------------------------ oracle


@dataclass(frozen=True)
class Spec:
    """A window as the oracle sees it: hand-written, never parsed by gpud."""

    profile: str
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after local midnight
    length: int  # wall-clock minutes
    priority: int = 0
    prewake_s: int = 0


ALL = frozenset(range(7))
WEEKDAYS = frozenset(range(5))
WEEKEND = frozenset({5, 6})
SUNDAY = frozenset({6})

# The day/night file used for the year-long checks. The Sunday-morning entries put
# window edges at 01:30, 02:15, 02:30 and 02:45 on the nights the clocks change in both
# Paris (02:00 -> 03:00, 03:00 -> 02:00) and New York (02:00 -> 03:00, 02:00 -> 01:00).
DAY_NIGHT_FILE = [
    ScheduleEntry("day", "mon-fri 08:00-20:00", prewake=timedelta(seconds=60)),
    ScheduleEntry("day", "sat,sun 10:00-16:00"),
    ScheduleEntry("batch", "22:00-02:30"),
    ScheduleEntry("maintenance", "cron: 30 1 * * sun for 1h", priority=10),
    ScheduleEntry(
        "backup", "cron: 15 2 * * sun for 30m", priority=20, prewake=timedelta(minutes=5)
    ),
    ScheduleEntry("night", "otherwise", prewake=timedelta(seconds=120)),
]
DAY_NIGHT_SPECS = [
    Spec("day", WEEKDAYS, 8 * 60, 12 * 60, prewake_s=60),
    Spec("day", WEEKEND, 10 * 60, 6 * 60),
    Spec("batch", ALL, 22 * 60, 4 * 60 + 30),
    Spec("maintenance", SUNDAY, 90, 60, priority=10),
    Spec("backup", SUNDAY, 135, 30, priority=20, prewake_s=300),
]
DAY_NIGHT_OTHERWISE = Spec("night", frozenset(), 0, 0, prewake_s=120)


@dataclass
class Oracle:
    first_minute: int  # UTC minutes since the epoch of index 0
    winner: list[int]  # per minute: index into specs, len(specs) for otherwise, -1 none
    specs: list[Spec]

    def profile(self, i: int) -> str | None:
        return None if self.winner[i] < 0 else self.specs[self.winner[i]].profile


def brute_force(
    tz: ZoneInfo, specs: list[Spec], otherwise: Spec | None, first: int, last: int
) -> Oracle:
    """Who wins each UTC minute in [first, last), by walking the wall clock."""
    minutes = range(first, last)
    epoch = datetime(1970, 1, 1)
    # The wall-clock reading at each minute, in minutes since 1970-01-01 00:00 local.
    one_minute = timedelta(minutes=1)
    offsets = (cast(timedelta, datetime.fromtimestamp(m * 60, tz).utcoffset()) for m in minutes)
    wall = [m + offset // one_minute for m, offset in zip(minutes, offsets, strict=True)]
    # The highest reading so far; "first minute reading >= t" is a bisect on it.
    highest = list(itertools.accumulate(wall, max))
    everyone = [*specs, otherwise] if otherwise is not None else list(specs)
    winner = [len(specs) if otherwise is not None else -1] * len(wall)
    first_day = (epoch + timedelta(minutes=wall[0])).date() - timedelta(days=8)
    last_day = (epoch + timedelta(minutes=wall[-1])).date() + timedelta(days=1)
    # Paint windows from lowest precedence to highest, so the winner is painted last.
    order = sorted(range(len(specs)), key=lambda k: (specs[k].priority, -k))
    for k in order:
        spec = specs[k]
        day = first_day
        while day <= last_day:
            if day.weekday() in spec.days:
                opens = (day - epoch.date()).days * 1440 + spec.start
                begin = bisect.bisect_left(highest, opens)
                end = bisect.bisect_left(highest, opens + spec.length)
                winner[begin:end] = [k] * (end - begin)
            day += timedelta(days=1)
    return Oracle(first, winner, everyone)


@functools.cache
def year_2025(zone: str) -> tuple[int, int, Oracle]:
    """The day/night file's oracle for 2025 in ``zone``, plus 17 days so that
    next_boundary near the year's end has an answer; shared by the tests below."""
    tz = ZoneInfo(zone)
    first = local_midnight_minute(tz, date(2025, 1, 1))
    last = local_midnight_minute(tz, date(2026, 1, 1))
    oracle = brute_force(tz, DAY_NIGHT_SPECS, DAY_NIGHT_OTHERWISE, first, last + 17 * 1440)
    return first, last, oracle


def local_midnight_minute(tz: ZoneInfo, day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()) // 60


def utc(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


# ------------------------------------------------------------------------ year of minutes


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York"])
def test_a_year_of_minutes_matches_the_oracle(zone: str) -> None:
    tz = ZoneInfo(zone)
    schedule = Schedule(DAY_NIGHT_FILE, tz)
    assert schedule.overlaps() == []
    first, last, oracle = year_2025(zone)
    expected = [oracle.profile(i) for i in range(last - first)]

    active = schedule.active_profile
    got = [active(utc(m)) for m in range(first, last)]

    wrong = [
        f"{utc(first + i).astimezone(tz).isoformat()}: got {g!r}, oracle says {e!r}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True))
        if g != e
    ]
    assert wrong == [], f"{len(wrong)} minutes differ, first ones:\n" + "\n".join(wrong[:10])
    # The file really exercises what the test claims: all profiles, DST in the year.
    assert set(expected) == {"day", "batch", "maintenance", "backup", "night"}
    offsets = {utc(m).astimezone(tz).utcoffset() for m in range(first, last, 1440)}
    assert len(offsets) == 2


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York"])
def test_next_boundary_matches_the_oracle(zone: str) -> None:
    tz = ZoneInfo(zone)
    schedule = Schedule(DAY_NIGHT_FILE, tz)
    first, last, oracle = year_2025(zone)
    profiles = [oracle.profile(i) for i in range(len(oracle.winner))]
    changes = [i for i in range(1, len(profiles)) if profiles[i] != profiles[i - 1]]

    def expected(seconds_after_first: int) -> Boundary:
        # The first change strictly after the instant.
        j = changes[bisect.bisect_right(changes, seconds_after_first / 60)]
        winner = oracle.winner[j]
        prewake = timedelta(seconds=oracle.specs[winner].prewake_s if winner >= 0 else 0)
        return Boundary(utc(first + j).astimezone(tz), profiles[j], prewake)

    # Every change in the year, probed at it, a minute before and a second before; plus
    # a sample of ordinary minutes.
    probes = {s for j in changes if j < last - first for s in (j * 60, j * 60 - 60, j * 60 - 1)}
    probes |= set(range(0, (last - first) * 60, 61 * 60 + 7))
    wrong = []
    for offset in sorted(p for p in probes if p >= 0):
        now = datetime.fromtimestamp(first * 60 + offset, tz)
        got = schedule.next_boundary(now)
        want = expected(offset)
        if got != want or got is None or got.at.utcoffset() != want.at.utcoffset():
            wrong.append(f"from {now.isoformat()}: got {got}, oracle says {want}")
    assert wrong == [], f"{len(wrong)} probes differ, first ones:\n" + "\n".join(wrong[:10])
    assert len(changes) > 365 * 4


# ---------------------------------------------------------------- DST, spelled out


def test_spring_forward_gap_opens_at_the_first_valid_instant() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule([ScheduleEntry("maintenance", "sun 02:30-04:00")], paris)
    # Sunday 30 March 2025: the clocks go from 02:00 straight to 03:00.
    saturday_night = datetime(2025, 3, 29, 23, 0, tzinfo=paris)
    boundary = schedule.next_boundary(saturday_night)
    assert boundary == Boundary(datetime(2025, 3, 30, 3, 0, tzinfo=paris), "maintenance")
    assert boundary.at.utcoffset() == timedelta(hours=2)
    assert schedule.active_profile(datetime(2025, 3, 30, 0, 59, 59, tzinfo=UTC)) is None
    assert schedule.active_profile(datetime(2025, 3, 30, 1, 0, tzinfo=UTC)) == "maintenance"


def test_a_window_entirely_inside_the_gap_does_not_happen_that_day() -> None:
    new_york = ZoneInfo("America/New_York")
    schedule = Schedule([ScheduleEntry("blip", "sun 02:10-02:50")], new_york)
    # 9 March 2025 has no 02:10-02:50; the next one is a week later.
    boundary = schedule.next_boundary(datetime(2025, 3, 8, 12, 0, tzinfo=new_york))
    assert boundary is not None
    assert boundary.at == datetime(2025, 3, 16, 2, 10, tzinfo=new_york)


def test_fall_back_overlap_uses_the_first_occurrence() -> None:
    new_york = ZoneInfo("America/New_York")
    schedule = Schedule(
        [ScheduleEntry("late", "sun 01:30-03:00"), ScheduleEntry("rest", "otherwise")], new_york
    )
    # Sunday 2 November 2025: 01:00-02:00 happens twice (EDT, then EST).
    boundary = schedule.next_boundary(datetime(2025, 11, 2, 0, 0, tzinfo=new_york))
    assert boundary is not None and boundary.profile == "late"
    assert boundary.at.utcoffset() == timedelta(hours=-4)  # 01:30 EDT, the first one
    second_0130 = datetime(2025, 11, 2, 1, 30, fold=1, tzinfo=new_york)
    assert schedule.active_profile(second_0130) == "late"  # still open, not re-opened
    closing = schedule.next_boundary(second_0130)
    assert closing == Boundary(datetime(2025, 11, 2, 3, 0, tzinfo=new_york), "rest")


def test_a_window_closing_in_the_overlap_closes_at_the_first_occurrence() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule([ScheduleEntry("batch", "22:00-02:30")], paris)
    # Sunday 26 October 2025: 02:00-03:00 happens twice in Paris.
    first_0230 = datetime(2025, 10, 26, 2, 30, tzinfo=paris)
    assert schedule.next_boundary(datetime(2025, 10, 26, 1, 0, tzinfo=paris)) == Boundary(
        first_0230, None
    )
    assert schedule.active_profile(first_0230 - timedelta(seconds=1)) == "batch"
    assert schedule.active_profile(datetime(2025, 10, 26, 2, 10, fold=1, tzinfo=paris)) is None


@pytest.mark.parametrize(
    "zone", ["Australia/Lord_Howe", "America/Santiago", "Asia/Tehran", "Europe/Dublin"]
)
def test_random_schedules_around_dst_changes_match_the_oracle(zone: str) -> None:
    """Odd zones (half-hour DST, changes at midnight, negative DST): random windows,
    minute by minute, for a few days around each change of 2025."""
    tz = ZoneInfo(zone)
    rng = random.Random(zone)
    first = local_midnight_minute(tz, date(2025, 1, 1))
    last = local_midnight_minute(tz, date(2026, 1, 1))
    daily = [utc(m).astimezone(tz).utcoffset() for m in range(first, last, 60)]
    changes = [first + i * 60 for i in range(1, len(daily)) if daily[i] != daily[i - 1]]
    assert changes or zone == "Asia/Tehran"  # Iran dropped DST in 2022: still a fine check
    centres = changes or [first + 180 * 1440]
    for _ in range(4):
        specs = [
            Spec(
                f"p{k}",
                frozenset(rng.sample(range(7), rng.randint(1, 7))),
                rng.randrange(0, 1440, 15),
                rng.choice([15, 30, 45, 60, 90, 240, 1440]),
                priority=rng.randint(0, 3),
            )
            for k in range(4)
        ]
        # A window at midnight too: Santiago's clocks change at midnight.
        specs.append(Spec("midnight", frozenset({rng.randrange(7)}), 0, 60, priority=4))
        names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        entries = [
            ScheduleEntry(
                s.profile,
                f"cron: {s.start % 60} {s.start // 60} * * "
                f"{','.join(names[d] for d in sorted(s.days))} for {s.length}m",
                priority=s.priority,
            )
            for s in specs
        ]
        schedule = Schedule(entries, tz)
        for centre in centres:
            lo, hi = centre - 2 * 1440, centre + 2 * 1440
            oracle = brute_force(tz, specs, None, lo, hi)
            got = [schedule.active_profile(utc(m)) for m in range(lo, hi)]
            want = [oracle.profile(i) for i in range(hi - lo)]
            assert got == want, f"{zone} around {utc(centre)}: {entries}"


# ---------------------------------------------------------------------- the basics


def test_a_daemon_started_mid_window_is_in_that_profile_at_once() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule(DAY_NIGHT_FILE, paris)
    tuesday_2pm = datetime(2025, 6, 10, 14, 0, tzinfo=paris)
    assert schedule.active_profile(tuesday_2pm) == "day"
    assert schedule.next_boundary(tuesday_2pm) == Boundary(
        datetime(2025, 6, 10, 20, 0, tzinfo=paris), "night", timedelta(seconds=120)
    )
    # The same instant given in another offset is the same instant.
    assert schedule.active_profile(tuesday_2pm.astimezone(UTC)) == "day"


def test_prewake_belongs_to_the_window_that_opens() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule(DAY_NIGHT_FILE, paris)
    boundary = schedule.next_boundary(datetime(2025, 6, 10, 7, 0, tzinfo=paris))
    assert boundary == Boundary(
        datetime(2025, 6, 10, 8, 0, tzinfo=paris), "day", timedelta(seconds=60)
    )


def test_a_window_crossing_midnight_belongs_to_the_day_it_starts() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule([ScheduleEntry("late", "fri 22:00-06:00")], paris)
    assert schedule.active_profile(datetime(2025, 6, 14, 5, 59, tzinfo=paris)) == "late"  # Sat
    assert schedule.active_profile(datetime(2025, 6, 14, 6, 0, tzinfo=paris)) is None
    assert schedule.active_profile(datetime(2025, 6, 13, 5, 0, tzinfo=paris)) is None  # Fri


def test_same_profile_back_to_back_is_not_a_boundary() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule(
        [
            ScheduleEntry("day", "08:00-12:00"),
            ScheduleEntry("day", "12:00-20:00"),
            ScheduleEntry("night", "otherwise"),
        ],
        paris,
    )
    boundary = schedule.next_boundary(datetime(2025, 6, 10, 9, 0, tzinfo=paris))
    assert boundary is not None and boundary.at == datetime(2025, 6, 10, 20, 0, tzinfo=paris)


def test_no_boundary_when_the_profile_never_changes() -> None:
    paris = ZoneInfo("Europe/Paris")
    now = datetime(2025, 6, 10, 9, 0, tzinfo=paris)
    assert Schedule([ScheduleEntry("all", "otherwise")], paris).next_boundary(now) is None
    assert Schedule([ScheduleEntry("all", "00:00-24:00")], paris).next_boundary(now) is None
    assert Schedule([], paris).next_boundary(now) is None
    assert Schedule([], paris).active_profile(now) is None


def test_cron_steps_open_many_windows_a_day() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule([ScheduleEntry("burst", "cron: */30 9-10 * * mon for 10m")], paris)
    monday = datetime(2025, 6, 9, 0, 0, tzinfo=paris)
    opened = [
        m
        for m in range(0, 1440)
        if schedule.active_profile(monday + timedelta(minutes=m)) == "burst"
    ]
    assert opened == [m for start in (540, 570, 600, 630) for m in range(start, start + 10)]


def test_naive_now_is_refused() -> None:
    schedule = Schedule(DAY_NIGHT_FILE, ZoneInfo("Europe/Paris"))
    with pytest.raises(ValueError, match="no timezone"):
        schedule.active_profile(datetime(2025, 6, 10, 14, 0))


# ----------------------------------------------------------------------------- overlaps


def test_overlaps_name_both_entries_and_when() -> None:
    schedule = Schedule(
        [
            ScheduleEntry("day", "mon-fri 08:00-20:00"),
            ScheduleEntry("batch", "19:00-21:00"),
            ScheduleEntry("night", "otherwise"),
        ],
        ZoneInfo("Europe/Paris"),
    )
    [message] = schedule.overlaps()
    assert "#1 (profile 'day'" in message and "#2 (profile 'batch'" in message
    assert "Mon 19:00-20:00" in message and "4 more" in message
    assert "priority" in message


def test_priority_orders_overlaps_and_wins() -> None:
    paris = ZoneInfo("Europe/Paris")
    schedule = Schedule(
        [
            ScheduleEntry("day", "mon-fri 08:00-20:00"),
            ScheduleEntry("batch", "19:00-21:00", priority=5),
        ],
        paris,
    )
    assert schedule.overlaps() == []
    assert schedule.active_profile(datetime(2025, 6, 10, 19, 30, tzinfo=paris)) == "batch"


def test_overlap_across_the_week_end_is_found() -> None:
    schedule = Schedule(
        [ScheduleEntry("a", "sun 23:00-02:00"), ScheduleEntry("b", "mon 01:00-03:00")],
        ZoneInfo("Europe/Paris"),
    )
    [message] = schedule.overlaps()
    assert "Mon 01:00-02:00" in message


def test_only_one_otherwise() -> None:
    with pytest.raises(ValueError, match=r"#2 \(profile 'b'\).*already used by entry #1"):
        Schedule(
            [ScheduleEntry("a", "otherwise"), ScheduleEntry("b", "otherwise")],
            ZoneInfo("Europe/Paris"),
        )


def test_bad_entry_names_its_number_and_profile() -> None:
    with pytest.raises(ValueError, match=r"entry #2 \(profile 'night'\): weekday '1'"):
        Schedule(
            [ScheduleEntry("day", "08:00-20:00"), ScheduleEntry("night", "1-5 20:00-08:00")],
            ZoneInfo("Europe/Paris"),
        )
    with pytest.raises(ValueError, match=r"prewake .* is negative"):
        Schedule(
            [ScheduleEntry("day", "08:00-20:00", prewake=timedelta(seconds=-1))],
            ZoneInfo("Europe/Paris"),
        )


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "days", "starts", "length"),
    [
        ("mon-fri 08:00-20:00", {0, 1, 2, 3, 4}, (480,), 720),
        ("sat,sun 10:00-16:00", {5, 6}, (600,), 360),
        ("22:00-06:00", set(range(7)), (1320,), 480),
        ("  Fri-Mon 22:00-06:00 ", {4, 5, 6, 0}, (1320,), 480),
        ("monday,wed-thu 8:00-9:30", {0, 2, 3}, (480,), 90),
        ("sat,sun 00:00-24:00", {5, 6}, (0,), 1440),
        ("daily 00:00-00:01", set(range(7)), (0,), 1),
        ("cron: 0 8 * * mon-fri for 12h", {0, 1, 2, 3, 4}, (480,), 720),
        ("cron 30 22 * * sun for 1h30m", {6}, (1350,), 90),
        ("CRON: 0,30 9-10 ? * * for 10m", set(range(7)), (540, 570, 600, 630), 10),
        ("cron: */20 0 * * sat for 2d", {5}, (0, 20, 40), 2880),
        ("cron: 5-15/5 1 * * tue for 7d", {1}, (65, 70, 75), 7 * 1440),
    ],
)
def test_parse_good(text: str, days: set[int], starts: tuple[int, ...], length: int) -> None:
    window = parse_when(text)
    assert (set(window.days), window.starts, window.length) == (days, starts, length)
    assert not window.otherwise


def test_parse_otherwise() -> None:
    assert parse_when(" Otherwise ").otherwise


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("mon-fri", "not a time range"),
        ("mon-fri 8-20", "not a time range: write HH:MM-HH:MM"),
        ("mon-fri 08:00 - 20:00", "no spaces inside"),
        ("08:00-08:00", "for a whole day write 00:00-24:00"),
        ("24:00-06:00", "times go from 00:00 to 23:59"),
        ("08:00-24:30", "or 24:00 as an end"),
        ("08:60-09:00", "not a time of day"),
        ("mondy 08:00-20:00", "'mondy' .* is not a weekday; use mon, tue"),
        ("1-5 08:00-20:00", "weekday '1' .* is a number; write a name .*0 and 7 mean Sunday"),
        ("sat,,sun 10:00-16:00", "empty weekday"),
        ("cron: 0 8 * * 1-5 for 12h", "weekday '1' .* is a number"),
        ("cron: 0 8 * * 0 for 12h", "weekday '0' .* is a number"),
        ("cron: 0 8 * * mon-fri", "not how long it lasts: add a length after 'for'"),
        ("cron: 0 8 * mon-fri for 12h", "has 4 cron field"),
        ("cron: 0 0 8 * * mon for 1h", "has 6 cron field"),
        ("cron: 0 8 1 * mon for 1h", "day-of-month field .* write '\\*' there"),
        ("cron: 0 8 * 6 mon for 1h", "month field"),
        ("cron: 0 8 * * */2 for 1h", "weekday field .* has a step"),
        ("cron: 60 8 * * mon for 1h", "'60' in the minute field .* numbers 0-59"),
        ("cron: 0 24 * * mon for 1h", "'24' in the hour field .* numbers 0-23"),
        ("cron: 0 17-9 * * mon for 1h", "runs backwards"),
        ("cron: */0 8 * * mon for 1h", "step '0'"),
        ("cron: 0 8 * * mon for 12", "'12' .* is not a length; write .* 30m, 12h"),
        ("cron: 0 8 * * mon for 30s", "not a length"),
        ("cron: 0 8 * * mon for 0m", "lasts no time"),
        ("cron: 0 8 * * mon for 8d", "longer than a week"),
        ("cron: 0 8 * * mon for 1h 30m", "one length after 'for'"),
    ],
)
def test_parse_bad(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_when(text)
