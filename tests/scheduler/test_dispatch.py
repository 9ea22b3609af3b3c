"""The dispatcher against httpx.MockTransport: headers, outcomes, retries, overlap."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
import structlog
from pydantic import SecretStr

from schedule_grammar import parse
from services.scheduler import __version__
from services.scheduler.config import Job
from services.scheduler.dispatch import Dispatcher, classify, parse_retry_after
from services.scheduler.slots import idempotency_key
from services.scheduler.stores.memory import MemoryStateStore
from tests.support import VirtualClock

SLOT = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "name": "data-refresh",
        "schedule": parse("every 15m"),
        "endpoint": "/api/sync/trigger",
    }
    values.update(fields)
    return Job(**values)


class FakeReporter:
    def __init__(self) -> None:
        self.reports: list[tuple[str, dict[str, Any]]] = []

    def report(self, error: BaseException, properties: dict[str, Any]) -> None:
        self.reports.append((str(error), properties))

    def close(self) -> None:
        return None


class Harness:
    def __init__(
        self,
        handler: Callable[[httpx.Request], httpx.Response],
        *,
        token: str | None = "t0k3n",
        concurrency: int = 4,
    ) -> None:
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []
        self.clock = VirtualClock(SLOT)
        self.store = MemoryStateStore()
        self.reporter = FakeReporter()
        self.pauses: list[float] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return handler(request)

        def sleep(seconds: float) -> bool:
            self.sleeps.append(seconds)
            self.clock.advance(seconds)
            return False

        self.dispatcher = Dispatcher(
            api_url="http://app:8000",
            token=SecretStr(token) if token else None,
            store=self.store,
            clock=self.clock,
            log=structlog.get_logger(),
            reporter=self.reporter,
            max_concurrency=concurrency,
            client=httpx.Client(transport=httpx.MockTransport(record)),
            sleep=sleep,
            pause=self.pause,
        )

    def pause(self, seconds: float) -> None:
        """Waiting for a slot in virtual time."""
        self.pauses.append(seconds)
        self.clock.advance(seconds)

    def call(self, j: Job, deadline: datetime | None = None):  # type: ignore[no-untyped-def]
        return self.dispatcher.call(j, SLOT, key=idempotency_key(j.name, SLOT), deadline=deadline)


def responses(*items: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
    queue = list(items)

    def handler(request: httpx.Request) -> httpx.Response:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


class TestHeaders:
    def test_every_call_carries_the_contract_headers(self) -> None:
        h = Harness(responses(httpx.Response(200)))
        h.call(job())
        request = h.requests[0]
        assert request.method == "POST"
        assert str(request.url) == "http://app:8000/api/sync/trigger"
        assert request.headers["Authorization"] == "Bearer t0k3n"
        assert request.headers["User-Agent"] == f"cronclock/{__version__}"
        assert request.headers["X-Scheduler-Job"] == "data-refresh"
        assert request.headers["X-Scheduled-For"] == "2026-11-22T03:00:00.000Z"
        assert request.headers["Idempotency-Key"] == f"data-refresh@{int(SLOT.timestamp() * 1000)}"
        assert request.headers["X-Scheduler-Attempt"] == "1"
        assert "X-Scheduler-Fencing-Token" not in request.headers

    def test_without_a_token_no_authorization_is_sent(self) -> None:
        h = Harness(responses(httpx.Response(200)), token=None)
        h.call(job())
        assert "Authorization" not in h.requests[0].headers

    def test_job_headers_method_query_and_json_body_are_sent(self) -> None:
        h = Harness(responses(httpx.Response(200)))
        h.call(
            job(
                method="PUT",
                endpoint="/api/run?processor=usage",
                headers=(("X-Team", "data"),),
                body={"full": True},
            )
        )
        request = h.requests[0]
        assert request.method == "PUT"
        assert request.url.params["processor"] == "usage"
        assert request.headers["X-Team"] == "data"
        assert request.headers["Content-Type"] == "application/json"
        assert request.content == b'{"full":true}'

    def test_the_idempotency_key_is_the_same_on_every_retry(self) -> None:
        h = Harness(responses(httpx.Response(503), httpx.Response(200)))
        h.call(job(retries=1))
        keys = {r.headers["Idempotency-Key"] for r in h.requests}
        assert len(keys) == 1
        assert [r.headers["X-Scheduler-Attempt"] for r in h.requests] == ["1", "2"]


class TestOutcomes:
    @pytest.mark.parametrize(
        ("status", "kind"),
        [(200, "success"), (204, "success"), (302, "success"), (409, "busy"), (408, "transient"),
         (425, "transient"), (429, "transient"), (500, "transient"), (503, "transient"),
         (400, "permanent"), (401, "permanent"), (404, "permanent"), (422, "permanent")],
        ids=str,
    )  # fmt: skip
    def test_statuses_are_classified(self, status: int, kind: str) -> None:
        assert classify(status) == kind

    def test_409_is_recorded_as_busy_not_an_error(self) -> None:
        h = Harness(responses(httpx.Response(409)))
        result = h.call(job(retries=3))
        assert result.outcome == "busy" and len(h.requests) == 1
        assert h.reporter.reports == []

    def test_a_permanent_failure_is_not_retried_and_is_reported(self) -> None:
        h = Harness(responses(httpx.Response(404)))
        result = h.call(job(retries=3))
        assert result.outcome == "failed" and result.status == 404 and len(h.requests) == 1
        ((message, props),) = h.reporter.reports
        assert props == {
            "job": "data-refresh",
            "endpoint": "/api/sync/trigger",
            "status": 404,
            "attempt": 1,
            "slot": "2026-11-22T03:00:00.000Z",
        }
        assert "HTTP 404" in message

    @pytest.mark.parametrize(
        ("fields", "token"),
        [
            ({"body": {"x": float("nan")}}, "t0k3n"),
            ({"headers": (("X-A", "secret-\u00e9"),)}, "t0k3n"),
            ({}, "secret-\u00e9"),
        ],
        ids=["nan body", "non-ascii header", "non-ascii token"],
    )
    def test_a_request_that_cannot_be_built_is_a_recorded_failure_naming_no_secret(
        self, fields: dict[str, Any], token: str
    ) -> None:
        # Config refuses these (issue 16); a job that slips past (an old stored schedule, a
        # bug) must still end as a run in the history, not as a crash of the pool thread.
        h = Harness(responses(httpx.Response(200)), token=token)
        result = h.call(job(**fields))
        assert result.outcome == "failed" and h.requests == []
        (run,) = h.store.runs("data-refresh")
        assert run.outcome == "failed" and run.error is not None
        assert "could not be built" in run.error and "secret" not in run.error
        assert h.reporter.reports and all("secret" not in m for m, _ in h.reporter.reports)

    def test_redirects_are_success_and_not_followed(self) -> None:
        h = Harness(responses(httpx.Response(302, headers={"Location": "/elsewhere"})))
        assert h.call(job()).outcome == "success"
        assert len(h.requests) == 1

    def test_every_attempt_is_in_the_history(self) -> None:
        h = Harness(responses(httpx.Response(500), httpx.Response(200)))
        h.call(job(retries=2))
        runs = h.store.runs("data-refresh")
        assert [(r.attempt, r.outcome, r.status) for r in runs] == [
            (2, "success", 200),
            (1, "failed", 500),
        ]
        assert h.store.job_state("data-refresh").last_outcome == "success"


class TestRetries:
    def test_transient_failures_retry_with_exponential_backoff_and_jitter(self) -> None:
        h = Harness(
            responses(
                httpx.Response(503), httpx.Response(503), httpx.Response(503), httpx.Response(200)
            )
        )
        result = h.call(job(retries=3))
        assert result.outcome == "success" and result.attempts == 4
        assert 0.5 <= h.sleeps[0] <= 1.0
        assert 1.0 <= h.sleeps[1] <= 2.0
        assert 2.0 <= h.sleeps[2] <= 4.0

    def test_retry_after_seconds_is_honoured(self) -> None:
        h = Harness(
            responses(httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(200))
        )
        h.call(job(retries=1))
        assert h.sleeps == [7.0]

    def test_retry_after_as_an_http_date_is_honoured(self) -> None:
        when = (SLOT + timedelta(seconds=12)).strftime("%a, %d %b %Y %H:%M:%S GMT")
        assert parse_retry_after(when, SLOT) == 12.0
        assert parse_retry_after("soon", SLOT) is None
        assert parse_retry_after(None, SLOT) is None

    def test_retries_run_out(self) -> None:
        h = Harness(responses(httpx.Response(500)))
        result = h.call(job(retries=2))
        assert result.outcome == "failed" and result.attempts == 3
        assert len(h.reporter.reports) == 1

    def test_a_retry_never_runs_into_the_next_slot(self) -> None:
        h = Harness(
            responses(httpx.Response(503, headers={"Retry-After": "120"}), httpx.Response(200))
        )
        result = h.call(job(retries=5), deadline=SLOT + timedelta(seconds=60))
        assert result.outcome == "failed" and len(h.requests) == 1
        assert (
            result.error is not None
            and "the next slot (2026-11-22T03:01:00.000Z) comes first" in result.error
        )

    def test_a_connection_that_failed_before_sending_is_retried_once_even_without_retries(
        self,
    ) -> None:
        calls = {"n": 0}

        def handler(request: httpx.Request) -> httpx.Response:
            calls["n"] += 1
            if calls["n"] == 1:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200)

        h = Harness(handler)
        result = h.call(job(retries=0))
        assert result.outcome == "success" and result.attempts == 2

    def test_the_connection_retry_happens_only_once(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        h = Harness(handler)
        result = h.call(job(retries=0))
        assert result.outcome == "failed" and result.attempts == 2
        assert "connection failed" in (result.error or "")

    def test_a_timeout_is_transient(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        h = Harness(handler)
        result = h.call(job(retries=1, timeout=2.5))
        assert result.attempts == 2 and result.error == "timed out after 2.5s"


class TestSendingAtTheSlot:
    def test_a_slot_handed_on_ahead_of_time_is_sent_at_its_instant(self) -> None:
        h = Harness(responses(httpx.Response(200)))
        early = SLOT + timedelta(milliseconds=40)
        h.dispatcher.call(job(), early, key="k", deadline=None)
        assert h.pauses == [0.04]
        assert h.store.runs("data-refresh")[0].started == early

    def test_a_slot_already_due_is_sent_at_once(self) -> None:
        h = Harness(responses(httpx.Response(200)))
        h.call(job())
        assert h.pauses == []

    def test_retries_do_not_wait_for_the_slot_again(self) -> None:
        h = Harness(responses(httpx.Response(503), httpx.Response(200)))
        h.dispatcher.call(job(retries=1), SLOT + timedelta(seconds=1), key="k", deadline=None)
        assert h.pauses == [1.0] and len(h.sleeps) == 1


class TestOverlap:
    def _blocking(self) -> tuple[Harness, threading.Event]:
        release = threading.Event()

        def handler(request: httpx.Request) -> httpx.Response:
            release.wait(5)
            return httpx.Response(200)

        return Harness(handler), release

    def _settle(self, h: Harness) -> None:
        h.dispatcher.shutdown(5)

    def test_skip_records_skipped_overlap_while_in_flight(self) -> None:
        h, release = self._blocking()
        j = job(overlap="skip")
        h.dispatcher.submit(j, [SLOT], deadline=None)
        h.dispatcher.submit(j, [SLOT + timedelta(minutes=15)], deadline=None)
        release.set()
        self._settle(h)
        assert len(h.requests) == 1
        outcomes = [r.outcome for r in h.store.runs("data-refresh")]
        assert sorted(outcomes) == ["skipped_overlap", "success"]

    def test_queue_keeps_one_pending_slot_the_newest(self) -> None:
        h, release = self._blocking()
        j = job(overlap="queue")
        for minutes in (0, 15, 30):
            h.dispatcher.submit(j, [SLOT + timedelta(minutes=minutes)], deadline=None)
        release.set()
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while len(h.requests) < 2 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        self._settle(h)
        assert [r.headers["X-Scheduled-For"] for r in h.requests] == [
            "2026-11-22T03:00:00.000Z",
            "2026-11-22T03:30:00.000Z",
        ]
        assert [r.outcome for r in h.store.runs("data-refresh")].count("skipped_overlap") == 1

    def test_allow_runs_concurrently(self) -> None:
        h, release = self._blocking()
        j = job(overlap="allow")
        h.dispatcher.submit(j, [SLOT], deadline=None)
        h.dispatcher.submit(j, [SLOT + timedelta(minutes=15)], deadline=None)
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while len(h.requests) < 2 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        assert h.dispatcher.in_flight() == {"data-refresh": 2}
        release.set()
        self._settle(h)
        assert len(h.requests) == 2

    def test_replayed_slots_run_one_after_another_in_order(self) -> None:
        h = Harness(responses(httpx.Response(200)))
        slots = [SLOT + timedelta(minutes=m) for m in (0, 15, 30)]
        h.dispatcher.submit(job(overlap="skip"), slots, deadline=SLOT + timedelta(minutes=45))
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while len(h.store.runs("data-refresh")) < 3 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        self._settle(h)
        assert [r.headers["X-Scheduled-For"][11:16] for r in h.requests] == [
            "03:00",
            "03:15",
            "03:30",
        ]
        assert [r.outcome for r in h.store.runs("data-refresh")] == ["success"] * 3

    def test_replays_not_started_at_shutdown_are_recorded_not_lost_silently(self) -> None:
        h, release = self._blocking()
        slots = [SLOT + timedelta(minutes=m) for m in (0, 15, 30)]
        h.dispatcher.submit(job(), slots, deadline=None)
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while not h.requests and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        stopper = threading.Thread(target=h.dispatcher.shutdown, args=(5,))
        stopper.start()  # SIGTERM arrives while the first replay is in flight
        while not h.dispatcher.stopping and datetime.now(UTC) < deadline:
            threading.Event().wait(0.01)
        release.set()
        stopper.join(5)
        outcomes = sorted((r.slot.minute, r.outcome, r.error) for r in h.store.runs("data-refresh"))
        assert outcomes == [
            (0, "success", None),
            (15, "skipped_overlap", "shutting down"),
            (30, "skipped_overlap", "shutting down"),
        ]

    def test_a_manual_trigger_gets_its_own_key_and_is_refused_while_in_flight(self) -> None:
        h, release = self._blocking()
        j = job()
        started = h.dispatcher.trigger(j)
        assert not isinstance(started, str)
        key, future = started
        assert key.startswith("data-refresh@manual-")
        assert h.dispatcher.trigger(j) == (
            "job 'data-refresh' is in flight and its overlap policy is 'skip'"
        )
        release.set()
        assert future.result(5).outcome == "success"
        self._settle(h)


def test_respx_routes_see_the_same_contract() -> None:
    """The same call through respx, as an application's own tests would mock it."""
    with respx.mock(base_url="http://app:8000", assert_all_called=True) as router:
        route = router.post("/api/sync/trigger").mock(return_value=httpx.Response(204))
        dispatcher = Dispatcher(
            api_url="http://app:8000",
            token=SecretStr("s"),
            store=MemoryStateStore(),
            clock=VirtualClock(SLOT),
            log=structlog.get_logger(),
            reporter=FakeReporter(),
            max_concurrency=1,
        )
        result = dispatcher.call(job(), SLOT, key="k", deadline=None)
        dispatcher.shutdown(0)
    assert result.outcome == "success"
    assert route.calls.last.request.headers["Idempotency-Key"] == "k"


