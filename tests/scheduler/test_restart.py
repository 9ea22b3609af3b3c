"""Restarts in virtual time: a store that outlives the process, and the catch-up policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from schedule_grammar import parse
from services.scheduler.clock import Scheduler
from services.scheduler.config import Job
from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.stores.protocols import StateStore
from tests.support import RecordingFirer, VirtualClock

T0 = datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC)


def job(schedule: str = "every 1m", **fields: object) -> Job:
    return Job(name="j", schedule=parse(schedule), endpoint="/x", **fields)  # type: ignore[arg-type]


class World:
    """One store and one clock; processes come and go."""

    def __init__(self, *jobs: Job, start: datetime = T0, store: StateStore | None = None) -> None:
        self.jobs = jobs
        self.clock = VirtualClock(start)
        self.store = store or MemoryStateStore()
        self.firer = RecordingFirer()
        self.scheduler: Scheduler | None = None

    def start(self) -> None:
        self.scheduler = Scheduler(jobs=self.jobs, firer=self.firer, store=self.store, clock=self.clock,
                                   log=structlog.get_logger(), tick_seconds=30)  # fmt: skip
        self.scheduler.start(self.clock.now())

    def run(self, seconds: float) -> None:
        assert self.scheduler is not None
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end:
            self.scheduler.fire_due(self.clock.now())
            self.clock.wait(
                min(
                    self.scheduler.seconds_until_next(self.clock.now()),
                    end - self.clock.monotonic(),
                )
            )
        self.scheduler.fire_due(self.clock.now())

    def stop(self) -> None:
        self.scheduler = None

    def down_for(self, seconds: float) -> None:
        self.stop()
        self.clock.advance(seconds)

    def fired(self) -> list[datetime]:
        return self.firer.slots("j")

    def missed(self) -> list[int]:
        return [r.count for r in self.store.runs("j") if r.outcome == "missed"]


def at(minute: int, hour: int = 10) -> datetime:
    return datetime(2026, 11, 22, hour, minute, tzinfo=UTC)


class TestRestart:
    def test_a_clean_restart_continues_after_the_last_fired_slot(self) -> None:
        world = World(job())
        world.start()
        world.run(150)  # fires 10:01, 10:02, 10:03
        world.down_for(20)  # back at 10:03:20, before 10:04
        world.start()
        world.run(100)
        assert world.fired() == [at(1), at(2), at(3), at(4), at(5)]
        assert world.missed() == []

    def test_a_restart_within_the_same_slot_fires_nothing_twice(self) -> None:
        world = World(job("every 1h"))
        world.start()
        world.run(3600)  # fires 11:00
        world.down_for(1)
        world.start()
        world.run(1)
        assert world.fired() == [at(0, 11)]

    def test_first_start_fires_nothing_at_once(self) -> None:
        world = World(job("every 1h"))
        world.start()
        world.run(1)
        assert world.fired() == []


class TestStoppedForThreeSlots:
    def run_policy(self, catchup: str) -> World:
        world = World(job(catchup=catchup, misfire_grace=300.0))
        world.start()
        world.run(60)  # 10:01
        world.down_for(200)  # back at 10:04:50: 10:02, 10:03, 10:04 fell due while down
        world.start()
        return world

    def test_latest_fires_the_latest_with_its_own_slot_and_records_two_missed(self) -> None:
        world = self.run_policy("latest")
        assert world.fired() == [at(1), at(4)]
        assert world.missed() == [2]

    def test_none_records_three_missed_and_fires_none(self) -> None:
        world = self.run_policy("none")
        assert world.fired() == [at(1)]
        assert world.missed() == [3]
        world.run(10)
        assert world.fired() == [at(1), at(5)], "then continues on schedule"

    def test_all_replays_the_three_in_order(self) -> None:
        world = self.run_policy("all")
        assert world.fired() == [at(1), at(2), at(3), at(4)]
        assert world.missed() == []

    def test_latest_beyond_grace_fires_nothing(self) -> None:
        world = World(
            job("daily 03:00", misfire_grace=300.0), start=datetime(2026, 11, 22, 2, 59, tzinfo=UTC)
        )
        world.start()
        world.run(120)
        world.down_for(86400 + 3600)  # the next day's 03:00 passes while down; back at 04:01
        world.start()
        assert world.fired() == [datetime(2026, 11, 22, 3, tzinfo=UTC)]
        assert world.missed() == [1]


class TestDstDays:
    def test_a_slot_moved_by_the_spring_gap_is_caught_up_with_its_moved_time(self) -> None:
        # daily 02:30 in Berlin: on 2027-03-28 it fires at 03:00 CEST (01:00 UTC).
        world = World(job("daily 02:30 in Europe/Berlin", misfire_grace=600.0),
                      start=datetime(2027, 3, 27, 1, tzinfo=UTC))  # fmt: skip
        world.start()
        world.run(3600)  # fires 2027-03-27 02:30 CET
        world.stop()
        world.clock.set(datetime(2027, 3, 28, 1, 5, tzinfo=UTC))  # down over the gap
        world.start()
        assert world.fired() == [
            datetime(2027, 3, 27, 1, 30, tzinfo=UTC),
            datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
        ]

    def test_a_restart_in_the_repeated_hour_does_not_fire_the_hour_again(self) -> None:
        world = World(
            job("daily 02:30 in Europe/Berlin"), start=datetime(2026, 10, 25, 0, 20, tzinfo=UTC)
        )
        world.start()
        world.run(900)  # fires 02:30 CEST = 00:30 UTC
        world.stop()
        world.clock.set(datetime(2026, 10, 25, 1, 20, tzinfo=UTC))  # 02:20 CET, second copy
        world.start()
        world.run(3600)  # past 02:30 CET
        assert world.fired() == [datetime(2026, 10, 25, 0, 30, tzinfo=UTC)]


class TestPausedAcrossRestarts:
    def test_a_paused_job_stays_paused(self) -> None:
        world = World(job())
        world.store.set_paused("j", True)
        world.start()
        world.run(300)
        world.down_for(10)
        world.start()
        world.run(300)
        assert world.fired() == []


actions = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.integers(1, 400)),
        st.tuples(st.just("down"), st.integers(1, 900)),
        st.tuples(st.just("step"), st.integers(-900, 900)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    plan=actions,
    schedule=st.sampled_from(
        ["every 1m", "every 7m offset 3m", "cron */2 * * * *", "daily 10:05,10:20"]
    ),
    catchup=st.sampled_from(["latest", "none", "all"]),
)
def test_no_slot_is_ever_fired_twice(
    plan: list[tuple[str, int]], schedule: str, catchup: str
) -> None:
    """Any sequence of runs, stops and wall-clock steps (forward or back)."""
    world = World(job(schedule, catchup=catchup))
    world.start()
    for action, amount in plan:
        if action == "run":
            if world.scheduler is None:
                world.start()
            world.run(amount)
        elif action == "down":
            world.down_for(amount)
        else:
            world.clock.set(world.clock.now() + timedelta(seconds=amount))
    fired = world.fired()
    assert len(fired) == len(set(fired)), fired
    parsed = parse(schedule)
    for slot in fired:  # every fire is a real slot of the schedule
        assert parsed.next_after(slot - timedelta(microseconds=1)) == slot
