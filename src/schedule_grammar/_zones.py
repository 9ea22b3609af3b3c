"""Time-zone lookup and the DST resolution of local wall-clock times."""

from __future__ import annotations

import bisect
import difflib
import functools
import re
import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo

from ._errors import ScheduleError

_SECOND = timedelta(seconds=1)


@functools.cache
def _zone_names() -> dict[str, str]:
    # Scanning the zone database costs a few milliseconds; only a name that is not found
    # exactly (wrong case, typo) pays it.
    return {name.lower(): name for name in zoneinfo.available_timezones()}


# What an IANA zone name looks like: 'Europe/Berlin', 'America/Argentina/Buenos_Aires',
# 'Etc/GMT+5', 'EST5EDT'. Anything else is refused before zoneinfo sees it: zoneinfo resolves
# names as package resources, so 'a/a/a/...' recursed and '__init__/x' raised TypeError.
_ZONE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_-]*(?:/[A-Za-z0-9][A-Za-z0-9+_-]*){0,3}")
_MAX_ZONE_LENGTH = 64


@functools.cache
def lookup_zone(name: str) -> tuple[str, tzinfo]:
    """Return the canonical name and tzinfo of an IANA zone name, matched case-insensitively."""
    if not isinstance(name, str):
        raise ScheduleError(
            f"a time zone must be an IANA name such as 'Europe/Berlin', got {name!r}"
        )
    key = name.strip()
    if key.upper() == "UTC":
        # datetime.UTC rather than ZoneInfo("UTC"): cronsim and astimezone take fast paths for it.
        return "UTC", UTC
    if len(key) <= _MAX_ZONE_LENGTH and _ZONE_NAME.fullmatch(key):
        try:
            return key, zoneinfo.ZoneInfo(key)
        except Exception:  # not found, or a name zoneinfo chokes on: look further
            pass
        canonical = _zone_names().get(key.lower())
        if canonical is not None:
            return canonical, zoneinfo.ZoneInfo(canonical)
    message = f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Berlin' or 'UTC'"
    if (close := _closest_zone(key[:_MAX_ZONE_LENGTH])) is not None:
        message += f"; did you mean {close!r}?"
    raise ScheduleError(message) from None


def _closest_zone(key: str) -> str | None:
    """The zone a misspelt name most likely meant: 'Europe/Berlinn' or the city alone, 'Berlin'."""
    known = _zone_names()
    wanted = key.lower().replace(" ", "_")
    close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.75)
    if close:
        return known[close[0]]
    cities = {lower.rpartition("/")[2]: lower for lower in sorted(known) if "/" in lower}
    city = difflib.get_close_matches(wanted, cities, n=1, cutoff=0.8)
    return known[cities[city[0]]] if city else None


def canonical_zone(name: str) -> str:
    """The canonical IANA name of a time zone (matched case-insensitively); ScheduleError if
    there is no such zone, with the closest name."""
    return lookup_zone(name)[0]


def wall_of(instant: datetime, tz: tzinfo) -> datetime:
    """The naive local wall-clock time of an aware instant."""
    return instant.astimezone(tz).replace(tzinfo=None, fold=0)


def is_ambiguous(wall: datetime, tz: tzinfo) -> bool:
    """True when a naive wall time occurs twice in `tz` (the repeated hour of a fall-back)."""
    first = wall.replace(tzinfo=tz, fold=0)
    return first.utcoffset() != wall.replace(tzinfo=tz, fold=1).utcoffset() and (
        wall_of(first, tz) == wall
    )


def resolve_wall(
    wall: datetime, tz: tzinfo, *, gap: str = "shift", repeat: str = "first"
) -> datetime | None:
    """Turn a naive local wall time into an aware UTC instant under a DST policy.

    The default policy is Debian cron's and cronsim's. A wall time that occurs twice resolves
    to its first occurrence (fold=0; `repeat="last"`: the second, fold=1). A wall time inside
    a spring-forward gap does not exist; it resolves to the first instant after the gap
    (02:30 in a 02:00-03:00 gap fires at 03:00), or with `gap="skip"` to None: no fire.
    """
    if tz is UTC:
        return wall.replace(tzinfo=UTC, fold=0)
    instant = wall.replace(tzinfo=tz, fold=1 if repeat == "last" else 0).astimezone(UTC)
    if wall_of(instant, tz) == wall.replace(fold=0):
        return instant
    return _gap_end(wall, tz) if gap == "shift" else None


def _gap_end(wall: datetime, tz: tzinfo) -> datetime:
    """The first instant after the gap that contains `wall` (a wall time that does not exist)."""
    # For a wall time in a gap, zoneinfo applies the offset from before the transition with
    # fold=0 and the one from after it with fold=1, so the transition lies between the two
    # readings. Bisect on whole seconds: gaps last from minutes (Lord Howe) to a day (Apia).
    readings = [wall.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1)]
    lo, hi = int(min(readings).timestamp()), int(max(readings).timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wall_of(datetime.fromtimestamp(mid, UTC), tz) > wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def gap_ending_at(instant: datetime, tz: tzinfo) -> tuple[datetime, datetime] | None:
    """If a spring-forward gap ends exactly at `instant`, its (start, end) naive wall times."""
    if tz is UTC:
        return None
    before = (instant - _SECOND).astimezone(tz)
    at = instant.astimezone(tz)
    before_offset, at_offset = before.utcoffset(), at.utcoffset()
    if before_offset is None or at_offset is None or at_offset <= before_offset:
        return None
    start = before.replace(tzinfo=None, fold=0) + _SECOND
    return start, at.replace(tzinfo=None, fold=0)


_HOUR = timedelta(hours=1)


@functools.lru_cache(maxsize=1024)
def transitions_in_year(tz: tzinfo, year: int) -> tuple[datetime, ...]:
    """The instants in UTC year `year` at which `tz`'s UTC offset changes, to the second.

    Found by sampling every hour and bisecting each change, so two changes less than an hour
    apart that cancel out are not seen (tzdata has none since 1970). Cached per zone and year.
    """
    if tz is UTC or not 1 <= year <= 9998:
        return ()
    found = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    offset = t.astimezone(tz).utcoffset()
    while t < end:
        following = t + _HOUR
        changed = following.astimezone(tz).utcoffset()
        if changed != offset:
            lo, hi = int(t.timestamp()), int(following.timestamp())
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if datetime.fromtimestamp(mid, UTC).astimezone(tz).utcoffset() == offset:
                    lo = mid
                else:
                    hi = mid
            found.append(datetime.fromtimestamp(hi, UTC))
            offset = changed
        t = following
    return tuple(found)


def next_transition(tz: tzinfo, after: datetime, until: datetime) -> datetime | None:
    """The first instant in (after, until] at which `tz`'s UTC offset changes, if any."""
    for year in range(after.year, min(until.year, 9998) + 1):
        changes = transitions_in_year(tz, year)
        index = bisect.bisect_right(changes, after)
        if index < len(changes):
            return changes[index] if changes[index] <= until else None
    return None
