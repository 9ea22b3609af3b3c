"""Runtime schedules against the real daemon (subprocess), a real loopback target and, for
two replicas, a real redis-server: each one-time schedule fires once, through restarts,
kills, cancellation, a burst of 1,000, and either replica."""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.integration import test_ha as ha
from tests.integration.conftest import Daemon, base_env, run_cli
from tests.integration.test_ha import Cluster
from tests.support import Arrival, RedisServer, Target, free_port

TOKEN = "app-token"
ADMIN = "admin-token"
QUIET_JOBS = '[jobs.quiet]\nschedule = "daily 04:00"\nendpoint = "/quiet"\n'


class Admin:
    def __init__(self, url: str, token: str = ADMIN) -> None:
        self.url = url
        # One client, shared (its pool is thread-safe): building one per request costs more
        # than the request.
        self._client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )  # fmt: skip

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._client.request(method, path, **kwargs)

    def put(self, id: str, body: dict[str, Any]) -> httpx.Response:
        return self.request("PUT", f"/api/schedules/{id}", json=body)

    def get(self, id: str) -> dict[str, Any]:
        response = self.request("GET", f"/api/schedules/{id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the admin API at {self.url} did not answer")


def whole_second(seconds_ahead: float) -> datetime:
    """A whole second at least `seconds_ahead` from now."""
    ahead = datetime.now(UTC) + timedelta(seconds=seconds_ahead)
    return datetime.fromtimestamp(math.ceil(ahead.timestamp()), UTC)


def one_time(instant: datetime, path: str = "/remind", **fields: Any) -> dict[str, Any]:
    return {"schedule": f"at {instant:%Y-%m-%dT%H:%M:%S}Z", "endpoint": path} | fields


def wait_until(instant: datetime) -> None:
    time.sleep(max(0.0, (instant - datetime.now(UTC)).total_seconds()))


def keys(calls: list[Arrival]) -> Counter[str]:
    return Counter(call.header("Idempotency-Key") or "" for call in calls)


class Solo:
    """One daemon on a SQLite file that survives restarts."""

    def __init__(self, daemon: Callable[..., Daemon], target: Target, tmp_path: Path) -> None:
        jobs = tmp_path / "jobs.toml"
        jobs.write_text("include_builtin = false\n" + QUIET_JOBS)
        self.port = free_port()
        self.env = {
            "API_URL": target.url, "SCHEDULER_API_TOKEN": TOKEN,
            "SCHEDULER_JOBS_FILE": str(jobs),
            "SCHEDULER_STATE_URL": f"sqlite:///{tmp_path}/state.db",
            "SCHEDULER_ADMIN_BIND": f"127.0.0.1:{self.port}", "SCHEDULER_ADMIN_TOKEN": ADMIN,
        }  # fmt: skip
        self._daemon = daemon
        self.admin = Admin(f"http://127.0.0.1:{self.port}")
        self.process = self.start()

    def start(self) -> Daemon:
        self.process = self._daemon(**self.env)
        self.admin.wait_ready()
        return self.process


def solo(daemon: Callable[..., Daemon], target: Target, tmp_path: Path) -> Solo:
    return Solo(daemon, target, tmp_path)


