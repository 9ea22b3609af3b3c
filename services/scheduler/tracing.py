"""Trace context: every call carries a W3C `traceparent`, one trace per slot, a new span per
attempt, so a fire is found in the application's traces and in cronclock's logs alike.

The trace id is derived from the slot's Idempotency-Key and the target (API_URL): the same on
every retry, after a restart and on every replica, with no state kept; a manual trigger has a
key, and so a trace, of its own. With OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) set
and the `otel` extra installed, each attempt is also exported as a span (kind CLIENT) whose id
is the one the call carried: the application's server span is its child. Without it nothing of
OpenTelemetry is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .config import Job

EXTRA_HINT = "pip install 'cronclock[otel]'"


def trace_id(seed: bytes, key: str) -> str:
    """32 hex digits: the slot's trace, from the target and the slot's Idempotency-Key."""
    return hashlib.sha256(seed + b"\0" + key.encode()).hexdigest()[:32]


def new_span_id() -> str:
    """16 hex digits, random, not all zero (which the spec forbids)."""
    while (span := os.urandom(8).hex()) == "0" * 16:
        continue
    return span


def traceparent(trace: str, span: str) -> str:
    """The W3C header value: version 00, sampled."""
    return f"00-{trace}-{span}-01"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One attempt of a slot, as a span: its ids, its time, how it went."""

    job: Job
    slot: datetime
    key: str
    attempt: int
    trace: str
    span: str
    started: datetime
    duration: float
    status: int | None
    outcome: str
    error: str | None


class SpanExport(Protocol):
    """Where attempts go as spans (the OTLP exporter, or a test's list)."""

    def attempt(self, attempt: Attempt) -> None: ...

    def close(self) -> None: ...


def otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint the standard variables name, unless they turn traces off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    return (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def missing_sdk() -> str | None:
    """What to install when the SDK or its OTLP/HTTP exporter is not there (nothing imported)."""
    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


def open_export(endpoint: str | None, version: str) -> OtlpExport | None:
    """The OTLP export when an endpoint is set (config checked the SDK is there), else None."""
    return None if endpoint is None else OtlpExport(version)


class OtlpExport:
    """Attempts as OTLP spans over HTTP (protobuf), batched by the SDK's BatchSpanProcessor.
    The exporter, the batching and the resource follow the standard OTEL_* variables
    (OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*);
    service.name is "cronclock" unless they name it."""

    def __init__(self, version: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        resource = Resource.create({"service.version": version})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "cronclock"}))
        self._resource = resource
        self._scope = InstrumentationScope("cronclock", version)
        self._processor = BatchSpanProcessor(OTLPSpanExporter())
        self._span, self._context, self._kind = ReadableSpan, SpanContext, SpanKind.CLIENT
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._status, self._codes = Status, StatusCode

    def attempt(self, attempt: Attempt) -> None:
        job = attempt.job
        start_ns = round(attempt.started.timestamp() * 1e9)
        attributes: dict[str, Any] = {
            "cronclock.job": job.name,
            "cronclock.slot": attempt.slot.isoformat(),
            "cronclock.idempotency_key": attempt.key,
            "cronclock.attempt": attempt.attempt,
            "cronclock.outcome": attempt.outcome,
            "http.request.method": job.method,
            "url.path": job.endpoint,
        }
        if attempt.status is not None:
            attributes["http.response.status_code"] = attempt.status
        failed = attempt.outcome == "failed"
        context = self._context(int(attempt.trace, 16), int(attempt.span, 16), False, self._flags)
        self._processor.on_end(
            self._span(
                name=f"{job.method} {job.name}",
                context=context,
                kind=self._kind,
                resource=self._resource,
                instrumentation_scope=self._scope,
                attributes=attributes,
                status=self._status(self._codes.ERROR, attempt.error) if failed else self._status(),
                start_time=start_ns,
                end_time=start_ns + round(attempt.duration * 1e9),
            )
        )

    def close(self) -> None:
        """Send what is batched (the SDK gives up after its export timeout)."""
        self._processor.shutdown()  # type: ignore[no-untyped-call]
