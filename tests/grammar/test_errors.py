"""Every bad input raises ScheduleError that quotes the text and says what is accepted."""

import pytest

from schedule_grammar import ScheduleError, parse, seconds_to_schedule

# (text, a fragment the message must contain)
MALFORMED = [
    ("", "empty schedule"),
    ("   ", "empty schedule"),
    ("evry 15m", "did you mean 'every'"),
    ("15m", "did you mean 'every 15m'"),
    ("dialy 03:00", "did you mean 'daily'"),
    ("hourly", "unknown form 'hourly'"),
    ("every", "'every' takes a whole number"),
    ("every 15", "'every' takes a whole number"),
    ("every m", "'every' takes a whole number"),
    ("every 0m", "longer than 0"),
    ("every -5m", "'every' takes a whole number"),
    ("every 1.5h", "'every' takes a whole number"),
    ("every 15w", "is not a duration"),
    ("every 15m offset", "'every' takes a whole number"),
    ("every 15m offset 15m", "must be shorter than the interval"),
    ("every 15m offset 1h", "must be shorter than the interval"),
    ("every 15m offset 3x", "is not a duration"),
    ("every 99999999d", "longer than a century"),
    ("daily", "'daily' takes one or more times"),
    ("daily 25:00", "hours 0-23"),
    ("daily 03:60", "minutes 0-59"),
    ("daily 3pm", "not a time of day"),
    ("daily 03:00 07:00", "'daily' takes one or more times"),
    ("daily 03:00,", "not a time of day"),
    ("daily 03:00:99", "hours 0-23, minutes 0-59"),
    ("weekly 10:00", "'weekly' takes days then times"),
    ("weekly mon", "'weekly' takes days then times"),
    ("weekly mon,funday 10:00", "'funday' is not a day of the week"),
    ("weekly mon-xyz 10:00", "not a day of the week"),
    ("mon", "'weekly' takes days then times"),
    ("mon 25:00", "hours 0-23"),
    ("monthly 09:00", "'monthly' takes days then times"),
    ("monthly 0 09:00", "'0' is not a day of the month"),
    ("monthly 32 09:00", "'32' is not a day of the month"),
    ("monthly first 09:00", "'first' is not a day of the month"),
    ("monthly 15-1 09:00", "runs backwards"),
    ("cron", "cron takes 5 fields"),
    ("cron * * * *", "cron takes 5 fields"),
    ("cron * * * * * * *", "cron takes 5 fields"),
    ("cron 61 * * * *", "invalid cron expression"),
    ("cron */0 * * * *", "invalid cron expression"),
    ("cron * * 31 2 *", "invalid cron expression"),
    ("cron * * * 13 *", "invalid cron expression"),
    ("cron * * * * funday", "invalid cron expression"),
    ("@fortnightly", "unknown form '@fortnightly'"),
    ("cron @fortnightly", "unknown cron alias"),
    ("at", "'at' takes an ISO date and time"),
    ("at tomorrow", "'at' takes an ISO date and time"),
    ("at 2026-12-01", "'at' takes an ISO date and time"),
    ("at 2026-13-01T09:00", "'at' takes an ISO date and time"),
    ("at 2026-12-01T25:00", "'at' takes an ISO date and time"),
    ("daily 03:00 in Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("daily 03:00 in Europe/Berlinn", "did you mean 'Europe/Berlin'"),
    ("daily 03:00 in", "'daily' takes one or more times"),
    ("daily 03:00 in ../etc/passwd", "unknown time zone"),
    # Issue 16: nonsense is refused, never read one way or another.
    ("daily 03:00 in Europe/Berlin in Asia/Tokyo", "more than one time zone"),
    ("daily 03:00 dst=skip dst=last", "more than one dst="),
    ("daily 03:00 dst=skip in UTC dst=last", "more than one dst="),
    ("every \uff11\uff15m", "digits 0-9"),
    ("every \u0661\u0665m", "digits 0-9"),
    ("daily \uff103:00", "digits 0-9"),
    ("cron \uff15 * * * *", "digits 0-9"),
    ("every " + "1" * 4301 + "s", "is not a duration"),
    ("cron " + "1" * 4301 + " * * * *", "invalid cron expression"),
    ("monthly " + "1" * 4301 + " 09:00", "not a day of the month"),
    ("daily 03:00 in " + "a/" * 300, "unknown time zone"),
    ("daily 03:00 in __init__/x", "unknown time zone"),
    ("daily 03:00 in zoneinfo/../UTC", "unknown time zone"),
    ("*/5 * * * *", "did you mean 'cron */5 * * * *'"),
    ("daily 03:00 in Berlin", "did you mean 'Europe/Berlin'"),
    ("0 30 2 * * *", "did you mean 'cron 0 30 2 * * *'"),
]


@pytest.mark.parametrize(
    ("text", "fragment"), MALFORMED, ids=[t[:40] or "<empty>" for t, _ in MALFORMED]
)
def test_it_rejects_malformed_text_with_a_message_that_quotes_it(text: str, fragment: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse(text)
    message = str(caught.value)
    assert repr(text) in message
    assert fragment in message


def test_there_are_at_least_thirty_malformed_cases() -> None:
    assert len(MALFORMED) >= 30


def test_an_unknown_form_lists_what_is_accepted() -> None:
    with pytest.raises(ScheduleError, match=r"expected one of: 'every 15m'.*'in <IANA zone>'"):
        parse("sometimes")


def test_a_bad_timezone_argument_is_named() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Nowhere/City'"):
        parse("daily 03:00", timezone="Nowhere/City")


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


@pytest.mark.parametrize("value", [None, 15, b"every 1m"], ids=["none", "int", "bytes"])
def test_non_text_is_rejected(value: object) -> None:
    with pytest.raises(ScheduleError, match="must be text"):
        parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("zone", [None, 3, b"UTC", "", "  "], ids=repr)
def test_a_timezone_that_is_not_a_zone_name_is_a_schedule_error(zone: object) -> None:
    with pytest.raises(ScheduleError, match="time zone"):
        parse("daily 03:00", timezone=zone)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    ["every 1h in America/New_York", "every 15m offset 3m in Asia/Makassar", "every 30s in UTC"],
)
def test_canonical_text_keeps_the_zone_so_it_parses_back_equal(text: str) -> None:
    schedule = parse(text)
    assert parse(str(schedule)) == schedule


class TestSecondsToSchedule:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (30, "every 30s"),
            (60, "every 1m"),
            (90, "every 90s"),
            (300, "every 5m"),
            (900, "every 15m"),
            (1020, "every 17m"),
            (3600, "every 1h"),
            (5400, "every 90m"),
            (86_400, "every 1d"),
            (172_800, "every 2d"),
            (90_000, "every 25h"),
        ],
        ids=str,
    )
    def test_it_gives_the_shortest_exact_form(self, seconds: int, text: str) -> None:
        assert seconds_to_schedule(seconds) == text
        schedule = parse(text)
        assert getattr(schedule, "seconds", None) == seconds

    @pytest.mark.parametrize("value", [0, -1, 1.5, "900", True, None], ids=repr)
    def test_it_rejects_what_is_not_a_positive_whole_number(self, value: object) -> None:
        with pytest.raises(ScheduleError, match="whole number of seconds above 0"):
            seconds_to_schedule(value)  # type: ignore[arg-type]


