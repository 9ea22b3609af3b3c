"""Settings and the job table: built-in default table, TOML jobs file, environment overrides.

Everything the daemon reads from its environment is read here, once, and validated; every
problem becomes one ConfigError whose message names the variable or field and quotes the value.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from schedule_grammar import (
    Interval,
    Schedule,
    ScheduleError,
    canonical_zone,
    parse,
    seconds_to_schedule,
)

from . import tracing
from .signing import Signer, parse_secrets

if TYPE_CHECKING:
    from . import notify


class ConfigError(ValueError):
    """A setting, variable or job field that cannot be used. The CLI exits 2 on it."""


# ---------------------------------------------------------------------------------------------
# Durations: "30s", "5m", "1.5h", "250ms", or a bare number of seconds.

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a duration: a number of seconds or text such as '30s', '5m', '250ms'."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()]
    else:
        raise ValueError(f"{value!r} is not a duration; write e.g. '30s', '5m', '2h' or seconds")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def _within(low: float, high: float) -> Callable[[float], float]:
    """A check that seconds lie in [low, high], whose message names the bound."""

    def within(seconds: float) -> float:
        if seconds < low:
            raise ValueError(f"must be at least {format_seconds(low)}")
        if seconds > high:
            raise ValueError(f"must be at most {format_seconds(high)}")
        return seconds

    return within


# Every duration has a range (README "Settings"): outside it is a mistake, not a cadence.
Timeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_within(0.01, 86400))]
Grace = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_within(0, 30 * 86400))]


def _off_or_duration(value: object) -> float | None:
    """`max_silence`: "off" (or absent) for no dead-man check, else a duration."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return parse_duration(value)


def _silence_within(seconds: float | None) -> float | None:
    return None if seconds is None else _within(60, 366 * 86400)(seconds)


Silence = Annotated[
    float | None, BeforeValidator(_off_or_duration), AfterValidator(_silence_within)
]
Retention = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(_within(60, 3650 * 86400))
]


def format_seconds(seconds: float) -> str:
    """A duration for people: 120 -> '2m', 90 -> '90s', 0.25 -> '250ms'."""
    if not math.isfinite(seconds):
        return repr(seconds)
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    for suffix, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{suffix}"
    return f"{whole}s"


# ---------------------------------------------------------------------------------------------
# Settings


