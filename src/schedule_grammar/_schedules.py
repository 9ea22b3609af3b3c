"""Schedule value types. Each answers one question: when is the next fire after `dt`?"""

from __future__ import annotations

import bisect
import calendar
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import ClassVar, Literal

from cronsim import CronSim

from ._errors import ScheduleError
from ._zones import lookup_zone, next_transition, resolve_wall, wall_of

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SECOND = timedelta(seconds=1)
_LAST_SECOND = datetime(9999, 12, 31, 23, 59, 59)
_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
# How far back a `dst_repeat="last"` walk looks: longer than any repeated period on record.
_REPEAT_LOOKBACK = timedelta(hours=25)
# Every search for a next fire gives up after this many candidates with a ScheduleError, so
# no evaluator bug (a cron walk that cycles, say) can freeze the daemon's loop or a request.
# Real schedules need far fewer: the longest skip is a repeated hour of 6-field cron seconds.
MAX_STEPS = 100_000


def _stuck(schedule: Schedule, dt: datetime) -> ScheduleError:
    return ScheduleError(
        f"{schedule.describe()!r}: no next fire found after {dt.isoformat()} within "
        f"{MAX_STEPS:,} steps; the evaluator does not advance for this schedule (please "
        "report it); write it another way meanwhile"
    )


DstGap = Literal["shift", "skip"]
DstRepeat = Literal["first", "last", "both"]
WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def format_duration(seconds: int) -> str:
    """The shortest exact rendering of whole seconds in one unit: 900 -> '15m', 90 -> '90s'."""
    for suffix, size in _UNITS:
        if seconds % size == 0:
            return f"{seconds // size}{suffix}"
    raise AssertionError("unreachable: every whole number is a multiple of 1s")


def _require_aware(dt: datetime) -> None:
    if not isinstance(dt, datetime):
        raise ScheduleError(f"next_after() needs an aware datetime, got {dt!r}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ScheduleError(
            f"next_after() needs an aware datetime, got naive {dt.isoformat()!r}; "
            "attach a zone, e.g. dt.replace(tzinfo=datetime.UTC)"
        )


def _format_time(t: time) -> str:
    return t.strftime("%H:%M:%S" if t.second else "%H:%M")


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule(ABC):
    """A parsed schedule: `next_after(dt)` gives the next fire strictly after `dt`.

    Build one with `parse()`; `str(schedule)` (or `describe()`) is its canonical text,
    which parses back to an equal schedule.
    """

    timezone: str = "UTC"
    tzinfo: tzinfo = field(init=False, repr=False, compare=False)
    # DST policy for wall-clock times: one that does not exist (spring forward) is shifted to
    # the end of the gap or skipped; one that occurs twice (fall back) fires at the first, the
    # last or both occurrences.
    dst_gap: DstGap = "shift"
    dst_repeat: DstRepeat = "first"

    # True when the schedule names local wall-clock times, so DST can move its fires.
    wall_clock: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name, tz = lookup_zone(self.timezone)
        object.__setattr__(self, "timezone", name)
        object.__setattr__(self, "tzinfo", tz)
        if self.dst_gap not in ("shift", "skip"):
            raise ScheduleError(f"dst_gap must be 'shift' or 'skip', got {self.dst_gap!r}")
        if self.dst_repeat not in ("first", "last", "both"):
            raise ScheduleError(
                f"dst_repeat must be 'first', 'last' or 'both', got {self.dst_repeat!r}"
            )

    @property
    def dst_policy_applies(self) -> bool:
        """True when the schedule names wall-clock times that DST can move or double."""
        return self.wall_clock

    def _check_dst_policy(self, why: str) -> None:
        if (self.dst_gap, self.dst_repeat) != ("shift", "first"):
            raise ScheduleError(f"{why}, so a DST policy (dst=...) does not apply to it")

    def _dst_suffix(self) -> str:
        parts = [p for p, default in ((self.dst_gap, "shift"), (self.dst_repeat, "first"))
                 if p != default]  # fmt: skip
        return f" dst={','.join(parts)}" if parts else ""

    @abstractmethod
    def next_after(self, dt: datetime) -> datetime | None:
        """The next fire strictly after the aware `dt`, as an aware UTC datetime.

        None when the schedule will not fire again (a one-time schedule that has passed).
        Raises ScheduleError for a naive `dt`.
        """

    @abstractmethod
    def describe(self) -> str:
        """The canonical text of this schedule."""

    def nominal_in(self, start: datetime, end: datetime) -> datetime | None:
        """The first naive wall time in [start, end) this schedule names, if it names any.

        Used to explain DST effects; forms that do not name wall-clock times return None.
        """
        return None

    def _zone_suffix(self) -> str:
        return "" if self.timezone == "UTC" else f" in {self.timezone}"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True, slots=True, kw_only=True)
