"""Specification of every form of the schedule language, one concern per class."""

from datetime import UTC, datetime, time, timedelta

import pytest

from schedule_grammar import Cron, Interval, Once, ScheduleError, WallClock, parse


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(text: str, after: datetime, count: int = 4, **kwargs: str) -> list[datetime]:
    schedule = parse(text, **kwargs)
    out = []
    for _ in range(count):
        nxt = schedule.next_after(after)
        assert nxt is not None
        out.append(nxt)
        after = nxt
    return out


class TestEvery:
    def test_it_fires_on_the_utc_epoch_grid_whatever_the_start(self) -> None:
        assert fires("every 15m", utc(2026, 11, 22, 10, 7, 33)) == [
            utc(2026, 11, 22, 10, 15),
            utc(2026, 11, 22, 10, 30),
            utc(2026, 11, 22, 10, 45),
            utc(2026, 11, 22, 11, 0),
        ]

    def test_it_is_strictly_after_a_time_on_the_grid(self) -> None:
        assert parse("every 15m").next_after(utc(2026, 1, 1, 10, 15)) == utc(2026, 1, 1, 10, 30)

    def test_an_offset_shifts_the_grid(self) -> None:
        assert fires("every 15m offset 3m", utc(2026, 1, 1, 10, 0)) == [
            utc(2026, 1, 1, 10, 3),
            utc(2026, 1, 1, 10, 18),
            utc(2026, 1, 1, 10, 33),
            utc(2026, 1, 1, 10, 48),
        ]

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("every 30s", 30),
            ("every 15m", 900),
            ("every 1h", 3600),
            ("every 2d", 172_800),
            ("every 90s", 90),
            ("every 15 minutes", 900),
            ("every 1 hour", 3600),
            ("EVERY   10M", 600),
        ],
        ids=lambda v: str(v),
    )
    def test_it_reads_units(self, text: str, seconds: int) -> None:
        assert parse(text) == Interval(seconds=seconds)

    def test_it_ignores_the_time_zone_for_firing(self) -> None:
        after = utc(2026, 3, 29, 0, 50)
        assert fires("every 30m in Europe/Berlin", after) == fires("every 30m", after)

    def test_a_cadence_that_does_not_divide_the_hour_still_sits_on_the_epoch_grid(self) -> None:
        first = parse("every 7m").next_after(utc(2026, 1, 1))
        assert first is not None
        assert int(first.timestamp()) % 420 == 0

    def test_it_keeps_microsecond_inputs_exact(self) -> None:
        after = utc(2026, 1, 1, 0, 0, 29).replace(microsecond=999_999)
        assert parse("every 30s").next_after(after) == utc(2026, 1, 1, 0, 0, 30)


class TestDaily:
    def test_it_fires_at_the_local_time_of_its_zone(self) -> None:
        # Asia/Makassar is UTC+8 all year.
        assert fires("daily 03:00 in Asia/Makassar", utc(2026, 11, 22), 2) == [
            utc(2026, 11, 22, 19, 0),
            utc(2026, 11, 23, 19, 0),
        ]

    def test_several_times_fire_in_order(self) -> None:
        assert fires("daily 13:00,07:00", utc(2026, 1, 1, 8), 3) == [
            utc(2026, 1, 1, 13),
            utc(2026, 1, 2, 7),
            utc(2026, 1, 2, 13),
        ]

    def test_the_timezone_argument_is_the_default_zone(self) -> None:
        schedule = parse("daily 03:00", timezone="Asia/Makassar")
        assert schedule.timezone == "Asia/Makassar"
        assert schedule.next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 19)

    def test_an_in_suffix_wins_over_the_timezone_argument(self) -> None:
        schedule = parse("daily 03:00 in UTC", timezone="Asia/Makassar")
        assert schedule.timezone == "UTC"

    def test_seconds_are_allowed(self) -> None:
        assert parse("daily 03:00:30").next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 3, 0, 30)

    def test_one_digit_hours_are_allowed(self) -> None:
        assert parse("daily 3:05") == WallClock(kind="daily", times=(time(3, 5),))