class Settings(BaseSettings):
    """Process-wide settings, one per environment variable (DESIGN.md section 3)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    api_url: str = Field("http://localhost:8000", alias="API_URL")
    api_token: SecretStr | None = Field(None, alias="SCHEDULER_API_TOKEN")
    api_token_file: Path | None = Field(None, alias="SCHEDULER_API_TOKEN_FILE")
    # Standard Webhooks signing of every call (signing.py): one or more whsec_ secrets.
    signing_secret: SecretStr | None = Field(None, alias="SCHEDULER_SIGNING_SECRET")
    signing_secret_file: Path | None = Field(None, alias="SCHEDULER_SIGNING_SECRET_FILE")
    local_dev_mode: bool = Field(False, alias="LOCAL_DEV_MODE")
    timezone: str = Field("UTC", alias="SCHEDULER_TIMEZONE")
    jobs_file: Path | None = Field(None, alias="SCHEDULER_JOBS_FILE")
    max_concurrency: int = Field(8, ge=1, le=512, alias="SCHEDULER_MAX_CONCURRENCY")
    # Scheduled first attempts over plain HTTP written at their instant by one event loop
    # (dispatch.py, wire.py); false sends every call through httpx on the thread pool.
    fast_path: bool = Field(True, alias="SCHEDULER_FAST_PATH")
    tick_seconds: float = Field(
        30.0, ge=0.1, le=3600, allow_inf_nan=False, alias="SCHEDULER_TICK_SECONDS"
    )
    state_url: str = Field("sqlite:///./.cronclock/state.db", alias="SCHEDULER_STATE_URL")
    admin_bind: str = Field("127.0.0.1:8089", alias="SCHEDULER_ADMIN_BIND")
    admin_token: SecretStr | None = Field(None, alias="SCHEDULER_ADMIN_TOKEN")
    log_format: Literal["json", "console", "auto"] = Field("auto", alias="SCHEDULER_LOG_FORMAT")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", alias="SCHEDULER_LOG_LEVEL"
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, le=86400, allow_inf_nan=False, alias="SCHEDULER_SHUTDOWN_GRACE_SECONDS"
    )
    history_max_runs: int = Field(1000, ge=1, le=1_000_000, alias="SCHEDULER_HISTORY_MAX_RUNS")
    history_max_age: Retention = Field(30 * 86400.0, alias="SCHEDULER_HISTORY_MAX_AGE")
    namespace: str = Field("cronclock", min_length=1, alias="SCHEDULER_NAMESPACE")
    redis_password: SecretStr | None = Field(None, alias="SCHEDULER_REDIS_PASSWORD")
    lease_ttl_seconds: float = Field(
        15.0, ge=1, le=3600, allow_inf_nan=False, alias="SCHEDULER_LEASE_TTL_SECONDS"
    )
    runtime_retention: Retention = Field(7 * 86400.0, alias="SCHEDULER_RUNTIME_RETENTION")
    max_runtime_schedules: int = Field(
        100_000, ge=1, le=10_000_000, alias="SCHEDULER_MAX_RUNTIME_SCHEDULES"
    )
    # Notifications (notify.py): a webhook URL's path is often its secret (Slack's).
    notify_url: SecretStr | None = Field(None, alias="SCHEDULER_NOTIFY_URL")
    notify_format: Literal["json", "slack"] = Field("json", alias="SCHEDULER_NOTIFY_FORMAT")
    posthog_api_key: SecretStr | None = Field(None, alias="POSTHOG_API_KEY")
    posthog_host: str = Field("https://us.i.posthog.com", alias="POSTHOG_HOST")

    @field_validator("log_format", "log_level", "notify_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("jobs_file", "api_token_file", "signing_secret_file", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; set a path or unset it")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _canonical_zone(value)

    @field_validator("api_token", "admin_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_token(value.get_secret_value().strip())
        return value

    @field_validator("api_url", "posthog_host")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)

    @field_validator("admin_bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        if value.lower() == "off":
            return "off"
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT such as 127.0.0.1:8089, or 'off'")
        return value

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        scheme = scheme.lower()  # REDIS://… is redis://…, here and wherever the URL is used
        if (
            scheme not in ("sqlite", "memory", "redis", "rediss", "postgresql", "postgres")
            or not sep
        ):
            raise ValueError(
                "expected sqlite:///path/state.db, memory://, redis://host:port/db or "
                "postgresql://user@host:port/database"
            )
        value = f"{scheme}://{rest}"
        if scheme == "sqlite":
            sqlite_path(value)
        if scheme in ("redis", "rediss"):
            check_redis_url(value)
        if scheme in ("postgresql", "postgres"):
            check_postgres_url(value)
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", value):
            raise ValueError(
                "expected 1-64 letters, digits or _ . : - (the prefix of Redis keys, the "
                "PostgreSQL schema)"
            )
        return value


STATE_SCHEMES = ("sqlite", "memory", "redis", "rediss", "postgresql", "postgres")


def sqlite_path(url: str) -> Path:
    """The file of a sqlite:/// URL: sqlite:///./x.db is relative, sqlite:////var/x.db absolute."""
    rest = url.partition("://")[2]
    if not rest.startswith("/") or rest.endswith("/"):
        raise ValueError("expected sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return Path(rest[1:])


def check_postgres_url(value: str) -> None:
    """postgresql://[user[:password]@][host][:port][/database][?param=value], with the client
    installed (libpq's PG* variables, such as PGPASSWORD, fill in what the URL leaves out)."""
    if (
        importlib.util.find_spec("psycopg") is None
        or importlib.util.find_spec("psycopg_pool") is None
    ):
        raise ValueError(
            "needs the PostgreSQL client, which is not installed: pip install 'cronclock[postgres]'"
        )
    host = value.partition("://")[2].partition("/")[0].rpartition("@")[2]
    port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
    if port and not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")


def check_redis_url(value: str) -> None:
    """redis://[user:password@]host[:port][/db] (rediss:// for TLS), with the client installed."""
    if importlib.util.find_spec("redis") is None:
        raise ValueError(
            "needs the Redis client, which is not installed: pip install 'cronclock[redis]'"
        )
    url = urllib.parse.urlsplit(value)
    try:
        port = url.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if not url.hostname:
        raise ValueError("expected redis://host:port/db, e.g. redis://redis:6379/0")
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if not re.fullmatch(r"/?(\d{1,5})?", url.path):
        raise ValueError(f"the database must be a number, e.g. /0; got {url.path!r}")


def redact_url(value: str) -> str:
    """The URL with any password replaced by ***, fit for logs and error messages."""
    try:
        url = urllib.parse.urlsplit(value)
    except ValueError:
        return "<not a URL>"
    pairs = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):  # postgresql://h/db?password=... (libpq)
        url = url._replace(query="&".join(
            f"{k}=***" if k.lower() == "password" else f"{k}={v}" for k, v in pairs
        ))  # fmt: skip
        value = urllib.parse.urlunsplit(url)
    if "@" not in url.netloc:
        return value
    userinfo, _, host = url.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"  # a bare userinfo is a token as often as a name
    return urllib.parse.urlunsplit(url._replace(netloc=f"{shown}@{host}"))


