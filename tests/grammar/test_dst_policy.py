"""Configurable DST policy: dst_gap = shift | skip, dst_repeat = first | last | both."""

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedule_grammar import ScheduleError, dst_warnings, iter_fires, next_fires, parse
from schedule_grammar._zones import is_ambiguous, resolve_wall


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local_times(text: str, after: datetime, until: datetime) -> list[str]:
    schedule = parse(text)
    out = []
    for fire in iter_fires(schedule, after):
        if fire >= until:
            break
        out.append(fire.astimezone(schedule.tzinfo).strftime("%Y-%m-%d %H:%M%z"))
    return out


class TestSpelling:
    @pytest.mark.parametrize(
        ("text", "canonical"),
        [
            (
                "daily 02:30 in Europe/Berlin dst=skip,both",
                "daily 02:30 in Europe/Berlin dst=skip,both",
            ),
            (
                "daily 02:30 dst=both,skip in Europe/Berlin",
                "daily 02:30 in Europe/Berlin dst=skip,both",
            ),
            ("daily 02:30 in Europe/Berlin DST=Last", "daily 02:30 in Europe/Berlin dst=last"),
            ("daily 02:30 in Europe/Berlin dst=shift,first", "daily 02:30 in Europe/Berlin"),
            (
                "cron 30 2 * * * in Europe/Berlin dst=skip",
                "cron 30 2 * * * in Europe/Berlin dst=skip",
            ),
            (
                "at 2027-03-28T02:30 in Europe/Berlin dst=skip",
                "at 2027-03-28T02:30 in Europe/Berlin dst=skip",
            ),
        ],
        ids=lambda v: str(v),
    )
    def test_the_text_form_round_trips(self, text: str, canonical: str) -> None:
        schedule = parse(text)
        assert str(schedule) == canonical
        assert parse(canonical) == schedule

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("every 15m dst=skip", "runs in absolute time"),
            ("cron */5 * * * * dst=both", "runs in absolute time"),
            ("at 2027-03-28T02:30+01:00 dst=skip", "one exact instant"),
            ("daily 02:30 dst=sometimes", "'sometimes' is not a DST policy"),
            ("daily 02:30 dst=", "is not a DST policy"),
        ],
        ids=lambda v: str(v),
    )
    def test_it_is_rejected_where_it_cannot_apply(self, text: str, fragment: str) -> None:
        with pytest.raises(ScheduleError, match=fragment):
            parse(text)

    def test_keyword_arguments_are_defaults_the_text_overrides(self) -> None:
        assert parse("daily 02:30", dst_gap="skip").dst_gap == "skip"
        assert parse("daily 02:30 dst=shift", dst_gap="skip").dst_gap == "shift"

    def test_keyword_arguments_are_ignored_by_absolute_time_forms(self) -> None:
        assert parse("every 15m", dst_gap="skip", dst_repeat="both") == parse("every 15m")
        assert parse("cron */5 * * * *", dst_repeat="both") == parse("cron */5 * * * *")


# (zone, a spring-forward day's missing wall time, its gap end, a fall-back day's repeated wall time)
ZONES = [
    ("Europe/Berlin", "2027-03-28 02:30", "03:00", "2027-10-31 02:30"),
    ("America/New_York", "2027-03-14 02:30", "03:00", "2027-11-07 01:30"),
    ("Australia/Lord_Howe", "2027-10-03 02:15", "02:30", "2027-04-04 01:45"),
    ("Pacific/Apia", "2011-12-30 09:00", "00:00", "2012-04-01 03:30"),
]


class TestEveryCombination:
    @pytest.mark.parametrize(
        ("zone", "missing", "gap_end", "repeated"), ZONES, ids=[z[0] for z in ZONES]
    )
    @pytest.mark.parametrize("gap", ["shift", "skip"])
    @pytest.mark.parametrize("repeat", ["first", "last", "both"])
    def test_spring_and_fall_days(
        self, zone: str, missing: str, gap_end: str, repeated: str, gap: str, repeat: str
    ) -> None:
        tz = ZoneInfo(zone)
        # Spring: the day of the gap and the days around it.
        day, hhmm = missing.split()
        text = f"daily {hhmm} in {zone} dst={gap},{repeat}"
        # local midnights of the day before and the day after next (Apia skips the day itself)
        first_day = date.fromisoformat(day) - timedelta(days=1)
        start = datetime.combine(first_day, time(), tzinfo=tz).astimezone(UTC)
        end = datetime.combine(first_day + timedelta(days=3), time(), tzinfo=tz).astimezone(UTC)
        spring = local_times(text, start, end)
        before, after = first_day.isoformat(), (first_day + timedelta(days=2)).isoformat()
        assert spring[0].startswith(f"{before} {hhmm}") and spring[-1].startswith(f"{after} {hhmm}")
        moved = [f for f in spring if f[11:16] != hhmm]
        if gap == "shift":
            assert len(spring) == 3 and len(moved) == 1 and moved[0][11:16] == gap_end
        else:
            assert len(spring) == 2 and moved == [], "skip: no fire for the missing time"
        # Fall: the repeated wall time fires at the first, the second or both copies.
        day, hhmm = repeated.split()
        text = f"daily {hhmm} in {zone} dst={gap},{repeat}"
        start = datetime.fromisoformat(day).replace(tzinfo=tz) - timedelta(hours=12)
        fall = [
            f
            for f in local_times(
                text, start.astimezone(UTC), start.astimezone(UTC) + timedelta(days=1)
            )
        ]
        assert all(f.startswith(f"{day} {hhmm}") for f in fall)
        offsets = [f[16:] for f in fall]
        wall = datetime.fromisoformat(f"{day}T{hhmm}")
        first, second = (wall.replace(tzinfo=tz, fold=fold).strftime("%z") for fold in (0, 1))
        expected = {"first": [first], "last": [second], "both": [first, second]}[repeat]
        assert offsets == expected


