"""Failure policies in the real daemon against a real loopback target: a job that keeps
failing pauses itself after pause_after_failures slots (and stays paused across a restart,
with its reason, until `cronclock resume`); a 410 Gone disables a job at once; a job without
a success for max_silence is listed as stale by /healthz, which stays 200."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.integration.conftest import Daemon, base_env, run_cli
from tests.support import Reply, Target, free_port

ADMIN = "admin-token"


def _env(target: Target, jobs: Path, state: Path) -> dict[str, str]:
    return {"API_URL": target.url, "SCHEDULER_API_TOKEN": "t", "SCHEDULER_ADMIN_TOKEN": ADMIN,
            "SCHEDULER_ADMIN_BIND": f"127.0.0.1:{free_port()}", "SCHEDULER_JOBS_FILE": str(jobs),
            "SCHEDULER_STATE_URL": f"sqlite:///{state}"}  # fmt: skip


def _admin(env: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=f"http://{env['SCHEDULER_ADMIN_BIND']}",
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)  # fmt: skip


def test_a_failing_job_pauses_itself_stays_paused_across_a_restart_and_resumes(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    target.script["/flaky"] = [Reply(status=500)]
    jobs = jobs_file('[jobs.flaky]\nschedule = "every 1s"\nendpoint = "/flaky"\n'
                     'pause_after_failures = 3\n')  # fmt: skip
    env = _env(target, jobs, tmp_path / "state.db")
    first = daemon(**env)
    assert first.wait_for_log("job auto-paused"), first.log_path.read_text()
    (line,) = first.events("job auto-paused")
    assert line["reason"] == "auto-paused after 3 consecutive failures"
    assert line["resume"] == "cronclock resume flaky"
    calls = len(target.calls("/flaky"))
    assert 3 <= calls <= 4, "the three failures, and at most the slot already handed on"
    time.sleep(2.5)
    assert len(target.calls("/flaky")) == calls, "paused: no more calls"
    view = _admin(env).get("/api/jobs/flaky").json()
    assert (view["paused"], view["pause_reason"]) == (True, line["reason"])
    metrics = _admin(env).get("/metrics").text
    assert 'cronclock_job_auto_paused_total{job="flaky",reason="failures"} 1.0' in metrics
    assert first.stop() == 0

    second = daemon(**env)  # the pause and its reason are in the state file
    assert second.wait_for_log("admin API listening"), second.log_path.read_text()
    status = run_cli("status", env=base_env(**env))
    assert status.returncode == 0, status.stderr
    assert "auto-paused" in status.stdout
    assert (
        "flaky: auto-paused after 3 consecutive failures; cronclock resume flaky" in status.stdout
    )
    time.sleep(1.5)
    assert len(target.calls("/flaky")) == calls

    target.script["/flaky"] = [Reply(status=200)]
    resumed = run_cli("resume", "flaky", env=base_env(**env))
    assert resumed.returncode == 0, resumed.stderr
    assert target.wait_for(lambda seen: len([c for c in seen if c.path == "/flaky"]) > calls)
    assert second.wait_for_log("fired")
    view = _admin(env).get("/api/jobs/flaky").json()
    assert (view["paused"], view["pause_reason"], view["consecutive_failures"]) == (
        False, None, 0,
    )  # fmt: skip


def test_a_410_disables_the_job_and_an_ignoring_job_goes_on(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    target.script["/gone"] = [Reply(status=410)]
    target.script["/kept"] = [Reply(status=410)]
    jobs = jobs_file('[jobs.gone]\nschedule = "every 1s"\nendpoint = "/gone"\n'
                     '[jobs.kept]\nschedule = "every 1s"\nendpoint = "/kept"\n'
                     'on_gone = "ignore"\n')  # fmt: skip
    env = _env(target, jobs, tmp_path / "state.db")
    proc = daemon(**env)
    assert proc.wait_for_log("job disabled"), proc.log_path.read_text()
    (line,) = proc.events("job disabled")
    assert line["job"] == "gone" and "410 Gone" in line["reason"]
    assert target.wait_for(lambda seen: len([c for c in seen if c.path == "/kept"]) >= 4)
    assert len(target.calls("/gone")) <= 2, "the 410, and at most the slot already handed on"
    kept = _admin(env).get("/api/jobs/kept").json()
    assert kept["paused"] is False and kept["consecutive_failures"] >= 3
    assert "disabled (410)" in run_cli("status", env=base_env(**env)).stdout


def test_healthz_lists_a_stale_job_and_stays_200(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    # A job that has never succeeded counts from the start; max_silence is at least 1m, so
    # the state file says its last success was long ago.
    import sqlite3

    state = tmp_path / "state.db"
    jobs = jobs_file('[jobs.nightly]\nschedule = "daily 03:00"\nendpoint = "/nightly"\n'
                     'max_silence = "1h"\n'
                     '[jobs.other]\nschedule = "daily 03:00"\nendpoint = "/other"\n'
                     'max_silence = "2d"\n')  # fmt: skip
    env = _env(target, jobs, state)
    proc = daemon(**env)
    assert proc.wait_for_log("admin API listening")
    assert proc.stop() == 0
    two_hours_ago = int((time.time() - 7200) * 1_000_000)
    with sqlite3.connect(state) as db:
        db.execute("INSERT INTO jobs (name, last_success) VALUES ('nightly', ?), ('other', ?) "
                   "ON CONFLICT (name) DO UPDATE SET last_success = excluded.last_success",
                   (two_hours_ago, two_hours_ago))  # fmt: skip
    proc = daemon(**env)
    assert proc.wait_for_log("admin API listening"), proc.log_path.read_text()
    health = _admin(env).get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["stale"] == ["nightly"]
    metrics = _admin(env).get("/metrics").text
    assert 'cronclock_job_stale{job="nightly"} 1.0' in metrics
    assert 'cronclock_job_stale{job="other"} 0.0' in metrics
    assert "nightly: stale" in run_cli("status", env=base_env(**env)).stdout


def test_a_runtime_schedule_pauses_itself_and_is_resumed_through_its_own_endpoint(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    target.script["/remind"] = [Reply(status=503)]
    env = _env(target, jobs_file(""), tmp_path / "state.db")
    proc = daemon(**env)
    assert proc.wait_for_log("admin API listening"), proc.log_path.read_text()
    admin = _admin(env)
    put = admin.put("/api/schedules/r1", json={"schedule": "every 1s", "endpoint": "/remind",
                                               "pause_after_failures": 2, "group": "reminders"})  # fmt: skip
    assert put.status_code == 201, put.text
    assert proc.wait_for_log("job auto-paused"), proc.log_path.read_text()
    (line,) = proc.events("job auto-paused")
    assert line["job"] == "schedule/r1"
    shown = admin.get("/api/schedules/r1").json()
    assert (shown["paused"], shown["pause_reason"], shown["consecutive_failures"]) == (
        True, "auto-paused after 2 consecutive failures", 2,
    )  # fmt: skip
    metrics = admin.get("/metrics").text
    assert 'cronclock_job_auto_paused_total{job="schedules/reminders",reason="failures"} 1.0' in (
        metrics
    )
    calls = len(target.calls("/remind"))
    time.sleep(2.0)
    assert len(target.calls("/remind")) == calls
    target.script["/remind"] = [Reply(status=200)]
    resumed = admin.post("/api/schedules/r1/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert target.wait_for(lambda seen: len([c for c in seen if c.path == "/remind"]) > calls)
    assert admin.post("/api/schedules/nope/resume").status_code == 404
    assert admin.delete("/api/schedules/r1").status_code == 200
    ended = admin.post("/api/schedules/r1/pause")
    assert ended.status_code == 409 and "already ended" in ended.json()["error"]


def test_notifications_reach_a_real_receiver_and_a_dead_one_delays_nothing(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    import json

    target.script["/flaky"] = [Reply(status=500)]
    dead = f"http://127.0.0.1:{free_port()}/dead"
    jobs = jobs_file('[jobs.flaky]\nschedule = "every 1s"\nendpoint = "/flaky"\n'
                     'pause_after_failures = 2\n'
                     '[jobs.steady]\nschedule = "every 1s"\nendpoint = "/steady"\n')  # fmt: skip
    env = _env(target, jobs, tmp_path / "state.db") | {
        "SCHEDULER_NOTIFY_URL": f"{target.url}/hooks/ops, slack+{target.url}/hooks/chat {dead}",
        "SCHEDULER_SIGNING_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    proc = daemon(**env)

    def bodies(path: str) -> list[dict[str, object]]:
        return [json.loads(c.body) for c in target.calls(path)]

    assert target.wait_for(lambda _: len(bodies("/hooks/ops")) >= 2), proc.log_path.read_text()
    ops = bodies("/hooks/ops")
    assert [b["type"] for b in ops] == ["job.failing", "job.auto_paused"]
    assert ops[1]["data"] == {"job": "flaky", "replica": ops[1]["data"]["replica"],  # type: ignore[index]
                              "reason": "auto-paused after 2 consecutive failures",
                              "consecutive_failures": 2}  # fmt: skip
    signature = target.calls("/hooks/ops")[0].header("webhook-signature") or ""
    assert signature.startswith("v1,"), "signed like the calls"
    assert target.wait_for(lambda _: len(bodies("/hooks/chat")) >= 2)
    chat = bodies("/hooks/chat")
    assert set(chat[0]) == {"text"} and "flaky is failing" in str(chat[0]["text"])

    target.script["/flaky"] = [Reply(status=200)]
    assert run_cli("resume", "flaky", env=base_env(**env)).returncode == 0
    assert target.wait_for(
        lambda _: any(b["type"] == "job.recovered" for b in bodies("/hooks/ops"))
    )
    recovered = [b for b in bodies("/hooks/ops") if b["type"] == "job.recovered"]
    assert recovered[0]["data"]["failed_slots"] == 2  # type: ignore[index]
    assert proc.wait_for_log("notification not delivered"), "the dead URL, after its retries"
    (line,) = proc.events("notification not delivered")[:1]
    assert line["target"] == f"http://127.0.0.1:{dead.split(':')[2].split('/')[0]}/…"
    # The dead receiver delayed nothing: the steady job fired every second throughout.
    steady = [c.scheduled_for for c in target.calls("/steady")]
    assert len(steady) >= 5 and all(
        (b - a).total_seconds() == 1 for a, b in itertools.pairwise(steady)
    )
    assert not [n for n in proc.logs() if n.get("event") == "missed slots"]


def test_cronclock_backfill_fires_a_past_range_with_the_slots_own_headers(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    import json
    from datetime import UTC, datetime, timedelta

    jobs = jobs_file('[jobs.report]\nschedule = "every 1m"\nendpoint = "/report"\n')
    env = _env(target, jobs, tmp_path / "state.db")
    proc = daemon(**env)
    assert proc.wait_for_log("admin API listening"), proc.log_path.read_text()
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start, end = now - timedelta(minutes=4), now - timedelta(minutes=1)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    cli = run_cli("backfill", "report", "--from", start.strftime(stamp), "--to",
                  end.strftime(stamp), "--json", env=base_env(**env))  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    answer = json.loads(cli.stdout)
    assert answer["count"] == 4 and answer["backfill_key"].startswith("report@backfill-")
    assert target.wait_for(lambda seen: len([c for c in seen if c.path == "/report"
                                             and c.scheduled_for <= end]) == 4)  # fmt: skip
    sent = [c for c in target.calls("/report") if c.scheduled_for <= end]
    expected = [start + timedelta(minutes=m) for m in range(4)]
    assert [c.scheduled_for for c in sent] == expected, "in order, each its own slot"
    assert [c.header("Idempotency-Key") for c in sent] == [
        f"report@{int(slot.timestamp() * 1000)}" for slot in expected
    ]
    runs = _admin(env).get("/api/jobs/report/runs").json()
    assert [r["backfill"] for r in runs if r["slot"] <= end.strftime(stamp)] == [True] * 4
    assert len([line for line in proc.events("fired") if line.get("backfill")]) == 4

    future = run_cli("backfill", "report", "--from", start.strftime(stamp), "--to",
                     (now + timedelta(hours=1)).strftime(stamp), env=base_env(**env))  # fmt: skip
    assert future.returncode == 1
    assert "is in the future; a backfill fires past slots only" in future.stderr
    wide = run_cli("backfill", "report", "--from", (now - timedelta(days=1)).strftime(stamp),
                   "--to", end.strftime(stamp), "--limit", "10", env=base_env(**env))  # fmt: skip
    assert wide.returncode == 1 and "more than 10 slots" in wide.stderr
