"""Invariants of the language, checked with hypothesis over generated schedules and instants."""

import functools
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from schedule_grammar import Interval, WallClock, iter_fires, next_fires, parse

# Zones with DST of every shape: 1h shifts north and south, a half-hour shift, shifts at
# midnight (Santiago), none at all (Makassar), and UTC.
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Makassar",
    "Pacific/Apia",
]
# Every zone above whose calendar days all exist in 1990-2060 (Apia skipped 2011-12-30).
WHOLE_DAY_ZONES = [zone for zone in ZONES if zone != "Pacific/Apia"]

instants = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2060, 12, 31), timezones=st.just(UTC)
)


@functools.cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """UTC instants (to the hour) where the zone's offset changes, 2010-2035."""
    tz = ZoneInfo(zone)
    found, hour = [], datetime(2010, 1, 1, tzinfo=UTC)
    previous = hour.astimezone(tz).utcoffset()
    while hour.year < 2036:
        hour += timedelta(hours=1)
        offset = hour.astimezone(tz).utcoffset()
        if offset != previous:
            found.append(hour)
        previous = offset
    return tuple(found)


def zone_and_instant(among: list[str] = ZONES) -> st.SearchStrategy[tuple[str, datetime]]:
    """A zone and an instant; half of them within two days of one of the zone's transitions,
    where random instants would almost never land."""

    def near(zone: str) -> st.SearchStrategy[datetime]:
        if not transitions(zone):
            return instants
        return st.tuples(
            st.sampled_from(transitions(zone)), st.integers(-2 * 86_400, 2 * 86_400)
        ).map(lambda ts: ts[0] + timedelta(seconds=ts[1]))

    return st.sampled_from(among).flatmap(
        lambda zone: st.tuples(st.just(zone), st.one_of(instants, near(zone)))
    )


clock_times = st.tuples(st.integers(0, 23), st.integers(0, 59)).map(
    lambda hm: f"{hm[0]:02d}:{hm[1]:02d}"
)
time_lists = st.lists(clock_times, min_size=1, max_size=3).map(",".join)
durations = st.tuples(st.integers(1, 120), st.sampled_from("smhd")).map(
    lambda nu: f"{nu[0]}{nu[1]}"
)

everys = durations.map(lambda d: f"every {d}")
dailies = time_lists.map(lambda t: f"daily {t}")
weeklies = st.tuples(
    st.lists(
        st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1, max_size=3
    ),
    time_lists,
).map(lambda dt: f"weekly {','.join(dt[0])} {dt[1]}")
monthlies = st.tuples(
    st.lists(st.one_of(st.integers(1, 31).map(str), st.just("last")), min_size=1, max_size=3),
    time_lists,
).map(lambda dt: f"monthly {','.join(dt[0])} {dt[1]}")