def check_http_url(value: str) -> str:
    """An http(s) URL with a host, without credentials, query or fragment; trailing slash
    removed."""
    import httpx  # the parser the calls are built with; imported when a URL is checked

    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain a space or control character")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not 0-65535
        url = httpx.URL(value)
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    except (httpx.InvalidURL, TypeError):
        raise ValueError("not a URL; expected e.g. http://app:8000") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected an http:// or https:// URL with a host, e.g. http://app:8000")
    if "@" in parts.netloc:
        raise ValueError(
            "must not carry credentials (user:password@): they would be sent as Basic auth; "
            "cronclock authenticates with SCHEDULER_API_TOKEN as a bearer token"
        )
    if parts.port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if url.query or url.fragment:
        raise ValueError("must not have a query or fragment")
    return value.rstrip("/")


def check_token(token: str, what: str = "the token") -> None:
    """A bearer token must fit in an HTTP header as it is: visible ASCII, no spaces. The
    message never quotes the token."""
    for position, char in enumerate(token, 1):
        if "!" <= char <= "~":
            continue
        kind = (
            "a line break" if char in "\r\n"
            else "a space" if char in " \t"
            else "a control character" if char.isascii()
            else "a non-ASCII character"
        )  # fmt: skip
        raise ValueError(
            f"{what} has {kind} at position {position}; it cannot be sent in an HTTP header "
            "(visible ASCII only, no spaces)"
        )


def _canonical_zone(value: str) -> str:
    try:
        return canonical_zone(value)
    except ScheduleError as error:
        raise ValueError(str(error)) from None


SETTING_NAMES: dict[str, str] = {
    info.alias: name for name, info in Settings.model_fields.items() if info.alias
}
_SECRET_SETTINGS = {
    alias
    for alias, name in SETTING_NAMES.items()
    if Settings.model_fields[name].annotation == SecretStr | None
}


# ---------------------------------------------------------------------------------------------
# Jobs

JOB_FIELDS = (
    "schedule",
    "endpoint",
    "method",
    "timeout",
    "timezone",
    "headers",
    "body",
    "enabled",
    "overlap",
    "retries",
    "catchup",
    "misfire_grace",
    "spread",
    "run_on_start",
    "dst_gap",
    "dst_repeat",
    "pause_after_failures",
    "on_gone",
    "max_silence",
)
# Headers cronclock sets on every call (DESIGN.md section 4); a job may not set them itself.
RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "user-agent",
        "idempotency-key",
        "x-scheduler-job",
        "x-scheduled-for",
        "x-scheduler-attempt",
        "x-scheduler-fencing-token",
        "traceparent",
        "tracestate",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
# Headers that belong to the connection and the message framing, which the HTTP client owns,
# and Host, which API_URL names: set by a job, they would smuggle a second request, reach a
# virtual host behind the application's proxy, or break the request (RFC 9110 7.6.1, 9112 6).
TRANSPORT_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,99}")


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")
MAX_HEADERS = 32
MAX_HEADER_BYTES = 8 * 1024  # names and values of a job's own headers, together
MAX_BODY_BYTES = 64 * 1024  # the JSON body, serialised
MAX_BODY_DEPTH = 32  # arrays and objects inside each other
MAX_ENDPOINT_LENGTH = 2048


