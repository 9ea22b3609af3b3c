"""Schedule text -> Schedule. Case-insensitive, tolerant of extra white space."""

from __future__ import annotations

import difflib
import re
from dataclasses import replace
from datetime import datetime, time

from cronsim import CronSimError

from ._errors import ScheduleError
from ._schedules import (
    CRON_ALIASES,
    WEEKDAY_NAMES,
    Cron,
    Interval,
    Once,
    Schedule,
    WallClock,
    format_duration,
)
from ._zones import lookup_zone

ACCEPTED = (
    "expected one of: 'every 15m' (s, m, h, d; optional 'offset 3m'), 'daily 03:00', "
    "'weekly mon,thu 10:00' (or 'mon 10:00'), 'monthly 1,15,last 09:00', "
    "'cron */5 * * * *' (5 fields, or 6 with seconds first), '@hourly', '@daily', '@weekly', "
    "'@monthly', '@yearly', 'at 2026-12-01T09:00'; any of them may end in 'in <IANA zone>' "
    "and wall-clock forms in 'dst=<shift|skip>,<first|last|both>'"
)

_UNIT_SECONDS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3_600),
    **dict.fromkeys(("d", "day", "days"), 86_400),
}
_DAY_NAMES = {
    **{name: index for index, name in enumerate(WEEKDAY_NAMES)},
    **{
        name: index
        for index, name in enumerate(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        )
    },
}
_KEYWORDS = ("every", "daily", "weekly", "monthly", "cron", "at", *WEEKDAY_NAMES, *CRON_ALIASES)

