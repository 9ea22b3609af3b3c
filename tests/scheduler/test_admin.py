"""The admin API through FastAPI's TestClient: every endpoint and every error."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import structlog
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from schedule_grammar import parse
from services.scheduler.admin import AdminContext, create_app
from services.scheduler.clock import Scheduler
from services.scheduler.config import Job
from services.scheduler.dispatch import Dispatcher
from services.scheduler.schedules import RuntimeSchedules
from services.scheduler.stores.memory import MemorySchedules, MemoryStateStore
from services.scheduler.stores.protocols import RunRecord, ScheduleStore, StateStore
from services.scheduler.telemetry import Metrics
from tests.support import VirtualClock

T0 = datetime(2026, 11, 22, 10, 0, 7, tzinfo=UTC)
TOKEN = "admin-secret"


class World:
    def __init__(
        self,
        *,
        token: str | None = TOKEN,
        local_dev_mode: bool = False,
        store: StateStore | None = None,
        schedule_store: ScheduleStore | None = None,
        limit: int = 100_000,
        start: datetime = T0,
    ) -> None:
        self.release = threading.Event()
        self.release.set()
        self.requests: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            self.release.wait(5)
            return httpx.Response(200)

        self.clock = VirtualClock(start)
        self.store: StateStore = store if store is not None else MemoryStateStore()
        self.schedules = RuntimeSchedules(
            schedule_store if schedule_store is not None else MemorySchedules(self.store),
            limit=limit,
            retention=7 * 86400,
            log=structlog.get_logger(),
        )
        self.metrics = Metrics()
        log = structlog.get_logger()
        self.jobs = [
            Job(name="data-refresh", schedule=parse("every 15m"), endpoint="/api/sync/trigger"),
            Job(
                name="nightly",
                schedule=parse("daily 03:00 in Asia/Makassar"),
                endpoint="/api/n",
                method="GET",
            ),
            Job(name="both", schedule=parse("every 1h"), endpoint="/api/b", overlap="allow"),
        ]
        self.dispatcher = Dispatcher(
            api_url="http://app", token=None, store=self.store, clock=self.clock, log=log,
            reporter=_NoReporter(), max_concurrency=4, metrics=self.metrics,
            client=httpx.Client(transport=httpx.MockTransport(handler)),
            on_finished=lambda *args: self.scheduler.call_finished(*args),
        )  # fmt: skip
        self.scheduler = Scheduler(
            jobs=self.jobs, firer=self.dispatcher, store=self.store, clock=self.clock, log=log,
            tick_seconds=30, metrics=self.metrics, runtime=self.schedules,
        )  # fmt: skip
        self.scheduler.start(self.clock.now())
        self.app = create_app(
            AdminContext(
                scheduler=self.scheduler, dispatcher=self.dispatcher, store=self.store,
                metrics=self.metrics, clock=self.clock, tick_seconds=30,
                admin_token=SecretStr(token) if token else None, local_dev_mode=local_dev_mode,
                schedules=self.schedules,
            )
        )  # fmt: skip
        self.client = TestClient(self.app, headers={"Authorization": f"Bearer {TOKEN}"})

    def close(self) -> None:
        self.release.set()
        self.dispatcher.shutdown(5)


class _NoReporter:
    def report(self, error: BaseException, properties: dict[str, object]) -> None:
        return None

    def close(self) -> None:
        return None


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


class TestHealth:
    def test_a_fresh_loop_is_healthy_without_auth(self, world: World) -> None:
        response = TestClient(world.app).get("/healthz")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"

    def test_a_stale_heartbeat_is_503_with_the_reason(self, world: World) -> None:
        world.clock.advance(120)
        response = world.client.get("/healthz")
        assert response.status_code == 503
        assert response.json()["reason"] == "the clock loop has not run for 120s"

    def test_a_degraded_state_store_is_503(self, world: World) -> None:
        world.store.problem = lambda: "cannot write /x/state.db: disk full"  # type: ignore[method-assign]
        response = world.client.get("/healthz")
        assert response.status_code == 503
        assert response.json()["reason"] == "state store: cannot write /x/state.db: disk full"

    def test_shutting_down_is_503(self, world: World) -> None:
        world.scheduler.stop()
        assert world.client.get("/healthz").json()["reason"] == "shutting down"


class TestAuth:
    @pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/nightly", "/api/jobs/nightly/runs"])
    def test_reads_need_the_token(self, world: World, path: str) -> None:
        assert TestClient(world.app).get(path).status_code == 401
        wrong = TestClient(world.app, headers={"Authorization": "Bearer nope"}).get(path)
        assert wrong.status_code == 401
        assert wrong.json() == {
            "error": "missing or wrong admin token: send Authorization: Bearer <SCHEDULER_ADMIN_TOKEN>"
        }
        assert wrong.headers["WWW-Authenticate"] == "Bearer"

    @pytest.mark.parametrize("action", ["trigger", "pause", "resume"])
    def test_actions_need_the_token(self, world: World, action: str) -> None:
        assert TestClient(world.app).post(f"/api/jobs/nightly/{action}").status_code == 401
        assert world.requests == []

    def test_without_a_configured_token_the_api_refuses(self) -> None:
        w = World(token=None)
        response = w.client.get("/api/jobs")
        assert response.status_code == 401
        assert "SCHEDULER_ADMIN_TOKEN" in response.json()["error"]
        w.close()

    def test_local_dev_mode_opens_it(self) -> None:
        w = World(token=None, local_dev_mode=True)
        assert TestClient(w.app).get("/api/jobs").status_code == 200
        w.close()

    def test_health_and_metrics_need_no_token(self, world: World) -> None:
        client = TestClient(world.app)
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


class TestJobs:
    def test_the_table_lists_every_job_with_next_run_in_utc_and_local_time(
        self, world: World
    ) -> None:
        jobs = {job["name"]: job for job in world.client.get("/api/jobs").json()}
        assert list(jobs) == ["data-refresh", "nightly", "both"]
        nightly = jobs["nightly"]
        assert nightly["schedule"] == "daily 03:00 in Asia/Makassar"
        assert nightly["timezone"] == "Asia/Makassar"
        assert nightly["next_run"] == "2026-11-22T19:00:00.000Z"
        assert nightly["next_run_local"] == "2026-11-23T03:00:00+08:00"
        assert nightly["last_run"] == {"at": None, "outcome": None, "status": None}
        assert (nightly["paused"], nightly["in_flight"], nightly["method"]) == (False, 0, "GET")

    def test_the_job_view_carries_the_next_dst_warning(self, world: World) -> None:
        jobs = {job["name"]: job for job in world.client.get("/api/jobs").json()}
        assert jobs["nightly"]["dst_warning"] is None  # Asia/Makassar has no DST
        assert jobs["data-refresh"]["dst_warning"] is None  # an interval is never moved

    def test_one_job(self, world: World) -> None:
        assert (
            world.client.get("/api/jobs/data-refresh").json()["next_run"]
            == "2026-11-22T10:15:00.000Z"
        )

    def test_an_unknown_job_is_404(self, world: World) -> None:
        for method, path in [("GET", "/api/jobs/nope"), ("GET", "/api/jobs/nope/runs"),
                             ("POST", "/api/jobs/nope/trigger"), ("POST", "/api/jobs/nope/pause"),
                             ("POST", "/api/jobs/nope/resume")]:  # fmt: skip
            response = world.client.request(method, path)
            assert response.status_code == 404
            assert response.json() == {"error": "no job named 'nope'"}

    def test_runs_are_newest_first_and_limited(self, world: World) -> None:
        for minute in range(5):
            world.store.record_run(RunRecord(job="nightly", slot=T0 + timedelta(minutes=minute), key=f"k{minute}",
                                             attempt=1, started=T0, outcome="success", status=200, duration=0.5))  # fmt: skip
        runs = world.client.get("/api/jobs/nightly/runs", params={"limit": 2}).json()
        assert [run["key"] for run in runs] == ["k4", "k3"]
        assert runs[0] | {"slot": None} == {"slot": None, "key": "k4", "attempt": 1, "started": "2026-11-22T10:00:07.000Z",
                                           "duration_seconds": 0.5, "status": 200, "outcome": "success", "error": None, "count": 1,
                                           "backfill": False}  # fmt: skip
        assert world.client.get("/api/jobs/nightly").json()["last_run"]["outcome"] == "success"

    @pytest.mark.parametrize("limit", ["0", "1001", "many", "-1"])
    def test_bad_parameters_are_422_with_a_message(self, world: World, limit: str) -> None:
        response = world.client.get("/api/jobs/nightly/runs", params={"limit": limit})
        assert response.status_code == 422
        assert response.json()["error"].startswith("bad parameters: query.limit:")


class TestActions:
    def test_trigger_fires_now_with_a_manual_key_and_answers_202(self, world: World) -> None:
        response = world.client.post("/api/jobs/nightly/trigger")
        assert response.status_code == 202
        key = response.json()["idempotency_key"]
        assert key.startswith("nightly@manual-")
        world.dispatcher.shutdown(5)
        (request,) = world.requests
        assert request.headers["Idempotency-Key"] == key and request.method == "GET"

    def test_trigger_with_wait_answers_the_outcome(self, world: World) -> None:
        # Issue 19: `trigger JOB --wait` asks for the outcome in the same request.
        response = world.client.post("/api/jobs/nightly/trigger", params={"wait": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["idempotency_key"].startswith("nightly@manual-")
        assert (body["outcome"], body["status"], body["attempts"], body["error"]) == (
            "success", 200, 1, None)  # fmt: skip

    def test_trigger_with_wait_that_runs_out_answers_202_and_the_call_goes_on(
        self, world: World
    ) -> None:
        world.release.clear()
        response = world.client.post("/api/jobs/nightly/trigger", params={"wait": 0.2})
        assert response.status_code == 202 and response.json()["outcome"] is None
        world.release.set()
        world.dispatcher.shutdown(5)
        (run,) = world.store.runs("nightly")  # not cancelled by the answer
        assert run.key == response.json()["idempotency_key"] and run.outcome == "success"

    def test_trigger_while_in_flight_under_skip_is_409(self, world: World) -> None:
        world.release.clear()
        assert world.client.post("/api/jobs/data-refresh/trigger").status_code == 202
        second = world.client.post("/api/jobs/data-refresh/trigger")
        assert second.status_code == 409
        assert second.json() == {
            "error": "job 'data-refresh' is in flight and its overlap policy is 'skip'"
        }

    def test_trigger_while_in_flight_under_allow_is_accepted(self, world: World) -> None:
        world.release.clear()
        assert world.client.post("/api/jobs/both/trigger").status_code == 202
        assert world.client.post("/api/jobs/both/trigger").status_code == 202

    def test_pause_and_resume(self, world: World) -> None:
        assert world.client.post("/api/jobs/nightly/pause").json() == {
            "job": "nightly",
            "paused": True,
        }
        assert world.store.job_state("nightly").paused is True
        assert world.client.get("/api/jobs/nightly").json()["paused"] is True
        assert world.client.post("/api/jobs/nightly/resume").json() == {
            "job": "nightly",
            "paused": False,
        }
        assert world.store.job_state("nightly").paused is False


class TestMetrics:
    def test_the_exposition_parses_and_names_every_metric(self, world: World) -> None:
        world.client.post("/api/jobs/nightly/trigger")
        world.dispatcher.shutdown(5)
        text = TestClient(world.app).get("/metrics").text
        families = {family.name: family for family in text_string_to_metric_families(text)}
        for name in ["cronclock_job_runs", "cronclock_job_duration_seconds", "cronclock_job_lateness_seconds",
                     "cronclock_job_next_run_timestamp_seconds", "cronclock_job_last_success_timestamp_seconds",
                     "cronclock_jobs_in_flight", "cronclock_is_leader"]:  # fmt: skip
            assert name in families, name
        runs = {
            (s.labels["job"], s.labels["outcome"]): s.value
            for s in families["cronclock_job_runs"].samples
            if s.name.endswith("_total")
        }
        assert runs[("nightly", "success")] == 1
        next_runs = {
            s.labels["job"]: s.value
            for s in families["cronclock_job_next_run_timestamp_seconds"].samples
        }
        assert next_runs["nightly"] == datetime(2026, 11, 22, 19, tzinfo=UTC).timestamp()
        assert families["cronclock_is_leader"].samples[0].value == 1


def test_the_openapi_schema_is_served(world: World) -> None:
    schema = TestClient(world.app).get("/openapi.json").json()
    assert {"/healthz", "/metrics", "/api/jobs", "/api/jobs/{name}", "/api/jobs/{name}/runs",
            "/api/jobs/{name}/trigger", "/api/jobs/{name}/pause", "/api/jobs/{name}/resume"} <= set(schema["paths"])  # fmt: skip


def test_admin_requests_wait_while_calls_are_being_sent(world: World) -> None:
    """Firing comes first: a request arriving while a slot is armed is answered after its call."""
    job = world.jobs[0]
    world.dispatcher.submit(
        job, [T0 + timedelta(seconds=0.3)], deadline=None
    )  # armed, sends in 0.3 s
    assert world.dispatcher.firing
    response = TestClient(world.app).get("/healthz")
    assert response.status_code == 200
    assert len(world.requests) == 1, "the armed call went out before the admin request was served"
    assert not world.dispatcher.firing