class CallSpec(BaseModel):
    """How to call the application: what a static job and a runtime schedule share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Strict types: `retries = true` or `enabled = "yes"` is a mistake to report, not to coerce.
    # (Environment overrides are text; _env_overrides types them first.)
    schedule: StrictStr = Field(max_length=256)
    endpoint: StrictStr = Field(max_length=MAX_ENDPOINT_LENGTH)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    timeout: Timeout = 30.0
    timezone: StrictStr | None = None
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    body: Any = None
    overlap: Literal["skip", "queue", "allow"] = "skip"
    retries: StrictInt = Field(0, ge=0, le=20)
    catchup: Literal["latest", "none", "all"] = "latest"
    misfire_grace: Grace = 300.0
    dst_gap: Literal["shift", "skip"] | None = None
    dst_repeat: Literal["first", "last", "both"] | None = None
    # Failure policies (README "When calls fail"): pause after N failed slots in a row (0:
    # never), what a 410 Gone does, and how long without a success makes the job stale.
    pause_after_failures: StrictInt = Field(0, ge=0, le=10_000)
    on_gone: Literal["disable", "ignore"] = "disable"
    max_silence: Silence = None

    @field_validator(
        "method", "overlap", "catchup", "dst_gap", "dst_repeat", "on_gone", mode="before"
    )
    @classmethod
    def _case(cls, value: object, info: Any) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "method" else value.lower()

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        path = value.partition("?")[0]
        if (
            not value.startswith("/")
            or value.startswith("//")
            or "\\" in value
            or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value)
        ):
            raise ValueError(
                "must be a path under API_URL starting with '/', e.g. '/api/sync/trigger'"
            )
        if ".." in path.split("/"):
            raise ValueError("must not contain '..' segments (it must stay under API_URL)")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else _canonical_zone(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        # Messages name headers, never quote their values: a value may be a credential.
        reserved = sorted(name for name in value if name.lower() in RESERVED_HEADERS)
        if reserved:
            raise ValueError(f"cronclock sets {', '.join(reserved)} itself; remove it")
        transport = sorted(name for name in value if name.lower() in TRANSPORT_HEADERS)
        if transport:
            raise ValueError(
                f"{', '.join(transport)}: hop-by-hop or framing headers (and Host) are the HTTP "
                "client's to set, from API_URL and the body; remove them"
            )
        if len(value) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers, got {len(value)}")
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name[:100]!r} is not a valid header name")
            if not all(" " <= c <= "~" or c == "\t" for c in text):
                raise ValueError(
                    f"header {name!r}: its value must be visible ASCII, spaces and tabs (no line "
                    "breaks, control or non-ASCII characters); the value is not shown"
                )
        size = sum(len(name) + len(text) for name, text in value.items())
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"headers take {size} bytes; at most {MAX_HEADER_BYTES}")
        return value

    @field_validator("body")
    @classmethod
    def _json_body(cls, value: Any) -> Any:
        if _depth(value, MAX_BODY_DEPTH + 1) > MAX_BODY_DEPTH:
            raise ValueError(f"the body is nested deeper than {MAX_BODY_DEPTH} levels")
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except ValueError:
            raise ValueError(
                "has a number JSON cannot carry (NaN or Infinity); use a finite number or a string"
            ) from None
        except TypeError:
            raise ValueError("must be JSON-serialisable (a TOML table, array or value)") from None
        if (size := len(text.encode())) > MAX_BODY_BYTES:
            raise ValueError(f"the body takes {size} bytes as JSON; at most {MAX_BODY_BYTES}")
        return value

    def parse_schedule(self, zone: str) -> Schedule:
        """The schedule in `zone` (unless it names its own), with the DST policy; ScheduleError."""
        return parse(
            self.schedule,
            timezone=zone,
            dst_gap=self.dst_gap or "shift",
            dst_repeat=self.dst_repeat or "first",
        )

    def call_fields(self) -> dict[str, Any]:
        """The Job fields that say how to call (same for jobs and runtime schedules)."""
        return {
            "endpoint": self.endpoint,
            "method": self.method,
            "timeout": self.timeout,
            "headers": tuple(self.headers.items()),
            "body": self.body,
            "overlap": self.overlap,
            "retries": self.retries,
            "catchup": self.catchup,
            "misfire_grace": self.misfire_grace,
            "pause_after_failures": self.pause_after_failures,
            "on_gone": self.on_gone,
            "max_silence": self.max_silence,
        }


def _depth(value: Any, limit: int) -> int:
    """How deeply arrays and objects nest in `value`, counting no further than `limit`
    (iterative: a value nested thousands deep must not exhaust the stack)."""
    deepest, stack = 0, [(value, 0)]
    while stack and deepest < limit:
        item, level = stack.pop()
        if isinstance(item, dict | list | tuple):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in (
                item.values() if isinstance(item, dict) else item))  # fmt: skip
    return deepest


class JobSpec(CallSpec):
    """One job as configured, before its schedule is parsed."""

    enabled: StrictBool = True
    spread: StrictBool = False
    run_on_start: StrictBool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A validated job: its effective schedule and how to call its endpoint."""

    name: str
    schedule: Schedule
    endpoint: str
    method: str = "POST"
    timeout: float = 30.0
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = field(default=None, compare=False)
    enabled: bool = True
    overlap: Literal["skip", "queue", "allow"] = "skip"
    retries: int = 0
    catchup: Literal["latest", "none", "all"] = "latest"
    misfire_grace: float = 300.0
    spread: bool = False
    run_on_start: bool = False
    pause_after_failures: int = 0  # 0: never
    on_gone: Literal["disable", "ignore"] = "disable"
    max_silence: float | None = None  # seconds without a success that make it stale; None: off
    source: str = "built-in"  # where the job's definition came from, for `check`
    # Runtime schedules (created through the admin API) only:
    schedule_id: str | None = None
    revision: int = 0
    group: str | None = None
    anchor: datetime | None = None  # slots count from this instant (when it was armed)
    ends: datetime | None = None  # no slot after this instant (expires_at)

    def next_slot(self, after: datetime) -> datetime | None:
        """The job's next slot strictly after `after`; None past its end."""
        upcoming = self.schedule.next_after(after)
        if upcoming is not None and self.ends is not None and upcoming > self.ends:
            return None
        return upcoming

    @property
    def label(self) -> str:
        """The `job` label of its metrics: a runtime schedule counts under its group, so
        100,000 schedules do not make 100,000 time series."""
        if self.schedule_id is None:
            return self.name
        return f"schedules/{self.group}" if self.group else "schedules"


