"""The loop in virtual time: precise wake-ups, catch-up, overlap hand-off, reload."""

from __future__ import annotations

import heapq
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from schedule_grammar import parse
from services.scheduler.clock import (
    CATCHUP_ALL_CAP,
    HAND_ON_SECONDS_PER_SLOT,
    LEAD_MARGIN,
    Scheduler,
    decide,
    due_by,
)
from services.scheduler.config import Job
from services.scheduler.slots import format_slot
from services.scheduler.stores.memory import MemoryStateStore
from tests.support import RecordingFirer, VirtualClock

T0 = datetime(2026, 11, 22, 10, 0, 7, 250_000, tzinfo=UTC)


def job(name: str = "j", schedule: str = "every 15m", **fields: object) -> Job:
    return Job(name=name, schedule=parse(schedule), endpoint="/x", **fields)  # type: ignore[arg-type]


def make(*jobs: Job, tick: float = 30.0, start: datetime = T0, reload=None):  # type: ignore[no-untyped-def]
    clock = VirtualClock(start)
    firer = RecordingFirer()
    store = MemoryStateStore()
    scheduler = Scheduler(
        jobs=jobs,
        firer=firer,
        store=store,
        clock=clock,
        log=structlog.get_logger(),
        tick_seconds=tick,
        reload=reload,
    )
    scheduler.start(clock.now())
    return scheduler, clock, firer, store


