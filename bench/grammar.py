"""Throughput of Schedule.next_after per form, beside cronsim on the same expression family.

Run: python bench/grammar.py [--calls N] [--repeats R]
Each measurement walks a schedule forward (next_after of the previous fire), the way the
daemon plans; cronsim is driven the same way (CronSim(expr, dt) then next()), which is what a
scheduler that keeps no iterator state between plans must do. Medians of R repeats.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo

import cronsim

from schedule_grammar import parse

START = datetime(2026, 11, 22, 1, 2, 3, tzinfo=UTC)

# (label, our schedule text, equivalent cron expression, zone)
CASES = [
    ("interval every 15m", "every 15m", "*/15 * * * *", "UTC"),
    ("interval every 30s", "every 30s", "*/30 * * * * *", "UTC"),
    ("daily 03:00", "daily 03:00", "0 3 * * *", "UTC"),
    ("daily 03:00 Berlin", "daily 03:00 in Europe/Berlin", "0 3 * * *", "Europe/Berlin"),
    ("weekly mon,thu", "weekly mon,thu 10:00", "0 10 * * 1,4", "UTC"),
    ("monthly 1,15", "monthly 1,15 09:00", "0 9 1,15 * *", "UTC"),
    ("monthly last Berlin", "monthly last 18:00 in Europe/Berlin", "0 18 L * *", "Europe/Berlin"),
    ("cron */5 (ours)", "cron */5 * * * *", "*/5 * * * *", "UTC"),
    (
        "cron 0 9 * * 1-5 Berlin",
        "cron 0 9 * * 1-5 in Europe/Berlin",
        "0 9 * * 1-5",
        "Europe/Berlin",
    ),
    ("cron */5 Berlin", "cron */5 * * * * in Europe/Berlin", "*/5 * * * *", "Europe/Berlin"),
    ("cron 6 fields Berlin", "cron */30 * * * * * in Europe/Berlin", "*/30 * * * * *",
     "Europe/Berlin"),
    ("cron */15 Lord_Howe", "cron */15 * * * * in Australia/Lord_Howe", "*/15 * * * *",
     "Australia/Lord_Howe"),
    ("cron 0 0 * * 0 Santiago", "cron 0 0 * * 0 in America/Santiago", "0 0 * * 0",
     "America/Santiago"),
]  # fmt: skip

# The slowest single next_after we know of per form: (label, text, instant).
_BERLIN_FALL = datetime(2026, 10, 24, 23, 0, tzinfo=UTC)
WORST = [
    ("interval every 1s", "every 1s", START),
    ("daily, 1,440 times, dst=last, fall-back day",
     "daily " + ",".join(f"{h:02d}:{m:02d}" for h in range(24) for m in range(60))
     + " in Europe/Berlin dst=last", _BERLIN_FALL),
    ("weekly, dst=both, fall-back day", "weekly sun 02:30 in Europe/Berlin dst=both", _BERLIN_FALL),
    ("monthly 31 (skips short months)", "monthly 31 09:00 in Europe/Berlin",
     datetime(2026, 1, 31, 12, tzinfo=UTC)),
    ("cron 0 0 29 2 * (7 years ahead)", "cron 0 0 29 2 *", datetime(2097, 3, 1, tzinfo=UTC)),
    ("cron * * 1 1 * Berlin (a year ahead)", "cron * * 1 1 * in Europe/Berlin",
     datetime(2026, 1, 2, tzinfo=UTC)),
    ("cron */5 3 * * * Chatham (fall back)", "cron */5 3 * * * in Pacific/Chatham",
     datetime(2026, 4, 4, 13, 55, tzinfo=UTC)),
    ("cron */20 0 * * 0 Santiago (midnight gap)", "cron */20 0 * * 0 in America/Santiago",
     datetime(2026, 9, 5, 12, tzinfo=UTC)),
    ("at, passed", "at 2026-01-01T00:00", START),
]  # fmt: skip


def worst_case(text: str, instant: datetime, repeats: int) -> tuple[float, float]:
    """(first call, median of warm calls) in seconds; the first includes building caches."""
    from schedule_grammar._zones import transitions_in_year

    transitions_in_year.cache_clear()
    schedule = parse(text)
    began = time.perf_counter()
    schedule.next_after(instant)
    cold = time.perf_counter() - began
    warm = []
    for _ in range(repeats):
        began = time.perf_counter()
        schedule.next_after(instant)
        warm.append(time.perf_counter() - began)
    return cold, statistics.median(warm)


def per_second(step: Callable[[datetime], datetime], calls: int) -> float:
    t = START
    began = time.perf_counter()
    for _ in range(calls):
        t = step(t)
    return calls / (time.perf_counter() - began)


def cronsim_step(expression: str, tz: tzinfo) -> Callable[[datetime], datetime]:
    def step(t: datetime) -> datetime:
        return next(cronsim.CronSim(expression, t.astimezone(tz))).astimezone(UTC)

    return step


def ours_step(text: str) -> Callable[[datetime], datetime]:
    schedule = parse(text)

    def step(t: datetime) -> datetime:
        fire = schedule.next_after(t)
        assert fire is not None
        return fire

    return step


def plan_many(count: int) -> float:
    """Seconds to plan the next fire of `count` mixed schedules from one instant."""
    rng = random.Random(7)
    texts = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            texts.append(f"every {rng.randint(1, 120)}m")
        elif kind == 1:
            texts.append(
                f"daily {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} in Europe/Berlin"
            )
        elif kind == 2:
            texts.append(f"weekly {rng.choice(['mon', 'tue', 'fri'])} {rng.randint(0, 23):02d}:00")
        elif kind == 3:
            texts.append(f"monthly {rng.randint(1, 28)},last {rng.randint(0, 23):02d}:30")
        else:
            texts.append(f"cron {rng.randint(0, 59)} */{rng.randint(1, 6)} * * *")
    schedules = [parse(text) for text in texts]
    began = time.perf_counter()
    for schedule in schedules:
        schedule.next_after(START)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan", type=int, default=100_000)
    args = parser.parse_args()

    print(f"python {platform.python_version()}, cronsim {cronsim_version()}, {platform.machine()}")
    print(f"median of {args.repeats} runs x {args.calls} calls; higher is better\n")
    print(f"{'form':<26}{'cronclock/s':>14}{'cronsim/s':>14}{'ratio':>9}")
    for label, text, expression, zone in CASES:
        tz: tzinfo = UTC if zone == "UTC" else ZoneInfo(zone)
        ours = statistics.median(
            per_second(ours_step(text), args.calls) for _ in range(args.repeats)
        )
        peer = statistics.median(
            per_second(cronsim_step(expression, tz), args.calls) for _ in range(args.repeats)
        )
        print(f"{label:<26}{ours:>14,.0f}{peer:>14,.0f}{ours / peer:>8.1f}x")
    plan = statistics.median(plan_many(args.plan) for _ in range(args.repeats))
    print(f"\nplan next fire of {args.plan:,} mixed schedules: {plan:.3f} s (median)")
    print(f"\n{'worst case':<46}{'first call':>12}{'warm median':>13}")
    for label, text, instant in WORST:
        cold, warm = worst_case(text, instant, max(args.repeats, 21))
        print(f"{label:<46}{cold * 1e3:>10.2f}ms{warm * 1e3:>11.3f}ms")


def cronsim_version() -> str:
    from importlib.metadata import version

    return version("cronsim")


if __name__ == "__main__":
    main()
