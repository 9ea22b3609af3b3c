"""Settings and the job table: sources, precedence, legacy variables, and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from services.scheduler.__main__ import cmd_check
from services.scheduler.config import (
    DEFAULT_JOBS,
    ConfigError,
    env_key,
    load_config,
    parse_duration,
    require_auth,
    spread_offset,
)

TOKEN = {"SCHEDULER_API_TOKEN": "secret-token"}


def jobs(environ: dict[str, str]) -> dict[str, object]:
    return {job.name: job for job in load_config({**TOKEN, **environ}).jobs}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
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

    def test_the_scheduler_timezone_is_the_default_zone(self) -> None:
        table = jobs({"SCHEDULER_TIMEZONE": "Europe/Berlin"})
        assert str(table["marketplaces"].schedule) == "daily 03:00 in Europe/Berlin"  # type: ignore[attr-defined]


class TestEnvOverrides:
    def test_an_override_wins_over_file_and_default(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[jobs.data-refresh]\nschedule = "every 30m"\n')
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
        path = write(tmp_path, '[defaults]\ndst_gap = "skip"\n[jobs.berlin]\nschedule = "daily 02:30 in Europe/Berlin"\n'
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
    ("bad state url", {"SCHEDULER_STATE_URL": "postgres://db"}, None, ["SCHEDULER_STATE_URL", "sqlite:///"]),
    ("redis bad port", {"SCHEDULER_STATE_URL": "redis://:hunter2@redis:63x9/0"}, None, ["SCHEDULER_STATE_URL='redis://:***@redis:63x9/0'", "port must be a number"]),
    ("redis no host", {"SCHEDULER_STATE_URL": "redis:///0"}, None, ["SCHEDULER_STATE_URL='redis:///0'", "redis://host:port/db"]),
    ("redis bad db", {"SCHEDULER_STATE_URL": "redis://redis:6379/cache"}, None, ["SCHEDULER_STATE_URL", "database must be a number"]),
    ("bad namespace", {"SCHEDULER_NAMESPACE": "my app"}, None, ["SCHEDULER_NAMESPACE='my app'", "prefixes Redis keys"]),
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
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "environ", "file_text", "fragments"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_configuration_is_one_clear_error(
    tmp_path: Path, label: str, environ: dict[str, str], file_text: str | None, fragments: list[str]
) -> None:
    env = {**TOKEN, **environ}
    if file_text is not None:
        env["SCHEDULER_JOBS_FILE"] = write(tmp_path, file_text)
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert "hunter2" not in str(caught.value) and "secret-token" not in str(caught.value)


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