class TestEveryComputationIsBounded:
    """Issue 15.9: no evaluator bug may freeze the loop or a request."""

    def test_a_cron_walk_that_does_not_advance_ends_with_a_clear_error(self) -> None:
        from datetime import UTC, datetime

        from schedule_grammar import ScheduleError, parse

        schedule = parse("cron */5 3 * * * in Pacific/Chatham")
        after = datetime(2026, 4, 4, 13, 55, tzinfo=UTC)
        try:
            fire = schedule.next_after(after)
        except ScheduleError as error:  # until the evaluator is fixed (issue 17)
            assert "no next fire found" in str(error)
            assert "'cron */5 3 * * * in Pacific/Chatham'" in str(error)
        else:  # it returns or says why; it never hangs
            assert fire is not None and fire > after

    def test_a_wall_clock_walk_that_does_not_advance_ends_with_a_clear_error(self) -> None:
        from datetime import UTC, datetime

        import pytest

        from schedule_grammar import ScheduleError, parse

        schedule = parse("daily 03:00")
        stuck = type(schedule).next_nominal

        def frozen(self: object, wall: datetime) -> datetime:
            return wall  # a bug: never moves forward

        type(schedule).next_nominal = frozen  # type: ignore[method-assign,assignment]
        try:
            with pytest.raises(ScheduleError, match="no next fire found"):
                schedule.next_after(datetime(2026, 4, 4, tzinfo=UTC))
        finally:
            type(schedule).next_nominal = stuck  # type: ignore[method-assign]
