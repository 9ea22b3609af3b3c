"""Settings and the job table: sources, precedence, legacy variables, and clear errors."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.scheduler.__main__ import cmd_check, main
from services.scheduler.config import (
    DEFAULT_JOBS,
    SETTING_NAMES,
    ConfigError,
    env_key,
    load_config,
    parse_duration,
    require_auth,
    spread_offset,
)

TOKEN = {"SCHEDULER_API_TOKEN": "secret-token"}
J = 'include_builtin = false\n[jobs.x]\nschedule = "every 1m"\nendpoint = "/x"\n'


def jobs(environ: dict[str, str]) -> dict[str, object]:
    return {job.name: job for job in load_config({**TOKEN, **environ}).jobs}


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "jobs.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


class TestBuiltInTable:
    def test_it_has_the_applications_eight_jobs(self) -> None:
        table = load_config(TOKEN).jobs
        assert [job.name for job in table] == [job.name for job in DEFAULT_JOBS]
        assert len(table) == 8

    @pytest.mark.parametrize(
        ("name", "schedule", "endpoint", "method", "timeout"),
        [
            ("data-refresh", "every 15m", "/api/sync/trigger", "POST", 120),
            ("health-check", "every 5m", "/api/health", "GET", 30),
            ("script-runner", "every 1m", "/api/scripts/run-due", "POST", 600),
            ("marketplaces", "daily 03:00", "/api/marketplaces/sync-all", "POST", 900),
        ],
        ids=lambda v: str(v),
    )
    def test_fixed_jobs(
        self, name: str, schedule: str, endpoint: str, method: str, timeout: int
    ) -> None:
        job = jobs({})[name]
        assert (str(job.schedule), job.endpoint, job.method, job.timeout) == (
            schedule,
            endpoint,
            method,
            timeout,
        )  # type: ignore[attr-defined]

    def test_the_llm_pipeline_jobs_are_spread_on_their_interval(self) -> None:
        table = jobs({})
        periods = {"session-collector": 600, "session-processor:verification": 900,
                   "session-processor:usage": 600, "corporate-memory": 1020}  # fmt: skip
        for name, period in periods.items():
            job = table[name]
            assert job.spread  # type: ignore[attr-defined]
            assert job.schedule.seconds == period  # type: ignore[attr-defined]
            assert job.schedule.offset == spread_offset(name, period)  # type: ignore[attr-defined]
        offsets = {table[name].schedule.offset for name in periods}  # type: ignore[attr-defined]
        assert len(offsets) == 4, "spread jobs should not share an instant"

    def test_the_spread_offset_is_stable(self) -> None:
        assert spread_offset("corporate-memory", 1020) == spread_offset("corporate-memory", 1020)
        assert 0 <= spread_offset("x", 60) < 60


class TestLegacyCadenceVariables:
    def test_a_legacy_variable_sets_the_cadence(self) -> None:
        assert (
            str(jobs({"SCHEDULER_DATA_REFRESH_INTERVAL": "3600"})["data-refresh"].schedule)
            == "every 1h"
        )  # type: ignore[attr-defined]

    def test_an_odd_number_of_seconds_stays_exact(self) -> None:
        assert (
            str(jobs({"SCHEDULER_HEALTH_CHECK_INTERVAL": "90"})["health-check"].schedule)
            == "every 90s"
        )  # type: ignore[attr-defined]

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [("", "empty"), ("  ", "empty"), ("abc", "not a whole number"), ("1.5", "not a whole number"),
         ("0", "above 0"), ("-60", "above 0")],
        ids=repr,
    )  # fmt: skip
    def test_bad_values_name_the_variable(self, value: str, fragment: str) -> None:
        with pytest.raises(ConfigError) as caught:
            load_config({**TOKEN, "SCHEDULER_SCRIPT_RUN_INTERVAL": value})
        assert f"SCHEDULER_SCRIPT_RUN_INTERVAL={value!r}" in str(caught.value)
        assert fragment in str(caught.value)


class TestJobsFile:
    def test_file_jobs_are_added_and_merge_onto_built_in_jobs(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            """
include_builtin = true

[defaults]
timezone = "Asia/Makassar"

[jobs.data-refresh]
schedule = "every 30m"

