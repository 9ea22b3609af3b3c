"""Trace context (issue 21): a W3C traceparent on every call, one trace per slot (the same on
every retry), a new span per attempt, the trace id on the fire's log lines, one exported span
per attempt; against a real server on loopback, on the fast path and the ordinary one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from services.scheduler.config import ConfigError, load_config
from services.scheduler.slots import idempotency_key
from services.scheduler.tracing import Attempt, new_span_id, otlp_endpoint, trace_id, traceparent
from tests.scheduler.test_dispatch_wire import World, job, soon
from tests.support import Reply, Target

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


class Recorded:
    """A SpanExport that keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    def attempt(self, attempt: Attempt) -> None:
        self.spans.append({"job": attempt.job.name, "span": attempt.span, "trace": attempt.trace,
                           "attempt": attempt.attempt, "status": attempt.status,
                           "outcome": attempt.outcome})  # fmt: skip

    def close(self) -> None:
        return None


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def carried(arrival: Any) -> tuple[str, str]:
    match = TRACEPARENT.fullmatch(arrival.header("traceparent") or "")
    assert match, arrival.header("traceparent")
    return match.group(1), match.group(2)


@pytest.mark.parametrize("fast_path", [True, False], ids=["wire", "httpx"])
def test_every_attempt_of_a_slot_shares_its_trace_and_has_a_span_of_its_own(
    target: Target, fast_path: bool
) -> None:
    target.script["/api/sync/trigger"] = [Reply(status=503, headers={"Retry-After": "0"}),
                                          Reply(status=503, headers={"Retry-After": "0"}),
                                          Reply(status=200)]  # fmt: skip
    spans = Recorded()
    world = World(target.url, wire=fast_path, span_ids=new_span_id, spans=spans)
    world.dispatcher._backoff = lambda attempt: 0.01  # type: ignore[method-assign]
    slot = soon()
    with capture_logs() as logs:
        world.fire(job(retries=2), slot)
        world.wait()
    world.dispatcher.shutdown(1)
    arrivals = target.calls()
    assert [a.header("X-Scheduler-Attempt") for a in arrivals] == ["1", "2", "3"]
    ids = [carried(a) for a in arrivals]
    trace = world.dispatcher.trace(idempotency_key("sync", slot))
    assert {t for t, _ in ids} == {trace}  # one trace for the slot
    assert len({s for _, s in ids}) == 3  # a span per attempt
    assert [(s["span"], s["trace"], s["attempt"], s["status"], s["outcome"]) for s in spans.spans] == [
        (ids[0][1], trace, 1, 503, "failed"), (ids[1][1], trace, 2, 503, "failed"),
        (ids[2][1], trace, 3, 200, "success")]  # fmt: skip
    lines = [e for e in logs if e["event"] in ("retrying", "fired")]
    assert [e["event"] for e in lines] == ["retrying", "retrying", "fired"]
    assert {e["trace_id"] for e in lines} == {trace}


def test_each_slot_and_each_target_has_a_trace_of_its_own() -> None:
    key = idempotency_key("sync", soon())
    assert trace_id(b"http://a", key) == trace_id(b"http://a", key)  # every replica agrees
    assert trace_id(b"http://a", key) != trace_id(b"http://b", key)  # staging is not prod
    assert trace_id(b"http://a", key) != trace_id(b"http://a", "sync@manual-1")
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id(b"x", key))
    assert TRACEPARENT.fullmatch(traceparent(trace_id(b"x", key), new_span_id()))
    assert len({new_span_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"},
         "http://t:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
    ids=["unset", "endpoint", "traces-endpoint-wins", "sdk-disabled", "exporter-none"],
)  # fmt: skip
def test_spans_are_exported_when_the_standard_variables_say_so(
    environ: dict[str, str], endpoint: str | None
) -> None:
    assert otlp_endpoint(environ) == endpoint
    config = load_config({"SCHEDULER_API_TOKEN": "t", **environ})
    assert config.otlp_endpoint == endpoint


def test_an_endpoint_without_the_sdk_is_a_config_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.scheduler.tracing.missing_sdk", lambda: "opentelemetry.sdk")
    with pytest.raises(ConfigError) as caught:
        load_config({"SCHEDULER_API_TOKEN": "t",
                     "OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:pw@c:4318"})  # fmt: skip
    message = str(caught.value)
    assert message.startswith("OTEL_EXPORTER_OTLP_ENDPOINT=")
    assert "pip install 'cronclock[otel]'" in message and "pw" not in message
