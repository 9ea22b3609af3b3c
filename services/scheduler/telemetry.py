"""Logs (structlog) and error reporting (PostHog). Passed in, never module-level singletons."""

from __future__ import annotations

import logging
import sys
from typing import Any, Protocol, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

from . import __version__


def configure_logging(
    *, fmt: str = "auto", level: str = "info", stream: TextIO | None = None
) -> FilteringBoundLogger:
    """A structlog logger: JSON when `stream` is not a TTY (or fmt='json'), console otherwise."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    logger: FilteringBoundLogger = structlog.get_logger("cronclock")
    return logger


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
