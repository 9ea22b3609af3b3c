"""Failure policies (policies.py): pause_after_failures, on_gone, max_silence; the count and
the daemon's pause reason in every state store (memory, SQLite, a real redis-server, a real
PostgreSQL cluster), the dispatcher applying them, and what the admin API shows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi.testclient import TestClient
from pydantic import SecretStr

from schedule_grammar import parse
from services.scheduler.admin import AdminContext, create_app
from services.scheduler.clock import Scheduler
from services.scheduler.config import ConfigError, Job, load_config
from services.scheduler.dispatch import Dispatcher
from services.scheduler.policies import FailurePolicy, silence
from services.scheduler.slots import idempotency_key
from services.scheduler.stores import open_store
from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.stores.protocols import JobState, RunRecord, StateStore, apply_outcome
from services.scheduler.telemetry import Metrics
from tests.support import RedisServer, VirtualClock

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LOG = structlog.get_logger()


def record(outcome: str, *, minute: int = 0, settles: bool = True, attempt: int = 1) -> RunRecord:
    slot = T + timedelta(minutes=minute)
    return RunRecord(job="j", slot=slot, key=idempotency_key("j", slot), attempt=attempt,
                     started=slot, outcome=outcome, status=500 if outcome == "failed" else 200,
                     settles=settles)  # type: ignore[arg-type]  # fmt: skip


class TestTheCount:
    def test_settled_failures_count_and_a_success_ends_the_run(self) -> None:
        state = JobState()
        for outcome, settles, expected in [
            ("failed", False, 0),  # an attempt that is retried
            ("failed", True, 1),
            ("busy", True, 1),  # the application's lock: neither counts nor resets
            ("skipped_overlap", True, 1),
            ("missed", True, 1),
            ("interrupted", True, 1),
            ("failed", True, 2),
            ("success", True, 0),
            ("failed", True, 1),
        ]:
            state = apply_outcome(state, record(outcome, settles=settles))
            assert state.failures == expected, (outcome, settles)


# -- the stores: the count and the daemon's reason persist, resume clears both ----------------


def _open(url: str) -> Any:
    settings_env = {"SCHEDULER_STATE_URL": url, "SCHEDULER_API_TOKEN": "t",
                    "SCHEDULER_LEASE_TTL_SECONDS": "2"}  # fmt: skip
    config = load_config(settings_env)
    opened = open_store(config.settings, LOG)
    opened.coordinator.start(lambda: None)
    deadline = time.monotonic() + 10
    while opened.coordinator.term() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return opened


def _close(opened: Any) -> None:
    opened.coordinator.stop()
    opened.close()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield server.url
    else:
        yield request.getfixturevalue("postgres_url")


def test_the_count_and_the_pause_reason_survive_a_restart_and_resume_clears_the_reason(
    state_url: str,
) -> None:
    first = _open(state_url)
    store: StateStore = first.store
    store.record_run(record("failed", minute=0))
    store.record_run(record("failed", minute=1, settles=False))
    store.record_run(record("failed", minute=1, attempt=2))
    assert store.job_state("j").failures == 2
    store.set_paused("j", True, "auto-paused after 2 consecutive failures")
    _close(first)

    second = _open(state_url)
    try:
        second.store.refresh()
        state = second.store.job_state("j")
        assert (state.paused, state.pause_reason, state.failures) == (
            True, "auto-paused after 2 consecutive failures", 2,
        )  # fmt: skip
        second.store.set_paused("j", False)
        assert second.store.job_state("j").failures == 2  # until a success
    finally:
        _close(second)
    third = _open(state_url)
    try:
        third.store.refresh()
        state = third.store.job_state("j")
        assert (state.paused, state.pause_reason, state.failures) == (False, None, 2)
        third.store.record_run(record("success", minute=2))
        assert third.store.job_state("j").failures == 0
        third.store.set_paused("j", True)  # an operator's pause has no reason
        assert third.store.job_state("j").pause_reason is None
    finally:
        _close(third)


# -- the dispatcher applies them ----------------------------------------------------------


def job(**fields: Any) -> Job:
    return Job(name="j", schedule=parse("every 1m"), endpoint="/work", **fields)


class Harness:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.clock = VirtualClock(T)
        self.store = MemoryStateStore()
        self.metrics = Metrics()
        self.policy = FailurePolicy(self.store, log=LOG, metrics=self.metrics)
        self.slot = T

        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            )

        def sleep(seconds: float) -> bool:
            self.clock.advance(seconds)
            return False

        self.dispatcher = Dispatcher(
            api_url="http://app:8000", token=SecretStr("t"), store=self.store, clock=self.clock,
            log=LOG, reporter=_Null(), max_concurrency=2, sleep=sleep,
            client=httpx.Client(transport=httpx.MockTransport(answer)),
            pause=self.clock.advance, metrics=self.metrics, on_settled=self.policy.settled,
        )  # fmt: skip

    def fire(self, j: Job, times: int = 1) -> None:
        for _ in range(times):
            self.dispatcher.submit(j, [self.slot], deadline=None)
            deadline = time.monotonic() + 10
            while self.dispatcher.in_flight() and time.monotonic() < deadline:
                time.sleep(0.005)
            self.slot += timedelta(minutes=1)

    def state(self) -> JobState:
        return self.store.job_state("j")

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


class _Null:
    def report(self, error: BaseException, properties: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class TestPauseAfterFailures:
    def test_the_job_pauses_itself_after_n_failed_slots_in_a_row(self) -> None:
        h = Harness([500])
        h.fire(job(pause_after_failures=3), times=2)
        assert (h.state().paused, h.state().failures) == (False, 2)
        h.fire(job(pause_after_failures=3))
        state = h.state()
        assert state.paused
        assert state.pause_reason == "auto-paused after 3 consecutive failures"
        assert h.sample("cronclock_job_auto_paused_total", job="j", reason="failures") == 1

    def test_retried_attempts_count_once_per_slot_and_busy_neither_counts_nor_resets(
        self,
    ) -> None:
        h = Harness([503, 503, 409, 503, 503])  # slot 1: two attempts; slot 2 busy; slot 3
        h.fire(job(pause_after_failures=2, retries=1), times=2)
        assert (h.state().failures, h.state().paused) == (1, False)
        h.fire(job(pause_after_failures=2, retries=1))
        assert h.state().paused

    def test_a_success_starts_the_count_again_and_zero_never_pauses(self) -> None:
        h = Harness([500, 500, 200, 500, 500])
        h.fire(job(pause_after_failures=3), times=5)
        assert (h.state().failures, h.state().paused) == (2, False)
        never = Harness([500])
        never.fire(job(), times=20)
        assert (never.state().failures, never.state().paused) == (20, False)

    def test_resume_gives_the_whole_allowance_again_and_the_run_goes_on(self) -> None:
        h = Harness([500])
        h.fire(job(pause_after_failures=2), times=2)
        assert h.state().paused
        h.store.set_paused("j", False)
        h.fire(job(pause_after_failures=2))
        assert (h.state().paused, h.state().failures) == (False, 3)
        h.fire(job(pause_after_failures=2))
        assert h.state().pause_reason == "auto-paused after 4 consecutive failures"


class TestGone:
    def test_a_410_disables_the_job_at_once(self) -> None:
        h = Harness([410])
        h.fire(job())
        state = h.state()
        assert state.paused
        assert state.pause_reason is not None and "410 Gone" in state.pause_reason
        assert h.sample("cronclock_job_auto_paused_total", job="j", reason="gone") == 1

    def test_on_gone_ignore_makes_it_an_ordinary_failure(self) -> None:
        h = Harness([410])
        h.fire(job(on_gone="ignore"), times=2)
        assert (h.state().paused, h.state().failures) == (False, 2)
        h.fire(job(on_gone="ignore", pause_after_failures=3))
        assert h.state().pause_reason == "auto-paused after 3 consecutive failures"

    def test_an_operators_pause_is_kept_as_it_is(self) -> None:
        h = Harness([500, 410])
        h.fire(job())
        h.store.set_paused("j", True)
        h.fire(job())  # a manual trigger of a paused job answered 410: still the operator's
        assert h.state().pause_reason is None


# -- max_silence --------------------------------------------------------------------------


class TestSilence:
    def test_stale_after_max_silence_without_a_success(self) -> None:
        j = job(max_silence=7200.0)
        ok = JobState(last_success=T - timedelta(hours=1))
        assert not silence(j, ok, T, T - timedelta(days=1)).stale
        late = JobState(last_success=T - timedelta(hours=2, seconds=1))
        quiet = silence(j, late, T, T - timedelta(days=1))
        assert quiet.stale and quiet.silent_seconds == 7201

    def test_a_job_that_never_succeeded_counts_from_the_start(self) -> None:
        j = job(max_silence=3600.0)
        assert not silence(j, JobState(), T, T - timedelta(minutes=59)).stale
        assert silence(j, JobState(), T, T - timedelta(minutes=61)).stale

    def test_off_disabled_and_operator_paused_jobs_are_never_stale(self) -> None:
        never = JobState()
        start = T - timedelta(days=30)
        assert not silence(job(), never, T, start).stale
        assert not silence(job(max_silence=60.0, enabled=False), never, T, start).stale
        assert not silence(job(max_silence=60.0), JobState(paused=True), T, start).stale
        auto = JobState(paused=True, pause_reason="auto-paused after 3 consecutive failures")
        assert silence(job(max_silence=60.0), auto, T, start).stale  # still worth an alert


# -- config ---------------------------------------------------------------------------------


def _config(tmp_path: Path, text: str, **env: str) -> list[Job]:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    return load_config({"SCHEDULER_JOBS_FILE": str(path), "SCHEDULER_API_TOKEN": "t",
                        **env}).jobs  # fmt: skip


class TestConfig:
    TABLE = """
