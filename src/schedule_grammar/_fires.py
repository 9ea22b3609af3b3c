"""The next N fires of a schedule, with the ones DST moved or doubled explained."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime

from ._schedules import Cron, Schedule, iter_fires
from ._zones import gap_ending_at, is_ambiguous, wall_of


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
                f"{nominal:%H:%M} does not exist on {nominal:%Y-%m-%d} in {zone} (clocks go "
                f"forward at {gap[0]:%H:%M}); fires at {gap[1]:%H:%M}"
            )
    wall = wall_of(instant, tz)
    if is_ambiguous(wall, tz):
        local = instant.astimezone(tz)
        copy = "second" if local.fold else "first"
        offset = _format_offset(local)
        if isinstance(schedule, Cron) and not schedule.wall_clock_times:
            rule = f"fires in both copies; this is the {copy} (UTC{offset})"
        else:
            rule = f"fires once, at the first (UTC{offset})"
        return f"{wall:%H:%M} occurs twice on {wall:%Y-%m-%d} in {zone} (clocks go back); {rule}"
    return None
