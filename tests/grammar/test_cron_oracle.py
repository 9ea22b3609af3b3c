"""Issue 17: `cron` schedules against a first-principles model, in every kind of zone.

The model knows nothing of the evaluator: for each local day it lists the wall times the
expression names (cronsim parses the fields and matches the days; its DST walk is not used),
and turns each into instants with zoneinfo alone, under the README's rules:

* a 5-field expression with a fixed minute and hour (neither starts with `*`) names wall-clock
  times: a time that occurs twice fires at the first, the last or both copies (`dst_repeat`);
  a time that does not exist fires at the end of the gap or not at all (`dst_gap`);
* any other expression (a `*` minute or hour, or 6 fields) runs in absolute time: it fires at
  every instant whose local wall time matches, so both copies of a repeated time and nothing
  in a gap.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schedule_grammar import ScheduleError, iter_fires, parse
from tests.grammar.test_properties import transitions

ZONES = [
    "Australia/Lord_Howe",  # 30-minute DST at 02:00
    "Pacific/Chatham",  # transitions at 02:45 / 03:45
    "America/Santiago",  # midnight transitions
    "America/Havana",  # midnight transitions
    "Asia/Tehran",  # midnight transitions until 2022
    "Asia/Beirut",  # midnight transitions
    "Africa/Casablanca",  # Ramadan suspensions, negative DST
    "Pacific/Apia",  # skipped a whole day (2011-12-30)
    "Europe/Berlin",
    "America/New_York",
    "Asia/Makassar",  # no DST
    "UTC",
]
SECOND = timedelta(seconds=1)
HORIZON_DAYS = 40


def instants_of(wall: datetime, tz: tzinfo) -> list[datetime]:
    """The instants whose local wall time is `wall`: none (a gap), one, or two (a repeat)."""
    found = []
    for fold in (0, 1):
        instant = wall.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if instant.astimezone(tz).replace(tzinfo=None) == wall and instant not in found:
            found.append(instant)
    return sorted(found)


def gap_end(wall: datetime, tz: tzinfo) -> datetime:
    """The first instant whose wall time is later than `wall` (a wall time in a gap)."""
    lo = wall.replace(tzinfo=tz, fold=0).astimezone(UTC) - timedelta(days=2)
    hi = wall.replace(tzinfo=tz, fold=0).astimezone(UTC) + timedelta(days=2)
    while hi - lo > SECOND:
        mid = (lo + (hi - lo) / 2).replace(microsecond=0)
        if mid.astimezone(tz).replace(tzinfo=None) > wall:
            hi = mid
        else:
            lo = mid
    return hi


def model_fires(
    fields: str, zone: str, after: datetime, gap: str, repeat: str
) -> Iterator[datetime]:
    """The model's fires in (after, after + HORIZON_DAYS], in order."""
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    sim = CronSim(fields, datetime(2000, 1, 1))  # parses the fields; its walk is not used
    parts = fields.split()
    wall_clock = len(parts) == 5 and not parts[0].startswith("*") and not parts[1].startswith("*")
    found: set[datetime] = set()
    first_day = after.astimezone(tz).date() - timedelta(days=2)
    for offset in range(HORIZON_DAYS + 4):
        day: date = first_day + timedelta(days=offset)
        if day.month not in sim.months or not sim.match_day(day):
            continue
        for h, m, s in itertools.product(
            sorted(sim.hours), sorted(sim.minutes), sorted(sim.seconds)
        ):
            wall = datetime.combine(day, time(h, m, s))
            real = instants_of(wall, tz)
            if not wall_clock:
                found.update(real)
            elif not real:
                if gap == "shift":
                    found.add(gap_end(wall, tz))
            elif repeat == "both":
                found.update(real)
            else:
                found.add(real[0] if repeat == "first" else real[-1])
    end = after + timedelta(days=HORIZON_DAYS)
    return iter(sorted(f for f in found if after < f <= end))


class _Timeout(Exception):
    pass