class Interval(Schedule):
    """`every 15m [offset 3m]`: a fixed grid on the UTC epoch, unaffected by time zones."""

    seconds: int
    offset: int = 0

    def __post_init__(self) -> None:
        Schedule.__post_init__(self)
        self._check_dst_policy("an 'every' schedule runs in absolute time")
        if self.seconds <= 0:
            raise ScheduleError(f"interval must be positive, got {self.seconds!r} seconds")
        if not 0 <= self.offset < self.seconds:
            raise ScheduleError(
                f"offset {format_duration(self.offset)!r} must be shorter than the interval "
                f"{format_duration(self.seconds)!r}"
            )

    def next_after(self, dt: datetime) -> datetime | None:
        _require_aware(dt)
        # Integer microseconds keep the grid exact far from the epoch.
        period, offset = self.seconds * 1_000_000, self.offset * 1_000_000
        elapsed = (dt - _EPOCH) // _MICROSECOND
        steps = (elapsed - offset) // period + 1
        try:
            return _EPOCH + timedelta(microseconds=steps * period + offset)
        except OverflowError:  # after year 9999: there is none
            return None

    def describe(self) -> str:
        text = f"every {format_duration(self.seconds)}"
        if self.offset:
            text += f" offset {format_duration(self.offset)}"
        # The zone does not move an interval's fires, but it is part of the schedule (local
        # times are shown in it), so the canonical text keeps it and parses back equal.
        return text + self._zone_suffix()


@dataclass(frozen=True, slots=True, kw_only=True)
class _WallSequence(Schedule, ABC):
    """A schedule defined by a sequence of naive local wall times, resolved under the DST policy."""

    wall_clock: ClassVar[bool] = True

    @abstractmethod
    def next_nominal(self, wall: datetime) -> datetime | None:
        """The first naive wall time of the schedule strictly after the naive `wall`."""

    def next_after(self, dt: datetime) -> datetime | None:
        _require_aware(dt)
        try:
            if self.dst_repeat != "both":
                return self._walk(dt, self.dst_repeat)
            # Both copies: the first copies and the second copies each come in order, but not
            # interleaved (01:30 second copy follows 01:45 first copy); take the earlier.
            fires = [f for f in (self._walk(dt, "first"), self._walk(dt, "last")) if f]
            return min(fires, default=None)
        except OverflowError:  # the next fire would be after year 9999: there is none
            return None

    def _walk(self, dt: datetime, repeat: str) -> datetime | None:
        """The first nominal time after `dt`'s wall time whose instant is after `dt`."""
        wall = wall_of(dt, self.tzinfo)
        if repeat == "last":
            # A wall time behind `dt`'s may still have its second copy ahead of `dt`.
            wall -= _REPEAT_LOOKBACK
        for _ in range(MAX_STEPS):
            nominal = self.next_nominal(wall)
            if nominal is None:
                return None
            instant = resolve_wall(nominal, self.tzinfo, gap=self.dst_gap, repeat=repeat)
            # In the second copy of a repeated hour the wall clock is behind instants already
            # fired (first occurrence), so keep walking until the fire is really after `dt`.
            if instant is not None and instant > dt:
                return instant
            if nominal <= wall:
                raise _stuck(self, dt)  # a walk that does not move forward never ends
            wall = nominal
        raise _stuck(self, dt)

    def nominal_in(self, start: datetime, end: datetime) -> datetime | None:
        nominal = self.next_nominal(start - _MICROSECOND)
        return nominal if nominal is not None and nominal < end else None