@dataclass(frozen=True, slots=True)
class DefaultJob:
    name: str
    endpoint: str
    method: str
    timeout: str
    cadence_variable: str | None
    default_seconds: int | None = None
    schedule: str | None = None
    spread: bool = False


# The main application's jobs and their legacy cadence variables (DESIGN.md section 3).
DEFAULT_JOBS = (
    DefaultJob("data-refresh", "/api/sync/trigger", "POST", "120s",
               "SCHEDULER_DATA_REFRESH_INTERVAL", 900),
    DefaultJob("health-check", "/api/health", "GET", "30s",
               "SCHEDULER_HEALTH_CHECK_INTERVAL", 300),
    DefaultJob("script-runner", "/api/scripts/run-due", "POST", "600s",
               "SCHEDULER_SCRIPT_RUN_INTERVAL", 60),
    DefaultJob("marketplaces", "/api/marketplaces/sync-all", "POST", "900s",
               None, schedule="daily 03:00"),
    DefaultJob("session-collector", "/api/admin/run-session-collector", "POST", "300s",
               "SCHEDULER_SESSION_COLLECTOR_INTERVAL", 600, spread=True),
    DefaultJob("session-processor:verification",
               "/api/admin/run-session-processor?processor=verification", "POST", "900s",
               "SCHEDULER_VERIFICATION_DETECTOR_INTERVAL", 900, spread=True),
    DefaultJob("session-processor:usage",
               "/api/admin/run-session-processor?processor=usage", "POST", "300s",
               "SCHEDULER_USAGE_PROCESSOR_INTERVAL", 600, spread=True),
    DefaultJob("corporate-memory", "/api/admin/run-corporate-memory", "POST", "900s",
               "SCHEDULER_CORPORATE_MEMORY_INTERVAL", 1020, spread=True),
)  # fmt: skip
CADENCE_VARIABLES = frozenset(j.cadence_variable for j in DEFAULT_JOBS if j.cadence_variable)
JOB_OVERRIDE_PREFIX = "SCHEDULER_JOBS__"
KNOWN_VARIABLES = frozenset(SETTING_NAMES) | CADENCE_VARIABLES


def env_key(job_name: str) -> str:
    """The KEY of SCHEDULER_JOBS__<KEY>__<FIELD>: upper case, non-alphanumerics as '_'."""
    return re.sub(r"[^A-Za-z0-9]", "_", job_name).upper()


