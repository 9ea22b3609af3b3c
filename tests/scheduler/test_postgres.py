"""The PostgreSQL back-end against a real server (a cluster of the session's own, a database per
test; tests that stop the server start a cluster of their own): schema and migrations, the
lease, slot claims under UNIQUE (job, slot), shared state and history, runtime schedules and
their notifications, a server that goes away, terminates connections or loses its data."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from structlog.testing import capture_logs

from services.scheduler.config import load_settings
from services.scheduler.slots import idempotency_key, manual_key
from services.scheduler.stores import open_store
from services.scheduler.stores.postgres import (
    SCHEMA_VERSION,
    Database,
    PostgresLease,
    PostgresSchedules,
    PostgresStateStore,
    UnusableSchema,
)
from services.scheduler.stores.protocols import JobState, Put, RunRecord, StoreUnavailable
from tests.support import PostgresServer

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LOG = structlog.get_logger()


class Replica:
    """One replica's view: its own pool, lease and stores, on the shared database."""

    def __init__(self, url: str, name: str, *, ttl: float = 1.0, ns: str = "cronclock") -> None:
        self.db = Database(url, namespace=ns, timeout=0.5, log=LOG)
        self.lease = PostgresLease(self.db, ttl=ttl, log=LOG, identity=name)
        self.store = PostgresStateStore(self.db, lease_value=self.lease.value, log=LOG, max_runs=5)
        self.schedules = PostgresSchedules(self.db, self.store, log=LOG)

    def lead(self) -> Replica:
        self.lease._cycle()
        assert self.lease.leading()
        return self

    def close(self) -> None:
        self.schedules.close()
        self.store.close()
        self.db.close()


@pytest.fixture
def replicas() -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(url: str, name: str = "a", **kwargs: object) -> Replica:
        replica = Replica(url, name, **kwargs)  # type: ignore[arg-type]
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.close()


def slot(job: str, minutes: int = 0) -> tuple[str, datetime, str]:
    at = T + timedelta(minutes=minutes)
    return job, at, idempotency_key(job, at)


def run(job: str, minutes: int, outcome: str = "success", **fields: object) -> RunRecord:
    at = T + timedelta(minutes=minutes)
    values: dict[str, object] = {"job": job, "slot": at, "key": idempotency_key(job, at),
                                 "attempt": 1, "started": at, "outcome": outcome}  # fmt: skip
    values.update(fields)
    return RunRecord(**values)  # type: ignore[arg-type]


class TestSchema:
    def test_the_daemon_creates_its_schema_under_the_namespace(
        self, postgres_url: str, postgres_cluster: PostgresServer
    ) -> None:
        settings = load_settings(
            {"SCHEDULER_STATE_URL": postgres_url, "SCHEDULER_NAMESPACE": "my.app"}
        )
        opened = open_store(settings, LOG)
        try:
            assert isinstance(opened.store, PostgresStateStore)
            assert isinstance(opened.coordinator, PostgresLease)
        finally:
            opened.close()
        database = postgres_url.rpartition("/")[2]
        tables = postgres_cluster.sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'my.app'",
            database,
        )
        assert {name for (name,) in tables} == {
            "meta", "lease", "claims", "jobs", "in_flight", "runs", "schedules",
        }  # fmt: skip
        version = postgres_cluster.sql(
            "SELECT value FROM \"my.app\".meta WHERE key = 'version'", database
        )
        assert version == [(str(SCHEMA_VERSION),)]

    def test_a_schema_from_a_newer_cronclock_is_refused_with_its_version(
        self, postgres_url: str, postgres_cluster: PostgresServer
    ) -> None:
        database = postgres_url.rpartition("/")[2]
        Database(postgres_url, namespace="cronclock", timeout=1, log=LOG).migrate()
        postgres_cluster.sql(
            "UPDATE cronclock.meta SET value = '99' WHERE key = 'version'", database
        )
        db = Database(postgres_url, namespace="cronclock", timeout=1, log=LOG)
        with pytest.raises(UnusableSchema, match="at version 99, from a newer cronclock"):
            db.migrate()
        db.close()

    def test_replicas_starting_together_migrate_once(self, postgres_url: str) -> None:
        dbs = [Database(postgres_url, namespace="cronclock", timeout=5, log=LOG) for _ in range(4)]
        errors: list[BaseException] = []

        def migrate(db: Database) -> None:
            try:
                db.migrate()
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=migrate, args=(db,)) for db in dbs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        for db in dbs:
            db.close()


