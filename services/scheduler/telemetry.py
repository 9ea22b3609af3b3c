"""Logs (structlog) and error reporting (PostHog). Passed in, never module-level singletons."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Protocol, TextIO

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from structlog.typing import FilteringBoundLogger

from . import __version__


def configure_logging(
    *, fmt: str = "auto", level: str = "info", stream: TextIO | None = None, color: bool = True
) -> FilteringBoundLogger:
    """A structlog logger: JSON when `stream` is not a TTY (or fmt='json'), console otherwise,
    coloured on a TTY unless `color` is False (NO_COLOR, https://no-color.org)."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=color and out.isatty())
    )
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    global _writer
    writer = _writer = LineWriter(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )
    logger: FilteringBoundLogger = structlog.get_logger("cronclock")
    return logger


class LineWriter:
    """structlog's logger: each line is written whole (its text and newline in one write) and
    flushed. Within `batch()` a thread's lines are kept and written together in one write when
    the batch ends: the bookkeeper so writes the "fired" lines of the answers it took at once.
    Other threads' lines are never held."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._local = threading.local()

    def msg(self, message: str) -> None:
        kept: list[str] | None = getattr(self._local, "kept", None)
        if kept is not None:
            kept.append(message)
            return
        with self._lock:
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if getattr(self._local, "kept", None) is not None:  # within one already
            yield
            return
        self._local.kept = []
        try:
            yield
        finally:
            kept, self._local.kept = self._local.kept, None
            if kept:
                with self._lock:
                    self._file.write("\n".join(kept) + "\n")
                    self._file.flush()


_writer: LineWriter | None = None  # the one configure_logging set up


def log_batch() -> contextlib.AbstractContextManager[None]:
    """Hold this thread's log lines and write them in one write at the end (see LineWriter);
    nothing is held where logging was configured elsewhere (tests capturing logs)."""
    return _writer.batch() if _writer is not None else contextlib.nullcontext()


class ErrorReporter(Protocol):
    """Where terminal failures are reported."""

    def report(self, error: BaseException, properties: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """No POSTHOG_API_KEY: nothing is sent anywhere."""

    def report(self, error: BaseException, properties: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class JobFailed(Exception):
    """A job's call failed for good (after its retries); what PostHog receives."""


class PostHogReporter:
    """Sends terminal failures to PostHog error tracking; flushed at shutdown."""

    def __init__(self, api_key: str, host: str, log: FilteringBoundLogger) -> None:
        from posthog import Posthog

        self._log = log
        self._client = Posthog(
            api_key,
            host=host,
            super_properties={"cronclock_version": __version__},
            on_error=self._on_error,
        )

    def _on_error(self, error: Exception, batch: object) -> None:
        self._log.warning("posthog delivery failed", error=str(error))

    def report(self, error: BaseException, properties: dict[str, Any]) -> None:
        try:
            self._client.capture_exception(
                error, distinct_id=f"cronclock:{properties.get('job', '-')}", properties=properties
            )
        except Exception as failure:  # reporting must never break firing
            self._log.warning("posthog capture failed", error=str(failure))

    def close(self) -> None:
        try:
            self._client.shutdown()
        except Exception as failure:
            self._log.warning("posthog flush failed", error=str(failure))


def make_reporter(api_key: str | None, host: str, log: FilteringBoundLogger) -> ErrorReporter:
    if not api_key:
        return NullReporter()
    return PostHogReporter(api_key, host, log)


LATENESS_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
)  # fmt: skip