def _cron_field(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high).map(str)
    return st.one_of(
        st.just("*"),
        value,
        st.integers(1, max(1, (high - low) // 2)).map(lambda step: f"*/{step}"),
        st.lists(st.integers(low, high), min_size=2, max_size=3).map(
            lambda v: ",".join(map(str, v))
        ),
    )


crons = st.tuples(
    _cron_field(0, 59),
    _cron_field(0, 23),
    _cron_field(1, 28),
    _cron_field(1, 12),
    _cron_field(0, 6),
).map(" ".join)
cron_texts = crons.map(lambda c: f"cron {c}")
recurring = st.one_of(everys, dailies, weeklies, monthlies, cron_texts)
zones = st.sampled_from(ZONES)


@settings(max_examples=300, deadline=None)
@given(text=recurring, zone_after=zone_and_instant())
def test_the_next_fire_is_strictly_after_the_given_instant(
    text: str, zone_after: tuple[str, datetime]
) -> None:
    zone, after = zone_after
    schedule = parse(text, timezone=zone)
    fires = [f.at for f in next_fires(schedule, after, 3)]
    assert fires, text
    assert fires[0] > after
    assert fires == sorted(set(fires)), "fires repeat or go backwards"
    assert all(f.tzinfo is UTC for f in fires)


@settings(max_examples=200, deadline=None)
@given(text=recurring, zone=zones)
def test_canonical_text_parses_back_to_the_same_schedule(text: str, zone: str) -> None:
    schedule = parse(text, timezone=zone)
    assert parse(str(schedule), timezone=zone) == schedule
    assert str(parse(str(schedule), timezone=zone)) == str(schedule)


@settings(max_examples=300, deadline=None)
@given(every=durations, offset_fraction=st.floats(0, 0.999), after=instants)
def test_interval_fires_lie_on_their_epoch_grid(
    every: str, offset_fraction: float, after: datetime
) -> None:
    period = parse(f"every {every}")
    assert isinstance(period, Interval)
    offset = int(period.seconds * offset_fraction)
    schedule = Interval(seconds=period.seconds, offset=offset)
    fire = schedule.next_after(after)
    assert fire is not None
    assert (int(fire.timestamp()) - offset) % period.seconds == 0
    assert fire - after <= timedelta(seconds=period.seconds)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(dailies, weeklies, monthlies), zone_after=zone_and_instant())
def test_wall_clock_fires_land_on_a_requested_local_time_unless_dst_moved_them(
    text: str, zone_after: tuple[str, datetime]
) -> None:
    zone, after = zone_after
    schedule = parse(text, timezone=zone)
    assert isinstance(schedule, WallClock)
    for fire in next_fires(schedule, after, 5):
        on_time = fire.local.time().replace(fold=0) in schedule.times
        assert on_time or fire.dst_note is not None, (fire, text)
        if not on_time:
            assert "does not exist" in fire.dst_note


@settings(max_examples=60, deadline=None)
@given(time_of_day=clock_times, zone=st.sampled_from(WHOLE_DAY_ZONES), year=st.integers(1995, 2050))
def test_a_fixed_time_daily_schedule_fires_exactly_once_per_local_day_across_a_year(
    time_of_day: str, zone: str, year: int
) -> None:
    tz = ZoneInfo(zone)
    start = datetime(year, 1, 1, tzinfo=tz).astimezone(UTC) - timedelta(microseconds=1)
    end = datetime(year + 1, 1, 1, tzinfo=tz).astimezone(UTC)
    per_day: Counter[str] = Counter()
    for fire in iter_fires(parse(f"daily {time_of_day}", timezone=zone), start):
        if fire >= end:
            break
        per_day[fire.astimezone(tz).date().isoformat()] += 1
    days_in_year = (datetime(year + 1, 1, 1) - datetime(year, 1, 1)).days
    assert len(per_day) == days_in_year
    assert set(per_day.values()) == {1}


# cronsim steps whole hours in absolute time: right where transitions fall on the whole hour
# and not at midnight, wrong elsewhere (issue 17; tests/grammar/test_cron_oracle.py models
# every zone). Where it is right, cronclock must agree with it.
CRONSIM_ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Makassar"]


@settings(max_examples=400, deadline=None)
@given(expression=crons, zone_after=zone_and_instant(CRONSIM_ZONES))
def test_cron_forms_agree_with_cronsim(expression: str, zone_after: tuple[str, datetime]) -> None:
    zone, after = zone_after
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    expected = next(
        fire.astimezone(UTC) for fire in CronSim(expression, after.astimezone(tz)) if fire > after
    )
    assert parse(f"cron {expression}", timezone=zone).next_after(after) == expected


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(dailies, weeklies, monthlies), zone_after=zone_and_instant())
def test_wall_clock_forms_agree_with_the_equivalent_cron(
    text: str, zone_after: tuple[str, datetime]
) -> None:
    zone, after = zone_after
    schedule = parse(text, timezone=zone)
    assert isinstance(schedule, WallClock)
    # One cron per time of day; the schedule's next fire is the earliest of theirs.
    if schedule.kind == "daily":
        days = "* * *"
    elif schedule.kind == "weekly":
        days = "* * " + ",".join(str((w + 1) % 7) for w in schedule.weekdays)
    else:
        listed = [str(d) for d in schedule.monthdays] + (["L"] if schedule.last_day else [])
        days = ",".join(listed) + " * *"
    expected = min(
        c
        for t in schedule.times
        if (c := parse(f"cron {t.minute} {t.hour} {days}", timezone=zone).next_after(after))
        is not None
    )
    assert schedule.next_after(after) == expected


transition_cases = st.sampled_from([z for z in ZONES if transitions(z)]).flatmap(
    lambda zone: st.tuples(
        st.just(zone),
        st.sampled_from(transitions(zone)),
        st.integers(-90, 90),  # minutes from the transition, read on the local wall clock
    )
)


@settings(max_examples=300, deadline=None)
@given(case=transition_cases)
def test_wall_times_around_transitions_agree_with_cronsim(case: tuple[str, datetime, int]) -> None:
    # Random times of day almost never fall in a gap or a repeated hour; these always do.
    zone, transition, minutes = case
    tz = ZoneInfo(zone)
    wall = transition.astimezone(tz) + timedelta(minutes=minutes)
    expression = f"{wall.minute} {wall.hour} * * *"
    after = transition - timedelta(days=1)
    expected = next(
        f.astimezone(UTC) for f in CronSim(expression, after.astimezone(tz)) if f > after
    )
    assert parse(f"cron {expression}", timezone=zone).next_after(after) == expected
    assert parse(f"daily {wall:%H:%M}", timezone=zone).next_after(after) == expected
