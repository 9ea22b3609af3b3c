"""The next N fires of a schedule, with the ones DST moved or doubled explained."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from ._schedules import Schedule, _WallSequence, iter_fires
from ._zones import gap_ending_at, is_ambiguous, lookup_zone, transitions_in_year, wall_of

_SECOND = timedelta(seconds=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fire:
    """One upcoming fire: the instant in UTC, the same in the schedule's zone, and a DST note."""

    at: datetime
    local: datetime
    dst_note: str | None = None

    @property
    def dst_affected(self) -> bool:
        """True when a DST transition moved this fire or made its wall time ambiguous."""
        return self.dst_note is not None


def next_fires(schedule: Schedule, after: datetime, count: int = 5) -> list[Fire]:
    """The next `count` fires strictly after the aware `after`, each with its DST note if any."""
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count!r}")
    return [
        Fire(
            at=instant,
            local=instant.astimezone(schedule.tzinfo),
            dst_note=dst_note(schedule, instant),
        )
        for instant in itertools.islice(iter_fires(schedule, after), count)
    ]


def _format_offset(local: datetime) -> str:
    delta = local.utcoffset()
    minutes = int(delta.total_seconds()) // 60 if delta is not None else 0
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def dst_note(schedule: Schedule, instant: datetime) -> str | None:
    """Why DST affects the fire at `instant`, in words for an operator; None when it does not."""
    tz, zone = schedule.tzinfo, schedule.timezone
    if tz is UTC or not schedule.wall_clock:
        return None
    gap = gap_ending_at(instant, tz)
    if gap is not None:
        nominal = schedule.nominal_in(*gap)
        if nominal is not None:
            return (
                f"{nominal:%H:%M} does not exist on {nominal:%Y-%m-%d} in {zone}; "
                f"fires at {gap[1]:%H:%M} (dst_gap=shift)"
            )
    wall = wall_of(instant, tz)
    if is_ambiguous(wall, tz):
        local = instant.astimezone(tz)
        copy = "second" if local.fold else "first"
        offset = _format_offset(local)
        if not schedule.dst_policy_applies:
            rule = f"fires in both copies; this is the {copy} (UTC{offset})"
        elif schedule.dst_repeat == "both":
            rule = f"fires twice; this is the {copy} (UTC{offset}) (dst_repeat=both)"
        else:
            rule = f"fires once, at the {copy} (UTC{offset}) (dst_repeat={schedule.dst_repeat})"
        return f"{wall:%H:%M} occurs twice on {wall:%Y-%m-%d} in {zone}; {rule}"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class DstWarning:
    """A DST transition ahead that moves, skips or doubles some of a schedule's fires."""

    transition: datetime  # the instant the clocks change, UTC
    message: str


def dst_warnings(schedule: Schedule, after: datetime, days: int = 365) -> list[DstWarning]:
    """Every DST effect on `schedule` in the `days` after `after`, in words for an operator."""
    tz = schedule.tzinfo
    if tz is UTC or not isinstance(schedule, _WallSequence):
        return []
    start = after.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    warnings = []
    for transition in _transitions(schedule.timezone, start.date(), days):
        if not after < transition <= after + timedelta(days=days):
            continue
        before = (transition - _SECOND).astimezone(tz)
        at = transition.astimezone(tz)
        last_wall = before.replace(tzinfo=None, fold=0) + _SECOND
        first_wall = at.replace(tzinfo=None, fold=0)
        gap = first_wall > last_wall  # clocks go forward: [last_wall, first_wall) is missing
        low, high = (last_wall, first_wall) if gap else (first_wall, last_wall)
        names = _nominals(schedule, low, high)
        if not names:
            continue
        times = ", ".join(f"{n:%H:%M}" for n in names)
        day = f"{names[0]:%Y-%m-%d}"
        if gap:
            verb = "do not exist" if len(names) > 1 else "does not exist"
            if not schedule.dst_policy_applies:
                rule = "those fires are skipped"
            elif schedule.dst_gap == "shift":
                rule = f"fires at {first_wall:%H:%M} (dst_gap=shift)"
            else:
                rule = "does not fire that day (dst_gap=skip)"
        else:
            verb = "occur twice" if len(names) > 1 else "occurs twice"
            first, second = _format_offset(before), _format_offset(at)
            if not schedule.dst_policy_applies:
                rule = "fires in both copies"
            elif schedule.dst_repeat == "first":
                rule = f"fires once, at the first (UTC{first}) (dst_repeat=first)"
            elif schedule.dst_repeat == "last":
                rule = f"fires once, at the second (UTC{second}) (dst_repeat=last)"
            else:
                rule = f"fires twice, at UTC{first} and UTC{second} (dst_repeat=both)"
        message = f"{times} {verb} on {day} in {schedule.timezone}; {rule}"
        warnings.append(DstWarning(transition=transition, message=message))
    return warnings


def _nominals(schedule: _WallSequence, low: datetime, high: datetime) -> list[datetime]:
    """The schedule's nominal wall times in [low, high)."""
    found: list[datetime] = []
    current = low - timedelta(microseconds=1)
    while (nominal := schedule.next_nominal(current)) is not None and nominal < high:
        found.append(nominal)
        current = nominal
    return found


def _transitions(zone: str, start: date, days: int) -> tuple[datetime, ...]:
    """Instants in [start, start + days + 1 day) where the zone's UTC offset changes."""
    tz = lookup_zone(zone)[1]
    begin = datetime.combine(start, datetime.min.time(), tzinfo=UTC)
    end = begin + timedelta(days=days + 1)
    return tuple(
        change
        for year in range(begin.year, min(end.year, 9998) + 1)
        for change in transitions_in_year(tz, year)
        if begin <= change < end
    )
