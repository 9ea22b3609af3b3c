"""Backfill: which slots a range holds (admin.backfill_slots), and the dispatcher firing them
in order with their own slots' headers, recorded as backfill, one backfill per job at a time.
The real daemon and `cronclock backfill` are in tests/integration/test_policies.py."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import structlog
from pydantic import SecretStr

from schedule_grammar import parse
from services.scheduler.admin import backfill_slots
from services.scheduler.config import Job
from services.scheduler.dispatch import Dispatcher
from services.scheduler.policies import FailurePolicy
from services.scheduler.slots import idempotency_key
from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.telemetry import Metrics
from tests.support import VirtualClock

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
LOG = structlog.get_logger()


def job(schedule: str = "every 1h", **fields: Any) -> Job:
    return Job(name="j", schedule=parse(schedule), endpoint="/j", **fields)


class TestSlots:
    def test_both_ends_are_included_and_the_schedule_decides(self) -> None:
        slots = backfill_slots(job(), NOW - timedelta(hours=3), NOW - timedelta(hours=1), NOW, 100)
        assert slots == [NOW - timedelta(hours=h) for h in (3, 2, 1)]
        daily = job("daily 03:00 in Asia/Makassar")  # 19:00 UTC the day before
        (slot,) = backfill_slots(daily, NOW - timedelta(days=1), NOW, NOW, 100)
        assert slot == datetime(2026, 11, 21, 19, 0, tzinfo=UTC)

    @pytest.mark.parametrize(
        ("start", "end", "limit", "message"),
        [
            (NOW - timedelta(hours=1), NOW + timedelta(seconds=1), 100, "is in the future"),
            (NOW - timedelta(hours=1), NOW - timedelta(hours=2), 100, "is before from"),
            (NOW - timedelta(minutes=59), NOW - timedelta(minutes=1), 100, "no slot of 'every 1h'"),
            (NOW - timedelta(hours=5), NOW, 3, "more than 3 slots of 'every 1h'"),
            (datetime(2026, 11, 22, 9), NOW, 100, "give an offset or Z"),
        ],
    )
    def test_what_is_refused(
        self, start: datetime, end: datetime, limit: int, message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            backfill_slots(job(), start, end, NOW, limit)


class Harness:
    def __init__(self, status: int = 200, hold: threading.Event | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.clock = VirtualClock(NOW)
        self.store = MemoryStateStore()
        self.metrics = Metrics()
        self.policy = FailurePolicy(self.store, log=LOG, metrics=self.metrics)

        def answer(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            if hold is not None:
                hold.wait(10)
            return httpx.Response(status)

        self.dispatcher = Dispatcher(
            api_url="http://app:8000", token=SecretStr("t"), store=self.store, clock=self.clock,
            log=LOG, reporter=_Null(), max_concurrency=4, sleep=lambda s: False,
            client=httpx.Client(transport=httpx.MockTransport(answer)),
            pause=self.clock.advance, metrics=self.metrics, on_settled=self.policy.settled,
        )  # fmt: skip

    def wait(self) -> None:
        deadline = time.monotonic() + 10
        while self.dispatcher.in_flight() and time.monotonic() < deadline:
            time.sleep(0.005)


class _Null:
    def report(self, error: BaseException, properties: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


def test_past_slots_fire_in_order_with_their_own_headers_and_are_recorded_as_backfill() -> None:
    h = Harness()
    slots = [NOW - timedelta(hours=h_) for h_ in (3, 2, 1)]
    started = h.dispatcher.backfill(job(), slots, overlap="skip")
    assert not isinstance(started, str)
    claim, future = started
    assert claim.startswith("j@backfill-")
    assert future.result(10).outcome == "success"
    sent = [(r.headers["X-Scheduled-For"], r.headers["Idempotency-Key"]) for r in h.requests]
    assert sent == [(s.strftime("%Y-%m-%dT%H:%M:%S.000Z"), idempotency_key("j", s)) for s in slots]
    runs = h.store.runs("j")
    assert [r.backfill for r in runs] == [True] * 3
    assert h.store.in_flight() == {}, "the claim is finished"
    # a past slot is not a late fire: nothing observed
    assert h.metrics.registry.get_sample_value("cronclock_job_lateness_seconds_count") == 0


def test_one_backfill_per_job_at_a_time_and_not_while_a_run_is_in_flight() -> None:
    hold = threading.Event()
    h = Harness(hold=hold)
    first = h.dispatcher.backfill(job(), [NOW - timedelta(hours=2)], overlap="allow")
    assert not isinstance(first, str)
    deadline = time.monotonic() + 5
    while not h.requests and time.monotonic() < deadline:
        time.sleep(0.005)
    assert h.dispatcher.backfill(job(), [NOW - timedelta(hours=1)], overlap="skip") == (
        "job 'j' is in flight; ask again, or with overlap \"allow\""
    )
    again = h.dispatcher.backfill(job(), [NOW - timedelta(hours=1)], overlap="allow")
    assert again == "a backfill of 'j' is running; wait for it to end"
    hold.set()
    first[1].result(10)
    h.wait()
    assert not isinstance(h.dispatcher.backfill(job(), [NOW], overlap="skip"), str)
    h.wait()


def test_a_failing_backfill_neither_pauses_the_job_nor_counts() -> None:
    h = Harness(status=500)
    slots = [NOW - timedelta(hours=h_) for h_ in (5, 4, 3, 2, 1)]
    started = h.dispatcher.backfill(job(pause_after_failures=2), slots, overlap="skip")
    assert not isinstance(started, str)
    assert started[1].result(10).outcome == "failed"
    h.wait()
    state = h.store.job_state("j")
    assert len(h.requests) == 5 and (state.paused, state.failures) == (False, 0)