_ZONE_SUFFIX = re.compile(r"(?P<body>.+?) in (?P<zone>\S+)", re.IGNORECASE)
_DST_SUFFIX = re.compile(r"(?P<body>.+?) dst=(?P<dst>\S*)", re.IGNORECASE)
_ASCII_DIGITS = frozenset("0123456789")
# At most 12 digits: a century in seconds has 10; a longer number is a typo (and Python's
# int() refuses more than 4,300 digits with a ValueError of its own).
_DURATION = re.compile(r"([0-9]{1,12}) ?([a-z]+)")
_EVERY = re.compile(r"every (?P<every>[0-9]+ ?[a-z]+)(?: offset (?P<offset>[0-9]+ ?[a-z]+))?")
_TIME = re.compile(r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?")
_CRON_FIELD = re.compile(r"[0-9a-z*/,?#-]+")
_MAX_SECONDS = 366 * 86_400 * 100  # a century: anything longer is a typo, not a cadence


class _Invalid(Exception):
    """Internal: a reason, turned into a ScheduleError that also quotes the whole text."""


def parse(
    text: str, *, timezone: str = "UTC", dst_gap: str = "shift", dst_repeat: str = "first"
) -> Schedule:
    """Parse schedule text into a Schedule.

    `timezone` is the zone for wall-clock forms unless the text ends in `in <zone>`.
    `dst_gap` and `dst_repeat` are the DST policy for forms that name wall-clock times, unless
    the text ends in `dst=...`; forms in absolute time ignore them.
    Raises ScheduleError, quoting the text and saying what is accepted.
    """
    if not isinstance(text, str):
        raise ScheduleError(f"a schedule must be text, got {text!r}; {ACCEPTED}")
    normal = re.sub(r"\s*,\s*", ",", " ".join(text.split()))
    if not normal:
        raise ScheduleError(f"empty schedule {text!r}; {ACCEPTED}")
    zone: str | None = None
    policy: str | None = None
    try:
        if digit := next((c for c in normal if c.isdigit() and c not in _ASCII_DIGITS), None):
            raise _Invalid(f"{digit!r} is not an ASCII digit; write numbers with digits 0-9")
        while True:  # `in <zone>` and `dst=...` in either order, each at most once
            if dst := _DST_SUFFIX.fullmatch(normal):
                if policy is not None:
                    raise _Invalid("more than one dst=...; write one, e.g. dst=skip,both")
                normal, policy = dst["body"], dst["dst"]
            elif suffix := _ZONE_SUFFIX.fullmatch(normal):
                if zone is not None:
                    raise _Invalid("more than one time zone ('in <zone>'); write one")
                normal, zone = suffix["body"], suffix["zone"]
            else:
                break
        zone = lookup_zone(timezone if zone is None else zone)[0]
        schedule = _parse_body(normal, zone)
        if policy is not None:
            gap, repeat = _parse_dst(policy)
            return replace(schedule, dst_gap=gap, dst_repeat=repeat)  # type: ignore[arg-type]
        if schedule.dst_policy_applies and (dst_gap, dst_repeat) != ("shift", "first"):
            return replace(schedule, dst_gap=dst_gap, dst_repeat=dst_repeat)  # type: ignore[arg-type]
        return schedule
    except (_Invalid, ScheduleError) as error:
        raise ScheduleError(f"invalid schedule {text!r}: {error}") from None
    except (ValueError, OverflowError, RecursionError) as error:  # from a library: still ours
        raise ScheduleError(f"invalid schedule {text!r}: {type(error).__name__}: {error}") from None


def _parse_dst(text: str) -> tuple[str, str]:
    gap, repeat = "shift", "first"
    for item in text.lower().split(","):
        if item in ("shift", "skip"):
            gap = item
        elif item in ("first", "last", "both"):
            repeat = item
        else:
            raise _Invalid(
                f"dst={text!r}: {item!r} is not a DST policy; write shift or skip (a time that "
                "does not exist) and/or first, last or both (a time that occurs twice), "
                "e.g. dst=skip,both"
            )
    return gap, repeat


def _parse_body(body: str, zone: str) -> Schedule:
    lower = body.lower()
    head, _, rest = lower.partition(" ")
    if head == "every":
        return _parse_every(lower, zone)
    if head in ("daily", "weekly", "monthly"):
        return _parse_wall_clock(head, rest, zone)
    if head.split(",")[0].split("-")[0] in _DAY_NAMES:
        return _parse_wall_clock("weekly", lower, zone)
    if head == "cron":
        return _parse_cron(rest, zone)
    if head in CRON_ALIASES:
        return _parse_cron(lower, zone)
    if head == "at":
        return _parse_at(body.partition(" ")[2], zone)
    raise _Invalid(_unknown_form(head, lower))


def _unknown_form(head: str, body: str) -> str:
    message = f"unknown form {head!r}"
    fields = body.split(" ")
    if _DURATION.fullmatch(head):
        message += f"; did you mean 'every {head}'?"
    elif len(fields) in (5, 6) and all(_CRON_FIELD.fullmatch(f) for f in fields):
        message += f"; did you mean 'cron {body}'?"
    else:
        close = difflib.get_close_matches(head, _KEYWORDS, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return f"{message}; {ACCEPTED}"


def _duration(text: str, what: str) -> int:
    match = _DURATION.fullmatch(text)
    unit = match and _UNIT_SECONDS.get(match[2])
    if not match or unit is None:
        raise _Invalid(
            f"{what} {text!r} is not a duration; write a whole number and a unit "
            "s, m, h or d, as in '15m'"
        )
    seconds = int(match[1]) * unit
    if seconds > _MAX_SECONDS:
        raise _Invalid(f"{what} {text!r} is longer than a century")
    return seconds


def _parse_every(lower: str, zone: str) -> Interval:
    match = _EVERY.fullmatch(lower)
    if not match:
        raise _Invalid(
            "'every' takes a whole number and a unit (s, m, h, d) and an optional offset, "
            "as in 'every 15m' or 'every 15m offset 3m'"
        )
    seconds = _duration(match["every"], "interval")
    if seconds == 0:
        raise _Invalid("the interval must be longer than 0")
    offset = _duration(match["offset"], "offset") if match["offset"] else 0
    if offset >= seconds:
        raise _Invalid(
            f"offset {format_duration(offset)!r} must be shorter than the interval "
            f"{format_duration(seconds)!r}"
        )
    return Interval(seconds=seconds, offset=offset, timezone=zone)


def _parse_times(text: str) -> tuple[time, ...]:
    times = []
    for item in text.split(","):
        match = _TIME.fullmatch(item)
        if not match:
            raise _Invalid(f"{item!r} is not a time of day; write HH:MM or HH:MM:SS, as in 03:00")
        hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise _Invalid(f"{item!r} is not a time of day: hours 0-23, minutes 0-59")
        times.append(time(hour, minute, second))
    return tuple(times)


def _expand(item: str, lookup: dict[str, int], size: int, what: str) -> list[int]:
    """One list item: a single value or a range `a-b` (wrapping for weekdays)."""
    first, dash, last = item.partition("-")
    if first not in lookup or (dash and last not in lookup):
        raise _Invalid(what)
    start, end = lookup[first], lookup[last] if dash else lookup[first]
    if end < start and size == 0:
        raise _Invalid(f"range {item!r} runs backwards")
    span = (end - start) % size if size else end - start
    return [(start + step) % size if size else start + step for step in range(span + 1)]


def _parse_wall_clock(kind: str, rest: str, zone: str) -> WallClock:
    days, _, times_text = rest.partition(" ")
    if kind == "daily":
        if not rest or " " in rest:
            raise _Invalid(
                "'daily' takes one or more times, as in 'daily 03:00' or 'daily 07:00,13:00'"
            )
        return WallClock(kind="daily", times=_parse_times(rest), timezone=zone)
    if not times_text or " " in times_text:
        example = "'weekly mon,thu 10:00'" if kind == "weekly" else "'monthly 1,15 09:00'"
        raise _Invalid(f"{kind!r} takes days then times, as in {example}")
    if kind == "weekly":
        weekdays: list[int] = []
        for item in days.split(","):
            weekdays += _expand(
                item,
                _DAY_NAMES,
                7,
                f"{item!r} is not a day of the week; use mon, tue, wed, thu, fri, sat, sun "
                "or a range such as mon-fri",
            )
        return WallClock(
            kind="weekly", weekdays=tuple(weekdays), times=_parse_times(times_text), timezone=zone
        )
    monthdays: list[int] = []
    last_day = False
    numbers = {str(n): n for n in range(1, 32)}
    for item in days.split(","):
        if item == "last":
            last_day = True
            continue
        monthdays += _expand(
            item,
            numbers,
            0,
            f"{item!r} is not a day of the month; use 1-31, a range such as 1-7, or 'last'",
        )
    return WallClock(
        kind="monthly",
        monthdays=tuple(monthdays),
        last_day=last_day,
        times=_parse_times(times_text),
        timezone=zone,
    )


def _parse_cron(rest: str, zone: str) -> Cron:
    expression = rest.strip()
    if expression in CRON_ALIASES:
        return Cron(expression=expression, timezone=zone)
    if expression.startswith("@"):
        raise _Invalid(f"unknown cron alias {expression!r}; use one of {', '.join(CRON_ALIASES)}")
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise _Invalid(
            f"cron takes 5 fields (minute hour day-of-month month day-of-week) or 6 with "
            f"seconds first; got {len(fields)} in {expression!r}"
        )
    if long := re.search(r"[0-9]{5,}", expression):  # no cron field holds 5 digits
        raise _Invalid(f"invalid cron expression {expression!r}: {long[0][:12]!r} is out of range")
    try:
        return Cron(expression=expression, timezone=zone)  # cronsim parses the fields
    except (CronSimError, ValueError) as error:
        if isinstance(error, ScheduleError):
            raise
        raise _Invalid(f"invalid cron expression {expression!r}: {error}") from None


def _parse_at(text: str, zone: str) -> Once:
    accepted = (
        "'at' takes an ISO date and time, as in 'at 2026-12-01T09:00' or "
        f"'at 2026-12-01T09:00+08:00'; got {text!r}"
    )
    if "T" not in text.upper() and " " not in text:
        raise _Invalid(accepted)  # a bare date: midnight is rarely what was meant
    try:
        when = datetime.fromisoformat(text.upper())
    except ValueError:
        raise _Invalid(accepted) from None
    return Once(when=when, timezone=zone)


def seconds_to_schedule(seconds: int) -> str:
    """The shortest exact schedule text for a legacy cadence in seconds: 900 -> 'every 15m'."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        raise ScheduleError(f"a cadence must be a whole number of seconds above 0, got {seconds!r}")
    if seconds > _MAX_SECONDS:
        raise ScheduleError(f"a cadence of {seconds!r} seconds is longer than a century")
    return f"every {format_duration(seconds)}"
