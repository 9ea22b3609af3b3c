"""The cronclock schedule language: text in, next fire times out. No I/O, no clock reads."""

from ._errors import ScheduleError
from ._fires import DstWarning, Fire, dst_note, dst_warnings, next_fires
from ._parser import parse, seconds_to_schedule
from ._schedules import Cron, Interval, Once, Schedule, WallClock, iter_fires
from ._zones import canonical_zone

__all__ = [
    "Cron",
    "DstWarning",
    "Fire",
    "Interval",
    "Once",
    "Schedule",
    "ScheduleError",
    "WallClock",
    "canonical_zone",
    "dst_note",
    "dst_warnings",
    "iter_fires",
    "next_fires",
    "parse",
    "seconds_to_schedule",
]