class TestWarnings:
    def test_each_policy_says_what_will_happen(self) -> None:
        after = utc(2026, 11, 22)
        messages = {
            policy: [
                w.message
                for w in dst_warnings(parse(f"daily 02:30 in Europe/Berlin dst={policy}"), after)
            ]
            for policy in ("shift", "skip", "first", "last", "both")
        }
        assert (
            messages["shift"][0]
            == "02:30 does not exist on 2027-03-28 in Europe/Berlin; fires at 03:00 (dst_gap=shift)"
        )
        assert (
            messages["skip"][0]
            == "02:30 does not exist on 2027-03-28 in Europe/Berlin; does not fire that day (dst_gap=skip)"
        )
        assert (
            messages["first"][1]
            == "02:30 occurs twice on 2027-10-31 in Europe/Berlin; fires once, at the first (UTC+02:00) (dst_repeat=first)"
        )
        assert (
            messages["last"][1]
            == "02:30 occurs twice on 2027-10-31 in Europe/Berlin; fires once, at the second (UTC+01:00) (dst_repeat=last)"
        )
        assert (
            messages["both"][1]
            == "02:30 occurs twice on 2027-10-31 in Europe/Berlin; fires twice, at UTC+02:00 and UTC+01:00 (dst_repeat=both)"
        )

    def test_only_the_next_365_days_and_only_affected_times(self) -> None:
        assert dst_warnings(parse("daily 12:00 in Europe/Berlin"), utc(2026, 11, 22)) == []
        assert dst_warnings(parse("every 1h in Europe/Berlin"), utc(2026, 11, 22)) == []
        assert (
            len(dst_warnings(parse("daily 02:30 in Europe/Berlin"), utc(2026, 11, 22), days=365))
            == 2
        )
        assert (
            len(dst_warnings(parse("daily 02:30 in Europe/Berlin"), utc(2026, 11, 22), days=30))
            == 0
        )

    def test_sub_hour_cron_is_warned_about_too(self) -> None:
        (gap, repeat) = dst_warnings(parse("cron */30 * * * * in Europe/Berlin"), utc(2026, 11, 22))
        assert gap.message.endswith(
            "02:00, 02:30 do not exist on 2027-03-28 in Europe/Berlin; those fires are skipped"
        )
        assert repeat.message.endswith("fires in both copies")

    def test_a_skipped_whole_day(self) -> None:
        (warning,) = dst_warnings(parse("daily 09:00 in Pacific/Apia"), utc(2011, 12, 1), days=60)
        assert (
            warning.message
            == "09:00 does not exist on 2011-12-30 in Pacific/Apia; fires at 00:00 (dst_gap=shift)"
        )


POLICY_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]


@settings(max_examples=60, deadline=None)
@given(
    hour=st.integers(0, 23),
    minute=st.sampled_from([0, 15, 30, 45]),
    zone=st.sampled_from(POLICY_ZONES),
    year=st.integers(2000, 2040),
    gap=st.sampled_from(["shift", "skip"]),
    repeat=st.sampled_from(["first", "last", "both"]),
)
def test_every_policy_fires_as_promised_on_every_day_of_a_year(
    hour: int, minute: int, zone: str, year: int, gap: str, repeat: str
) -> None:
    """skip: nothing on a gap day; both: twice exactly on fall-back days; otherwise once a day."""
    tz = ZoneInfo(zone)
    schedule = parse(f"daily {hour:02d}:{minute:02d} in {zone} dst={gap},{repeat}")
    start = datetime(year, 1, 1, tzinfo=tz).astimezone(UTC) - timedelta(microseconds=1)
    end = datetime(year + 1, 1, 1, tzinfo=tz).astimezone(UTC)
    per_day: Counter[date] = Counter()
    for fire in iter_fires(schedule, start):
        if fire >= end:
            break
        local = fire.astimezone(tz)
        per_day[local.date()] += 1
        if gap == "skip":  # never inside (or at the end of) a gap: always the wall time asked for
            assert (local.hour, local.minute) == (hour, minute)
    day = date(year, 1, 1)
    while day.year == year:
        wall = datetime.combine(day, time(hour, minute))
        if resolve_wall(wall, tz, gap="skip") is None:
            expected = 0 if gap == "skip" else 1
        elif is_ambiguous(wall, tz):
            expected = 2 if repeat == "both" else 1
        else:
            expected = 1
        assert per_day[day] == expected, (day, wall)
        day += timedelta(days=1)


@settings(max_examples=100, deadline=None)
@given(
    text=st.sampled_from(
        ["daily 02:30,03:15", "weekly sun 01:30,02:45", "cron 30 1,2 * * *", "monthly last 02:30"]
    ),
    zone=st.sampled_from(POLICY_ZONES),
    policy=st.sampled_from(["skip,both", "shift,both", "last", "skip,last"]),
    after=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
)
def test_fires_stay_strictly_increasing_under_any_policy(
    text: str, zone: str, policy: str, after: datetime
) -> None:
    fires = [f.at for f in next_fires(parse(f"{text} in {zone} dst={policy}"), after, 12)]
    assert fires and fires[0] > after
    assert fires == sorted(set(fires))