def run_for(scheduler: Scheduler, clock: VirtualClock, seconds: float) -> None:
    """Drive the loop exactly as run() does, in virtual time."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        scheduler.fire_due(clock.now())
        clock.wait(min(scheduler.seconds_until_next(clock.now()), end - clock.monotonic()))
    scheduler.fire_due(clock.now())


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


class TestPrecision:
    def test_it_sleeps_exactly_until_the_earliest_slot(self) -> None:
        scheduler, clock, _, _ = make(job(schedule="every 15s"), tick=30)
        assert scheduler.seconds_until_next(clock.now()) == pytest.approx(7.75)

    def test_it_wakes_at_least_every_tick_for_housekeeping(self) -> None:
        scheduler, clock, _, _ = make(job(schedule="daily 03:00"), tick=30)
        assert scheduler.seconds_until_next(clock.now()) == 30

    def test_each_slot_is_handed_on_at_its_nominal_time(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="every 15m"))
        run_for(scheduler, clock, 3600)
        assert firer.slots("j") == [utc(2026, 11, 22, 10, 15), utc(2026, 11, 22, 10, 30),
                                    utc(2026, 11, 22, 10, 45), utc(2026, 11, 22, 11, 0)]  # fmt: skip
        # the loop never slept past a slot: every wait ended on a slot or a tick
        assert max(clock.waits) <= 30

    def test_a_deadline_is_the_next_slot(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="every 15m"))
        run_for(scheduler, clock, 900)
        assert firer.fired[0][2] == utc(2026, 11, 22, 10, 30)

    def test_several_jobs_interleave_in_time_order(self) -> None:
        scheduler, clock, firer, _ = make(job("a", "every 10s"), job("b", "every 15s"))
        run_for(scheduler, clock, 30)
        order = [(slot.second, name) for name, slot, _ in firer.fired]
        assert [second for second, _ in order] == [10, 15, 20, 30, 30]
        assert sorted(order) == [(10, "a"), (15, "b"), (20, "a"), (30, "a"), (30, "b")]


class TestLead:
    def test_slots_are_handed_on_the_lead_ahead_of_their_instant(self) -> None:
        clock = VirtualClock(T0)
        firer = RecordingFirer()
        scheduler = Scheduler(jobs=[job(schedule="every 15s")], firer=firer, store=MemoryStateStore(),
                              clock=clock, log=structlog.get_logger(), tick_seconds=30, lead_seconds=0.05)  # fmt: skip
        scheduler.start(clock.now())
        assert scheduler.seconds_until_next(clock.now()) == pytest.approx(7.70)
        clock.advance(7.70)
        scheduler.fire_due(clock.now())
        assert firer.slots("j") == [utc(2026, 11, 22, 10, 0, 15)], "handed on with its own slot"

    def test_a_burst_at_one_instant_is_handed_on_earlier_by_what_it_costs(self) -> None:
        """1,000 slots at one instant cannot all be planned, recorded and built in the base
        lead: the loop wakes earlier by their number times the cost of one."""
        clock = VirtualClock(T0)
        firer = RecordingFirer()
        jobs = [job(f"j{n}", "every 15s") for n in range(1000)]
        scheduler = Scheduler(jobs=jobs, firer=firer, store=MemoryStateStore(), clock=clock,
                              log=structlog.get_logger(), tick_seconds=30, lead_seconds=0.05)  # fmt: skip
        scheduler.start(clock.now())
        lead = 1000 * HAND_ON_SECONDS_PER_SLOT * LEAD_MARGIN
        assert scheduler.seconds_until_next(clock.now()) == pytest.approx(7.75 - lead)
        clock.advance(7.75 - lead)
        scheduler.fire_due(clock.now())
        assert len(firer.fired) == 1000
        assert {slot for _, slot, _ in firer.fired} == {utc(2026, 11, 22, 10, 0, 15)}

    @given(st.lists(st.integers(0, 50), max_size=200), st.integers(-1, 51))
    def test_due_by_counts_the_entries_at_or_before_an_instant(
        self, seconds: list[int], bound: int
    ) -> None:
        heap: list[tuple[datetime, int, str]] = []
        for n, second in enumerate(seconds):
            heapq.heappush(heap, (T0 + timedelta(seconds=second), n, "j"))
        when = T0 + timedelta(seconds=bound)
        assert due_by(heap, when) == sum(1 for second in seconds if second <= bound)


class TestFirstStart:
    def test_nothing_fires_at_once(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="every 1h"))
        scheduler.fire_due(clock.now())
        assert firer.fired == []

    def test_run_on_start_fires_once_at_start_then_follows_the_schedule(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="every 1h", run_on_start=True))
        run_for(scheduler, clock, 3600)
        assert firer.slots("j") == [T0.replace(microsecond=250_000), utc(2026, 11, 22, 11)]

    def test_disabled_jobs_never_fire(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="every 1m", enabled=False))
        run_for(scheduler, clock, 600)
        assert firer.fired == []

    def test_a_one_time_job_fires_once_and_is_then_unplanned(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="at 2026-11-22T10:05"))
        run_for(scheduler, clock, 3600)
        assert firer.slots("j") == [utc(2026, 11, 22, 10, 5)]
        assert "j" not in scheduler.planned()


class TestPausedJobs:
    def test_a_paused_job_lets_its_slots_pass_without_firing(self) -> None:
        scheduler, clock, firer, store = make(job(schedule="every 1m"))
        store.set_paused("j", True)
        run_for(scheduler, clock, 300)
        assert firer.fired == []
        store.set_paused("j", False)
        run_for(scheduler, clock, 60)
        assert len(firer.fired) == 1


class TestCatchUp:
    def test_latest_fires_the_latest_missed_slot_within_grace_and_records_the_rest(self) -> None:
        j = job(schedule="every 1m", misfire_grace=300.0)
        decision = decide(j, utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 10, 4, 30))
        assert decision.fire == [utc(2026, 1, 1, 10, 4)]
        assert decision.missed == [utc(2026, 1, 1, 10, m) for m in range(4)]
        assert decision.next_slot == utc(2026, 1, 1, 10, 5)

    def test_latest_fires_nothing_when_the_latest_slot_is_beyond_grace(self) -> None:
        j = job(schedule="daily 03:00", misfire_grace=300.0)
        decision = decide(j, utc(2026, 1, 1, 3), utc(2026, 1, 1, 9))
        assert decision.fire == [] and decision.missed == [utc(2026, 1, 1, 3)]

    def test_none_records_missed_slots_and_fires_nothing(self) -> None:
        j = job(schedule="every 1m", catchup="none")
        decision = decide(j, utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 10, 2, 1))
        assert decision.fire == [] and len(decision.missed) == 3

    def test_none_still_fires_an_on_time_slot(self) -> None:
        j = job(schedule="every 1m", catchup="none")
        assert decide(j, utc(2026, 1, 1, 10), utc(2026, 1, 1, 10, 0, 0, 3000)).fire == [
            utc(2026, 1, 1, 10)
        ]

    def test_all_replays_in_order_capped(self) -> None:
        j = job(schedule="every 1m", catchup="all", misfire_grace=86400.0)
        decision = decide(j, utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 3, 0))
        assert len(decision.fire) == CATCHUP_ALL_CAP
        assert decision.fire == sorted(decision.fire)
        assert decision.fire[-1] == utc(2026, 1, 1, 3, 0)
        assert len(decision.missed) == 181 - CATCHUP_ALL_CAP

    def test_all_replays_only_slots_within_the_grace(self) -> None:
        # Issue 16: misfire_grace bounds every catch-up, `all` included (README "Missed slots").
        j = job(schedule="every 1m", catchup="all", misfire_grace=300.0)
        decision = decide(j, utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 3, 0, 30))
        assert decision.fire == [utc(2026, 1, 1, 2, 56) + timedelta(minutes=m) for m in range(5)]
        assert decision.missed == [utc(2026, 1, 1, 0, 0) + timedelta(minutes=m) for m in range(176)]

    def test_a_forward_clock_jump_is_treated_as_missed_slots(self) -> None:
        scheduler, clock, firer, store = make(job(schedule="every 1m"))
        run_for(scheduler, clock, 60)
        clock.set(clock.now() + timedelta(minutes=10))
        run_for(scheduler, clock, 1)
        assert firer.slots("j")[-1] == utc(2026, 11, 22, 10, 11)
        missed = [r for r in store.runs("j") if r.outcome == "missed"]
        assert missed[0].count == 9

    def test_a_backward_clock_step_never_refires_a_slot(self) -> None:
        scheduler, clock, firer, _ = make(job(schedule="every 1m"))
        run_for(scheduler, clock, 180)
        clock.set(clock.now() - timedelta(minutes=5))
        run_for(scheduler, clock, 600)
        slots = firer.slots("j")
        assert len(slots) == len(set(slots))
        assert slots == sorted(slots)


class TestReload:
    def test_added_removed_and_changed_jobs_take_effect(self) -> None:
        table = [job("a", "every 1m"), job("b", "every 1m")]
        scheduler, clock, firer, _ = make(*table, reload=lambda: tuple(table))
        run_for(scheduler, clock, 60)
        table[:] = [job("a", "every 2m"), job("c", "every 1m")]
        scheduler.request_reload()
        scheduler._do_reload()
        firer.fired.clear()
        run_for(scheduler, clock, 120)
        assert {name for name, _, _ in firer.fired} == {"a", "c"}
        assert all(slot.minute % 2 == 0 for slot in firer.slots("a"))

    @pytest.mark.parametrize("overlap", ["skip", "queue", "allow"])
    def test_a_reload_just_before_a_slot_does_not_hand_that_slot_on_again(
        self, overlap: str
    ) -> None:
        # Issue 15.1: the loop hands a slot on `lead` ahead of its instant; a reload of the
        # changed job in that window planned from `now` and handed the same slot on again.
        table = [job("a", "every 1m", overlap=overlap)]
        clock = VirtualClock(utc(2026, 11, 22, 10, 0, 30))
        firer, store = RecordingFirer(), MemoryStateStore()
        scheduler = Scheduler(jobs=table, firer=firer, store=store, clock=clock,
                              log=structlog.get_logger(), tick_seconds=30,
                              reload=lambda: tuple(table), lead_seconds=0.05)  # fmt: skip
        scheduler.start(clock.now())
        clock.set(utc(2026, 11, 22, 10, 0, 59, 970_000))  # 30 ms before 10:01
        scheduler.fire_due(clock.now())
        assert firer.slots("a") == [utc(2026, 11, 22, 10, 1)]
        table[:] = [job("a", "every 1m", overlap=overlap, timeout=5.0)]  # changed
        scheduler._do_reload()
        run_for(scheduler, clock, 120)
        slots = firer.slots("a")
        assert slots == [
            utc(2026, 11, 22, 10, 1),
            utc(2026, 11, 22, 10, 2),
            utc(2026, 11, 22, 10, 3),
        ]

    def test_a_reload_after_a_backward_clock_step_plans_after_the_last_handled_slot(
        self,
    ) -> None:
        table = [job("a", "every 1m", overlap="allow")]
        scheduler, clock, firer, _ = make(*table, reload=lambda: tuple(table))
        run_for(scheduler, clock, 180)
        handled = firer.slots("a")
        clock.set(clock.now() - timedelta(seconds=150))  # behind three handled slots
        table[:] = [job("a", "every 1m", overlap="allow", retries=1)]
        scheduler._do_reload()
        run_for(scheduler, clock, 300)
        slots = firer.slots("a")
        assert len(slots) == len(set(slots)), slots
        assert slots[: len(handled)] == handled and slots == sorted(slots)

    def test_a_slot_already_handed_on_is_never_handed_on_again(self) -> None:
        # The structural guard behind every planning path: the loop compares each slot with
        # the job's last handled slot before it is marked started.
        scheduler, clock, firer, _ = make(job("a", "every 1m", overlap="allow"))
        run_for(scheduler, clock, 120)
        again = firer.slots("a")[-1]
        scheduler._fire(scheduler.jobs()["a"], [again], None)
        scheduler._hand_on()
        assert firer.slots("a").count(again) == 1

    def test_an_invalid_table_is_rejected_and_the_old_one_kept(self) -> None:
        def broken() -> tuple[Job, ...]:
            raise ValueError("bad file")

        scheduler, clock, firer, _ = make(job("a", "every 1m"), reload=broken)
        scheduler._do_reload()
        run_for(scheduler, clock, 60)
        assert firer.slots("a")


def test_slots_are_formatted_as_rfc3339_utc_with_milliseconds() -> None:
    assert format_slot(utc(2026, 11, 22, 3)) == "2026-11-22T03:00:00.000Z"
    assert (
        format_slot(datetime(2026, 11, 22, 11, 0, 0, 123_999, tzinfo=UTC))
        == "2026-11-22T11:00:00.123Z"
    )


class TestResilience:
    def test_a_failing_hand_on_does_not_stop_the_job_or_the_loop(self) -> None:
        class Flaky(RecordingFirer):
            failures = 1

            def submit(
                self, job: object, slots: list[datetime], *, deadline: datetime | None
            ) -> None:
                if self.failures:
                    self.failures -= 1
                    raise RuntimeError("a bug in dispatch")
                super().submit(job, slots, deadline=deadline)

        clock = VirtualClock(T0)
        firer = Flaky()
        scheduler = Scheduler(jobs=[job(schedule="every 1m")], firer=firer, store=MemoryStateStore(),
                              clock=clock, log=structlog.get_logger(), tick_seconds=30)  # fmt: skip
        import threading

        loop = threading.Thread(target=scheduler.run)
        loop.start()
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while len(firer.fired) < 2 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        scheduler.stop()
        loop.join(5)
        assert firer.slots("j")[:2] == [utc(2026, 11, 22, 10, 2), utc(2026, 11, 22, 10, 3)]

    def test_a_slot_whose_handling_fails_still_plans_the_next(self) -> None:
        scheduler, clock, firer, store = make(job(schedule="every 1m"))
        original = store.job_state
        calls = {"n": 0}

        def broken_once(name: str):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("store hiccup")
            return original(name)

        store.job_state = broken_once  # type: ignore[method-assign]
        run_for(scheduler, clock, 180)
        assert firer.slots("j") == [utc(2026, 11, 22, 10, 2), utc(2026, 11, 22, 10, 3)]


class TestAScheduleThatCannotBeEvaluated:
    """Issue 15.9: an evaluator that cannot find the next fire costs that job, loudly, and
    nothing else: the loop and every other job go on."""

    class _Stuck(type(parse("every 1m"))):  # type: ignore[misc]
        def next_after(self, dt: datetime) -> datetime | None:
            from schedule_grammar import ScheduleError

            raise ScheduleError("'stuck': no next fire found")

    def test_at_start_the_job_is_not_planned_and_the_others_fire(self) -> None:
        from structlog.testing import capture_logs

        stuck = Job(name="stuck", schedule=self._Stuck(seconds=60), endpoint="/x")
        with capture_logs() as logs:
            scheduler, clock, firer, _ = make(stuck, job("ok", "every 1m"))
            run_for(scheduler, clock, 180)
        assert len(firer.slots("ok")) == 3 and not firer.slots("stuck")
        (line,) = [e for e in logs if e["event"].startswith("job not planned")]
        assert line["job"] == "stuck" and "no next fire found" in line["error"]

    def test_when_a_slot_is_handled_the_job_is_unplanned_and_the_loop_goes_on(self) -> None:
        table = [job("a", "every 1m"), job("ok", "every 1m")]
        scheduler, clock, firer, _ = make(*table)
        run_for(scheduler, clock, 60)
        scheduler._jobs["a"] = Job(name="a", schedule=self._Stuck(seconds=60), endpoint="/x")
        run_for(scheduler, clock, 180)
        assert len(firer.slots("ok")) == 4
        assert "a" not in scheduler.planned()


class TestTheSystemClock:
    """Issue 15.10: a wall-clock step during a long sleep ends the sleep."""

    def test_a_forward_step_ends_a_long_sleep_within_a_second(self) -> None:
        import threading
        import time

        from services.scheduler.clock import SystemClock

        jump = {"by": 0.0}
        clock = SystemClock(wall=lambda: time.time() + jump["by"])
        threading.Timer(0.2, lambda: jump.update(by=120.0)).start()
        begun = time.monotonic()
        assert clock.wait(30) is True
        assert time.monotonic() - begun < 5  # one step check, with room for a slow machine

    def test_without_a_step_it_sleeps_the_whole_timeout(self) -> None:
        import time

        from services.scheduler.clock import SystemClock

        clock = SystemClock()
        begun = time.monotonic()
        assert clock.wait(1.5) is False
        assert time.monotonic() - begun >= 1.5

    def test_wake_ends_the_sleep(self) -> None:
        import threading

        from services.scheduler.clock import SystemClock

        clock = SystemClock()
        threading.Timer(0.1, clock.wake).start()
        assert clock.wait(30) is True