class TestLease:
    def test_one_replica_leads_the_other_stands_by(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a, b = replicas(postgres_url, "a"), replicas(postgres_url, "b")
        a.lease._cycle()
        b.lease._cycle()
        assert a.lease.term() == 1 and b.lease.term() is None
        status = b.lease.status()
        assert status.role == "standby" and status.leader == "a" and status.epoch == 1

    def test_renewal_keeps_it_past_the_ttl_and_a_release_hands_over_higher(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a, b = replicas(postgres_url, "a"), replicas(postgres_url, "b")
        for _ in range(5):  # 2 s, twice the TTL
            a.lease._cycle()
            b.lease._cycle()
            time.sleep(0.4)
        assert a.lease.term() == 1 and b.lease.term() is None
        with capture_logs() as logs:
            a.lease.stop()
        assert "lease released" in [entry["event"] for entry in logs]
        b.lease._cycle()
        assert b.lease.term() == 2

    def test_a_lapsed_leader_stops_before_expiry_and_finds_it_taken(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a, b = replicas(postgres_url, "a"), replicas(postgres_url, "b")
        a.lease._cycle()
        time.sleep(0.85)  # inside the TTL, past the margin (ttl/5): a no longer fires
        assert not a.lease.leading()
        time.sleep(0.25)
        b.lease._cycle()
        assert b.lease.term() == 2
        a.lease._cycle()
        assert a.lease.term() is None and a.lease.status().leader == "b"

    def test_the_epoch_never_goes_back_when_the_schema_is_lost(
        self, postgres_url: str, postgres_cluster: PostgresServer, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        a.lease.stop()
        a.lease._cycle()
        assert a.lease.term() == 2
        postgres_cluster.sql("DROP SCHEMA cronclock CASCADE", postgres_url.rpartition("/")[2])
        a.lease._cycle()  # renewal fails (no schema), it is created anew, acquired above 2
        a.lease._cycle()
        assert a.lease.term() == 3


class TestClaims:
    def test_a_slot_is_claimed_once_even_by_two_leaders(
        self, postgres_url: str, postgres_cluster: PostgresServer, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        b = replicas(postgres_url, "b")
        assert a.store.mark_started([slot("j"), slot("k")]) == {}
        # split brain: b is made the lease holder while a still believes it leads
        database = postgres_url.rpartition("/")[2]
        postgres_cluster.sql(
            f"UPDATE cronclock.lease SET holder = '{b.lease.value}', epoch = 2, "
            "expires = clock_timestamp() + interval '1 minute'",
            database,
        )
        _, _, key = slot("j")
        assert b.store.mark_started([slot("j"), slot("j", 1)]) == {key: "taken"}
        assert a.store.mark_started([slot("k", 1)]) == {
            idempotency_key("k", T + timedelta(minutes=1)): "not_leader"
        }
        claims = postgres_cluster.sql(
            "SELECT job, slot, epoch FROM cronclock.claims ORDER BY job, slot", database
        )
        ms = round(T.timestamp() * 1000)
        assert claims == [("j", str(ms), 1), ("j", str(ms + 60_000), 2), ("k", str(ms), 1)]

    def test_claims_advance_state_and_record_calls_in_flight(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        a.store.mark_started([slot("j", 5)])
        b = replicas(postgres_url, "b")
        b.store.refresh()
        assert b.store.job_state("j").last_slot == T + timedelta(minutes=5)
        recovered = b.store.recover_interrupted(T + timedelta(minutes=6))
        assert [(r.job, r.outcome) for r in recovered] == [("j", "interrupted")]
        assert b.store.recover_interrupted(T) == []  # recorded and cleared once
        assert [r.outcome for r in b.store.runs("j")] == ["interrupted"]

    def test_a_paused_job_and_an_ended_schedule_are_refused(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        a.store.set_paused("j", True)
        _, _, key = slot("j")
        assert a.store.mark_started([slot("j")]) == {key: "paused"}
        assert a.store.claim("j", manual_key("j")) is None  # a manual trigger is its own slot
        runtime = slot("schedule/gone")
        assert a.store.mark_started([runtime]) == {runtime[2]: "inactive"}

    def test_history_is_bounded_and_outcomes_are_shared(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        for minute in range(8):
            a.store.record_run(run("j", minute, "failed" if minute == 7 else "success", status=500))
        a.store.close()  # trimmed every 100 records and at close, as SQLite's history
        b = replicas(postgres_url, "b")
        assert len(b.store.runs("j")) == 5  # max_runs
        b.store.refresh()
        state = b.store.job_state("j")
        assert state.last_outcome == "failed" and state.last_status == 500
        assert state.last_success == T + timedelta(minutes=6)


class TestSchedules:
    def put(self, id: str, spec: str = '{"schedule": "every 1m"}') -> Put:
        return Put(id=id, spec=spec, group="g", anchor=T, first=T + timedelta(minutes=1))

    def test_create_replace_cancel_finish_purge(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a")
        changes = a.schedules.put_schedules([self.put("x"), self.put("y")], now=T, limit=10)
        assert [change for _, change in changes] == ["created", "created"]
        again = a.schedules.put_schedules([self.put("x"), self.put("y", "{}")], now=T, limit=10)
        assert [(r.revision, change) for r, change in again] == [(1, "unchanged"), (2, "replaced")]
        assert a.schedules.group_counts() == {"g": (2, 0)}
        assert sorted(id for id, _, _ in a.schedules.active_plan()) == ["x", "y"]
        cancelled = a.schedules.cancel_schedule("x", T)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert not a.schedules.finish_schedule("y", 1, "executed", T)  # a stale revision
        assert a.schedules.finish_schedule("y", 2, "executed", T)
        listed = a.schedules.list_schedules(status=None, group="g", after="", limit=10)
        assert [(r.id, r.status) for r in listed] == [("x", "cancelled"), ("y", "executed")]
        assert sorted(a.schedules.purge_schedules(T + timedelta(seconds=1))) == ["x", "y"]
        assert a.schedules.get_schedules(["x", "y"]) == {}

    def test_the_limit_stores_nothing_of_a_batch_over_it(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        from services.scheduler.stores.protocols import LimitReached

        a = replicas(postgres_url, "a")
        a.schedules.put_schedules([self.put("x")], now=T, limit=2)
        with pytest.raises(
            LimitReached, match="1 active runtime schedules exist and this batch adds 2"
        ):
            a.schedules.put_schedules([self.put("y"), self.put("z")], now=T, limit=2)
        assert set(a.schedules.get_schedules(["x", "y", "z"])) == {"x"}

    def test_the_leader_hears_of_a_schedule_put_through_another_replica(
        self, postgres_url: str, replicas: Callable[..., Replica]
    ) -> None:
        leader, other = replicas(postgres_url, "a"), replicas(postgres_url, "b")
        heard: list[list[str]] = []
        leader.schedules.watch(heard.append)
        deadline = time.monotonic() + 5
        while not heard and time.monotonic() < deadline:  # listening: it replans everything once
            time.sleep(0.02)
        other.schedules.put_schedules([self.put("x"), self.put("y")], now=T, limit=10)
        while ["x", "y"] not in heard and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heard[0] == [] and ["x", "y"] in heard


class TestAServerThatGoesAway:
    def test_claims_refused_then_leadership_ends_then_all_resumes(
        self, postgres_server: PostgresServer, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_server.url(), "a").lead()
        postgres_server.stop("immediate")
        _, _, key = slot("j")
        started = time.monotonic()
        assert a.store.mark_started([slot("j")]) == {key: "unavailable"}
        assert time.monotonic() - started < 3  # bounded by the timeouts, never stuck
        problem = a.store.problem()
        assert problem is not None and problem.startswith(
            "cannot reach PostgreSQL at postgresql://"
        )
        with pytest.raises(StoreUnavailable):
            a.store.set_paused("j", True)
        with capture_logs() as logs:
            a.lease._cycle()
            time.sleep(0.85)
            a.lease._cycle()
        assert not a.lease.leading()
        events = [entry["event"] for entry in logs]
        assert (
            "lease could not be renewed in time; firing stopped until PostgreSQL answers" in events
        )
        postgres_server.start()
        a.lease._cycle()
        assert a.lease.leading() and a.lease.term() == 2
        assert a.store.mark_started([slot("j")]) == {}
        assert a.store.problem() is None

    def test_terminated_connections_are_replaced_without_losing_a_claim(
        self, postgres_url: str, postgres_cluster: PostgresServer, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        assert a.store.mark_started([slot("j")]) == {}
        postgres_cluster.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'cronclock'"
        )
        assert a.store.mark_started([slot("j", 1)]) == {}  # one retry on a fresh connection
        a.lease._cycle()
        assert a.lease.term() == 1

    def test_a_lost_schema_marks_what_this_replica_knew_uncertain(
        self, postgres_url: str, postgres_cluster: PostgresServer, replicas: Callable[..., Replica]
    ) -> None:
        a = replicas(postgres_url, "a").lead()
        a.store.mark_started([slot("j", 5)])
        a.store.refresh()
        postgres_cluster.sql("DROP SCHEMA cronclock CASCADE", postgres_url.rpartition("/")[2])
        with capture_logs() as logs:
            a.store.refresh()
        assert a.store.job_state("j") == JobState(
            last_slot=T + timedelta(minutes=5), uncertain=True
        )
        assert any("PostgreSQL lost its state" in entry["event"] for entry in logs)
        assert a.store.flush()
        b = replicas(postgres_url, "b")
        b.store.refresh()
        assert b.store.job_state("j").uncertain  # written back as restored