[jobs.reports]
schedule = "weekly mon 10:00"
endpoint = "/api/reports"
timeout = "2m"
retries = 2
headers = { X-Team = "finance" }
body = { full = true }
""",
        )
        table = jobs({"SCHEDULER_JOBS_FILE": path})
        assert str(table["data-refresh"].schedule) == "every 30m in Asia/Makassar"  # type: ignore[attr-defined]
        assert table["data-refresh"].endpoint == "/api/sync/trigger"  # type: ignore[attr-defined]
        reports = table["reports"]
        assert str(reports.schedule) == "weekly mon 10:00 in Asia/Makassar"  # type: ignore[attr-defined]
        assert (reports.timeout, reports.retries, reports.headers, reports.body) == (
            120,
            2,
            (("X-Team", "finance"),),
            {"full": True},
        )  # type: ignore[attr-defined]
        assert str(table["marketplaces"].schedule) == "daily 03:00 in Asia/Makassar"  # type: ignore[attr-defined]

    def test_include_builtin_false_drops_the_built_in_table(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            'include_builtin = false\n[jobs.one]\nschedule = "every 1m"\nendpoint = "/one"\n',
        )
        assert list(jobs({"SCHEDULER_JOBS_FILE": path})) == ["one"]

    def test_a_jobs_file_is_the_job_table(self, tmp_path: Path) -> None:
        # Issue 19 (DESIGN.md section 3): without include_builtin = true, a file's jobs are all.
        path = write(tmp_path, '[jobs.one]\nschedule = "every 1m"\nendpoint = "/one"\n')
        config = load_config({**TOKEN, "SCHEDULER_JOBS_FILE": path})
        assert [job.name for job in config.jobs] == ["one"]
        assert config.origin == f"jobs file {path!r}"

    def test_the_origin_names_the_built_in_table_when_it_applies(self, tmp_path: Path) -> None:
        assert load_config(TOKEN).origin == "built-in table (no SCHEDULER_JOBS_FILE)"
        path = write(
            tmp_path,
            'include_builtin = true\n[jobs.one]\nschedule = "every 1m"\nendpoint = "/one"\n',
        )
        config = load_config({**TOKEN, "SCHEDULER_JOBS_FILE": path})
        assert config.origin == f"jobs file {path!r} + built-in table (include_builtin = true)"
        assert len(config.jobs) == len(DEFAULT_JOBS) + 1

    def test_check_prints_the_origin_in_its_header(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[jobs.one]\nschedule = "every 1m"\nendpoint = "/one"\n')
        out = io.StringIO()
        assert cmd_check(load_config({**TOKEN, "SCHEDULER_JOBS_FILE": path}), out) == 0
        assert (
            out.getvalue().splitlines()[0].endswith(f"configuration OK; jobs file {path!r} (1 job)")
        )

    @pytest.mark.parametrize(
        ("variable", "value", "fragments"),
        [
            ("SCHEDULER_DATA_REFRESH_INTERVAL", "600", ["SCHEDULER_DATA_REFRESH_INTERVAL is set", "include_builtin = true"]),
            ("SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE", "every 5m", ["SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE", "built-in job 'data-refresh'", "include_builtin = true", "[jobs.data-refresh]"]),
            ("SCHEDULER_JOBS__HEALTH_CHECK__ENABLED", "false", ["built-in job 'health-check'"]),
        ],
    )  # fmt: skip
    def test_a_built_in_setting_while_the_table_is_excluded_is_an_error(
        self, tmp_path: Path, variable: str, value: str, fragments: list[str]
    ) -> None:
        path = write(tmp_path, '[jobs.one]\nschedule = "every 1m"\nendpoint = "/one"\n')
        with pytest.raises(ConfigError) as caught:
            load_config({**TOKEN, "SCHEDULER_JOBS_FILE": path, variable: value})
        for fragment in fragments:
            assert fragment in str(caught.value)

    def test_an_override_of_a_file_job_that_shares_a_built_in_name_is_fine(
        self, tmp_path: Path
    ) -> None:
        path = write(tmp_path, '[jobs.data-refresh]\nschedule = "every 1m"\nendpoint = "/mine"\n')
        table = jobs(
            {"SCHEDULER_JOBS_FILE": path, "SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE": "every 2m"}
        )
        assert list(table) == ["data-refresh"]
        assert str(table["data-refresh"].schedule) == "every 2m"  # type: ignore[attr-defined]

    def test_the_scheduler_timezone_is_the_default_zone(self) -> None:
        table = jobs({"SCHEDULER_TIMEZONE": "Europe/Berlin"})
        assert str(table["marketplaces"].schedule) == "daily 03:00 in Europe/Berlin"  # type: ignore[attr-defined]


class TestEnvOverrides:
    def test_an_override_wins_over_file_and_default(self, tmp_path: Path) -> None:
        path = write(
            tmp_path, 'include_builtin = true\n[jobs.data-refresh]\nschedule = "every 30m"\n'
        )
        table = jobs({"SCHEDULER_JOBS_FILE": path, "SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE": "every 5m",
                      "SCHEDULER_DATA_REFRESH_INTERVAL": "60"})  # fmt: skip
        assert str(table["data-refresh"].schedule) == "every 5m"  # type: ignore[attr-defined]

    def test_keys_map_non_alphanumerics_to_underscores(self) -> None:
        assert env_key("session-processor:verification") == "SESSION_PROCESSOR_VERIFICATION"
        table = jobs({"SCHEDULER_JOBS__SESSION_PROCESSOR_VERIFICATION__ENABLED": "false"})
        assert table["session-processor:verification"].enabled is False  # type: ignore[attr-defined]

    def test_typed_fields_from_text(self) -> None:
        table = jobs(
            {
                "SCHEDULER_JOBS__HEALTH_CHECK__TIMEOUT": "45s",
                "SCHEDULER_JOBS__HEALTH_CHECK__RETRIES": "3",
                "SCHEDULER_JOBS__HEALTH_CHECK__HEADERS": '{"X-A": "b"}',
                "SCHEDULER_JOBS__HEALTH_CHECK__OVERLAP": "Queue",
                "SCHEDULER_JOBS__HEALTH_CHECK__MISFIRE_GRACE": "10m",
            }
        )
        job = table["health-check"]
        assert (job.timeout, job.retries, job.headers, job.overlap, job.misfire_grace) == (
            45,
            3,
            (("X-A", "b"),),
            "queue",
            600,
        )  # type: ignore[attr-defined]

    def test_a_new_job_can_come_from_the_environment(self) -> None:
        table = jobs({"SCHEDULER_JOBS__NIGHTLY_EXPORT__SCHEDULE": "daily 01:00",
                      "SCHEDULER_JOBS__NIGHTLY_EXPORT__ENDPOINT": "/api/export"})  # fmt: skip
        assert table["nightly-export"].endpoint == "/api/export"  # type: ignore[attr-defined]


class TestDstPolicyFields:
    def test_job_fields_set_the_policy_of_wall_clock_schedules(self, tmp_path: Path) -> None:
        path = write(tmp_path, 'include_builtin = true\n[defaults]\ndst_gap = "skip"\n[jobs.berlin]\nschedule = "daily 02:30 in Europe/Berlin"\n'
                               'endpoint = "/x"\ndst_repeat = "Both"\n')  # fmt: skip
        table = jobs({"SCHEDULER_JOBS_FILE": path})
        assert str(table["berlin"].schedule) == "daily 02:30 in Europe/Berlin dst=skip,both"  # type: ignore[attr-defined]
        # [defaults] reach every job; absolute-time schedules ignore them
        assert str(table["data-refresh"].schedule) == "every 15m"  # type: ignore[attr-defined]

    def test_the_schedule_text_wins_over_the_fields(self) -> None:
        table = jobs({"SCHEDULER_JOBS__MARKETPLACES__SCHEDULE": "daily 02:30 in Europe/Berlin dst=last",
                      "SCHEDULER_JOBS__MARKETPLACES__DST_REPEAT": "both"})  # fmt: skip
        assert table["marketplaces"].schedule.dst_repeat == "last"  # type: ignore[attr-defined]

    def test_a_bad_policy_names_the_field(self) -> None:
        with pytest.raises(ConfigError, match="field 'dst_gap'='later'"):
            load_config({**TOKEN, "SCHEDULER_JOBS__MARKETPLACES__DST_GAP": "later"})


class TestAuth:
    def test_without_a_token_it_refuses_unless_local_dev_mode(self) -> None:
        with pytest.raises(ConfigError, match=r"set SCHEDULER_API_TOKEN.*LOCAL_DEV_MODE=true"):
            require_auth(load_config({}))
        require_auth(load_config({"LOCAL_DEV_MODE": "true"}))

    def test_the_token_can_come_from_a_file(self, tmp_path: Path) -> None:
        secret = tmp_path / "token"
        secret.write_text("from-file\n")
        config = load_config({"SCHEDULER_API_TOKEN_FILE": str(secret)})
        assert config.api_token is not None and config.api_token.get_secret_value() == "from-file"

    def test_secrets_never_appear_in_reprs(self) -> None:
        config = load_config(
            {**TOKEN, "SCHEDULER_ADMIN_TOKEN": "admin-secret", "POSTHOG_API_KEY": "phc_secret"}
        )
        assert "secret-token" not in repr(config)
        assert "admin-secret" not in repr(config) and "phc_secret" not in repr(config)


# Each bad configuration: environment, file text (or None), fragments the message must contain.
BAD = [
    ("unknown variable", {"SCHEDULER_MAX_CONCURENCY": "4"}, None, ["SCHEDULER_MAX_CONCURENCY", "did you mean 'SCHEDULER_MAX_CONCURRENCY'"]),
    ("bad integer", {"SCHEDULER_MAX_CONCURRENCY": "many"}, None, ["SCHEDULER_MAX_CONCURRENCY='many'", "valid integer"]),
    ("zero concurrency", {"SCHEDULER_MAX_CONCURRENCY": "0"}, None, ["SCHEDULER_MAX_CONCURRENCY='0'"]),
    ("bad url", {"API_URL": "localhost:8000"}, None, ["API_URL='localhost:8000'", "http://"]),
    ("bad zone", {"SCHEDULER_TIMEZONE": "Europe/Berln"}, None, ["SCHEDULER_TIMEZONE", "did you mean 'Europe/Berlin'"]),
    ("bad log format", {"SCHEDULER_LOG_FORMAT": "xml"}, None, ["SCHEDULER_LOG_FORMAT='xml'"]),
    ("bad state url", {"SCHEDULER_STATE_URL": "mysql://db"}, None, ["SCHEDULER_STATE_URL", "sqlite:///", "postgresql://"]),
    ("redis bad port", {"SCHEDULER_STATE_URL": "redis://:hunter2@redis:63x9/0"}, None, ["SCHEDULER_STATE_URL='redis://:***@redis:63x9/0'", "port must be a number"]),
    ("redis no host", {"SCHEDULER_STATE_URL": "redis:///0"}, None, ["SCHEDULER_STATE_URL='redis:///0'", "redis://host:port/db"]),
    ("redis bad db", {"SCHEDULER_STATE_URL": "redis://redis:6379/cache"}, None, ["SCHEDULER_STATE_URL", "database must be a number"]),
    ("bad namespace", {"SCHEDULER_NAMESPACE": "my app"}, None, ["SCHEDULER_NAMESPACE='my app'", "the prefix of Redis keys, the PostgreSQL schema"]),
    ("empty jobs file", {"SCHEDULER_JOBS_FILE": ""}, None, ["SCHEDULER_JOBS_FILE=''", "empty; set a path or unset it"]),
    ("bad admin bind", {"SCHEDULER_ADMIN_BIND": "8089"}, None, ["SCHEDULER_ADMIN_BIND='8089'", "HOST:PORT"]),
    ("secret redacted", {"SCHEDULER_API_TOKENN": "hunter2"}, None, ["SCHEDULER_API_TOKENN", "did you mean 'SCHEDULER_API_TOKEN'"]),
    ("legacy empty", {"SCHEDULER_DATA_REFRESH_INTERVAL": ""}, None, ["SCHEDULER_DATA_REFRESH_INTERVAL=''"]),
    ("override unknown job", {"SCHEDULER_JOBS__DATA_REFRSH__SCHEDULE": "every 1m"}, None, ["SCHEDULER_JOBS__DATA_REFRSH__SCHEDULE", "did you mean 'DATA_REFRESH'"]),
    ("override unknown field", {"SCHEDULER_JOBS__DATA_REFRESH__SCHEDUEL": "every 1m"}, None, ["unknown job field 'scheduel'", "did you mean 'schedule'"]),
    ("override bad schedule", {"SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE": "every 15"}, None, ["SCHEDULER_JOBS__DATA_REFRESH__SCHEDULE", "job 'data-refresh'", "'every 15'"]),
    ("override bad json", {"SCHEDULER_JOBS__DATA_REFRESH__BODY": "{nope"}, None, ["SCHEDULER_JOBS__DATA_REFRESH__BODY", "not valid JSON"]),
    ("missing file", {"SCHEDULER_JOBS_FILE": "/nonexistent/jobs.toml"}, None, ["SCHEDULER_JOBS_FILE='/nonexistent/jobs.toml'", "no such file"]),
    ("toml syntax", {}, "[jobs.x\nschedule=", ["not valid TOML"]),
    ("unknown job field", {}, '[jobs.x]\nschedule = "every 1m"\nendpoint = "/x"\ntimout = "5s"\n', ["job 'x'", "unknown field 'timout'", "did you mean 'timeout'"]),
    ("missing endpoint", {}, '[jobs.x]\nschedule = "every 1m"\n', ["job 'x'", "'endpoint' is required"]),
    ("bad method", {}, '[jobs.x]\nschedule = "every 1m"\nendpoint = "/x"\nmethod = "FETCH"\n', ["field 'method'='FETCH'"]),
    ("absolute endpoint", {}, '[jobs.x]\nschedule = "every 1m"\nendpoint = "http://evil/x"\n', ["field 'endpoint'", "path under API_URL"]),
    ("bad timezone field", {}, '[jobs.x]\nschedule = "daily 03:00"\nendpoint = "/x"\ntimezone = "Mars/Base"\n', ["job 'x'", "unknown time zone 'Mars/Base'"]),
    ("bad timeout", {}, '[jobs.x]\nschedule = "every 1m"\nendpoint = "/x"\ntimeout = "soon"\n', ["field 'timeout'='soon'", "not a duration"]),
    ("reserved header", {}, '[jobs.x]\nschedule = "every 1m"\nendpoint = "/x"\nheaders = { Authorization = "x" }\n', ["cronclock sets Authorization itself"]),
    ("duplicate job key", {}, '[jobs.a-b]\nschedule = "every 1m"\nendpoint = "/x"\n[jobs.a_b]\nschedule = "every 1m"\nendpoint = "/y"\n', ["'a-b' and 'a_b'", "SCHEDULER_JOBS__A_B__"]),
    ("duplicate toml table", {}, '[jobs.x]\nschedule = "every 1m"\n[jobs.x]\nendpoint = "/x"\n', ["not valid TOML"]),
    ("spread on wall clock", {}, '[jobs.x]\nschedule = "daily 03:00"\nendpoint = "/x"\nspread = true\n', ["spread needs an 'every' schedule"]),
    ("unknown top-level", {}, 'jobz = 1\n', ["unknown top-level key 'jobz'"]),
    ("token and token file", {"SCHEDULER_API_TOKEN_FILE": "/tmp/x"}, None, ["both SCHEDULER_API_TOKEN and SCHEDULER_API_TOKEN_FILE"]),
    # Issue 16: what `check` accepts must run, so all of this is refused here, with one line.
    ("body nan", {}, J + "body = nan\n", ["field 'body'", "NaN or Infinity"]),
    ("body inf nested", {}, J + "body = { x = [1, inf] }\n", ["field 'body'", "NaN or Infinity"]),
    ("body NaN from env", {"SCHEDULER_JOBS__X__BODY": "NaN"}, J, ["SCHEDULER_JOBS__X__BODY", "NaN or Infinity"]),
    ("body Infinity from env", {"SCHEDULER_JOBS__X__BODY": '{"a": -Infinity}'}, J, ["SCHEDULER_JOBS__X__BODY", "NaN or Infinity"]),
    ("body nested deep", {}, J + "body = " + "[" * 40 + "]" * 40 + "\n", ["field 'body'", "nested deeper than 32"]),
    ("toml nested deeper than python", {}, J + "body = " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
    ("jobs file not utf-8", {}, b'[jobs.x]\nschedule = "every 1m"\nendpoint = "/x\xff"\n', ["not UTF-8", "byte 0xff at offset 45"]),
    ("header non-ascii", {}, J + 'headers = { X-A = "hunter2\u00e9" }\n', ["field 'headers'", "'X-A'", "visible ASCII"]),
    ("header line break", {}, J + 'headers = { X-A = "hunter2\\r\\nX-Injected: 1" }\n', ["'X-A'", "visible ASCII"]),
    ("header from env non-ascii", {"SCHEDULER_JOBS__X__HEADERS": '{"X-A": "hunter2\u00e9"}'}, J, ["SCHEDULER_JOBS__X__HEADERS", "'X-A'"]),
    ("header host", {}, J + 'headers = { Host = "admin.internal" }\n', ["Host", "hop-by-hop or framing"]),
    ("header content-length", {}, J + 'headers = { content-length = "5" }\n', ["content-length", "hop-by-hop or framing"]),
    ("header framing set", {}, J + 'headers = { Transfer-Encoding = "chunked", Connection = "close", Expect = "100-continue", Proxy-Authorization = "x" }\n', ["Connection, Expect, Proxy-Authorization, Transfer-Encoding"]),
    ("header traceparent", {}, J + 'headers = { traceparent = "00-x" }\n', ["cronclock sets traceparent itself"]),
    ("token line break", {"SCHEDULER_API_TOKEN": "hunter2\nX-Injected: 1"}, None, ["SCHEDULER_API_TOKEN", "cannot be sent in an HTTP header", "a line break"]),
    ("token non-ascii", {"SCHEDULER_API_TOKEN": "hunter2\u00e9"}, None, ["SCHEDULER_API_TOKEN", "cannot be sent in an HTTP header"]),
    ("token space", {"SCHEDULER_API_TOKEN": "hunter2 other"}, None, ["SCHEDULER_API_TOKEN", "a space"]),
    ("admin token line break", {"SCHEDULER_ADMIN_TOKEN": "hunter2\rx"}, None, ["SCHEDULER_ADMIN_TOKEN", "cannot be sent in an HTTP header"]),
    ("empty token without dev mode", {"SCHEDULER_API_TOKEN": ""}, None, ["SCHEDULER_API_TOKEN is empty", "LOCAL_DEV_MODE=true"]),
    ("misfire_grace inf", {}, J + "misfire_grace = inf\n", ["field 'misfire_grace'", "not a finite duration"]),
    ("misfire_grace 1e308", {}, J + "misfire_grace = 1e308\n", ["field 'misfire_grace'", "at most 30d"]),
    ("misfire_grace huge text", {}, J + 'misfire_grace = "99999999999d"\n', ["field 'misfire_grace'", "at most 30d"]),
    ("timeout tiny", {}, J + "timeout = 1e-300\n", ["field 'timeout'", "at least 10ms"]),
    ("timeout nan from env", {"SCHEDULER_JOBS__X__TIMEOUT": "nan"}, J, ["SCHEDULER_JOBS__X__TIMEOUT", "not a duration"]),
    ("history max age huge", {"SCHEDULER_HISTORY_MAX_AGE": "99999999999d"}, None, ["SCHEDULER_HISTORY_MAX_AGE='99999999999d'", "at most 3650d"]),
    ("runtime retention huge", {"SCHEDULER_RUNTIME_RETENTION": "99999999999d"}, None, ["SCHEDULER_RUNTIME_RETENTION", "at most 3650d"]),
    ("runtime retention tiny", {"SCHEDULER_RUNTIME_RETENTION": "1ms"}, None, ["SCHEDULER_RUNTIME_RETENTION", "at least 1m"]),
    ("history max runs huge", {"SCHEDULER_HISTORY_MAX_RUNS": "1" + "0" * 30}, None, ["SCHEDULER_HISTORY_MAX_RUNS", "1000000"]),
    ("tick tiny", {"SCHEDULER_TICK_SECONDS": "1e-9"}, None, ["SCHEDULER_TICK_SECONDS='1e-9'", "0.1"]),
    ("tick nan", {"SCHEDULER_TICK_SECONDS": "nan"}, None, ["SCHEDULER_TICK_SECONDS='nan'", "finite"]),
    ("grace inf", {"SCHEDULER_SHUTDOWN_GRACE_SECONDS": "inf"}, None, ["SCHEDULER_SHUTDOWN_GRACE_SECONDS", "finite"]),
    ("retries true", {}, J + "retries = true\n", ["field 'retries'=True", "integer"]),
    ("retries float", {}, J + "retries = 1.5\n", ["field 'retries'=1.5", "integer"]),
    ("enabled yes", {}, J + 'enabled = "yes"\n', ["field 'enabled'='yes'", "boolean"]),
    ("run_on_start 1", {}, J + "run_on_start = 1\n", ["field 'run_on_start'=1", "boolean"]),
    ("timezone empty", {}, J + 'timezone = ""\n', ["field 'timezone'=''", "unknown time zone"]),
    ("schedule number", {}, '[jobs.x]\nschedule = 5\nendpoint = "/x"\n', ["field 'schedule'=5", "string"]),
    ("timezone nope", {}, J + 'timezone = "Nope"\n', ["field 'timezone'='Nope'", "unknown time zone 'Nope'"]),
    ("timezone city", {}, J + 'timezone = "Berlin"\n', ["field 'timezone'='Berlin'", "did you mean 'Europe/Berlin'"]),
    ("timezone recursion", {}, J + 'timezone = "' + "a/" * 300 + '"\n', ["field 'timezone'", "unknown time zone"]),
    ("timezone dunder", {}, J + 'timezone = "__init__/x"\n', ["field 'timezone'", "unknown time zone"]),
    ("schedule two zones", {"SCHEDULER_JOBS__X__SCHEDULE": "daily 03:00 in Europe/Berlin in Asia/Tokyo"}, J, ["SCHEDULER_JOBS__X__SCHEDULE", "more than one time zone"]),
    ("schedule two dst", {}, '[jobs.x]\nschedule = "daily 03:00 dst=skip dst=last"\nendpoint = "/x"\n', ["more than one dst="]),
    ("schedule full-width digits", {"SCHEDULER_JOBS__X__SCHEDULE": "every \uff11\uff15m"}, J, ["digits 0-9"]),
    ("schedule huge number", {"SCHEDULER_JOBS__X__SCHEDULE": "every " + "1" * 4301 + "s"}, J, ["SCHEDULER_JOBS__X__SCHEDULE", "at most 256 characters"]),
    ("schedule long number", {"SCHEDULER_JOBS__X__SCHEDULE": "every " + "1" * 200 + "s"}, J, ["SCHEDULER_JOBS__X__SCHEDULE", "is not a duration"]),
    ("cadence huge number", {"SCHEDULER_DATA_REFRESH_INTERVAL": "1" * 4301}, None, ["SCHEDULER_DATA_REFRESH_INTERVAL='111", "…"]),
    ("schedule bare cron", {"SCHEDULER_JOBS__X__SCHEDULE": "*/5 * * * *"}, J, ["did you mean 'cron */5 * * * *'"]),
    ("api url credentials", {"API_URL": "http://user:hunter2@app:8000"}, None, ["API_URL='http://user:***@app:8000'", "credentials"]),
    ("api url user only", {"API_URL": "http://hunter2@app:8000"}, None, ["API_URL", "credentials"]),
    ("api url port", {"API_URL": "http://app:99999"}, None, ["API_URL='http://app:99999'", "port"]),
    ("api url space", {"API_URL": "http://app :8000"}, None, ["API_URL='http://app :8000'", "space"]),
    ("state url upper sqlite dir", {"SCHEDULER_STATE_URL": "SQLITE:///"}, None, ["SCHEDULER_STATE_URL", "sqlite:///relative"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "environ", "file_text", "fragments"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_configuration_is_one_clear_error_from_check(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    label: str,
    environ: dict[str, str],
    file_text: str | bytes | None,
    fragments: list[str],
) -> None:
    """`check` (and tests/integration: the daemon's start) exit 2 with one line naming the
    variable or field; no traceback, no secret."""
    env = {**TOKEN, **environ}
    if file_text is not None:
        env["SCHEDULER_JOBS_FILE"] = write(tmp_path, file_text)
    code = main(["check"], env)
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert err.startswith("cronclock: config error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and "hunter2" not in err and "secret-token" not in err
    for fragment in fragments:
        assert fragment in err


def test_secret_values_are_redacted_in_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"SCHEDULER_API_TOKENN": "hunter2"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("2d", 172800),
        (45, 45),
        ("12", 12),
    ],
    ids=repr,
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_check_names_a_cadence_variable_as_the_source_only_when_it_is_set() -> None:
    table = jobs({"SCHEDULER_HEALTH_CHECK_INTERVAL": "120"})
    assert table["health-check"].source == "SCHEDULER_HEALTH_CHECK_INTERVAL"  # type: ignore[attr-defined]
    assert table["data-refresh"].source == "built-in"  # type: ignore[attr-defined]


def test_check_never_prints_a_redis_password() -> None:
    out = io.StringIO()
    config = load_config({"SCHEDULER_STATE_URL": "redis://:hunter2@redis:6379/0",
                          "SCHEDULER_API_TOKEN": "t"})  # fmt: skip
    assert cmd_check(config, out) == 0
    assert "state: redis://:***@redis:6379/0" in out.getvalue()
    assert "hunter2" not in out.getvalue()


def test_next_for_an_unknown_job_lists_the_job_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["next", "nope"], TOKEN) == 2
    err = capsys.readouterr().err
    assert "no job named 'nope'" in err and len(err.strip().splitlines()) == 1
    assert "the jobs are: data-refresh, health-check, script-runner, marketplaces" in err


class TestNextSchedule:
    """Issue 19: `next --schedule EXPR` evaluates any text without a configuration."""

    def test_it_needs_no_configuration(self, capsys: pytest.CaptureFixture[str]) -> None:
        broken = {"SCHEDULER_MAX_CONCURRENCY": "many"}  # a config `next JOB` would refuse
        code = main(["next", "--schedule", "daily 02:30", "--timezone", "Europe/Berlin",
                     "-n", "3"], broken)  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0] == "daily 02:30 in Europe/Berlin"
        assert len(lines) >= 4
        for line in lines[1:4]:
            utc, weekday, local_date, local_time, zone, word = line.split()[:6]
            when = datetime.fromisoformat(utc.replace("Z", "+00:00")).astimezone(
                ZoneInfo("Europe/Berlin")
            )
            assert (weekday, local_date) == (when.strftime("%a"), when.strftime("%Y-%m-%d"))
            assert local_time == when.strftime("%H:%M:%S") and zone in ("CET", "CEST")
            assert word == "in"

    def test_relative_times_read_like_systemctl(self) -> None:
        from services.scheduler.__main__ import from_now

        assert [from_now(s) for s in (5, 59, 60, 150, 3600, 3 * 3600 + 25 * 60, 86400 * 2 + 3600)] == [
            "in 5s", "in 59s", "in 1min", "in 2min 30s", "in 1h", "in 3h 25min", "in 2d 1h"]  # fmt: skip

    @pytest.mark.parametrize(
        ("argv", "fragment"),
        [
            (["next", "--schedule", "every fortnight"], "invalid schedule 'every fortnight'"),
            (["next", "--schedule", "daily 03:00", "--timezone", "Berlin"], "did you mean 'Europe/Berlin'"),
            (["next", "data-refresh", "--schedule", "every 1m"], "either a JOB or --schedule"),
            (["next", "--timezone", "UTC"], "--timezone needs --schedule"),
        ],
    )  # fmt: skip
    def test_bad_input_is_one_line_exit_2(
        self, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
    ) -> None:
        assert main(argv, TOKEN) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1


def test_status_times_read_like_systemctl_list_timers() -> None:
    from services.scheduler.__main__ import status_rows

    now = datetime.fromisoformat("2026-12-01T10:00:00+00:00")
    jobs = [
        {"name": "a", "schedule": "every 5m", "next_run": "2026-12-01T10:03:00.000Z", "paused": False,
         "last_run": {"at": "2026-12-01T09:56:00.000Z", "outcome": "failed", "status": 500},
         "last_success": "2026-12-01T07:00:00.000Z", "in_flight": 0},
        {"name": "b", "schedule": "daily 03:00", "next_run": "2026-12-02T03:00:00.000Z", "paused": True,
         "last_run": {"at": None, "outcome": None, "status": None}, "last_success": None, "in_flight": 1},
    ]  # fmt: skip
    header, a, b = status_rows(jobs, now)
    assert header == ("JOB", "SCHEDULE", "NEXT (UTC)", "LEFT", "LAST", "RESULT", "LAST SUCCESS",
                      "IN FLIGHT")  # fmt: skip
    assert a == ("a", "every 5m", "2026-12-01T10:03:00.000Z", "in 3min", "4min ago", "failed (500)",
                 "3h ago", "0")  # fmt: skip
    assert b == ("b", "daily 03:00", "paused", "-", "-", "-", "never", "1")


class TestJson:
    """Issue 19: `--json` prints one JSON document with the field names README documents."""

    def test_check_json_carries_what_the_table_shows(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        env = {**TOKEN, "SCHEDULER_JOBS__MARKETPLACES__SCHEDULE": "daily 02:30 in Europe/Berlin"}
        assert main(["check", "--json"], env) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(report) == {
            "version",
            "origin",
            "target",
            "auth",
            "signing_secrets",
            "otlp_endpoint",
            "notify",
            "state",
            "jobs",
            "dst_effects",
        }
        assert report["origin"].startswith("built-in table") and report["auth"] == "bearer"
        assert report["signing_secrets"] == 0
        assert [job["name"] for job in report["jobs"]] == [job.name for job in DEFAULT_JOBS]
        refresh = report["jobs"][0]
        assert set(refresh) == {"name", "schedule", "method", "endpoint", "timeout_seconds",
                                "overlap", "enabled", "next_run", "source", "pause_after_failures",
                                "on_gone", "max_silence_seconds"}  # fmt: skip
        assert (refresh["schedule"], refresh["timeout_seconds"]) == ("every 15m", 120.0)
        assert refresh["next_run"].endswith(":00.000Z")
        effects = [e for e in report["dst_effects"] if e["job"] == "marketplaces"]
        assert (
            effects and "02:30" in effects[0]["message"] and effects[0]["transition"].endswith("Z")
        )

    def test_next_json_for_jobs_and_for_a_schedule_text(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["next", "health-check", "-n", "2", "--json"], TOKEN) == 0
        (entry,) = json.loads(capsys.readouterr().out)["schedules"]
        assert entry["job"] == "health-check" and entry["schedule"] == "every 5m"
        first, second = entry["fires"]
        assert set(first) == {"at", "local", "weekday", "zone", "in_seconds", "dst_note"}
        gap = datetime.fromisoformat(second["at"].replace("Z", "+00:00")) - datetime.fromisoformat(
            first["at"].replace("Z", "+00:00")
        )
        assert gap.total_seconds() == 300 and 0 < first["in_seconds"] <= 300
        assert main(["next", "--schedule", "daily 02:30", "--timezone", "Europe/Berlin",
                     "-n", "1", "--json"], {}) == 0  # fmt: skip
        (text,) = json.loads(capsys.readouterr().out)["schedules"]
        assert text["job"] is None and text["schedule"] == "daily 02:30 in Europe/Berlin"
        assert text["fires"][0]["local"][11:19] == "02:30:00" and text["dst_ahead"]

    def test_an_error_with_json_is_still_one_line_on_stderr(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["check", "--json"], {"SCHEDULER_MAX_CONCURRENCY": "many"}) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1


class TestHelp:
    """Issue 19: each subcommand's --help says what it does and the variables it reads."""

    def _help(self, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--help"], {})
        assert exited.value.code == 0
        return capsys.readouterr().out.replace("\n  ", " ")

    @pytest.mark.parametrize("command", ["run", "check", "next", "fire"])
    def test_configuration_commands_list_every_setting(
        self, capsys: pytest.CaptureFixture[str], command: str
    ) -> None:
        text = self._help(capsys, command)
        words = set(text.replace(",", " ").split())
        assert "environment variables read:" in text
        assert set(SETTING_NAMES) | {"SCHEDULER_JOBS__<JOB>__<FIELD>"} <= words, text
        assert ("NO_COLOR" in words) == (command in ("run", "fire"))

    @pytest.mark.parametrize(
        "argv",
        [
            ["status"],
            ["pause"],
            ["resume"],
            ["trigger"],
            ["schedules"],
            ["schedules", "list"],
            ["schedules", "show"],
        ],
    )
    def test_admin_commands_name_the_admin_bind_and_token(
        self, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        text = self._help(capsys, *argv)
        assert "SCHEDULER_ADMIN_BIND, SCHEDULER_ADMIN_TOKEN" in text and "API_URL" not in text
        assert "running daemon" in text or "schedule" in text

    def test_every_command_says_what_it_does(self, capsys: pytest.CaptureFixture[str]) -> None:
        for command in (
            "run",
            "check",
            "next",
            "fire",
            "status",
            "pause",
            "resume",
            "trigger",
            "schedules",
            "demo",
            "completion",
        ):
            usage, _, description = self._help(capsys, command).partition("\n\n")
            assert usage.startswith(f"usage: cronclock {command}")
            assert description[0].isupper() and "." in description, (command, description)
        assert "environment variables read: none" in self._help(capsys, "completion")