include_builtin = false
[defaults]
pause_after_failures = 5
[jobs.a]
schedule = "every 1m"
endpoint = "/a"
max_silence = "2h"
on_gone = "Ignore"
[jobs.b]
schedule = "every 1m"
endpoint = "/b"
max_silence = "off"
pause_after_failures = 0
"""

    def test_fields_defaults_and_env_overrides(self, tmp_path: Path) -> None:
        a, b = _config(tmp_path, self.TABLE, SCHEDULER_JOBS__B__MAX_SILENCE="30m")
        assert (a.pause_after_failures, a.on_gone, a.max_silence) == (5, "ignore", 7200.0)
        assert (b.pause_after_failures, b.on_gone, b.max_silence) == (0, "disable", 1800.0)
        (a, b) = _config(tmp_path, self.TABLE, SCHEDULER_JOBS__A__PAUSE_AFTER_FAILURES="2")
        assert a.pause_after_failures == 2 and b.max_silence is None

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("pause_after_failures", "-1", "greater than or equal to 0"),
            ("pause_after_failures", '"3"', "valid integer"),
            ("on_gone", '"drop"', "'disable' or 'ignore'"),
            ("max_silence", '"10s"', "must be at least 1m"),
            ("max_silence", '"soon"', "is not a duration"),
        ],
    )
    def test_bad_values_name_the_field_and_quote_the_value(
        self, tmp_path: Path, field: str, value: str, message: str
    ) -> None:
        text = f'[jobs.x]\nschedule = "every 1m"\nendpoint = "/x"\n{field} = {value}\n'
        with pytest.raises(ConfigError) as caught:
            _config(tmp_path, text)
        assert f"field {field!r}" in str(caught.value) and message in str(caught.value)


# -- what the admin API shows ---------------------------------------------------------------


def _admin(jobs: list[Job], store: MemoryStateStore, clock: VirtualClock) -> TestClient:
    scheduler = Scheduler(
        jobs=jobs, firer=_NoFire(), store=store, clock=clock, log=LOG, tick_seconds=5.0
    )
    dispatcher = Dispatcher(api_url="http://app:8000", token=None, store=store, clock=clock,
                            log=LOG, reporter=_Null(), max_concurrency=1)  # fmt: skip
    ctx = AdminContext(scheduler=scheduler, dispatcher=dispatcher, store=store, metrics=Metrics(),
                       clock=clock, admin_token=SecretStr("adm"), local_dev_mode=False,
                       tick_seconds=5.0, started=T - timedelta(hours=3))  # fmt: skip
    return TestClient(create_app(ctx), headers={"Authorization": "Bearer adm"})


class _NoFire:
    def submit(self, job: Job, slots: Any, *, deadline: datetime | None) -> None:
        return None


def test_the_admin_api_shows_the_reason_the_count_and_staleness() -> None:
    clock = VirtualClock(T)
    store = MemoryStateStore()
    failing = job(pause_after_failures=2, max_silence=3600.0)
    fine = Job(name="fine", schedule=parse("every 1m"), endpoint="/fine", max_silence=3600.0)
    quiet = Job(name="quiet", schedule=parse("every 1m"), endpoint="/quiet")
    store.record_run(record("failed"))
    store.record_run(record("failed", minute=1))
    store.set_paused("j", True, "auto-paused after 2 consecutive failures")
    store.record_run(RunRecord(job="fine", slot=T, key="fine@1", attempt=1, started=T,
                               outcome="success", status=200))  # fmt: skip
    client = _admin([failing, fine, quiet], store, clock)

    views = {view["name"]: view for view in client.get("/api/jobs").json()}
    assert views["j"]["paused"] is True
    assert views["j"]["pause_reason"] == "auto-paused after 2 consecutive failures"
    assert (views["j"]["consecutive_failures"], views["j"]["pause_after_failures"]) == (2, 2)
    assert (views["j"]["stale"], views["fine"]["stale"], views["quiet"]["stale"]) == (
        True, False, False,
    )  # fmt: skip
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["stale"] == ["j"]

    metrics = client.get("/metrics").text
    assert 'cronclock_job_paused{by="failures",job="j"} 1.0' in metrics
    assert 'cronclock_job_paused{by="operator",job="fine"}' not in metrics  # not paused
    assert 'cronclock_job_consecutive_failures{job="j"} 2.0' in metrics
    assert 'cronclock_job_stale{job="j"} 1.0' in metrics
    assert 'cronclock_job_stale{job="fine"} 0.0' in metrics
    assert 'cronclock_job_stale{job="quiet"}' not in metrics  # no max_silence: no series

    assert client.post("/api/jobs/j/resume").status_code == 200
    view = client.get("/api/jobs/j").json()
    assert (view["paused"], view["pause_reason"], view["consecutive_failures"]) == (
        False, None, 2,
    )  # fmt: skip


# -- the schema upgrades that added the columns keep what was there ---------------------------


def test_a_sqlite_file_of_schema_2_is_upgraded_with_its_pauses_kept(tmp_path: Path) -> None:
    import sqlite3

    from services.scheduler.stores import sqlite as sqlite_store

    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(sqlite_store.MIGRATIONS[0] + sqlite_store.MIGRATIONS[1])
        db.execute("INSERT INTO jobs (name, last_slot, paused) VALUES ('j', 1, 1)")
        db.execute("PRAGMA user_version = 2")
    store = sqlite_store.SqliteStateStore(path, log=LOG)
    try:
        state = store.job_state("j")
        assert (state.paused, state.pause_reason, state.failures) == (True, None, 0)
        store.record_run(record("failed"))
        assert store.job_state("j").failures == 1
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def test_a_postgresql_schema_of_version_1_is_upgraded_with_its_pauses_kept(
    postgres_url: str,
) -> None:
    import psycopg

    from services.scheduler.stores import postgres as pg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA cronclock")
        conn.execute("SET search_path TO cronclock")
        conn.execute("CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute(pg.MIGRATIONS[0])  # type: ignore[arg-type]
        conn.execute("INSERT INTO meta VALUES ('version', '1'), ('instance', 'x')")
        conn.execute("INSERT INTO jobs (name, last_slot, paused) VALUES ('j', 1, true)")
    opened = _open(postgres_url)
    try:
        opened.store.refresh()
        state = opened.store.job_state("j")
        assert (state.paused, state.pause_reason, state.failures) == (True, None, 0)
    finally:
        _close(opened)
    with psycopg.connect(postgres_url) as conn:
        version = conn.execute("SELECT value FROM cronclock.meta WHERE key = 'version'").fetchone()
    assert version == (str(pg.SCHEMA_VERSION),) == ("2",)


def test_a_backfill_body_that_is_not_usable_is_422_naming_what_is_wrong() -> None:
    client = _admin([job()], MemoryStateStore(), VirtualClock(T))
    json_type = {"Content-Type": "application/json"}
    broken = client.post("/api/jobs/j/backfill", content=b"q\xff", headers=json_type)
    assert broken.status_code == 422 and broken.json() == {"error": "the body must be JSON"}
    bad = client.post("/api/jobs/j/backfill", json={"from": "yesterday", "to": T.isoformat()})
    assert bad.status_code == 422 and bad.json()["error"].startswith("bad parameters: from:")
    extra = client.post("/api/jobs/j/backfill", json={"from": T.isoformat(), "to": T.isoformat(),
                                                      "speed": 2})  # fmt: skip
    assert extra.status_code == 422 and "speed" in extra.json()["error"]
    future = client.post("/api/jobs/j/backfill",
                         json={"from": T.isoformat(), "to": (T + timedelta(hours=1)).isoformat()})  # fmt: skip
    assert future.status_code == 422 and "is in the future" in future.json()["error"]