def bounded(call, seconds: float = 5.0):  # type: ignore[no-untyped-def]
    """Run `call()`; a hang fails the test instead of freezing it."""

    def expire(signum: int, frame: object) -> None:
        raise _Timeout(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Cron fields: lists, ranges, steps, names; the day fields also L, LW, W-less `#`.
def _field(values: range, names: list[str] | None = None) -> st.SearchStrategy[str]:
    lo, hi = values.start, values.stop - 1
    number = st.integers(lo, hi).map(str)
    if names:
        number = st.one_of(number, st.sampled_from(names))
    ranged = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).map(lambda p: f"{min(p)}-{max(p)}")
    stepped = st.tuples(
        st.sampled_from(["*", str(lo)]), st.integers(1, max(1, (hi - lo) // 2))
    ).map(lambda p: f"{p[0]}/{p[1]}")
    single = st.one_of(number, ranged, stepped)
    return st.one_of(single, st.lists(single, min_size=2, max_size=3).map(",".join))


minute_fields = st.one_of(st.just("*"), st.just("*/15"), st.just("*/20"), _field(range(0, 60)))
hour_fields = st.one_of(st.just("*"), st.just("*/3"), _field(range(0, 24)))
dom_fields = st.one_of(
    st.just("*"), st.just("*"), st.just("L"), st.just("LW"), _field(range(1, 32))
)
month_fields = st.one_of(
    st.just("*"), st.just("*"), st.just("*"),
    _field(range(1, 13), ["jan", "mar", "apr", "sep", "oct", "nov", "dec"]),
)  # fmt: skip
dow_fields = st.one_of(
    st.just("*"), st.just("*"),
    _field(range(0, 7), ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]),
    st.tuples(st.integers(0, 6), st.integers(1, 4)).map(lambda p: f"{p[0]}#{p[1]}"),
    st.integers(0, 6).map(lambda d: f"{d}L"),
)  # fmt: skip
second_fields = st.sampled_from(["0", "30", "0,30", "*/20", "15-16"])


@st.composite
def expressions(draw: st.DrawFn) -> str:
    five = " ".join(
        draw(strategy)
        for strategy in (minute_fields, hour_fields, dom_fields, month_fields, dow_fields)
    )
    return f"{draw(second_fields)} {five}" if draw(st.integers(0, 4)) == 0 else five


@st.composite
def zone_and_instant(draw: st.DrawFn) -> tuple[str, datetime]:
    zone = draw(st.sampled_from(ZONES))
    near = transitions(zone)
    if near and draw(st.integers(0, 9)) < 8:  # mostly around a transition
        base = draw(st.sampled_from(near))
        shift = draw(st.integers(-2 * 86400, 2 * 86400))
    else:
        base = datetime(2010, 1, 1, tzinfo=UTC)
        shift = draw(st.integers(0, 25 * 365 * 86400))
    return zone, base + timedelta(seconds=shift, microseconds=draw(st.sampled_from([0, 0, 1])))


# CRON_ORACLE_EXAMPLES=20000 for a long run (the closing note of issue 17 reports one).
@settings(
    max_examples=int(os.environ.get("CRON_ORACLE_EXAMPLES", "1500")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    fields=expressions(),
    where=zone_and_instant(),
    gap=st.sampled_from(["shift", "shift", "skip"]),
    repeat=st.sampled_from(["first", "first", "last", "both"]),
)
def test_cron_agrees_with_the_first_principles_model(
    fields: str, where: tuple[str, datetime], gap: str, repeat: str
) -> None:
    zone, after = where
    try:
        schedule = parse(f"cron {fields}", timezone=zone, dst_gap=gap, dst_repeat=repeat)
    except ScheduleError:
        assume(False)  # cronsim refuses it (e.g. day 30 of February): nothing to compare
        raise
    if not schedule.dst_policy_applies:
        gap, repeat = "shift", "first"  # absolute time: the policy does not apply
    expected = list(itertools.islice(model_fires(fields, zone, after, gap, repeat), 6))
    assume(expected)  # nothing within the model's horizon (e.g. a rare day): nothing to compare
    got, current = [], after
    for _ in expected:
        fire = bounded(lambda c=current: schedule.next_after(c))
        assert fire is not None
        got.append(fire)
        current = fire
    assert got == expected, f"cron {fields} in {zone} after {after.isoformat()}"


# The cases the issue reports, each seen wrong from outside.
REPORTED = [
    ("*/30 2 * * *", "Australia/Lord_Howe", "2026-04-04T14:00Z", "2026-04-05T02:00+10:30"),
    ("25 */3 * * *", "Australia/Lord_Howe", "2025-10-04T14:00Z", "2025-10-05T03:25+11:00"),
    ("*/5 3 * * *", "Pacific/Chatham", "2026-04-04T13:55Z", None),  # hung
    ("*/20 0 * * 0", "America/Santiago", "2026-09-05T12:00Z", None),  # fired in hour 1-2
    ("*/30 1 * * 0", "America/Santiago", "2026-09-05T12:00Z", "2026-09-06T01:00-03:00"),
]


@pytest.mark.parametrize(("fields", "zone", "after", "first"), REPORTED)
def test_the_reported_cases(fields: str, zone: str, after: str, first: str | None) -> None:
    schedule = parse(f"cron {fields}", timezone=zone)
    start = datetime.fromisoformat(after.replace("Z", "+00:00"))
    fire = bounded(lambda: schedule.next_after(start))
    expected = next(model_fires(fields, zone, start, "shift", "first"))
    assert fire == expected
    if first is not None:
        assert fire == datetime.fromisoformat(first)
    if fields == "*/20 0 * * 0":  # 2026-09-06 has no hour 0 in Santiago: the next Sunday
        assert fire.astimezone(ZoneInfo(zone)).hour == 0
        assert fire.astimezone(ZoneInfo(zone)).date() == date(2026, 9, 13)


def test_chatham_skips_no_minute_that_exists() -> None:
    schedule = parse("cron * 3 * * * in Pacific/Chatham")
    after = datetime(2027, 9, 25, 12, tzinfo=UTC)
    fires, current = [], after
    for _ in range(200):
        current = bounded(lambda c=current: schedule.next_after(c))
        fires.append(current)
    assert fires == list(
        itertools.islice(model_fires("* 3 * * *", "Pacific/Chatham", after, "shift", "first"), 200)
    )


@pytest.mark.parametrize(
    "text",
    ["every 1d", "every 15m", "daily 03:00", "daily 23:30 in Pacific/Kiritimati", "mon 10:00",
     "monthly last 18:00 in Europe/Berlin", "cron 0 3 * * * in Europe/Berlin",
     "cron */5 * * * * in Europe/Berlin", "cron 0 0 29 2 *", "daily 03:00 dst=both in Europe/Berlin",
     "at 2026-01-01T00:00"],
)  # fmt: skip
def test_near_year_9999_there_is_no_next_fire_rather_than_an_overflow(text: str) -> None:
    fire = parse(text).next_after(datetime(9999, 12, 31, 23, 0, tzinfo=UTC))
    assert fire is None or fire.year == 9999


def test_a_santiago_midnight_gap_is_skipped_by_next_after_as_dst_warnings_says() -> None:
    from schedule_grammar import dst_warnings

    schedule = parse("cron */20 0 * * 0 in America/Santiago")
    after = datetime(2026, 9, 5, 12, tzinfo=UTC)
    (warning,) = [w for w in dst_warnings(schedule, after, days=7)]
    assert "those fires are skipped" in warning.message
    fire = schedule.next_after(after)
    assert fire is not None and fire.astimezone(schedule.tzinfo).date() == date(2026, 9, 13)


def test_six_fields_at_a_fixed_time_run_in_absolute_time() -> None:
    # README: 6-field expressions are always absolute time, as in cronsim: twice on the
    # fall-back day, not at all on the spring-forward day.
    schedule = parse("cron 0 30 2 * * * in Europe/Berlin")
    autumn = [
        f for f in itertools.islice(iter_fires(schedule, datetime(2026, 10, 24, tzinfo=UTC)), 3)
    ]
    assert [f.astimezone(schedule.tzinfo).date() for f in autumn] == [
        date(2026, 10, 24), date(2026, 10, 25), date(2026, 10, 25)]  # fmt: skip
    spring = list(itertools.islice(iter_fires(schedule, datetime(2027, 3, 27, tzinfo=UTC)), 2))
    assert [f.astimezone(schedule.tzinfo).date() for f in spring] == [
        date(2027, 3, 27), date(2027, 3, 29)]  # fmt: skip
