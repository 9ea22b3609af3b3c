"""Redis coordination against a real redis-server: the lease, fencing, slot claims, shared
state and history, a Redis that goes away or loses its data; and the loop following
leadership (with a scripted coordinator, in virtual time)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from structlog.testing import capture_logs

from schedule_grammar import parse
from services.scheduler.clock import Scheduler
from services.scheduler.config import Job, load_settings
from services.scheduler.coordination import Solo
from services.scheduler.slots import idempotency_key
from services.scheduler.stores import open_store
from services.scheduler.stores.memory import MemorySchedules, MemoryStateStore
from services.scheduler.stores.protocols import JobState, Leadership, RunRecord, StoreUnavailable
from services.scheduler.stores.redis import (
    RedisLease,
    RedisSchedules,
    RedisStateStore,
    connect_redis,
    lease_value,
)
from tests.support import RecordingFirer, RedisServer, VirtualClock

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LOG = structlog.get_logger()


def lease(server: RedisServer, ttl: float = 1.0, name: str = "a", ns: str = "cc") -> RedisLease:
    client = server.client()
    return RedisLease(client, namespace=ns, ttl=ttl, log=LOG, identity=name)


def store(server: RedisServer, value: str, ns: str = "cc", **kwargs: object) -> RedisStateStore:
    return RedisStateStore(
        server.client(),
        namespace=ns,
        lease_value=value,
        claim_ttl=300,
        log=LOG,
        **kwargs,  # type: ignore[arg-type]
    )


def run(job: str, minutes: int, outcome: str = "success", **fields: object) -> RunRecord:
    slot = T + timedelta(minutes=minutes)
    values: dict[str, object] = {"job": job, "slot": slot, "key": idempotency_key(job, slot),
                                 "attempt": 1, "started": slot, "outcome": outcome}  # fmt: skip
    values.update(fields)
    return RunRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def closing() -> Iterator[Callable[[RedisStateStore], RedisStateStore]]:
    opened: list[RedisStateStore] = []

    def keep(value: RedisStateStore) -> RedisStateStore:
        opened.append(value)
        return value

    yield keep
    for value in opened:
        value.close()


class TestLease:
    def test_one_replica_leads_the_other_stands_by_and_knows_who_leads(
        self, redis_server: RedisServer
    ) -> None:
        a, b = lease(redis_server, name="a"), lease(redis_server, name="b")
        a._cycle()
        b._cycle()
        assert a.term() == 1 and a.leading() and a.fencing_token() == 1
        assert b.term() is None and not b.leading() and b.fencing_token() is None
        assert b.status() == Leadership(
            role="standby", identity="b", leader="a", epoch=1, problem=None
        )
        assert a.status().role == "leader" and a.status().leader == "a"
        assert redis_server.client().get("cc:leader") == a.value

    def test_renewal_keeps_the_lease_past_its_ttl(self, redis_server: RedisServer) -> None:
        a, b = lease(redis_server, name="a"), lease(redis_server, name="b")
        for _ in range(5):  # 5 x 0.4 s = 2 s, twice the TTL
            a._cycle()
            b._cycle()
            time.sleep(0.4)
        assert a.term() == 1 and b.term() is None

    def test_a_release_hands_over_with_a_higher_epoch(self, redis_server: RedisServer) -> None:
        a, b = lease(redis_server, name="a"), lease(redis_server, name="b")
        a._cycle()
        b._cycle()
        with capture_logs() as logs:
            a.stop()
        assert "lease released" in [entry["event"] for entry in logs]
        assert redis_server.client().get("cc:leader") is None
        b._cycle()
        assert b.term() == 2 and b.fencing_token() == 2

    def test_release_never_deletes_another_replicas_lease(self, redis_server: RedisServer) -> None:
        a, b = lease(redis_server, name="a"), lease(redis_server, name="b")
        a._cycle()
        time.sleep(1.05)  # a's lease expires in Redis unrenewed; b takes it
        b._cycle()
        assert b.term() == 2
        a.stop()
        assert redis_server.client().get("cc:leader") == b.value

    def test_a_leader_stops_before_its_lease_could_expire(self, redis_server: RedisServer) -> None:
        a = lease(redis_server, ttl=1.0)
        a._cycle()
        time.sleep(0.85)  # inside the TTL, past the safety margin (ttl/5)
        assert redis_server.client().pttl("cc:leader") > 0  # Redis still holds it ...
        assert not a.leading() and a.term() is None  # ... but a no longer fires

    def test_a_lapsed_leader_finds_the_lease_taken_and_steps_down(
        self, redis_server: RedisServer
    ) -> None:
        a, b = lease(redis_server, name="a"), lease(redis_server, name="b")
        a._cycle()
        time.sleep(1.05)
        b._cycle()
        with capture_logs() as logs:
            a._cycle()
        assert a.term() is None and a.status().leader == "b"
        assert "lease lost: it expired or another replica took it" in [e["event"] for e in logs]

    def test_the_epoch_never_goes_back_when_redis_loses_its_data(
        self, redis_server: RedisServer
    ) -> None:
        a = lease(redis_server)
        for _ in range(3):  # epochs 1, 2, 3
            redis_server.client().delete("cc:leader")
            a._epoch = None
            a._cycle()
        assert a.term() == 3
        redis_server.restart()  # nothing kept on disk: epoch counter gone
        a._cycle()  # the renewal finds no lease: lost; acquired again above what it saw
        assert a.term() == 4 and redis_server.client().get("cc:epoch") == "4"

    def test_namespaces_do_not_meet(self, redis_server: RedisServer) -> None:
        a, b = lease(redis_server, name="a", ns="one"), lease(redis_server, name="b", ns="two")
        a._cycle()
        b._cycle()
        assert a.term() == 1 and b.term() == 1

    def test_redis_away_then_back(self, redis_server: RedisServer) -> None:
        a = lease(redis_server, ttl=1.0)
        a._cycle()
        redis_server.stop()
        with capture_logs() as logs:
            a._cycle()
            assert a.leading()  # within its lease it may still fire ...
            time.sleep(0.85)
            a._cycle()
        assert not a.leading()  # ... and stops when the lease cannot be confirmed
        events = [entry["event"] for entry in logs]
        assert "cannot reach Redis; a leader keeps firing only while its lease is certain" in events
        assert "lease could not be renewed in time; firing stopped until Redis answers" in events
        problem = a.status().problem
        assert problem is not None and "cannot reach Redis at redis" in problem
        redis_server.start()
        with capture_logs() as logs:
            a._cycle()
        assert a.leading() and a.status().problem is None
        assert "Redis reachable again" in [entry["event"] for entry in logs]

    def test_the_thread_announces_changes(self, redis_server: RedisServer) -> None:
        a, b = lease(redis_server, ttl=1.0, name="a"), lease(redis_server, ttl=1.0, name="b")
        changes: list[int | None] = []
        a.start(lambda: changes.append(a.term()))
        b.start(lambda: None)
        time.sleep(1.2)
        assert changes == [1] and a.term() == 1  # renewed by the thread, past one TTL
        a.stop()
        deadline = time.monotonic() + 3
        while b.term() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.term() == 2
        b.stop()


class TestClaims:
    def test_the_leader_claims_each_slot_once(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        db = closing(store(redis_server, a.value))
        slots = [("j", T, idempotency_key("j", T)), ("k", T, idempotency_key("k", T))]
        assert db.mark_started(slots) == {}
        again = closing(store(redis_server, a.value))  # the same slots handed on twice
        assert again.mark_started(slots) == {key: "taken" for _, _, key in slots}
        client = redis_server.client()
        ms = round(T.timestamp() * 1000)
        assert client.exists(f"cc:claim:j:{ms}") and 0 < client.pttl(f"cc:claim:j:{ms}") <= 300_000
        assert set(client.hkeys("cc:inflight")) == {key for _, _, key in slots}

    def test_a_replica_without_the_lease_claims_nothing(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        other = closing(store(redis_server, lease_value("b")))
        key = idempotency_key("j", T)
        assert other.mark_started([("j", T, key)]) == {key: "not_leader"}
        assert other.claim("j", "j@manual-1") == "not_leader"
        client = redis_server.client()
        assert client.keys("cc:claim:*") == [] and client.hlen("cc:inflight") == 0

    def test_a_job_paused_in_redis_lets_the_slot_pass(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        leader = closing(store(redis_server, a.value))
        closing(store(redis_server, lease_value("b"))).set_paused("j", True)  # via a standby
        key = idempotency_key("j", T)
        assert leader.mark_started([("j", T, key)]) == {key: "paused"}
        assert leader.job_state("j").paused and leader.job_state("j").last_slot == T
        assert redis_server.client().hget("cc:job:j", "last_slot") is not None

    def test_manual_triggers_claim_their_own_key(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        db = closing(store(redis_server, a.value))
        db.set_paused("j", True)  # a manual trigger fires a paused job, as on one replica
        assert db.claim("j", "j@manual-abc") is None
        assert db.claim("j", "j@manual-abc") == "taken"
        assert redis_server.client().exists("cc:claim:j:manual-abc")
        assert db.job_state("j").last_slot is None  # a manual key is not a slot

    def test_redis_away_refuses_every_claim(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        db = closing(store(redis_server, a.value))
        redis_server.stop()
        key = idempotency_key("j", T)
        assert db.mark_started([("j", T, key)]) == {key: "unavailable"}
        assert db.claim("j", "j@manual-x") == "unavailable"
        assert "cannot reach Redis" in (db.problem() or "")
        with pytest.raises(StoreUnavailable):
            db.set_paused("j", True)


class TestSharedState:
    def test_a_new_leader_sees_state_and_history_the_old_one_wrote(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        old = closing(store(redis_server, a.value))
        old.mark_started([("j", T, idempotency_key("j", T))])
        old.record_run(run("j", 0, status=200, duration=0.25))
        old.record_run(run("j", 0, outcome="failed", status=503, attempt=2, error="HTTP 503"))
        old.mark_finished("j", idempotency_key("j", T))
        old.advance("j", T + timedelta(minutes=15))
        assert old.flush()
        new = closing(store(redis_server, lease_value("b")))
        new.refresh()
        state = new.job_state("j")
        assert state.last_slot == T + timedelta(minutes=15)
        assert (state.last_outcome, state.last_status) == ("failed", 503)
        assert state.last_success == T
        history = new.runs("j")
        assert [(r.attempt, r.outcome, r.status, r.error) for r in history] == [
            (2, "failed", 503, "HTTP 503"),
            (1, "success", 200, None),
        ]
        assert history[1].duration == 0.25 and history[1].slot == T
        assert new.recover_interrupted(T) == []  # finished: nothing in flight

    def test_a_call_in_flight_when_the_leader_died_is_recorded_interrupted(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        a = lease(redis_server)
        a._cycle()
        closing(store(redis_server, a.value)).mark_started([("j", T, idempotency_key("j", T))])
        new = closing(store(redis_server, lease_value("b")))
        [record] = new.recover_interrupted(T + timedelta(seconds=20))
        assert (record.job, record.slot, record.outcome) == ("j", T, "interrupted")
        client = redis_server.client()  # recorded and cleared together, before it returns
        assert client.hlen("cc:inflight") == 0 and client.xlen("cc:runs:j") == 1
        assert new.recover_interrupted(T) == []  # recorded once
        assert [r.outcome for r in new.runs("j")] == ["interrupted"]

    def test_records_of_slots_not_called_are_written_before_anything_else_happens(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        # A leader killed right after a takeover must not lose the record of what it missed:
        # the next claim advances past those slots at once.
        db = closing(store(redis_server, "x"))
        client = redis_server.client()
        db.record_run(run("j", 0))  # a call's outcome: batched
        db.record_run(run("j", 1, outcome="missed", count=3))  # written through, after it
        assert [f["outcome"] for _, f in client.xrange("cc:runs:j")] == ["success", "missed"]
        db.record_run(run("j", 2))
        assert client.xlen("cc:runs:j") == 2  # still batched

    def test_history_is_capped(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        db = closing(store(redis_server, "x", max_runs=10))
        for minute in range(500):
            db.record_run(run("j", minute))
        assert db.flush()
        length = redis_server.client().xlen("cc:runs:j")
        assert 10 <= length < 200  # approximate trimming (XADD MAXLEN ~) keeps it bounded
        assert [r.slot for r in db.runs("j", 3)] == [
            T + timedelta(minutes=m) for m in (499, 498, 497)
        ]

    def test_writes_wait_for_a_redis_that_is_away(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        db = closing(store(redis_server, "x"))
        redis_server.stop()
        db.record_run(run("j", 0))
        assert not db.flush(timeout=0.5)
        assert db.job_state("j").last_outcome == "success"  # served from memory meanwhile
        redis_server.start()
        assert db.flush(timeout=5)
        assert [r.outcome for r in db.runs("j")] == ["success"]
        assert db.problem() is None

    def test_a_redis_that_lost_its_data_gets_back_what_this_replica_knew(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        db = closing(store(redis_server, "x"))
        db.advance("j", T)
        db.set_paused("k", True)
        assert db.flush()
        redis_server.restart()  # empty
        db.refresh()
        assert db.flush()
        assert db.job_state("j").last_slot == T
        fresh = closing(store(redis_server, "y"))
        fresh.refresh()
        assert fresh.job_state("j").last_slot == T and fresh.job_state("k").paused

    def test_a_redis_reset_marks_what_each_replica_knew_as_uncertain(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        # Issue 15.2: a standby knew slot :00; the leader had fired :10 when Redis lost its
        # data. What the standby knew is restored, marked so nobody catches up from it.
        standby = closing(store(redis_server, "s"))
        standby.advance("j", T)
        assert standby.flush()
        standby.refresh()
        redis_server.restart()  # empty
        with capture_logs() as logs:
            standby.refresh()
        assert [e for e in logs if e["event"].startswith("Redis lost its state")]
        assert standby.job_state("j") == JobState(last_slot=T, uncertain=True)
        assert standby.flush()
        assert redis_server.client().hget("cc:job:j", "restored") == "1"
        later = closing(store(redis_server, "l"))  # a replica started after the reset
        later.refresh()
        assert later.job_state("j").uncertain
        redis_server.client().set("cc:leader", "l")
        later.mark_started([("j", T + timedelta(minutes=1), "j@1")])  # a claim makes it certain
        assert not later.job_state("j").uncertain
        assert redis_server.client().hget("cc:job:j", "restored") is None

    def test_no_reset_is_seen_on_a_first_start(
        self, redis_server: RedisServer, closing: Callable[[RedisStateStore], RedisStateStore]
    ) -> None:
        db = closing(store(redis_server, "x"))
        with capture_logs() as logs:
            db.refresh()
            db.refresh()
        assert not [e for e in logs if e["event"].startswith("Redis lost its state")]


class TestWiring:
    def test_the_state_url_selects_redis(self, redis_server: RedisServer) -> None:
        settings = load_settings({"SCHEDULER_STATE_URL": redis_server.url})
        opened = open_store(settings, LOG)
        coordinator = opened.coordinator
        assert isinstance(opened.store, RedisStateStore) and isinstance(coordinator, RedisLease)
        assert isinstance(opened.schedules, RedisSchedules)
        coordinator.start(lambda: None)
        assert coordinator.term() == 1
        assert redis_server.client().get("cronclock:leader") == coordinator.value
        coordinator.stop()
        opened.close()

    def test_the_password_comes_from_the_url_or_the_setting(
        self, redis_server: RedisServer
    ) -> None:
        redis_server.client().config_set("requirepass", "s3cret")
        port = redis_server.port
        for env in (
            {"SCHEDULER_STATE_URL": f"redis://:s3cret@127.0.0.1:{port}/0"},
            {"SCHEDULER_STATE_URL": f"redis://127.0.0.1:{port}/0",
             "SCHEDULER_REDIS_PASSWORD": "s3cret"},
        ):  # fmt: skip
            assert connect_redis(load_settings(env)).ping()

    def test_embedded_state_is_solo(self) -> None:
        opened = open_store(load_settings({"SCHEDULER_STATE_URL": "memory://"}), LOG)
        coordinator = opened.coordinator
        assert isinstance(opened.store, MemoryStateStore)
        assert isinstance(opened.schedules, MemorySchedules)
        assert isinstance(coordinator, Solo) and coordinator.term() == 0
        assert coordinator.fencing_token() is None
        opened.close()


# -------------------------------------------------------------------------------------------
# The loop follows leadership (scripted coordinator, virtual time)


class Scripted(Solo):
    def __init__(self) -> None:
        super().__init__("me")
        self.current: int | None = None
        self.stepped_down = 0

    def term(self) -> int | None:
        return self.current

    def leading(self) -> bool:
        return self.current is not None

    def step_down(self) -> None:
        self.stepped_down += 1
        self.current = None


def job(name: str = "j", schedule: str = "every 10s", **fields: object) -> Job:
    return Job(name=name, schedule=parse(schedule), endpoint="/x", **fields)  # type: ignore[arg-type]


class TestLoopFollowsLeadership:
    def make(
        self, *jobs: Job
    ) -> tuple[Scheduler, VirtualClock, RecordingFirer, MemoryStateStore, Scripted]:
        clock, firer, db, coordinator = (
            VirtualClock(T),
            RecordingFirer(),
            MemoryStateStore(),
            Scripted(),
        )
        scheduler = Scheduler(jobs=jobs, firer=firer, store=db, clock=clock, log=LOG,
                              tick_seconds=5, coordinator=coordinator)  # fmt: skip
        return scheduler, clock, firer, db, coordinator

    def beat(self, scheduler: Scheduler, clock: VirtualClock, seconds: float) -> None:
        end = clock.monotonic() + seconds
        while clock.monotonic() < end:
            scheduler._follow_leadership()
            if scheduler.leading:
                scheduler.fire_due(clock.now())
            clock.wait(min(1.0, end - clock.monotonic()))

    def test_a_leader_never_catches_up_from_state_restored_after_a_reset(self) -> None:
        from dataclasses import replace

        scheduler, clock, firer, db, coordinator = self.make(job())
        self.beat(scheduler, clock, 1)
        # Redis lost its data; this replica knew the old leader's :00 only.
        db.put("j", replace(db.job_state("j"), last_slot=T, uncertain=True))
        clock.advance(15)  # :10 is due (maybe fired by the old leader)
        coordinator.current = 7
        self.beat(scheduler, clock, 10)
        assert firer.slots("j") == [T + timedelta(seconds=20)]
        (note,) = [r for r in db.runs("j") if r.outcome == "missed"]
        assert note.slot == T + timedelta(seconds=10) and "shared state was lost" in (
            note.error or ""
        )

    def test_a_standby_plans_nothing_and_a_leader_plans_from_the_shared_state(self) -> None:
        scheduler, clock, firer, db, coordinator = self.make(job())
        self.beat(scheduler, clock, 30)
        assert firer.fired == [] and not scheduler.leading
        assert scheduler.planned() == {"j": T + timedelta(seconds=40)}  # shown, not planned
        db.advance("j", T + timedelta(seconds=20))  # the old leader handled up to :20
        coordinator.current = 1
        with capture_logs() as logs:
            self.beat(scheduler, clock, 15)
        # takeover at :30 — the :30 slot (missed during the handover) fires as catch-up,
        # then :40; nothing the old leader handled fires again
        assert firer.slots("j") == [T + timedelta(seconds=30), T + timedelta(seconds=40)]
        assert any(e["event"] == "catch-up fire" for e in logs)

    def test_losing_the_lease_stops_planning_at_once(self) -> None:
        scheduler, clock, firer, _, coordinator = self.make(job())
        coordinator.current = 1
        self.beat(scheduler, clock, 12)
        assert firer.slots("j") == [T + timedelta(seconds=10)]
        coordinator.current = None
        with capture_logs() as logs:
            self.beat(scheduler, clock, 30)
        assert firer.slots("j") == [T + timedelta(seconds=10)]
        assert scheduler.planned() != {} and not scheduler.leading
        assert "standby: not the leader any more; planning stopped" in [e["event"] for e in logs]

    def test_a_new_term_replans_even_on_the_same_replica(self) -> None:
        scheduler, clock, firer, db, coordinator = self.make(job(run_on_start=True))
        coordinator.current = 1
        self.beat(scheduler, clock, 1)
        assert len(firer.fired) == 1  # run_on_start
        coordinator.current = 3  # lapsed and re-acquired between two beats
        db.advance("j", T + timedelta(seconds=60))  # another leader handled up to 1:00
        self.beat(scheduler, clock, 25)
        assert len(firer.fired) == 1  # no second run_on_start, no slot before 1:00
        self.beat(scheduler, clock, 50)
        assert firer.slots("j")[1:] == [T + timedelta(seconds=70)]

    def test_a_not_leader_refusal_steps_down(self) -> None:
        scheduler, clock, firer, db, coordinator = self.make(job())
        coordinator.current = 1
        self.beat(scheduler, clock, 1)

        def refuse(slots: object) -> dict[str, str]:
            return {key: "not_leader" for _, _, key in slots}  # type: ignore[attr-defined]

        db.mark_started = refuse  # type: ignore[method-assign,assignment]
        self.beat(scheduler, clock, 10)
        assert firer.fired == [] and coordinator.stepped_down == 1 and not scheduler.leading