class TestWeekly:
    def test_it_fires_on_the_named_days(self) -> None:
        # 2026-11-22 is a Sunday.
        assert fires("weekly mon,thu 10:00,18:00", utc(2026, 11, 22), 5) == [
            utc(2026, 11, 23, 10),
            utc(2026, 11, 23, 18),
            utc(2026, 11, 26, 10),
            utc(2026, 11, 26, 18),
            utc(2026, 11, 30, 10),
        ]

    def test_the_shorthand_is_the_same_schedule(self) -> None:
        assert parse("mon 10:00") == parse("weekly mon 10:00")
        assert str(parse("Monday 10:00")) == "weekly mon 10:00"

    def test_ranges_expand_and_may_wrap_around_the_week(self) -> None:
        assert parse("weekly mon-fri 09:00").describe() == "weekly mon,tue,wed,thu,fri 09:00"
        assert parse("weekly fri-mon 09:00").describe() == "weekly mon,fri,sat,sun 09:00"

    def test_the_same_day_fires_later_that_day(self) -> None:
        assert parse("sun 10:00").next_after(utc(2026, 11, 22, 9)) == utc(2026, 11, 22, 10)


class TestMonthly:
    def test_it_fires_on_the_named_days(self) -> None:
        assert fires("monthly 1,15 09:00", utc(2026, 11, 10), 3) == [
            utc(2026, 11, 15, 9),
            utc(2026, 12, 1, 9),
            utc(2026, 12, 15, 9),
        ]

    def test_last_is_the_last_day_of_each_month(self) -> None:
        assert fires("monthly last 18:00", utc(2027, 1, 1), 3) == [
            utc(2027, 1, 31, 18),
            utc(2027, 2, 28, 18),
            utc(2027, 3, 31, 18),
        ]

    def test_last_knows_leap_years(self) -> None:
        assert parse("monthly last 18:00").next_after(utc(2028, 2, 1)) == utc(2028, 2, 29, 18)

    def test_a_day_a_month_lacks_is_skipped_like_cron(self) -> None:
        assert fires("monthly 31 00:00", utc(2027, 1, 31, 1), 2) == [
            utc(2027, 3, 31),
            utc(2027, 5, 31),
        ]

    def test_last_and_a_number_on_the_same_day_fire_once(self) -> None:
        assert fires("monthly 30,last 12:00", utc(2027, 4, 1), 2) == [
            utc(2027, 4, 30, 12),
            utc(2027, 5, 30, 12),
        ]


class TestCron:
    def test_five_fields(self) -> None:
        assert fires("cron */5 * * * *", utc(2026, 1, 1, 0, 3), 2) == [
            utc(2026, 1, 1, 0, 5),
            utc(2026, 1, 1, 0, 10),
        ]

    def test_six_fields_have_seconds_first(self) -> None:
        assert fires("cron */20 * * * * *", utc(2026, 1, 1), 2) == [
            utc(2026, 1, 1, 0, 0, 20),
            utc(2026, 1, 1, 0, 0, 40),
        ]

    @pytest.mark.parametrize(
        ("alias", "after", "expected"),
        [
            ("@hourly", utc(2026, 1, 1, 0, 30), utc(2026, 1, 1, 1)),
            ("@daily", utc(2026, 1, 1, 0, 30), utc(2026, 1, 2)),
            ("@midnight", utc(2026, 1, 1, 0, 30), utc(2026, 1, 2)),
            ("@weekly", utc(2026, 11, 22, 0, 30), utc(2026, 11, 29)),  # Sundays
            ("@monthly", utc(2026, 1, 1, 0, 30), utc(2026, 2, 1)),
            ("@yearly", utc(2026, 1, 1, 0, 30), utc(2027, 1, 1)),
            ("@annually", utc(2026, 1, 1, 0, 30), utc(2027, 1, 1)),
        ],
        ids=lambda v: str(v),
    )
    def test_aliases(self, alias: str, after: datetime, expected: datetime) -> None:
        assert parse(alias).next_after(after) == expected
        assert parse(f"cron {alias}") == parse(alias)

    def test_it_runs_in_the_schedule_zone(self) -> None:
        assert parse("cron 0 9 * * mon-fri in Asia/Makassar").next_after(utc(2026, 11, 22)) == utc(
            2026, 11, 23, 1
        )

    def test_a_leap_day_expression_waits_for_the_next_leap_year(self) -> None:
        assert parse("cron 0 0 29 2 *").next_after(utc(2026, 1, 1)) == utc(2028, 2, 29)

    def test_it_is_a_cron_value(self) -> None:
        assert parse("cron  0  3  *  *  MON") == Cron(expression="0 3 * * mon")