@dataclass(frozen=True, slots=True, kw_only=True)
class WallClock(_WallSequence):
    """`daily`, `weekly` and `monthly` schedules: local times on matching days."""

    kind: Literal["daily", "weekly", "monthly"]
    times: tuple[time, ...]
    weekdays: tuple[int, ...] = ()  # 0 = Monday, for weekly
    monthdays: tuple[int, ...] = ()  # 1..31, for monthly; a day a month lacks is skipped
    last_day: bool = False  # monthly: also the month's last day

    def __post_init__(self) -> None:
        _WallSequence.__post_init__(self)
        if not self.times:
            raise ScheduleError(f"{self.kind} schedule needs at least one time of day")
        object.__setattr__(self, "times", tuple(sorted(set(self.times))))
        object.__setattr__(self, "weekdays", tuple(sorted(set(self.weekdays))))
        object.__setattr__(self, "monthdays", tuple(sorted(set(self.monthdays))))
        if self.kind == "weekly" and not self.weekdays:
            raise ScheduleError("weekly schedule needs at least one day of the week")
        if self.kind == "monthly" and not (self.monthdays or self.last_day):
            raise ScheduleError("monthly schedule needs at least one day of the month")
        if any(not 1 <= day <= 31 for day in self.monthdays):
            raise ScheduleError(f"days of the month must be 1..31, got {self.monthdays!r}")

    def next_nominal(self, wall: datetime) -> datetime | None:
        day, now = wall.date(), wall.time()
        if self._matches(day):
            index = bisect.bisect_right(self.times, now)  # thousands of times stay cheap
            if index < len(self.times):
                return datetime.combine(day, self.times[index])
        return datetime.combine(self._next_day(day), self.times[0])

    def _matches(self, day: date) -> bool:
        if self.kind == "daily":
            return True
        if self.kind == "weekly":
            return day.weekday() in self.weekdays
        return day.day in self._month_days(day.year, day.month)

    def _month_days(self, year: int, month: int) -> list[int]:
        length = calendar.monthrange(year, month)[1]
        days = [d for d in self.monthdays if d <= length]
        if self.last_day and length not in days:
            days.append(length)
        return days

    def _next_day(self, day: date) -> date:
        """The first matching day strictly after `day`."""
        if self.kind == "daily":
            return day + timedelta(days=1)
        if self.kind == "weekly":
            ahead = min((w - day.weekday() - 1) % 7 for w in self.weekdays) + 1
            return day + timedelta(days=ahead)
        year, month, after = day.year, day.month, day.day
        # Every month has day 1..28 and a last day, and day 29..31 exists in January,
        # so this finds a day within a year.
        for _ in range(13):
            for d in self._month_days(year, month):
                if d > after:
                    return date(year, month, d)
            year, month, after = (year + 1, 1, 0) if month == 12 else (year, month + 1, 0)
        raise AssertionError(f"no matching day within a year for {self.describe()!r}")

    def describe(self) -> str:
        times = ",".join(_format_time(t) for t in self.times)
        if self.kind == "daily":
            text = f"daily {times}"
        elif self.kind == "weekly":
            text = f"weekly {','.join(WEEKDAY_NAMES[w] for w in self.weekdays)} {times}"
        else:
            days = [str(d) for d in self.monthdays] + (["last"] if self.last_day else [])
            text = f"monthly {','.join(days)} {times}"
        return f"{text}{self._zone_suffix()}{self._dst_suffix()}"


CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class CronFields:
    """A cron expression's fields as sets, and the next naive wall time they name.

    cronsim parses the fields and matches days (lists, ranges, steps, names, `L`, `LW`,
    `#`, and Debian cron's day-of-month OR day-of-week rule); the walk is this module's own,
    on the plain calendar a day at a time, so time zones never enter it.
    """

    __slots__ = ("_hours", "_minutes", "_months", "_seconds", "_sim")

    def __init__(self, fields: str) -> None:
        self._sim = CronSim(fields, _EPOCH.replace(tzinfo=None))
        self._seconds = sorted(self._sim.seconds)
        self._minutes = sorted(self._sim.minutes)
        self._hours = sorted(self._sim.hours)
        self._months = frozenset(self._sim.months)

    def _time_from(self, h: int, m: int, s: int) -> time | None:
        """The first time of day at or after h:m:s that the fields name."""
        hours, minutes, seconds = self._hours, self._minutes, self._seconds
        for hour in hours[bisect.bisect_left(hours, h) :]:
            if hour > h:
                return time(hour, minutes[0], seconds[0])
            for minute in minutes[bisect.bisect_left(minutes, m) :]:
                if minute > m:
                    return time(hour, minute, seconds[0])
                index = bisect.bisect_left(seconds, s)
                if index < len(seconds):
                    return time(hour, minute, seconds[index])
        return None

    def next_wall(self, wall: datetime, *, inclusive: bool = False) -> datetime | None:
        """The first naive wall time the fields name after `wall` (or at it, if inclusive);
        None when there is none within 400 years (the Gregorian cycle) or before year 9999."""
        start = wall.replace(microsecond=0)
        if start < wall or not inclusive:  # the next whole second
            if start >= _LAST_SECOND:
                return None
            start += _SECOND
        day = start.date()
        if day.month in self._months and self._sim.match_day(day):
            found = self._time_from(start.hour, start.minute, start.second)
            if found is not None:
                return datetime.combine(day, found)
        first = time(self._hours[0], self._minutes[0], self._seconds[0])
        year, month = day.year, day.month
        for _ in range(400 * 12):
            if month in self._months:
                length = calendar.monthrange(year, month)[1]
                begin = day.day + 1 if (year, month) == (day.year, day.month) else 1
                for number in range(begin, length + 1):
                    candidate = date(year, month, number)
                    if self._sim.match_day(candidate):
                        return datetime.combine(candidate, first)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            if year > 9998:
                return None
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cron(_WallSequence):
    """`cron <5 or 6 fields>` or an `@alias`, in the schedule's zone.

    A 5-field expression with a fixed minute and hour (neither starts with `*`) names
    wall-clock times, resolved under the DST policy like `daily`. Any other expression runs in
    absolute time: it fires at every instant whose local wall time it names, so in both
    copies of a repeated hour and not in a gap (README, "Daylight saving time").
    """

    expression: str  # as canonically written: lower case, single spaces, or an @alias
    fields: str = field(init=False, repr=False, compare=False)
    # Debian cron's and cronsim's rule: a 5-field expression with a fixed minute and hour
    # names wall-clock times, resolved under the DST policy; any other runs in absolute time.
    wall_clock_times: bool = field(init=False, repr=False, compare=False)
    _cron: CronFields = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _WallSequence.__post_init__(self)
        fields = CRON_ALIASES.get(self.expression, self.expression)
        parts = fields.split()
        object.__setattr__(self, "fields", fields)
        object.__setattr__(
            self,
            "wall_clock_times",
            len(parts) == 5 and not parts[0].startswith("*") and not parts[1].startswith("*"),
        )
        object.__setattr__(self, "_cron", CronFields(fields))
        if self._cron.next_wall(datetime(2000, 1, 1)) is None:
            raise ScheduleError(f"cron {self.fields!r} names no time within 400 years")
        if not self.wall_clock_times:
            self._check_dst_policy(
                "a cron with a '*' minute or hour, or 6 fields, runs in absolute time (both "
                "copies of a repeated hour, nothing in a gap)"
            )

    def next_nominal(self, wall: datetime) -> datetime | None:
        return self._cron.next_wall(wall)

    def next_after(self, dt: datetime) -> datetime | None:
        if self.wall_clock_times:
            return _WallSequence.next_after(self, dt)
        _require_aware(dt)
        try:
            return self._absolute_after(dt.astimezone(UTC))
        except OverflowError:  # beyond year 9999: no more fires
            return None

    def _absolute_after(self, dt: datetime) -> datetime | None:
        """Walk the zone's offset segments: inside one the wall clock is the instant plus a
        constant, so the first wall time named in the segment is the first fire in it."""
        tz, current, inclusive = self.tzinfo, dt, False
        for _ in range(MAX_STEPS):
            offset = current.astimezone(tz).utcoffset() or timedelta(0)
            start = current.replace(tzinfo=None) + offset
            wall = self._cron.next_wall(start, inclusive=inclusive)
            if wall is None:
                return None
            instant = (wall - offset).replace(tzinfo=UTC)
            change = None if tz is UTC else next_transition(tz, current, instant)
            if change is None or instant < change:
                return instant
            current, inclusive = change, True
        raise _stuck(self, dt)

    def nominal_in(self, start: datetime, end: datetime) -> datetime | None:
        if not self.wall_clock_times:
            return None  # absolute-time expressions are not moved by DST, only skipped/doubled
        return _WallSequence.nominal_in(self, start, end)

    @property
    def dst_policy_applies(self) -> bool:
        return self.wall_clock_times

    def describe(self) -> str:
        text = self.expression if self.expression.startswith("@") else f"cron {self.expression}"
        return f"{text}{self._zone_suffix()}{self._dst_suffix()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Once(_WallSequence):
    """`at 2026-12-01T09:00`: one fire. A naive time is read in the schedule's zone."""

    when: datetime  # as written: naive (local to `timezone`) or with its own UTC offset

    def __post_init__(self) -> None:
        _WallSequence.__post_init__(self)
        if self.when.tzinfo is not None and self.when.utcoffset() is None:
            raise ScheduleError(f"'at' time has no usable UTC offset: {self.when!r}")
        if self.when.tzinfo is not None:
            self._check_dst_policy("an 'at' time with a UTC offset is one exact instant")

    @property
    def dst_policy_applies(self) -> bool:
        return self.when.tzinfo is None

    def next_nominal(self, wall: datetime) -> datetime | None:
        if self.when.tzinfo is not None:
            return None
        return self.when if self.when > wall else None

    def next_after(self, dt: datetime) -> datetime | None:
        if self.when.tzinfo is None:
            return _WallSequence.next_after(self, dt)
        _require_aware(dt)
        instant = self.when.astimezone(UTC)
        return instant if instant > dt else None

    def nominal_in(self, start: datetime, end: datetime) -> datetime | None:
        if self.when.tzinfo is not None:
            return None
        return _WallSequence.nominal_in(self, start, end)

    def describe(self) -> str:
        written = self.when.isoformat(timespec="seconds" if self.when.second else "minutes")
        if self.when.microsecond:
            written = self.when.isoformat()
        return f"at {written}{self._zone_suffix()}{self._dst_suffix()}"


def iter_fires(schedule: Schedule, after: datetime) -> Iterator[datetime]:
    """Every fire strictly after `after`, in order (endless for recurring schedules)."""
    fire = schedule.next_after(after)
    while fire is not None:
        yield fire
        fire = schedule.next_after(fire)
