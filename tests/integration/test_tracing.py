"""Trace context from the real daemon (issue 21): the traceparent each call carried, the
trace_id on its log lines, and with OTEL_EXPORTER_OTLP_ENDPOINT set one span per attempt sent
over OTLP/HTTP to a loopback collector stub that decodes what it receives (protobuf, with the
OpenTelemetry proto package)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ROOT, Daemon, base_env
from tests.support import Reply, Target

trace_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="the otel extra is not installed (pip install -e '.[dev]' installs it)",
)

JOBS = """
[jobs.tick]
schedule = "every 1s"
endpoint = "/tick"

[jobs.flaky]
schedule = "every 3s"
endpoint = "/flaky"
retries = 1
"""


class Collector:
    """An OTLP/HTTP collector stub on loopback: keeps every span it is sent, with its
    resource attributes, and answers as a collector does (200, an empty response)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_pb2.ExportTraceServiceRequest.FromString(body)
                collector.received(self.path, request)
                answer = trace_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, path: str, request: Any) -> None:
        self.paths.append(path)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {
                        a.key: getattr(a.value, a.value.WhichOneof("value"))
                        for a in span.attributes
                    }
                    self.spans.append({
                        "trace": span.trace_id.hex(), "span": span.span_id.hex(),
                        "name": span.name, "kind": span.kind, "status": span.status.code,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "attributes": attributes, "resource": resource,
                        "scope": scope_spans.scope.name,
                    })  # fmt: skip

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    stub = Collector()
    yield stub
    stub.close()


def carried(arrival: Any) -> tuple[str, str]:
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", arrival.header("traceparent"))
    assert match, arrival.header("traceparent")
    return match.group(1), match.group(2)


def test_each_attempt_is_exported_as_the_span_its_call_carried(
    daemon: Callable[..., Daemon], target: Target, jobs_file: Callable[[str], Path],
    collector: Collector,
) -> None:  # fmt: skip
    target.script["/flaky"] = [Reply(status=503, headers={"Retry-After": "0"}), Reply(status=200)]
    process = daemon(API_URL=target.url, SCHEDULER_API_TOKEN="tok",
                     SCHEDULER_JOBS_FILE=str(jobs_file(JOBS)),
                     OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="200")  # fmt: skip
    assert target.wait_for(lambda calls: len([c for c in calls if c.path == "/flaky"]) >= 2, 20)
    assert process.stop() == 0  # the spans still batched are sent on the way out
    calls = target.calls()
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    exported = {(s["trace"], s["span"]): s for s in collector.spans}
    for call in calls:
        span = exported[carried(call)]  # the call's own span, under the call's own trace
        attributes = span["attributes"]
        assert attributes["cronclock.job"] == call.path.strip("/")
        assert attributes["cronclock.idempotency_key"] == call.header("Idempotency-Key")
        assert attributes["cronclock.attempt"] == int(call.header("X-Scheduler-Attempt") or 0)
        assert span["name"] == f"POST {attributes['cronclock.job']}" and span["kind"] == 3  # CLIENT
        assert span["resource"]["service.name"] == "cronclock" and span["scope"] == "cronclock"
        assert 0 < span["start"] < span["end"]
    first, retry = [c for c in calls if c.path == "/flaky"][:2]
    assert carried(first)[0] == carried(retry)[0] and carried(first)[1] != carried(retry)[1]
    failed, succeeded = exported[carried(first)], exported[carried(retry)]
    assert (failed["attributes"]["http.response.status_code"], failed["attributes"]["cronclock.outcome"],
            failed["status"]) == (503, "failed", 2)  # STATUS_CODE_ERROR  # fmt: skip
    assert (succeeded["attributes"]["cronclock.outcome"], succeeded["status"]) == ("success", 0)
    # and the daemon's log lines name the same trace
    fired = {e["trace_id"] for e in process.events("fired")}
    assert {carried(c)[0] for c in calls if c.path == "/tick"} <= fired


def test_without_an_endpoint_calls_still_carry_a_traceparent_and_nothing_is_exported(
    daemon: Callable[..., Daemon], target: Target, jobs_file: Callable[[str], Path],
    collector: Collector,
) -> None:  # fmt: skip
    process = daemon(API_URL=target.url, SCHEDULER_API_TOKEN="tok",
                     SCHEDULER_JOBS_FILE=str(jobs_file(JOBS)))  # fmt: skip
    assert target.wait_for(lambda calls: len(calls) >= 2, 20)
    assert process.stop() == 0
    traces = {carried(c)[0] for c in target.calls("/tick")}
    assert len(traces) == len(target.calls("/tick"))  # a trace per slot
    assert collector.spans == []


def test_an_endpoint_without_the_otel_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    hidden = tmp_path / "no-otel"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text('import sys\nsys.modules["opentelemetry"] = None\n')
    env = base_env(SCHEDULER_API_TOKEN="t", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
                   PYTHONPATH=f"{hidden}:{ROOT}:{ROOT / 'src'}")  # fmt: skip
    for command in ("check", "run"):
        result = subprocess.run([sys.executable, "-m", "services.scheduler", command], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert "OTEL_EXPORTER_OTLP_ENDPOINT='http://127.0.0.1:4318'" in result.stderr
        assert "pip install 'cronclock[otel]'" in result.stderr