class TestAt:
    def test_a_naive_time_is_read_in_the_schedule_zone(self) -> None:
        schedule = parse("at 2026-12-01T09:00 in Asia/Makassar")
        assert schedule.next_after(utc(2026, 11, 22)) == utc(2026, 12, 1, 1)

    def test_an_explicit_offset_wins(self) -> None:
        schedule = parse("at 2026-12-01T09:00+02:00", timezone="Asia/Makassar")
        assert schedule.next_after(utc(2026, 11, 22)) == utc(2026, 12, 1, 7)

    def test_z_means_utc(self) -> None:
        assert parse("at 2026-12-01T09:00Z").next_after(utc(2026, 1, 1)) == utc(2026, 12, 1, 9)

    def test_it_fires_once_then_never(self) -> None:
        schedule = parse("at 2026-12-01T09:00")
        assert schedule.next_after(utc(2026, 12, 1, 8, 59, 59)) == utc(2026, 12, 1, 9)
        assert schedule.next_after(utc(2026, 12, 1, 9)) is None
        assert schedule.next_after(utc(2027, 1, 1)) is None

    def test_a_space_may_separate_date_and_time(self) -> None:
        assert parse("at 2026-12-01 09:00") == parse("at 2026-12-01T09:00")
        assert isinstance(parse("at 2026-12-01t09:00"), Once)


class TestCanonicalText:
    @pytest.mark.parametrize(
        ("text", "canonical"),
        [
            ("every 900s", "every 15m"),
            ("Every 60 Minutes", "every 1h"),
            ("every 15m offset 180s", "every 15m offset 3m"),
            ("daily 7:00 , 13:00", "daily 07:00,13:00"),
            ("DAILY 03:00 IN asia/makassar", "daily 03:00 in Asia/Makassar"),
            ("thu,mon 18:00,10:00", "weekly mon,thu 10:00,18:00"),
            ("monthly last,15,1 09:00", "monthly 1,15,last 09:00"),
            ("cron */5 * * * *", "cron */5 * * * *"),
            ("@DAILY in Europe/Berlin", "@daily in Europe/Berlin"),
            ("at 2026-12-01T09:00", "at 2026-12-01T09:00"),
            ("at 2026-12-01 09:00:30+08:00", "at 2026-12-01T09:00:30+08:00"),
        ],
        ids=lambda v: str(v),
    )
    def test_it_renders_the_canonical_text(self, text: str, canonical: str) -> None:
        schedule = parse(text)
        assert str(schedule) == canonical == schedule.describe()
        assert parse(canonical) == schedule

    def test_naive_datetimes_are_rejected(self) -> None:
        with pytest.raises(ScheduleError, match="aware datetime"):
            parse("every 1m").next_after(datetime(2026, 1, 1))

    def test_results_are_utc(self) -> None:
        nxt = parse("daily 03:00 in Asia/Makassar").next_after(
            datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=1)
        )
        assert nxt is not None and nxt.tzinfo is UTC
