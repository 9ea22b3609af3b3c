"""The DST policy: a wall time in a gap fires once at the first instant after the gap; a
wall time in a repeated hour fires once, at its first occurrence; sub-hour cron covers both."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from schedule_grammar import iter_fires, next_fires, parse


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def take(text: str, after: datetime, count: int) -> list[datetime]:
    fires = iter_fires(parse(text), after)
    return [next(fires) for _ in range(count)]


def local(instant: datetime, zone: str) -> datetime:
    return instant.astimezone(ZoneInfo(zone))


class TestEuropeBerlin:
    # 2027-03-28: 02:00 CET -> 03:00 CEST. 2026-10-25: 03:00 CEST -> 02:00 CET.
    @pytest.mark.parametrize(
        "text",
        [
            "daily 02:30 in Europe/Berlin",
            "cron 30 2 * * * in Europe/Berlin",
            "sun 02:30 in Europe/Berlin",
        ],
    )
    def test_a_time_in_the_spring_gap_fires_once_at_the_end_of_the_gap(self, text: str) -> None:
        fires = take(text, utc(2027, 3, 27, 12), 2)
        assert fires[0] == utc(2027, 3, 28, 1, 0)
        assert local(fires[0], "Europe/Berlin").strftime("%H:%M") == "03:00"
        assert fires[1] > utc(2027, 3, 28, 12)

    def test_a_gap_time_and_the_gap_end_time_fire_once_together(self) -> None:
        assert take("daily 02:30,03:00 in Europe/Berlin", utc(2027, 3, 27, 12), 2) == [
            utc(2027, 3, 28, 1, 0),
            utc(2027, 3, 29, 0, 30),
        ]

    @pytest.mark.parametrize(
        "text", ["daily 02:30 in Europe/Berlin", "cron 30 2 * * * in Europe/Berlin"]
    )
    def test_a_time_in_the_repeated_hour_fires_once_at_its_first_occurrence(
        self, text: str
    ) -> None:
        fires = take(text, utc(2026, 10, 24, 12), 2)
        assert fires == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
        first = local(fires[0], "Europe/Berlin")
        assert (first.hour, first.minute, first.fold) == (2, 30, 0)

    def test_asked_from_inside_the_second_copy_it_does_not_fire_the_hour_again(self) -> None:
        second_copy = utc(2026, 10, 25, 1, 15)  # 02:15 CET, fold=1
        assert local(second_copy, "Europe/Berlin").fold == 1
        assert parse("daily 02:30 in Europe/Berlin").next_after(second_copy) == utc(
            2026, 10, 26, 1, 30
        )

    def test_sub_hour_cron_covers_both_copies_of_the_repeated_hour(self) -> None:
        fires = take("cron */30 2 * * * in Europe/Berlin", utc(2026, 10, 24, 23, 59), 4)
        assert fires == [
            utc(2026, 10, 25, 0, 0),
            utc(2026, 10, 25, 0, 30),
            utc(2026, 10, 25, 1, 0),
            utc(2026, 10, 25, 1, 30),
        ]
        assert [local(f, "Europe/Berlin").fold for f in fires] == [0, 0, 1, 1]

    def test_intervals_run_in_absolute_time_across_transitions(self) -> None:
        fires = take("every 30m in Europe/Berlin", utc(2026, 10, 25, 0), 4)
        assert fires == [
            utc(2026, 10, 25, 0, 30),
            utc(2026, 10, 25, 1, 0),
            utc(2026, 10, 25, 1, 30),
            utc(2026, 10, 25, 2, 0),
        ]


class TestAmericaNewYork:
    # 2027-03-14: 02:00 EST -> 03:00 EDT. 2027-11-07: 02:00 EDT -> 01:00 EST.
    def test_spring_gap(self) -> None:
        assert parse("daily 02:15 in America/New_York").next_after(utc(2027, 3, 13, 12)) == utc(
            2027, 3, 14, 7, 0
        )

    def test_fall_back_fires_in_the_first_copy(self) -> None:
        nxt = parse("daily 01:30 in America/New_York").next_after(utc(2027, 11, 6, 12))
        assert nxt == utc(2027, 11, 7, 5, 30)  # 01:30 EDT

    def test_weekly_on_the_transition_day(self) -> None:
        assert take("weekly sun 01:30 in America/New_York", utc(2027, 11, 1), 2) == [
            utc(2027, 11, 7, 5, 30),
            utc(2027, 11, 14, 6, 30),
        ]


class TestAustraliaLordHowe:
    # Half-hour shifts: 2026-10-04 02:00 -> 02:30 (+10:30 -> +11); 2026-04-05 02:00 -> 01:30.
    def test_a_time_in_the_half_hour_gap_fires_at_its_end(self) -> None:
        nxt = parse("daily 02:15 in Australia/Lord_Howe").next_after(utc(2026, 10, 3, 12))
        assert nxt is not None
        assert local(nxt, "Australia/Lord_Howe").strftime("%Y-%m-%d %H:%M") == "2026-10-04 02:30"

    def test_a_time_in_the_repeated_half_hour_fires_once(self) -> None:
        fires = take("daily 01:45 in Australia/Lord_Howe", utc(2026, 4, 4, 0), 2)
        assert fires == [utc(2026, 4, 4, 14, 45), utc(2026, 4, 5, 15, 15)]

    def test_times_outside_the_shift_are_not_moved(self) -> None:
        nxt = parse("daily 02:45 in Australia/Lord_Howe").next_after(utc(2026, 10, 3, 12))
        assert nxt is not None
        assert local(nxt, "Australia/Lord_Howe").strftime("%H:%M") == "02:45"


class TestPacificApia:
    # Samoa skipped Friday 2011-12-30 entirely: 2011-12-29 23:59:59 -10:00 -> 2011-12-31 00:00 +14:00.
    def test_a_daily_fire_on_the_skipped_day_moves_to_the_first_instant_after_it(self) -> None:
        fires = take("daily 09:00 in Pacific/Apia", utc(2011, 12, 28, 20), 3)
        as_local = [local(f, "Pacific/Apia").strftime("%Y-%m-%d %H:%M") for f in fires]
        assert as_local == ["2011-12-29 09:00", "2011-12-31 00:00", "2011-12-31 09:00"]

    def test_a_weekly_fire_on_the_skipped_friday_moves_to_saturday_midnight(self) -> None:
        nxt = parse("fri 09:00 in Pacific/Apia").next_after(utc(2011, 12, 25))
        assert nxt is not None
        assert local(nxt, "Pacific/Apia").strftime("%Y-%m-%d %H:%M") == "2011-12-31 00:00"

    def test_interval_schedules_do_not_notice(self) -> None:
        fires = take("every 6h in Pacific/Apia", utc(2011, 12, 30, 5), 2)
        assert fires == [utc(2011, 12, 30, 6), utc(2011, 12, 30, 12)]


class TestAsiaMakassar:
    def test_a_zone_without_dst_fires_at_the_same_utc_time_all_year(self) -> None:
        fires = take("daily 03:00 in Asia/Makassar", utc(2026, 1, 1), 365)
        assert {(f.hour, f.minute) for f in fires} == {(19, 0)}

    def test_nothing_is_flagged(self) -> None:
        assert all(
            f.dst_note is None
            for f in next_fires(parse("daily 03:00 in Asia/Makassar"), utc(2026, 1, 1), 400)
        )


class TestOneTime:
    def test_a_naive_time_in_the_gap_fires_at_the_gap_end(self) -> None:
        assert parse("at 2027-03-14T02:30 in America/New_York").next_after(utc(2027, 1, 1)) == utc(
            2027, 3, 14, 7, 0
        )

    def test_a_naive_time_in_the_repeated_hour_fires_at_its_first_occurrence(self) -> None:
        assert parse("at 2027-11-07T01:30 in America/New_York").next_after(utc(2027, 1, 1)) == utc(
            2027, 11, 7, 5, 30
        )


class TestNextFiresFlagsDst:
    def test_a_moved_fire_says_where_it_went(self) -> None:
        fires = next_fires(parse("daily 02:30 in Europe/Berlin"), utc(2027, 3, 26, 12), 3)
        assert [f.dst_affected for f in fires] == [False, True, False]
        assert fires[1].dst_note == (
            "02:30 does not exist on 2027-03-28 in Europe/Berlin; fires at 03:00 (dst_gap=shift)"
        )
        assert fires[1].local.strftime("%H:%M%z") == "03:00+0200"

    def test_a_repeated_hour_fire_says_it_fires_once(self) -> None:
        fires = next_fires(parse("daily 02:30 in Europe/Berlin"), utc(2026, 10, 24, 12), 2)
        assert fires[0].dst_note == (
            "02:30 occurs twice on 2026-10-25 in Europe/Berlin; "
            "fires once, at the first (UTC+02:00) (dst_repeat=first)"
        )
        assert fires[1].dst_note is None

    def test_sub_hour_cron_fires_say_which_copy(self) -> None:
        fires = next_fires(parse("cron 30 * * * * in Europe/Berlin"), utc(2026, 10, 25, 0), 2)
        assert (
            fires[0].dst_note is not None and "this is the first (UTC+02:00)" in fires[0].dst_note
        )
        assert (
            fires[1].dst_note is not None and "this is the second (UTC+01:00)" in fires[1].dst_note
        )

    def test_a_time_that_happens_to_equal_the_gap_end_is_not_flagged(self) -> None:
        fires = next_fires(parse("daily 03:00 in Europe/Berlin"), utc(2027, 3, 27, 12), 1)
        assert fires[0].at == utc(2027, 3, 28, 1) and fires[0].dst_note is None

    def test_interval_and_utc_schedules_are_never_flagged(self) -> None:
        assert all(
            f.dst_note is None
            for f in next_fires(parse("every 1h in Europe/Berlin"), utc(2026, 10, 24), 72)
        )
        assert all(
            f.dst_note is None for f in next_fires(parse("daily 02:30"), utc(2026, 1, 1), 365)
        )

    def test_it_stops_after_a_one_time_schedule(self) -> None:
        fires = next_fires(parse("at 2026-12-01T09:00"), utc(2026, 1, 1), 5)
        assert [f.at for f in fires] == [utc(2026, 12, 1, 9)]

    def test_count_must_not_be_negative(self) -> None:
        with pytest.raises(ValueError, match="count must be 0 or more"):
            next_fires(parse("every 1m"), utc(2026, 1, 1), -1)