class TestTheWireIsBounded:
    """Issue 15.5/15.6, against a real loopback server: the job timeout is a deadline for
    the whole exchange, and only a small prefix of an answer is read."""

    def _dispatcher(self, url: str) -> Dispatcher:
        from services.scheduler.clock import SystemClock

        return Dispatcher(api_url=url, token=SecretStr("t"), store=MemoryStateStore(),
                          clock=SystemClock(), log=structlog.get_logger(),
                          reporter=FakeReporter(), max_concurrency=2)  # fmt: skip

    def test_a_body_dripped_one_byte_at_a_time_ends_at_the_timeout(self) -> None:
        import time

        from tests.support import Reply, Target

        target = Target()
        target.script["/slow"] = [Reply(drip=0.25)]
        dispatcher = self._dispatcher(target.url)
        try:
            begun = time.monotonic()
            result = dispatcher.call(job(endpoint="/slow", timeout=1.0), SLOT,
                                     key="k", deadline=None)  # fmt: skip
            took = time.monotonic() - begun
        finally:
            dispatcher.shutdown(0)
            target.close()
        assert result.outcome == "failed"
        assert result.error == "timed out after 1s"
        # 200 bytes at 4 per second would take 50 s; the deadline ended it (with slack for a
        # loaded machine, far below the per-read timeout's 50 s).
        assert took < 10

    def test_a_huge_answer_is_not_read_into_memory(self) -> None:
        import resource

        from tests.support import Reply, Target

        target = Target()
        target.script["/big"] = [Reply(status=500, size=300_000_000)]
        dispatcher = self._dispatcher(target.url)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            result = dispatcher.call(job(endpoint="/big", timeout=30.0), SLOT,
                                     key="k", deadline=None)  # fmt: skip
        finally:
            dispatcher.shutdown(0)
            target.close()
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert result.status == 500 and result.outcome == "failed"
        assert result.error is not None and result.error.startswith("HTTP 500: yyyy")
        assert len(result.error) < 300
        assert grown_mb < 50, f"RSS grew by {grown_mb:.0f} MB for a 300 MB answer"