class Metrics:
    """The Prometheus metrics of DESIGN.md section 7, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.runs = Counter(
            "cronclock_job_runs", "Slots by final outcome (a missed record counts each slot).",
            ["job", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "cronclock_job_duration_seconds", "Time from first attempt to final outcome.",
            ["job"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.lateness = Histogram(
            "cronclock_job_lateness_seconds", "Send time minus the slot's nominal time.",
            buckets=LATENESS_BUCKETS, registry=r,
        )  # fmt: skip
        self.next_run = Gauge(
            "cronclock_job_next_run_timestamp_seconds", "The job's next planned slot (Unix time).",
            ["job"], registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            "cronclock_job_last_success_timestamp_seconds", "When the job last succeeded.",
            ["job"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("cronclock_jobs_in_flight", "Calls in flight now.", registry=r)
        self.is_leader = Gauge(
            "cronclock_is_leader",
            "1 when this replica plans and fires; 0 on a standby.",
            registry=r,
        )
        self.is_leader.set(1)
        # Failure policies (policies.py). The gauges are set for the static jobs when scraped.
        self.auto_pauses = Counter(
            "cronclock_job_auto_paused", "Jobs paused by the daemon: after pause_after_failures "
            "failed slots in a row (reason=failures) or a 410 Gone (reason=gone).",
            ["job", "reason"], registry=r,
        )  # fmt: skip
        self.paused = Gauge(
            "cronclock_job_paused", "1 while the job is paused: by=operator, or by the daemon "
            "(by=failures: pause_after_failures; by=gone: a 410).",
            ["job", "by"], registry=r,
        )  # fmt: skip
        self.failures = Gauge(
            "cronclock_job_consecutive_failures", "Slots in a row whose final outcome was failed.",
            ["job"], registry=r,
        )  # fmt: skip
        self.stale = Gauge(
            "cronclock_job_stale", "1 while the job has had no success for longer than its "
            "max_silence (only jobs that set one).",
            ["job"], registry=r,
        )  # fmt: skip
        # Labelled children, looked up once (labels() validates and locks on every call);
        # these series are never removed, unlike next_run's.
        self._runs: dict[tuple[str, str], Any] = {}
        self._ends: dict[str, tuple[Any, Any]] = {}  # job -> (duration, last_success)

    def outcome(self, job: str, outcome: str, count: int = 1) -> None:
        child = self._runs.get((job, outcome))
        if child is None:
            child = self._runs[(job, outcome)] = self.runs.labels(job=job, outcome=outcome)
        child.inc(count)

    def finished(self, job: str, outcome: str, seconds: float, at: float) -> None:
        """A slot's final outcome: counted, its duration observed, its success stamped."""
        self.outcome(job, outcome)
        ends = self._ends.get(job)
        if ends is None:
            ends = self._ends[job] = (self.duration.labels(job=job),
                                      self.last_success.labels(job=job))  # fmt: skip
        ends[0].observe(seconds)
        if outcome == "success":
            ends[1].set(at)

    def auto_paused(self, job: str, reason: str) -> None:
        self.auto_pauses.labels(job=job, reason=reason).inc()

    def conditions(self, jobs: Iterable[tuple[str, str | None, int, bool | None]]) -> None:
        """The static jobs' (name, paused by: None when not paused, consecutive failures,
        stale) when scraped; stale is None for a job without max_silence. Jobs no longer in
        the table drop out."""
        for gauge in (self.paused, self.failures, self.stale):
            gauge.clear()
        for job, paused_by, failures, stale in jobs:
            if paused_by is not None:
                self.paused.labels(job=job, by=paused_by).set(1)
            self.failures.labels(job=job).set(failures)
            if stale is not None:
                self.stale.labels(job=job).set(int(stale))

    def planned(self, job: str, slot: datetime | None) -> None:
        if slot is None:
            with contextlib.suppress(KeyError):
                self.next_run.remove(job)
        else:
            self.next_run.labels(job=job).set(slot.timestamp())


class Throttle:
    """Yes at most once per `interval` seconds: for an error logged while a fault lasts."""

    def __init__(
        self, interval: float = 60.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._monotonic = monotonic
        self._last = -math.inf

    def ready(self) -> bool:
        now = self._monotonic()
        if now - self._last < self._interval:
            return False
        self._last = now
        return True


class ThreadDeaths:
    """The first uncaught exception of any internal thread (state writer, lease, admin
    server, ...). A daemon missing one of its threads may look alive while it fires nothing:
    health turns 503 at once and the process stops with exit 1, so a supervisor restarts it."""

    def __init__(self, log: FilteringBoundLogger, on_death: Callable[[], None]) -> None:
        self._log = log
        self._on_death = on_death
        self.reason: str | None = None
        self._previous: Callable[[threading.ExceptHookArgs], Any] | None = None

    def install(self) -> ThreadDeaths:
        self._previous = threading.excepthook
        threading.excepthook = self._hook
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            threading.excepthook = self._previous
            self._previous = None

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "unknown"
        if self.reason is None:
            error = f"{args.exc_type.__name__}: {args.exc_value}"
            self.reason = f"internal thread {name!r} died: {error}"
        self._log.error(
            "internal thread died; the daemon stops so that it is restarted",
            thread=name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
            if args.exc_value is not None
            else None,
        )
        self._on_death()
