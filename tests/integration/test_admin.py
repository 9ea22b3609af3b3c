"""The admin API of the real daemon, over real HTTP, acting on a real loopback target."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ROOT, Daemon, base_env, run_cli
from tests.support import Reply, Target, free_port

ADMIN = "admin-token"


def start(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> tuple[Daemon, str, dict[str, str]]:
    port = free_port()
    env = {"API_URL": target.url, "SCHEDULER_API_TOKEN": "t", "SCHEDULER_ADMIN_TOKEN": ADMIN,
           "SCHEDULER_ADMIN_BIND": f"127.0.0.1:{port}",
           "SCHEDULER_JOBS_FILE": str(jobs_file('[jobs.tick]\nschedule = "every 1s"\nendpoint = "/tick"\n'
                                               '[jobs.hourly]\nschedule = "every 1h"\nendpoint = "/hourly"\n'))}  # fmt: skip
    proc = daemon(**env)
    assert proc.wait_for_log("admin API listening"), proc.log_path.read_text()
    return proc, f"http://127.0.0.1:{port}", env


def test_pause_resume_and_trigger_over_http(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    proc, url, _ = start(target, jobs_file, daemon)
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"})
    assert target.wait_for(lambda calls: len(calls) >= 1)
    assert admin.post("/api/jobs/tick/pause").json() == {"job": "tick", "paused": True}
    paused_at = len(target.calls("/tick"))
    # while paused: the hourly job can still be triggered by hand
    triggered = admin.post("/api/jobs/hourly/trigger")
    assert triggered.status_code == 202
    assert target.wait_for(lambda calls: any(c.path == "/hourly" for c in calls))
    (hourly,) = target.calls("/hourly")
    assert hourly.header("Idempotency-Key") == triggered.json()["idempotency_key"]
    time.sleep(2.5)  # let two slots pass while paused
    assert len(target.calls("/tick")) <= paused_at + 1, "at most the slot already in flight"
    assert admin.get("/api/jobs/tick").json()["paused"] is True
    assert admin.post("/api/jobs/tick/resume").json()["paused"] is False
    assert target.wait_for(
        lambda calls: len([c for c in calls if c.path == "/tick"]) > paused_at + 1
    )
    runs = admin.get("/api/jobs/hourly/runs").json()
    assert runs[0]["outcome"] == "success" and runs[0]["key"].startswith("hourly@manual-")
    health = httpx.get(f"{url}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["role"] == "solo" and health.json()["fencing_token"] is None
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    lateness = {s.name: s.value for s in families["cronclock_job_lateness_seconds"].samples}
    assert lateness["cronclock_job_lateness_seconds_count"] >= 2
    assert proc.stop() == 0


def test_the_cli_talks_to_the_running_daemon(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    proc, _, env = start(target, jobs_file, daemon)
    cli_env = base_env(**env)
    status = run_cli("status", env=cli_env)
    assert status.returncode == 0, status.stderr
    replica, header, *rows = status.stdout.splitlines()
    assert replica == f"{socket.gethostname()}:{proc.process.pid}: solo, ok"
    assert header.split()[:3] == ["JOB", "SCHEDULE", "NEXT"]
    assert rows[0].startswith("tick ") and rows[1].startswith("hourly ")
    assert header.split() == ["JOB", "SCHEDULE", "NEXT", "(UTC)", "LEFT", "LAST", "RESULT",
                              "LAST", "SUCCESS", "IN", "FLIGHT"]  # fmt: skip
    assert run_cli("pause", "hourly", env=cli_env).stdout.strip() == "hourly: paused"
    hourly = run_cli("status", env=cli_env).stdout.splitlines()[3]
    assert hourly.split()[:4] == ["hourly", "every", "1h", "paused"]  # no next run shown
    assert target.wait_for(lambda calls: len(calls) >= 1)
    tick = run_cli("status", env=cli_env).stdout.splitlines()[2].split()
    assert tick[0] == "tick" and tick[4] == "in", tick
    assert "ago" in tick and "success" in tick
    assert run_cli("resume", "hourly", env=cli_env).stdout.strip() == "hourly: resumed"
    triggered = run_cli("trigger", "hourly", env=cli_env)
    assert triggered.stdout.startswith("hourly: triggered, Idempotency-Key hourly@manual-")
    assert target.wait_for(lambda calls: any(c.path == "/hourly" for c in calls))
    unknown = run_cli("pause", "nope", env=cli_env)
    assert unknown.returncode == 1 and "no job named 'nope'" in unknown.stderr
    wrong = run_cli("status", env={**cli_env, "SCHEDULER_ADMIN_TOKEN": "wrong"})
    assert wrong.returncode == 1 and "admin token" in wrong.stderr
    assert proc.stop() == 0


def test_the_cli_says_when_no_daemon_listens() -> None:
    result = run_cli(
        "status",
        env=base_env(SCHEDULER_ADMIN_BIND=f"127.0.0.1:{free_port()}", SCHEDULER_ADMIN_TOKEN=ADMIN),
    )
    assert result.returncode == 1
    assert "cannot reach the admin API" in result.stderr and "Traceback" not in result.stderr


def test_an_admin_address_in_use_is_a_clear_start_failure(
    target: Target, jobs_file: Callable[[str], Path]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(API_URL=target.url, SCHEDULER_API_TOKEN="t", SCHEDULER_ADMIN_BIND=f"127.0.0.1:{port}",
                       SCHEDULER_JOBS_FILE=str(jobs_file('[jobs.t]\nschedule = "every 1h"\nendpoint = "/t"\n')))  # fmt: skip
        result = run_cli("run", env=env, timeout=30)
    assert result.returncode == 2
    assert f"SCHEDULER_ADMIN_BIND='127.0.0.1:{port}'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fast_path", ["true", "false"])
def test_the_admin_api_is_served_on_the_event_loop_the_calls_go_out_on(
    fast_path: str, target: Target, jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
) -> None:  # fmt: skip
    """Issue 18: one event loop writes the calls and serves the admin API (uvloop here), on
    the fast path and off it; IPv6 binds answer at a bracketed URL."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    port = free_port()
    proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN="t", SCHEDULER_ADMIN_TOKEN=ADMIN,
                  SCHEDULER_ADMIN_BIND=f"[::1]:{port}", SCHEDULER_FAST_PATH=fast_path,
                  SCHEDULER_JOBS_FILE=str(jobs_file('[jobs.tick]\nschedule = "every 1s"\n'
                                                    'endpoint = "/tick"\n')))  # fmt: skip
    assert proc.wait_for_log("admin API listening"), proc.log_path.read_text()
    (listening,) = proc.events("admin API listening")
    assert listening["url"] == f"http://[::1]:{port}" and listening["loop"] == "uvloop"
    assert httpx.get(f"http://[::1]:{port}/healthz", timeout=5).status_code == 200
    assert target.wait_for(lambda calls: len(calls) >= 2)
    assert proc.stop() == 0