def spread_offset(job_name: str, period_seconds: int) -> int:
    """A stable offset in [0, period) derived from the job name (same on every replica)."""
    digest = hashlib.sha256(job_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % period_seconds


# ---------------------------------------------------------------------------------------------
# Loading


BUILT_IN_ORIGIN = "built-in table (no SCHEDULER_JOBS_FILE)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    settings: Settings
    jobs: tuple[Job, ...]
    api_token: SecretStr | None
    origin: str = BUILT_IN_ORIGIN  # where the job table came from
    signer: Signer | None = None  # SCHEDULER_SIGNING_SECRET(_FILE): calls are signed
    otlp_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT: spans exported
    notify: tuple[notify.Target, ...] = ()  # SCHEDULER_NOTIFY_URL: where events go

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        names = [j.name for j in self.jobs]
        listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise ConfigError(
            f"no job named {name!r}{_suggest(name, names)}; the jobs are: {listed or 'none'}"
        )


def _suggest(word: str, candidates: list[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _shown(variable: str, value: object) -> str:
    if variable in _SECRET_SETTINGS:
        return "'**********'"
    if variable in _URL_SETTINGS and isinstance(value, str):
        return _clipped(redact_url(value))  # a password may sit in a URL
    return _clipped(value)


_URL_SETTINGS = {"SCHEDULER_STATE_URL", "API_URL", "POSTHOG_HOST"}


def _clipped(value: object, limit: int = 100) -> str:
    """repr(value), at most about `limit` characters (a bad value may be a whole file)."""
    text = repr(value) if not isinstance(value, list | dict) or _depth(value, 8) < 8 else "[…]"
    return text if len(text) <= limit else f"{text[:limit]}…"


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Validate the process settings from an environment mapping."""
    for variable in sorted(environ):
        if not variable.startswith("SCHEDULER_") or variable in KNOWN_VARIABLES:
            continue
        if variable.startswith(JOB_OVERRIDE_PREFIX):
            continue  # checked with the job table
        # The value is not shown: a misspelt secret's name is no reason to print the secret.
        raise ConfigError(
            f"unknown variable {variable}{_suggest(variable, KNOWN_VARIABLES)}; "
            "unset it or fix its name (every SCHEDULER_* variable is checked against typos)"
        )
    values = {alias: environ[alias] for alias in SETTING_NAMES if alias in environ}
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        alias = str(first["loc"][0])
        raise ConfigError(
            f"{alias}={_shown(alias, values.get(alias))}: {_message(first)}"
        ) from None


def _message(detail: Mapping[str, Any]) -> str:
    message = str(detail["msg"])
    return message.removeprefix("Value error, ")


def load_config(environ: Mapping[str, str]) -> Config:
    """Settings, API token and the job table from an environment (os.environ in production)."""
    settings = load_settings(environ)
    token = _api_token(settings)
    signer = _signer(settings)
    jobs, origin = load_table(settings, environ)
    return Config(settings=settings, jobs=jobs, api_token=token, origin=origin, signer=signer,
                  otlp_endpoint=_otlp_endpoint(environ), notify=_notify(settings))  # fmt: skip


def _notify(settings: Settings) -> tuple[notify.Target, ...]:
    if settings.notify_url is None:
        return ()
    from . import notify  # only when notifications are configured

    try:
        return notify.parse_targets(settings.notify_url.get_secret_value(), settings.notify_format)
    except ValueError as error:
        raise ConfigError(f"SCHEDULER_NOTIFY_URL: {error}") from None


def _otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go, when the standard OTel variables say so; the SDK must be installed."""
    endpoint = tracing.otlp_endpoint(environ)
    missing = None if endpoint is None else tracing.missing_sdk()
    if endpoint is not None and missing is not None:
        variable = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    else "OTEL_EXPORTER_OTLP_ENDPOINT")  # fmt: skip
        raise ConfigError(
            f"{variable}={_clipped(redact_url(endpoint))}: spans are to be exported, but "
            f"{missing} is not installed: {tracing.EXTRA_HINT}, or unset it"
        )
    return endpoint


def _signer(settings: Settings) -> Signer | None:
    """The signing keys of SCHEDULER_SIGNING_SECRET or SCHEDULER_SIGNING_SECRET_FILE; errors
    name the variable and a secret's position, never a secret."""
    value, path = settings.signing_secret, settings.signing_secret_file
    if value is not None and path is not None:
        raise ConfigError(
            "both SCHEDULER_SIGNING_SECRET and SCHEDULER_SIGNING_SECRET_FILE are set; set only one"
        )
    if value is not None:
        where, text = "SCHEDULER_SIGNING_SECRET", value.get_secret_value()
        if not text.strip():
            return None  # `SCHEDULER_SIGNING_SECRET=` in an env file: unset
    elif path is not None:
        where = f"SCHEDULER_SIGNING_SECRET_FILE={str(path)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"{where}: cannot read it ({error.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text (the content is not shown)") from None
    else:
        return None
    try:
        return Signer(parse_secrets(text))
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def require_auth(config: Config) -> None:
    """Refuse to run without a token unless LOCAL_DEV_MODE is true."""
    if config.api_token is None and not config.settings.local_dev_mode:
        raise ConfigError(
            "no API token: set SCHEDULER_API_TOKEN (or SCHEDULER_API_TOKEN_FILE, e.g. a Docker "
            "secret) to the bearer token the application expects; for local development "
            "without auth set LOCAL_DEV_MODE=true"
        )


def _api_token(settings: Settings) -> SecretStr | None:
    if settings.api_token is not None and settings.api_token_file is not None:
        raise ConfigError(
            "both SCHEDULER_API_TOKEN and SCHEDULER_API_TOKEN_FILE are set; set only one"
        )
    if settings.api_token is not None:
        token = settings.api_token.get_secret_value().strip()
        if token:
            return SecretStr(token)
        if settings.local_dev_mode:  # `SCHEDULER_API_TOKEN=` in an env file: "unset"
            return None
        raise ConfigError(
            "SCHEDULER_API_TOKEN is empty: set the token the application expects, or for "
            "local development without auth unset it or set LOCAL_DEV_MODE=true"
        )
    if settings.api_token_file is None:
        return None
    where = f"SCHEDULER_API_TOKEN_FILE={str(settings.api_token_file)!r}"
    try:
        text = settings.api_token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"{where}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text (the content is not shown)") from None
    if not text:
        raise ConfigError(f"{where}: the file is empty")
    try:
        check_token(text, "the token in the file")
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
    return SecretStr(text)


def _cadence(job: DefaultJob, environ: Mapping[str, str]) -> str:
    if job.cadence_variable is None:
        assert job.schedule is not None
        return job.schedule
    raw = environ.get(job.cadence_variable)
    if raw is None:
        assert job.default_seconds is not None
        return seconds_to_schedule(job.default_seconds)
    problem = f"{job.cadence_variable}={_clipped(raw)}"
    if not raw.strip():
        raise ConfigError(f"{problem}: empty; set a whole number of seconds above 0, or unset it")
    if not re.fullmatch(r"-?[0-9]{1,12}", raw.strip()):
        raise ConfigError(f"{problem}: not a whole number of seconds (e.g. 900)")
    seconds = int(raw.strip())
    if seconds <= 0:
        raise ConfigError(f"{problem}: must be above 0 seconds")
    return seconds_to_schedule(seconds)


def _read_jobs_file(path: Path) -> dict[str, Any]:
    where = f"SCHEDULER_JOBS_FILE={str(path)!r}"
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except OSError as error:
        raise ConfigError(f"{where}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where}: not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{where}: nested too deeply (arrays or tables inside each other); a job body "
            f"may nest at most {MAX_BODY_DEPTH} levels"
        ) from None
    unknown = sorted(set(data) - {"defaults", "jobs", "include_builtin"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key {unknown[0]!r}; expected [defaults], [jobs.<name>] "
            "or include_builtin"
        )
    for table in ("defaults", "jobs"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{where}: {table!r} must be a table, as in [{table}]")
    if not isinstance(data.get("include_builtin", True), bool):
        raise ConfigError(f"{where}: include_builtin must be true or false")
    return data


_ENV_JSON_FIELDS = {"headers", "body"}
_ENV_BOOL_FIELDS = {"enabled", "spread", "run_on_start"}
_ENV_INT_FIELDS = {"retries", "pause_after_failures"}
_ENV_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
              "false": False, "0": False, "no": False, "off": False}  # fmt: skip


def _typed(field_name: str, text: str) -> Any:
    """An override's text as the field's type, so the strict model sees what TOML would give."""
    if field_name in _ENV_BOOL_FIELDS:
        return _ENV_BOOLS.get(text.strip().lower(), text)
    if field_name in _ENV_INT_FIELDS and text.strip().isascii() and text.strip().isdigit():
        return int(text.strip())
    return text


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, tuple[str, Any]]]:
    """KEY -> field -> (variable, value) from SCHEDULER_JOBS__<KEY>__<FIELD>."""
    found: dict[str, dict[str, tuple[str, Any]]] = {}
    for variable in sorted(environ):
        if not variable.startswith(JOB_OVERRIDE_PREFIX):
            continue
        key, sep, field_name = variable.removeprefix(JOB_OVERRIDE_PREFIX).rpartition("__")
        name = field_name.lower()
        if not sep or not key:
            raise ConfigError(
                f"{variable}: expected SCHEDULER_JOBS__<JOB>__<FIELD>, e.g. "
                "SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE"
            )
        if name not in JOB_FIELDS:
            raise ConfigError(
                f"{variable}: unknown job field {name!r}{_suggest(name, list(JOB_FIELDS))}; "
                f"fields are {', '.join(JOB_FIELDS)}"
            )
        value: Any = environ[variable]
        if name in _ENV_JSON_FIELDS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{variable}={_clipped(value)}: not valid JSON") from None
            except RecursionError:
                raise ConfigError(f"{variable}: nested too deeply") from None
        else:
            value = _typed(name, value)
        found.setdefault(key, {})[name] = (variable, value)
    return found


def load_jobs(settings: Settings, environ: Mapping[str, str]) -> tuple[Job, ...]:
    """The job table, merged field by field: env override > jobs file > built-in default."""
    return load_table(settings, environ)[0]


def load_table(settings: Settings, environ: Mapping[str, str]) -> tuple[tuple[Job, ...], str]:
    """The job table and where it came from (for `check`'s header line).

    A jobs file is the job table (DESIGN.md section 3): the built-in table applies when no
    file is given, or when the file says `include_builtin = true`.
    """
    # name -> field -> (source, value)
    layers: dict[str, dict[str, tuple[str, Any]]] = {}
    data: dict[str, Any] = {}
    if settings.jobs_file is not None:
        data = _read_jobs_file(settings.jobs_file)
    file_label = f"jobs file {str(settings.jobs_file)!r}"
    builtin = data.get("include_builtin", settings.jobs_file is None)
    if settings.jobs_file is None:
        origin = BUILT_IN_ORIGIN
    elif builtin:
        origin = f"{file_label} + built-in table (include_builtin = true)"
    else:
        origin = file_label
    include = (
        f"add include_builtin = true to {file_label} (a jobs file is the whole job table "
        "unless it includes the built-in one)"
    )
    for job in DEFAULT_JOBS:
        variable = job.cadence_variable
        if not builtin and variable is not None and variable in environ:
            raise ConfigError(
                f"{variable} is set, but it is the cadence of built-in job {job.name!r} and the "
                f"built-in table is not included: {include}, or unset {variable}"
            )
    cadences = {job.name: _cadence(job, environ) for job in DEFAULT_JOBS}
    if builtin:
        for job in DEFAULT_JOBS:
            variable = job.cadence_variable
            source = variable if variable and variable in environ else "built-in"
            fields: dict[str, tuple[str, Any]] = {
                "schedule": (source, cadences[job.name]),
                "endpoint": ("built-in", job.endpoint),
                "method": ("built-in", job.method),
                "timeout": ("built-in", job.timeout),
            }
            if job.spread:
                fields["spread"] = ("built-in", True)
            layers[job.name] = fields

    defaults = data.get("defaults", {})
    for name, table in data.get("jobs", {}).items():
        if not _JOB_NAME.fullmatch(name):
            raise ConfigError(
                f"{file_label}: job name {name!r}: use letters, digits and . _ : @ -, "
                "starting with a letter or digit (at most 100)"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{file_label}: [jobs.{name}] must be a table")
        layer = layers.setdefault(name, {})
        for key, value in table.items():
            layer[key] = (file_label, value)

    by_key: dict[str, str] = {}
    for name in layers:
        other = by_key.setdefault(env_key(name), name)
        if other != name:
            raise ConfigError(
                f"jobs {other!r} and {name!r} both map to SCHEDULER_JOBS__{env_key(name)}__*; "
                "rename one so environment overrides are unambiguous"
            )

    built_in_keys = {env_key(job.name): job.name for job in DEFAULT_JOBS}
    for key, overrides in _env_overrides(environ).items():
        name = by_key.get(key)
        if name is None and key in built_in_keys:
            variable = next(iter(overrides.values()))[0]
            raise ConfigError(
                f"{variable} overrides built-in job {built_in_keys[key]!r}, but the built-in "
                f"table is not included: {include}, or define [jobs.{built_in_keys[key]}] there"
            )
        if name is None:
            if not {"schedule", "endpoint"} <= overrides.keys():
                variable = next(iter(overrides.values()))[0]
                raise ConfigError(
                    f"{variable}: no job with key {key!r}"
                    f"{_suggest(key, list(by_key))}; a new job from the environment needs "
                    f"both SCHEDULER_JOBS__{key}__SCHEDULE and SCHEDULER_JOBS__{key}__ENDPOINT"
                )
            name = key.lower().replace("_", "-")
            by_key[key] = name
        layer = layers.setdefault(name, {})
        for field_name, (variable, value) in overrides.items():
            layer[field_name] = (variable, value)

    jobs = tuple(
        _build_job(name, layer, defaults, settings, file_label) for name, layer in layers.items()
    )
    return jobs, origin


# Fields whose values an error message never quotes: a header may hold a credential, and a
# body may be large or hold one too.
_UNQUOTED_FIELDS = {"headers", "body"}


def field_shown(name: str, value: object) -> str:
    """'=<value>' to follow a field's name in an error message; '' for fields never quoted."""
    return "" if name in _UNQUOTED_FIELDS else f"={_clipped(value)}"


def _build_job(
    name: str,
    layer: dict[str, tuple[str, Any]],
    defaults: dict[str, Any],
    settings: Settings,
    file_label: str,
) -> Job:
    values: dict[str, Any] = {key: value for key, value in defaults.items()}
    sources: dict[str, str] = {key: f"{file_label} [defaults]" for key in defaults}
    for key, (source, value) in layer.items():
        values[key] = value
        sources[key] = source
    try:
        spec = JobSpec.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        loc = str(first["loc"][0]) if first["loc"] else "?"
        source = sources.get(loc, file_label)
        if first["type"] == "extra_forbidden":
            raise ConfigError(
                f"{source}: job {name!r}: unknown field {loc!r}"
                f"{_suggest(loc, list(JOB_FIELDS))}; fields are {', '.join(JOB_FIELDS)}"
            ) from None
        if first["type"] == "missing":
            raise ConfigError(
                f"job {name!r}: field {loc!r} is required (in {file_label} or "
                f"SCHEDULER_JOBS__{env_key(name)}__{loc.upper()})"
            ) from None
        shown = field_shown(loc, values.get(loc))
        raise ConfigError(
            f"{source}: job {name!r}: field {loc!r}{shown}: {_message(first)}"
        ) from None

    zone = spec.timezone or settings.timezone
    schedule_source = sources.get("schedule", "built-in")
    try:
        schedule = spec.parse_schedule(zone)
    except ScheduleError as error:
        where = sources.get("timezone", "") if "time zone" in str(error) else schedule_source
        raise ConfigError(f"{where or schedule_source}: job {name!r}: {error}") from None
    if spec.spread:
        if not isinstance(schedule, Interval):
            raise ConfigError(
                f"{sources.get('spread', 'built-in')}: job {name!r}: spread needs an 'every' "
                f"schedule (got {str(schedule)!r}); give wall-clock jobs distinct times instead"
            )
        shifted = (schedule.offset + spread_offset(name, schedule.seconds)) % schedule.seconds
        schedule = Interval(seconds=schedule.seconds, offset=shifted, timezone=schedule.timezone)
    return Job(
        name=name,
        schedule=schedule,
        **spec.call_fields(),
        enabled=spec.enabled,
        spread=spec.spread,
        run_on_start=spec.run_on_start,
        source=schedule_source,
    )