class TestTargetReachability:
    """Issue 19: the application is `unreachable` after UNREACHABLE_AFTER attempts in a row
    that could not connect, since the first of them; any answer makes it reachable again."""

    def test_connection_failures_in_a_row_make_it_unreachable_since_the_first(self) -> None:
        from services.scheduler.dispatch import UNREACHABLE_AFTER

        answering = {"up": False}

        def handler(request: httpx.Request) -> httpx.Response:
            if not answering["up"]:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(500)

        h = Harness(handler)
        assert h.dispatcher.target().status == "unknown"
        first = h.clock.now()
        h.call(job(retries=0))  # two attempts: the connection retry
        assert UNREACHABLE_AFTER == 3 and h.dispatcher.target().status == "reachable"
        h.clock.advance(60)
        h.call(job(retries=0))
        target = h.dispatcher.target()
        assert target.status == "unreachable" and target.since == first
        assert target.failures == 4 and "connection refused" in (target.error or "")
        answering["up"] = True  # a 500 is an answer: the application is there
        h.call(job(retries=0))
        assert h.dispatcher.target().status == "reachable"
        assert h.dispatcher.target().since is None and h.dispatcher.target().failures == 0

    def test_a_timeout_after_sending_is_not_unreachable(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        h = Harness(handler)
        for _ in range(3):
            h.call(job(retries=1))
        assert h.dispatcher.target().status == "reachable"