def test_a_one_time_schedule_fires_once_at_its_time(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(2)
    created = cronclock.admin.put("pay-1", one_time(when, body={"payment": 1}))
    assert created.status_code == 201, created.text
    assert target.wait_for(lambda calls: len(calls) >= 1, timeout=15)
    time.sleep(1.5)
    calls = target.calls("/remind")
    assert len(calls) == 1
    call = calls[0]
    assert call.at >= when and (call.at - when).total_seconds() < 1.0
    assert call.header("X-Scheduler-Job") == "schedule/pay-1"
    assert call.header("Authorization") == f"Bearer {TOKEN}"
    assert call.scheduled_for == when and call.body == b'{"payment":1}'
    view = cronclock.admin.get("pay-1")
    assert view["status"] == "executed" and view["runs"][0]["outcome"] == "success"
    assert cronclock.process.stop() == 0


def test_it_fires_once_when_the_daemon_restarts_before_its_time(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(5)
    assert cronclock.admin.put("r-1", one_time(when)).status_code == 201
    assert cronclock.process.stop() == 0
    cronclock.start()
    wait_until(when + timedelta(seconds=2))
    assert target.wait_for(lambda calls: len(calls) >= 1, timeout=10)
    time.sleep(1)
    calls = target.calls("/remind")
    assert len(calls) == 1 and calls[0].scheduled_for == when
    assert calls[0].at >= when
    assert cronclock.admin.get("r-1")["status"] == "executed"
    assert cronclock.process.stop() == 0


def test_it_fires_once_when_killed_and_restarted_after_its_time_within_grace(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(2)
    assert cronclock.admin.put("k-1", one_time(when, misfire_grace="1m")).status_code == 201
    cronclock.process.signal(signal.SIGKILL)
    cronclock.process.process.wait(10)
    wait_until(when + timedelta(seconds=2))
    assert target.calls() == []
    second = cronclock.start()
    assert target.wait_for(lambda calls: len(calls) >= 1, timeout=15)
    time.sleep(1)
    calls = target.calls("/remind")
    assert len(calls) == 1 and calls[0].scheduled_for == when
    assert second.events("catch-up fire")
    assert cronclock.admin.get("k-1")["status"] == "executed"
    assert second.stop() == 0
    # ... and once more, killed after the call: not again
    third = cronclock.start()
    time.sleep(2)
    assert len(target.calls("/remind")) == 1
    assert third.stop() == 0


def test_beyond_its_grace_after_a_restart_it_expires_without_a_call(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(1)
    assert cronclock.admin.put("e-1", one_time(when, misfire_grace="1s")).status_code == 201
    cronclock.process.signal(signal.SIGKILL)
    cronclock.process.process.wait(10)
    wait_until(when + timedelta(seconds=3))
    cronclock.start()
    deadline = time.monotonic() + 10
    while cronclock.admin.get("e-1")["status"] != "expired" and time.monotonic() < deadline:
        time.sleep(0.1)
    view = cronclock.admin.get("e-1")
    assert view["status"] == "expired" and view["runs"][0]["outcome"] == "missed"
    assert target.calls() == []
    assert cronclock.process.stop() == 0


def test_a_cancelled_schedule_never_fires(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(2)
    assert cronclock.admin.put("c-1", one_time(when)).status_code == 201
    assert cronclock.admin.put("c-2", one_time(when, "/kept")).status_code == 201
    cancelled = cronclock.admin.request("DELETE", "/api/schedules/c-1")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert target.wait_for(lambda calls: len(calls) >= 1, timeout=15)
    time.sleep(1)
    assert [call.path for call in target.calls()] == ["/kept"]
    assert cronclock.admin.get("c-1")["status"] == "cancelled"
    assert cronclock.process.stop() == 0


def test_a_thousand_one_time_schedules_due_in_the_same_second_all_fire_once(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(20)
    ids = [f"burst-{n:04d}" for n in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda id: cronclock.admin.put(id, one_time(when, f"/b/{id}")).status_code, ids
            )
        )
    assert Counter(statuses) == {201: 1000}
    assert datetime.now(UTC) < when, "creating 1,000 schedules took longer than 20 s"
    assert target.wait_for(lambda calls: len(calls) >= 1000, timeout=60)
    time.sleep(1)
    calls = target.calls()
    assert len(calls) == 1000
    assert set(keys(calls).values()) == {1}
    assert {call.path for call in calls} == {f"/b/{id}" for id in ids}
    assert all(call.scheduled_for == when for call in calls)

    def executed() -> list[str]:
        found: list[str] = []
        after = ""
        while True:
            page = cronclock.admin.request(
                "GET", "/api/schedules", params={"status": "executed", "limit": 300, "after": after}
            ).json()
            found += [item["id"] for item in page["schedules"]]
            if page["next_after"] is None:
                return found
            after = page["next_after"]

    # Each ends "executed" once its answer is recorded, after the call (the test target is a
    # Python server: 1,000 calls take it seconds, and the last answers are recorded after).
    deadline = time.monotonic() + 30
    while (done := executed()) != ids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert done == ids
    assert cronclock.process.stop() == 0


def test_a_batch_of_a_thousand_is_durable_when_acknowledged_and_each_fires_once(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    """Issue 18: POST /api/schedules:batch commits before it answers. The daemon is killed
    (SIGKILL) right after the answer; the restarted one fires all 1,000, each once."""
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(8)
    ids = [f"bulk-{n:04d}" for n in range(1000)]
    batch = {"schedules": [{"id": id, **one_time(when, f"/b/{id}")} for id in ids]}
    answer = cronclock.admin.request("POST", "/api/schedules:batch", json=batch)
    assert answer.status_code == 200, answer.text
    assert answer.json()["created"] == 1000
    cronclock.process.process.send_signal(signal.SIGKILL)
    cronclock.process.process.wait(10)
    cronclock.start()
    assert target.wait_for(lambda calls: len(calls) >= 1000, timeout=60)
    time.sleep(1)
    calls = target.calls()
    assert len(calls) == 1000 and set(keys(calls).values()) == {1}
    assert {call.path for call in calls} == {f"/b/{id}" for id in ids}
    assert all(call.scheduled_for == when for call in calls)
    again = cronclock.admin.request("POST", "/api/schedules:batch", json=batch).json()
    assert again["unchanged"] == 1000  # executed ones are not re-armed by the same body
    assert cronclock.process.stop() == 0


def test_single_puts_sent_together_are_each_answered_as_alone_and_durable_when_answered(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    """Issue 18: PUTs that arrive together are stored in one transaction. Eight clients send
    200 new ids and all hit one shared id with their own bodies: one of those is created, the
    others replace it in turn; the daemon is killed (SIGKILL) after the last answer, and the
    restarted one fires every acknowledged schedule once, the shared one as last answered."""
    cronclock = solo(daemon, target, tmp_path)
    when = whole_second(12)
    ids = [f"own-{n:03d}" for n in range(200)]

    def send(k: int) -> list[tuple[str, int, dict[str, Any]]]:
        answers = []
        for id in [*ids[k::8], "shared"]:
            path = f"/s/{k}" if id == "shared" else f"/b/{id}"
            answer = cronclock.admin.put(id, one_time(when, path))
            answers.append((id, answer.status_code, answer.json()))
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [one for some in pool.map(send, range(8)) for one in some]
    own = [(status, body["change"]) for id, status, body in answers if id != "shared"]
    assert Counter(own) == {(201, "created"): 200}
    shared = sorted((body["revision"], status, body["change"], body["endpoint"])
                    for id, status, body in answers if id == "shared")  # fmt: skip
    assert [row[:3] for row in shared] == [(1, 201, "created")] + [
        (n, 200, "replaced") for n in range(2, 9)]  # fmt: skip
    cronclock.process.process.send_signal(signal.SIGKILL)
    cronclock.process.process.wait(10)
    cronclock.start()
    assert target.wait_for(lambda calls: len(calls) >= 201, timeout=60)
    time.sleep(1)
    calls = target.calls()
    assert len(calls) == 201 and set(keys(calls).values()) == {1}
    assert {call.path for call in calls} == {f"/b/{id}" for id in ids} | {shared[-1][3]}
    assert cronclock.process.stop() == 0


def test_with_two_replicas_on_redis_schedules_created_through_either_fire_exactly_once(
    daemon: Callable[..., Daemon],
    target: Target,
    jobs_file: Callable[[str], Path],
    redis_server: RedisServer,
) -> None:
    cluster = Cluster(daemon, target, jobs_file(QUIET_JOBS), redis_server, ttl=3.0)
    replicas = [cluster.add(), cluster.add()]
    leader = cluster.leader()
    standby = next(r for r in replicas if r is not leader)
    admins = {"leader": Admin(leader.admin, ha.ADMIN), "standby": Admin(standby.admin, ha.ADMIN)}
    when = whole_second(4)
    for role, admin in admins.items():
        for n in range(20):
            response = admin.put(
                f"{role}-{n}", one_time(when + timedelta(seconds=n % 3), f"/{role}/{n}")
            )
            assert response.status_code == 201, response.text
    # A recurring one created on the standby, and one that outlives the leader.
    assert admins["standby"].put("tick", {"schedule": "every 1s", "endpoint": "/tick"}).is_success
    late = whole_second(12)
    assert admins["standby"].put("after-failover", one_time(late, "/late")).is_success
    assert target.wait_for(lambda calls: len([c for c in calls if c.path != "/tick"]) >= 40, 20)
    leader.daemon.signal(signal.SIGKILL)
    leader.daemon.process.wait(10)
    assert target.wait_for(lambda calls: any(c.path == "/late" for c in calls), timeout=30)
    time.sleep(2)
    cluster.stop_all()
    calls = target.calls()
    assert set(keys(calls).values()) == {1}  # nothing twice, failover included
    paths = Counter(call.path for call in calls if call.path != "/tick")
    assert paths == Counter([f"/{role}/{n}" for role in admins for n in range(20)] + ["/late"])
    ticks = sorted(call.scheduled_for for call in calls if call.path == "/tick")
    assert len(ticks) >= 8
    fencing = {call.header("X-Scheduler-Fencing-Token") for call in calls if call.path == "/late"}
    assert fencing == {"2"}  # fired by the replica that took over


def test_the_cli_lists_shows_and_cancels_schedules(
    daemon: Callable[..., Daemon], target: Target, tmp_path: Path
) -> None:
    cronclock = solo(daemon, target, tmp_path)
    env = base_env(**cronclock.env)
    later = whole_second(3600)
    for n in range(3):
        body = one_time(later, group="mail" if n else None, headers={"X-N": str(n)})
        assert cronclock.admin.put(f"cli-{n}", body).status_code == 201
    listed = run_cli("schedules", "list", "--limit", "2", env=env)
    assert listed.returncode == 0, listed.stderr
    header, first, second, more = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "GROUP", "SCHEDULE", "NEXT", "(UTC)", "ENDPOINT"]
    assert first.split()[:3] == ["cli-0", "active", "-"] and second.startswith("cli-1 ")
    assert more == "(more: cronclock schedules list --after cli-1)"
    mail = run_cli("schedules", "list", "--group", "mail", env=env).stdout.splitlines()
    assert [line.split()[0] for line in mail[1:]] == ["cli-1", "cli-2"]
    shown = run_cli("schedules", "show", "cli-2", env=env)
    assert shown.returncode == 0 and "status:     active" in shown.stdout
    assert f"next run:   {later:%Y-%m-%dT%H:%M:%S}.000Z" in shown.stdout
    assert "runs: none yet" in shown.stdout
    cancelled = run_cli("schedules", "cancel", "cli-2", env=env)
    assert cancelled.stdout.strip() == "cli-2: cancelled"
    assert "cli-2" in run_cli("schedules", "list", "--status", "cancelled", env=env).stdout
    missing = run_cli("schedules", "show", "nope", env=env)
    assert missing.returncode == 1 and "no schedule with id 'nope'" in missing.stderr
    bare = run_cli("schedules", env=env)
    assert bare.returncode == 0 and "list" in bare.stdout and "cancel" in bare.stdout
    assert cronclock.process.stop() == 0