def test_a_chunked_body_is_refused_at_the_limit_not_read_whole(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    """Issue 16: 200 MB sent chunked with a valid token used to be read into memory first."""
    proc, url, _ = start(target, jobs_file, daemon)
    port = int(url.rpartition(":")[2])
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"PUT /api/schedules/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + ADMIN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.setblocking(False)
        while sent < 200 * 1024 * 1024 and not answer:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:  # the server closed the connection: read what it said
                break
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(4096)
        sock.setblocking(True)
        while not answer.endswith(b"}"):
            more = sock.recv(4096)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"at most 262144" in answer
    assert sent < 32 * 1024 * 1024, f"{sent} bytes were taken before the answer"
    assert proc.process.poll() is None


# Issue 16: bodies that were a plain-text 500, or stored and then broke every call.
BAD_PUT_BODIES = [
    ("NaN body", b'{"schedule": "every 1m", "endpoint": "/x", "body": {"x": NaN}}', "NaN or Infinity"),
    ("Infinity grace", b'{"schedule": "every 1m", "endpoint": "/x", "misfire_grace": Infinity}', "not a finite duration"),
    ("1e308 grace", b'{"schedule": "every 1m", "endpoint": "/x", "misfire_grace": 1e308}', "at most 30d"),
    ("deep JSON", b'{"schedule": "every 1m", "endpoint": "/x", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("33 levels", b'{"schedule": "every 1m", "endpoint": "/x", "body": ' + b"[" * 33 + b"]" * 33 + b"}", "nested deeper than 32"),
    ("non-ASCII header", '{"schedule": "every 1m", "endpoint": "/x", "headers": {"X-A": "hunter2\u00e9"}}'.encode(), "visible ASCII"),
    ("Host header", b'{"schedule": "every 1m", "endpoint": "/x", "headers": {"Host": "hunter2"}}', "hop-by-hop or framing"),
    ("retries true", b'{"schedule": "every 1m", "endpoint": "/x", "retries": true}', "retries=True"),
    ("empty zone", b'{"schedule": "every 1m", "endpoint": "/x", "timezone": ""}', "unknown time zone"),
    ("two zones", b'{"schedule": "daily 03:00 in UTC in Asia/Tokyo", "endpoint": "/x"}', "more than one time zone"),
]  # fmt: skip


def test_bad_put_bodies_are_a_json_422_from_the_real_server(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    proc, url, _ = start(target, jobs_file, daemon)
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}",
                                                "Content-Type": "application/json"})  # fmt: skip
    for label, raw, fragment in BAD_PUT_BODIES:
        response = admin.put("/api/schedules/bad", content=raw)
        assert response.status_code == 422, (label, response.text)
        assert response.headers["content-type"] == "application/json", label
        assert fragment in response.json()["error"], (label, response.text)
        assert "hunter2" not in response.text, label
    assert admin.get("/api/schedules/bad").status_code == 404
    assert admin.get("/docs").status_code == 404 and admin.get("/redoc").status_code == 404
    assert proc.process.poll() is None
    assert "Traceback" not in proc.log_path.read_text()


def test_trigger_wait_exits_by_the_outcome(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    """Issue 19: `trigger JOB --wait` waits for the call and exits 0 or 1 by its outcome."""
    target.script["/broken"] = [Reply(500)]
    target.script["/slow"] = [Reply(delay=3)]
    port = free_port()
    env = {"API_URL": target.url, "SCHEDULER_API_TOKEN": "t", "SCHEDULER_ADMIN_TOKEN": ADMIN,
           "SCHEDULER_ADMIN_BIND": f"127.0.0.1:{port}",
           "SCHEDULER_JOBS_FILE": str(jobs_file(
               "".join(f'[jobs.{n}]\nschedule = "every 1h"\nendpoint = "/{n}"\n'
                       for n in ("ok", "broken", "slow"))))}  # fmt: skip
    proc = daemon(**env)
    assert proc.wait_for_log("admin API listening"), proc.log_path.read_text()
    ok = run_cli("trigger", "ok", "--wait", env=base_env(**env))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(
        "ok: success (HTTP 200) after 1 attempt(s), Idempotency-Key ok@manual-"
    )
    broken = run_cli("trigger", "broken", "--wait", env=base_env(**env))
    assert broken.returncode == 1 and "broken: failed (HTTP 500)" in broken.stdout
    slow = run_cli("trigger", "slow", "--wait", "--timeout", "0.5", env=base_env(**env))
    assert slow.returncode == 1 and "still running after 0.5 s" in slow.stdout
    assert target.wait_for(lambda calls: any(c.path == "/slow" for c in calls))
    nope = run_cli("trigger", "nope", "--wait", env=base_env(**env))
    assert nope.returncode == 1 and "no job named 'nope'" in nope.stderr


def test_fire_refuses_a_job_the_running_daemon_has_paused_unless_forced(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    """Issue 19: `fire` asks the running daemon first; a paused job needs --force."""
    proc, _, env = start(target, jobs_file, daemon)
    cli_env = base_env(**env)
    assert run_cli("pause", "hourly", env=cli_env).returncode == 0
    refused = run_cli("fire", "hourly", env=cli_env)
    assert refused.returncode == 1, refused.stdout
    assert (
        "hourly is paused in the running daemon" in refused.stderr and "--force" in refused.stderr
    )
    assert not target.calls("/hourly")
    forced = run_cli("fire", "hourly", "--force", env=cli_env)
    assert forced.returncode == 0 and forced.stdout.startswith("hourly: success (HTTP 200)")
    assert len(target.calls("/hourly")) == 1
    assert run_cli("resume", "hourly", env=cli_env).returncode == 0
    assert run_cli("fire", "hourly", env=cli_env).returncode == 0
    assert proc.stop() == 0
    # No daemon answers: nothing is paused that fire could respect, so it fires.
    alone = run_cli("fire", "hourly", env=cli_env)
    assert alone.returncode == 0 and "no running daemon answered" in alone.stderr


def test_json_output_of_the_commands_that_talk_to_the_daemon(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    """Issue 19: `--json` is one document on stdout, the admin API's own fields."""
    proc, _, env = start(target, jobs_file, daemon)
    cli_env = base_env(**env)

    def cli(*args: str, code: int = 0) -> Any:
        result = run_cli(*args, "--json", env=cli_env)
        assert result.returncode == code, result.stderr
        return json.loads(result.stdout)

    assert target.wait_for(lambda calls: len(calls) >= 1)
    assert cli("pause", "hourly") == {"job": "hourly", "paused": True}
    status = cli("status")
    assert status["health"]["status"] == "ok" and status["health"]["role"] == "solo"
    by_name = {job["name"]: job for job in status["jobs"]}
    assert by_name["hourly"]["paused"] is True and by_name["tick"]["paused"] is False
    assert by_name["tick"]["last_run"]["outcome"] == "success"
    assert cli("resume", "hourly") == {"job": "hourly", "paused": False}
    triggered = cli("trigger", "hourly")
    assert triggered["job"] == "hourly" and triggered["idempotency_key"].startswith(
        "hourly@manual-"
    )
    waited = cli("trigger", "hourly", "--wait")
    assert waited["outcome"] == "success" and waited["status"] == 200 and waited["attempts"] == 1
    fired = cli("fire", "hourly")
    assert set(fired) == {"job", "idempotency_key", "outcome", "status", "attempts",
                          "duration_seconds", "error"}  # fmt: skip
    assert (fired["outcome"], fired["status"], fired["error"]) == ("success", 200, None)
    assert fired["idempotency_key"] in {
        c.header("Idempotency-Key") for c in target.calls("/hourly")
    }
    page = cli("schedules", "list")
    assert page == {"schedules": [], "next_after": None}
    # refused: nothing on stdout, the reason on stderr, exit 1
    result = run_cli("status", "--json", env={**cli_env, "SCHEDULER_ADMIN_TOKEN": "wrong"})
    assert result.returncode == 1 and result.stdout == "" and result.stderr
    assert proc.stop() == 0


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, as Docker runs it in the container."""
    return subprocess.run([sys.executable, "-m", "services.scheduler.healthcheck"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip


def test_the_image_health_check_follows_the_admin_bind(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    proc, url, env = start(target, jobs_file, daemon)
    bind = env["SCHEDULER_ADMIN_BIND"]
    healthy = _healthcheck(base_env(SCHEDULER_ADMIN_BIND=bind.replace("127.0.0.1", "0.0.0.0")))
    assert healthy.returncode == 0 and f"{url}/healthz: 200" in healthy.stdout, healthy.stderr
    nobody = _healthcheck(base_env(SCHEDULER_ADMIN_BIND=f"127.0.0.1:{free_port()}"))
    assert nobody.returncode == 1 and "/healthz" in nobody.stderr
    assert _healthcheck(base_env(SCHEDULER_ADMIN_BIND="off")).returncode == 0
    proc.process.send_signal(signal.SIGSTOP)  # a daemon that does not answer is unhealthy
    try:
        assert _healthcheck(base_env(SCHEDULER_ADMIN_BIND=bind)).returncode == 1
    finally:
        proc.process.send_signal(signal.SIGCONT)
    assert proc.stop() == 0
