"""The daemon as a subprocess against a real HTTP server on loopback."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from services.scheduler import __version__
from tests.integration.conftest import Daemon, base_env, run_cli
from tests.scheduler.test_config import BAD
from tests.support import Reply, Target

TOKEN = "integration-token"


def every_second(path: str = "/tick", **fields: str) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in fields.items())
    return f'[jobs.tick]\nschedule = "every 1s"\nendpoint = "{path}"\n{extra}'


class TestFiring:
    def test_slots_arrive_on_their_grid_with_every_header(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        path = jobs_file(every_second())
        proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(path))
        assert target.wait_for(lambda calls: len(calls) >= 4), proc.log_path.read_text()
        assert proc.stop() == 0
        calls = target.calls("/tick")
        slots = [call.scheduled_for for call in calls]
        assert all(slot.microsecond == 0 for slot in slots), "slots lie on whole seconds"
        assert slots == sorted(set(slots)), "no slot twice, in order"
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(slots))
        for call in calls:
            assert call.at >= call.scheduled_for, "never fired early"
            assert call.method == "POST"
            assert call.header("Authorization") == f"Bearer {TOKEN}"
            assert call.header("User-Agent") == f"cronclock/{__version__}"
            assert call.header("X-Scheduler-Job") == "tick"
            assert call.header("X-Scheduler-Attempt") == "1"
            assert (
                call.header("Idempotency-Key")
                == f"tick@{int(call.scheduled_for.timestamp() * 1000)}"
            )
            assert call.header("X-Scheduled-For").endswith(".000Z")  # type: ignore[union-attr]

    @pytest.mark.parametrize("fast_path", ["true", "false"])
    def test_both_paths_fire_every_slot_once_and_say_which_they_take(
        self,
        fast_path: str,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        path = jobs_file(every_second() + every_second("/other").replace("jobs.tick", "jobs.b"))
        proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(path),
                      SCHEDULER_FAST_PATH=fast_path, SCHEDULER_LOG_FORMAT="json")  # fmt: skip
        assert target.wait_for(lambda calls: len(calls) >= 6), proc.log_path.read_text()
        assert proc.stop() == 0
        for name in ("/tick", "/other"):
            slots = [call.scheduled_for for call in target.calls(name)]
            assert slots == sorted(set(slots)), "no slot twice"
            assert all(c.at >= c.scheduled_for for c in target.calls(name)), "never early"
        lines = [json.loads(line) for line in proc.log_path.read_text().splitlines()
                 if line.startswith("{")]  # fmt: skip
        (said,) = [line for line in lines if line["event"] == "calls go out"]
        if fast_path == "true":
            assert said["fast_path"] in ("asyncio", "uvloop")
        else:
            assert said["fast_path"] == "off"
        assert sum(line["event"] == "fired" for line in lines) == len(target.calls())

    def test_local_dev_mode_sends_no_authorization_and_warns(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        proc = daemon(
            API_URL=target.url,
            LOCAL_DEV_MODE="true",
            SCHEDULER_JOBS_FILE=str(jobs_file(every_second())),
        )
        assert target.wait_for(lambda calls: len(calls) >= 1)
        assert proc.stop() == 0
        assert target.calls()[0].header("Authorization") is None
        assert proc.events("LOCAL_DEV_MODE: calls carry no Authorization header")

    def test_overlap_skip_never_runs_a_job_twice_at_once(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        target.script["/slow"] = [Reply(delay=2.5)]
        path = jobs_file(every_second("/slow", timeout='"10s"'))
        proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(path))
        assert target.wait_for(lambda calls: len(calls) >= 2, timeout=30)
        assert proc.stop() == 0
        assert target.max_active["/slow"] == 1
        skipped = proc.events("skipped: overlap")
        assert skipped and all(line["job"] == "tick" and "slot" in line for line in skipped)

    def test_retries_on_503_honour_retry_after_with_the_same_key(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        target.script["/flaky"] = [Reply(503, {"Retry-After": "1"}), Reply(200)]
        path = jobs_file('[jobs.flaky]\nschedule = "every 5s"\nendpoint = "/flaky"\nretries = 2\n')
        proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(path))
        assert target.wait_for(lambda calls: len(calls) >= 2, timeout=30)
        assert proc.stop() == 0
        first, second = target.calls("/flaky")[:2]
        assert [first.header("X-Scheduler-Attempt"), second.header("X-Scheduler-Attempt")] == [
            "1",
            "2",
        ]
        assert first.header("Idempotency-Key") == second.header("Idempotency-Key")
        assert first.header("X-Scheduled-For") == second.header("X-Scheduled-For")
        assert second.at - first.done >= timedelta(seconds=1)
        assert proc.events("retrying")[0]["retry_in"] >= 1

    def test_a_failing_job_moves_on_to_its_next_slot(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        target.script["/broken"] = [Reply(500)]
        proc = daemon(
            API_URL=target.url,
            SCHEDULER_API_TOKEN=TOKEN,
            SCHEDULER_JOBS_FILE=str(jobs_file(every_second("/broken"))),
        )
        assert target.wait_for(lambda calls: len(calls) >= 3)
        assert proc.stop() == 0
        slots = [call.scheduled_for for call in target.calls("/broken")]
        assert len(slots) == len(set(slots)), "no hot loop: one call per slot"
        failed = proc.events("failed")
        assert failed and failed[0]["status"] == 500 and failed[0]["job"] == "tick"


class TestSignals:
    def test_sigterm_waits_for_the_call_in_flight_then_exits_0(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        target.script["/slow"] = [Reply(delay=2.0)]
        proc = daemon(
            API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_SHUTDOWN_GRACE_SECONDS="20",
            SCHEDULER_JOBS_FILE=str(jobs_file(every_second("/slow", timeout='"10s"'))),
        )  # fmt: skip
        # the signal must arrive while a call is in flight
        assert target.wait_for(lambda calls: target.active > 0, timeout=20)
        proc.signal(signal.SIGTERM)
        assert proc.process.wait(30) == 0
        assert target.active == 0
        waited = proc.events("waiting for jobs to finish")
        assert waited and waited[0]["jobs"] == ["tick"]
        assert proc.events("cronclock stopped")[0]["abandoned"] == []
        assert proc.events("fired"), "the call in flight completed before exit"

    def test_sighup_reloads_the_jobs_file_and_keeps_the_old_table_when_invalid(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        path = jobs_file(every_second("/a"))
        proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(path))
        assert target.wait_for(lambda calls: len(calls) >= 1)
        jobs_file('[jobs.other]\nschedule = "every 1s"\nendpoint = "/b"\n')
        proc.signal(signal.SIGHUP)
        assert target.wait_for(lambda calls: any(c.path == "/b" for c in calls))
        reloaded = proc.events("job table reloaded")[0]
        assert (reloaded["added"], reloaded["removed"]) == (["other"], ["tick"])
        jobs_file("[jobs.other\n")
        proc.signal(signal.SIGHUP)
        assert proc.wait_for_log("reload rejected; keeping the current job table")
        count = len(target.calls("/b"))
        assert target.wait_for(lambda calls: len([c for c in calls if c.path == "/b"]) > count + 1)
        assert proc.stop() == 0


class TestConfigErrors:
    @pytest.mark.parametrize(
        ("label", "environ", "file_text", "fragments"), BAD, ids=[b[0] for b in BAD]
    )
    def test_bad_configuration_exits_2_with_one_clear_line(
        self,
        tmp_path: Path,
        label: str,
        environ: dict[str, str],
        file_text: str | bytes | None,
        fragments: list[str],
    ) -> None:
        env = base_env(**{"SCHEDULER_API_TOKEN": "secret-token", **environ})
        if file_text is not None:
            data = file_text.encode() if isinstance(file_text, str) else file_text
            (tmp_path / "jobs.toml").write_bytes(data)
            env["SCHEDULER_JOBS_FILE"] = str(tmp_path / "jobs.toml")
        result = run_cli("run", env=env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("cronclock: config error: ")
        assert len(result.stderr.strip().splitlines()) == 1
        assert "hunter2" not in result.stderr and "secret-token" not in result.stderr
        for fragment in fragments:
            assert fragment in result.stderr

    def test_no_token_refuses_to_start_and_says_how_to_fix_it(self) -> None:
        result = run_cli("run", env=base_env())
        assert result.returncode == 2
        assert "set SCHEDULER_API_TOKEN" in result.stderr and "LOCAL_DEV_MODE=true" in result.stderr


class TestCommands:
    def test_check_prints_the_job_table(self) -> None:
        result = run_cli("check", env=base_env(SCHEDULER_API_TOKEN="x"))
        assert result.returncode == 0, result.stderr
        assert "configuration OK" in result.stdout
        assert "data-refresh" in result.stdout and "every 15m" in result.stdout
        assert "POST /api/sync/trigger" in result.stdout
        assert "x" not in result.stdout.split("auth:")[1].split()[0]

    def test_a_jobs_file_of_three_jobs_is_the_whole_table(self, tmp_path: Path) -> None:
        # Issue 19: a new user's own jobs, nothing of the built-in table's application.
        path = tmp_path / "jobs.toml"
        path.write_text("".join(f'[jobs.{n}]\nschedule = "every 1h"\nendpoint = "/{n}"\n'
                                for n in ("a", "b", "c")))  # fmt: skip
        env = base_env(SCHEDULER_API_TOKEN="x", SCHEDULER_JOBS_FILE=str(path))
        result = run_cli("check", env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].endswith(f"configuration OK; jobs file {str(path)!r} (3 jobs)")
        assert "data-refresh" not in result.stdout and "/api/admin" not in result.stdout
        legacy = run_cli("check", env={**env, "SCHEDULER_HEALTH_CHECK_INTERVAL": "60"})
        assert legacy.returncode == 2 and len(legacy.stderr.strip().splitlines()) == 1
        assert "SCHEDULER_HEALTH_CHECK_INTERVAL is set" in legacy.stderr
        assert "include_builtin = true" in legacy.stderr

    def test_next_evaluates_any_schedule_text_without_a_config(self) -> None:
        env = base_env(SCHEDULER_MAX_CONCURRENCY="many")  # `check` would refuse this
        result = run_cli("next", "--schedule", "mon 10:00", "--timezone", "Asia/Makassar",
                         "-n", "2", env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        header, *fires = result.stdout.splitlines()
        assert header == "weekly mon 10:00 in Asia/Makassar" and len(fires) == 2
        assert all(" Mon " in line and " 10:00:00 WITA  in " in line for line in fires)
        bad = run_cli("next", "--schedule", "*/5 * * * *", env=env)
        assert bad.returncode == 2 and "did you mean 'cron */5 * * * *'" in bad.stderr

    def test_next_prints_utc_and_local_times_and_flags_dst(self, tmp_path: Path) -> None:
        (tmp_path / "jobs.toml").write_text(
            'include_builtin = false\n[jobs.berlin]\nschedule = "daily 02:30 in Europe/Berlin"\nendpoint = "/x"\n'
        )
        env = base_env(SCHEDULER_API_TOKEN="x", SCHEDULER_JOBS_FILE=str(tmp_path / "jobs.toml"))
        result = run_cli("next", "berlin", "-n", "400", env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "berlin  (daily 02:30 in Europe/Berlin)"
        fires = [line for line in lines[1:] if not line.strip().startswith("DST ahead:")]
        assert len(fires) == 400 and len(lines) == 403
        assert any("DST: 02:30 does not exist" in line for line in lines)
        assert any("DST: 02:30 occurs twice" in line for line in lines)

    def test_check_and_next_warn_about_dst_in_the_next_365_days(self, tmp_path: Path) -> None:
        (tmp_path / "jobs.toml").write_text(
            'include_builtin = false\n[jobs.berlin]\nschedule = "daily 02:30 in Europe/Berlin"\nendpoint = "/x"\n'
            'dst_gap = "skip"\n[jobs.plain]\nschedule = "every 1h"\nendpoint = "/y"\n'
        )
        env = base_env(SCHEDULER_API_TOKEN="x", SCHEDULER_JOBS_FILE=str(tmp_path / "jobs.toml"))
        check = run_cli("check", env=env)
        assert check.returncode == 0, check.stderr
        warnings = check.stdout.split("DST effects in the next 365 days:")[1].strip().splitlines()
        assert len(warnings) == 2 and all(
            line.strip().startswith("berlin: 02:30 ") for line in warnings
        )
        assert any("does not fire that day (dst_gap=skip)" in line for line in warnings)
        assert any(
            "fires once, at the first" in line and "(dst_repeat=first)" in line for line in warnings
        )
        upcoming = run_cli("next", "berlin", "-n", "1", env=env)
        assert sum("DST ahead: 02:30" in line for line in upcoming.stdout.splitlines()) == 2

    def test_next_names_an_unknown_job(self) -> None:
        result = run_cli("next", "data-refrsh", env=base_env(SCHEDULER_API_TOKEN="x"))
        assert result.returncode == 2 and "did you mean 'data-refresh'" in result.stderr

    def test_fire_calls_once_now_and_prints_the_outcome(self, target: Target) -> None:
        env = base_env(SCHEDULER_API_TOKEN=TOKEN, API_URL=target.url)
        result = run_cli("fire", "health-check", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("health-check: success (HTTP 200) after 1 attempt(s)")
        (call,) = target.calls()
        assert (call.method, call.path) == ("GET", "/api/health")
        assert call.header("Idempotency-Key").startswith("health-check@manual-")  # type: ignore[union-attr]

    def test_fire_exits_1_on_failure(self, target: Target) -> None:
        target.script["/api/health"] = [Reply(404)]
        result = run_cli(
            "fire", "health-check", env=base_env(SCHEDULER_API_TOKEN=TOKEN, API_URL=target.url)
        )
        assert result.returncode == 1
        assert "failed (HTTP 404)" in result.stdout

    def test_demo_shows_calls_arriving_within_seconds(self) -> None:
        result = run_cli("demo", "--duration", "6", env=base_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("demo app <- POST /demo/tick -> 200") >= 2
        assert "Traceback" not in result.stderr

    def test_version_and_help(self) -> None:
        assert run_cli("--version", env=base_env()).stdout.strip() == f"cronclock {__version__}"
        script = Path(sys.executable).with_name("cronclock")  # the console script, same answer
        if script.exists():
            answer = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                    env=base_env(), timeout=60, check=False)  # fmt: skip
            assert (answer.returncode, answer.stdout) == (0, f"cronclock {__version__}\n")
        # `--version` with anything else goes through argparse as before
        assert run_cli("check", "--version", env=base_env()).returncode == 2
        helptext = run_cli("--help", env=base_env()).stdout
        for command in ("run", "check", "next", "fire", "demo"):
            assert command in helptext


class TestErrorReporting:
    def test_terminal_failures_reach_posthog_and_are_flushed_at_shutdown(
        self, target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
    ) -> None:
        posthog = Target()  # a loopback stand-in for the PostHog ingestion host
        try:
            target.script["/broken"] = [Reply(404)]
            proc = daemon(
                API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, POSTHOG_API_KEY="phc_integration",
                POSTHOG_HOST=posthog.url, SCHEDULER_JOBS_FILE=str(jobs_file(every_second("/broken"))),
            )  # fmt: skip
            assert target.wait_for(lambda calls: len(calls) >= 1)
            assert proc.stop() == 0
            batches = [call for call in posthog.calls() if call.method == "POST"]
            assert batches, "nothing reached the PostHog host"
            payloads = [json.loads(call.body) for call in batches]
            assert {payload.get("api_key") for payload in payloads} == {"phc_integration"}
            events = [e for p in payloads for e in p["batch"] if e["event"] == "$exception"]
            assert events and events[0]["properties"]["job"] == "tick"
            assert events[0]["properties"]["status"] == 404
            assert events[0]["properties"]["endpoint"] == "/broken"
            assert "phc_integration" not in proc.log_path.read_text()
        finally:
            posthog.close()
