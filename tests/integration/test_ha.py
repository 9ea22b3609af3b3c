"""High availability with real daemons on one real state server, a redis-server or a
PostgreSQL cluster of the test's own: two or three replicas fire every slot exactly once, and
keep that promise through SIGKILL, SIGSTOP, the server restarted, its connections terminated
and random kills."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler.stores.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA
from tests.integration.conftest import Daemon, base_env, run_cli
from tests.support import Arrival, PostgresServer, RedisServer, Target, free_port

TOKEN = "ha-token"
ADMIN = "ha-admin"
JOBS = ("a", "b", "c")
JOBS_TOML = "".join(
    f'[jobs.{name}]\nschedule = "every 1s"\nendpoint = "/{name}"\n' for name in JOBS
)


@dataclass
class Replica:
    daemon: Daemon
    admin: str

    def health(self) -> dict[str, object]:
        try:
            body: dict[str, object] = httpx.get(f"{self.admin}/healthz", timeout=2).json()
            return body
        except httpx.HTTPError:
            return {}

    @property
    def alive(self) -> bool:
        return self.daemon.process.poll() is None

    @property
    def pid(self) -> int:
        return self.daemon.process.pid


class Backend:
    """The state server the replicas share, as the tests drive it."""

    kind: str  # as the daemon names it in messages
    url: str
    keeps_data: bool  # across a restart

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def runs(self, job: str) -> list[tuple[datetime, str, int]]:
        """(slot, outcome, count) of every run record of `job`."""
        ...


class RedisBackend(Backend):
    kind = "Redis"
    keeps_data = False

    def __init__(self, server: RedisServer) -> None:
        self.server, self.url = server, server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()  # it comes back empty: it keeps nothing on disk

    def runs(self, job: str) -> list[tuple[datetime, str, int]]:
        return [
            (_at(int(fields["slot"])), fields["outcome"], int(fields["count"]))
            for _, fields in self.server.client().xrange(f"cronclock:runs:{job}")
        ]


class PostgresBackend(Backend):
    kind = "PostgreSQL"
    keeps_data = True

    def __init__(self, server: PostgresServer) -> None:
        self.server, self.url = server, server.url()

    def stop(self) -> None:
        self.server.stop("immediate")  # as a crash: no shutdown checkpoint

    def start(self) -> None:
        self.server.start()

    def runs(self, job: str) -> list[tuple[datetime, str, int]]:
        rows = self.server.sql(
            f"SELECT slot, outcome, count FROM cronclock.runs WHERE job = '{job}' ORDER BY id"
        )
        return [
            (_at(int(str(slot))), str(outcome), int(str(count))) for slot, outcome, count in rows
        ]


def _at(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


class Cluster:
    def __init__(
        self,
        daemon: Callable[..., Daemon],
        target: Target,
        jobs: Path,
        backend: Backend,
        ttl: float,
    ) -> None:
        self._daemon, self._target, self._jobs, self.backend, self.ttl = (
            daemon, target, jobs, backend, ttl,
        )  # fmt: skip
        self.replicas: list[Replica] = []

    def add(self) -> Replica:
        port = free_port()
        process = self._daemon(
            API_URL=self._target.url, SCHEDULER_API_TOKEN=TOKEN,
            SCHEDULER_JOBS_FILE=str(self._jobs), SCHEDULER_STATE_URL=self.backend.url,
            SCHEDULER_LEASE_TTL_SECONDS=str(self.ttl), SCHEDULER_TICK_SECONDS="1",
            SCHEDULER_ADMIN_BIND=f"127.0.0.1:{port}", SCHEDULER_ADMIN_TOKEN=ADMIN,
        )  # fmt: skip
        replica = Replica(process, f"http://127.0.0.1:{port}")
        self.replicas.append(replica)
        return replica

    def alive(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.alive]

    def leader(self, timeout: float = 20) -> Replica:
        """The replica that says it leads (and that every other live replica names)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            healths = {id(r): r.health() for r in self.alive()}
            leaders = [r for r in self.alive() if healths[id(r)].get("role") == "leader"]
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.1)
        raise AssertionError("no single leader among the replicas")

    def stop_all(self) -> None:
        for replica in self.replicas:
            replica.daemon.stop()


def keys(calls: list[Arrival]) -> list[str]:
    return [call.header("Idempotency-Key") or "" for call in calls]


def duplicates(calls: list[Arrival]) -> dict[str, int]:
    return {key: n for key, n in Counter(keys(calls)).items() if n > 1}


def fencing(call: Arrival) -> int:
    return int(call.header("X-Scheduler-Fencing-Token") or 0)


def slots_of(calls: list[Arrival], job: str) -> list[datetime]:
    return sorted(call.scheduled_for for call in calls if call.path == f"/{job}")


def seconds(first: datetime, last: datetime) -> list[datetime]:
    return [first + timedelta(seconds=n) for n in range(int((last - first).total_seconds()) + 1)]


@pytest.fixture(params=["redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        return RedisBackend(request.getfixturevalue("redis_server"))
    return PostgresBackend(request.getfixturevalue("postgres_server"))


@pytest.fixture
def cluster(
    daemon: Callable[..., Daemon],
    target: Target,
    jobs_file: Callable[[str], Path],
    backend: Backend,
) -> Cluster:
    return Cluster(daemon, target, jobs_file(JOBS_TOML), backend, ttl=3.0)


@pytest.mark.parametrize("replicas", [2, 3])
def test_every_slot_of_every_job_fires_exactly_once(
    replicas: int, cluster: Cluster, target: Target
) -> None:
    cluster.ttl = 5.0  # no failover wanted here: a generous lease on a busy machine
    for _ in range(replicas):
        cluster.add()
    leader = cluster.leader()
    time.sleep(8)
    standbys = [r for r in cluster.alive() if r is not leader]
    for standby in standbys:
        health = standby.health()
        assert health["status"] == "standby" and health["role"] == "standby"
        assert health["leader"] == leader.health()["replica"]
        metrics = httpx.get(f"{standby.admin}/metrics", timeout=2).text
        values = {
            s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
        }
        assert values["cronclock_is_leader"] == 0
        jobs = httpx.get(
            f"{standby.admin}/api/jobs", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=2
        ).json()
        assert {job["name"] for job in jobs} == set(JOBS) and all(job["next_run"] for job in jobs)
    stopping = datetime.now(UTC)
    cluster.stop_all()  # a stopped leader releases its lease: the next may take over
    calls = target.calls()
    assert duplicates(calls) == {}
    assert {fencing(call) for call in calls if call.at < stopping} == {1}  # one leader
    for job in JOBS:
        fired = slots_of(calls, job)
        assert len(fired) >= 6
        assert fired == seconds(fired[0], fired[-1])  # no gaps: every slot, once


def test_a_standby_fires_the_next_slot_within_the_ttl_plus_2s_of_a_kill(
    cluster: Cluster, target: Target
) -> None:
    for _ in range(2):
        cluster.add()
    leader = cluster.leader()
    assert target.wait_for(lambda calls: len(calls) >= 6, timeout=20)
    leader.daemon.signal(signal.SIGKILL)
    killed_at = datetime.now().astimezone()
    leader.daemon.process.wait(10)
    assert target.wait_for(lambda calls: any(fencing(c) == 2 for c in calls), timeout=15)
    first_new = min(call.at for call in target.calls() if fencing(call) == 2)
    assert (first_new - killed_at).total_seconds() <= cluster.ttl + 2
    new_leader = cluster.leader()
    assert new_leader is not leader and new_leader.health()["fencing_token"] == 2
    time.sleep(2)
    cluster.stop_all()
    assert duplicates(target.calls()) == {}


def test_a_leader_stopped_past_its_lease_fires_nothing_the_new_leader_fired(
    cluster: Cluster, target: Target
) -> None:
    for _ in range(2):
        cluster.add()
    old = cluster.leader()
    assert target.wait_for(lambda calls: len(calls) >= 6, timeout=20)
    old.daemon.signal(signal.SIGSTOP)
    assert target.wait_for(lambda calls: any(fencing(c) == 2 for c in calls), timeout=15)
    time.sleep(2)
    old.daemon.signal(signal.SIGCONT)
    resumed_at = datetime.now().astimezone()
    time.sleep(4)
    assert old.health()["role"] == "standby"
    assert cluster.leader() is not old
    cluster.stop_all()
    calls = target.calls()
    assert duplicates(calls) == {}
    late = [c for c in calls if fencing(c) == 1 and c.at > resumed_at - timedelta(seconds=0.5)]
    assert late == []  # the resumed process sent nothing after SIGCONT
    events = {line.get("event") for line in old.daemon.logs()}
    assert "standby: not the leader any more; planning stopped" in events


def test_a_state_server_restart_fires_nothing_twice_and_firing_resumes(
    cluster: Cluster, target: Target, backend: Backend
) -> None:
    for _ in range(2):
        cluster.add()
    leader = cluster.leader()
    assert target.wait_for(lambda calls: len(calls) >= 6, timeout=20)
    backend.stop()
    stopped = datetime.now().astimezone()
    deadline = time.monotonic() + 10
    while (health := leader.health()).get("status") != "unhealthy" and time.monotonic() < deadline:
        time.sleep(0.1)
    where = backend.url.partition("@")[2] or backend.url.partition("://")[2]
    assert f"cannot reach {backend.kind} at " in str(health.get("reason"))
    assert where.partition("/")[0] in str(health.get("reason"))
    time.sleep(1)  # nothing fired once the lease could have ended
    silent_from = stopped + timedelta(seconds=cluster.ttl)
    assert [c for c in target.calls() if c.at > silent_from] == []
    backend.start()
    restarted = datetime.now().astimezone()
    assert target.wait_for(
        lambda calls: sum(1 for c in calls if c.at > restarted + timedelta(seconds=1)) >= 6,
        timeout=20,
    )
    health = cluster.leader().health()
    assert health["status"] == "ok"
    if not backend.keeps_data:  # Redis came back empty: a new term, never back to 1
        assert health["fencing_token"] >= 2
    # PostgreSQL kept the lease row: its holder may go on in the same term (no other replica
    # could take it meanwhile); either way no call ever carries an older token than one before
    tokens = [fencing(call) for call in sorted(target.calls(), key=lambda call: call.at)]
    assert tokens == sorted(tokens)
    time.sleep(1)
    cluster.stop_all()
    assert duplicates(target.calls()) == {}
    events = [line.get("event") for line in leader.daemon.logs()]
    kind = backend.kind
    assert f"cannot reach {kind}; a leader keeps firing only while its lease is certain" in events


def test_connections_terminated_under_the_leader_fire_nothing_twice(
    daemon: Callable[..., Daemon],
    target: Target,
    jobs_file: Callable[[str], Path],
    postgres_server: PostgresServer,
) -> None:
    """pg_terminate_backend of every cronclock connection, again and again: the pool
    reconnects, claims recognise their own resend, firing goes on, nothing fires twice."""
    cluster = Cluster(daemon, target, jobs_file(JOBS_TOML), PostgresBackend(postgres_server), 3.0)
    for _ in range(2):
        cluster.add()
    cluster.leader()
    assert target.wait_for(lambda calls: len(calls) >= 6, timeout=20)
    began = datetime.now().astimezone()
    terminated = 0
    for _ in range(8):
        time.sleep(0.7)
        rows = postgres_server.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'cronclock'"
        )
        terminated += len(rows)
    assert terminated >= 8
    ended = datetime.now().astimezone()
    time.sleep(3)
    cluster.stop_all()
    calls = target.calls()
    assert duplicates(calls) == {}
    for job in JOBS:  # firing went on through it (a takeover may skip a slot or two)
        during = [c for c in calls if c.path == f"/{job}" and began < c.at < ended]
        assert len(during) >= 2


def test_a_schema_from_a_newer_cronclock_stops_the_start_with_exit_2(
    daemon: Callable[..., Daemon],
    target: Target,
    jobs_file: Callable[[str], Path],
    postgres_url: str,
    postgres_cluster: PostgresServer,
) -> None:
    env = {"API_URL": target.url, "SCHEDULER_API_TOKEN": TOKEN,
           "SCHEDULER_JOBS_FILE": str(jobs_file(JOBS_TOML)), "SCHEDULER_STATE_URL": postgres_url}  # fmt: skip
    first = daemon(**env)  # creates the schema, fires
    assert target.wait_for(lambda calls: len(calls) >= 1, timeout=20)
    assert first.stop() == 0
    database = postgres_url.rpartition("/")[2]
    postgres_cluster.sql("UPDATE cronclock.meta SET value = '7' WHERE key = 'version'", database)
    second = daemon(**env)
    assert second.process.wait(30) == 2
    message = second.log_path.read_text()
    assert (
        "schema 'cronclock' is at version 7, from a newer cronclock (this one knows "
        f"{POSTGRES_SCHEMA})" in message
    )
    assert "SCHEDULER_STATE_URL=" in message and "Traceback" not in message


def test_chaos_random_kills_and_restarts(
    cluster: Cluster, target: Target, backend: Backend
) -> None:
    rng = random.Random(20261122)
    for _ in range(3):
        cluster.add()
    cluster.leader()
    deadline = time.monotonic() + 45
    kills = 0
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(2.0, 5.0))
        alive = cluster.alive()
        victim = rng.choice(alive)
        victim.daemon.signal(signal.SIGKILL)
        victim.daemon.process.wait(10)
        kills += 1
        if len(cluster.alive()) < 3:
            time.sleep(rng.uniform(0.0, 2.0))
            cluster.add()
    time.sleep(cluster.ttl + 3)  # the last takeover settles
    cluster.stop_all()
    calls = target.calls()
    assert kills >= 8
    assert duplicates(calls) == {}
    # Every slot from the first to the last is accounted for exactly as catchup=latest says:
    # fired, or recorded missed by the leader that took over (never both), or interrupted.
    for job in JOBS:
        fired = set(slots_of(calls, job))
        missed: set[datetime] = set()
        recorded: set[datetime] = set()  # interrupted (or skipped) slots
        for slot, outcome, count in backend.runs(job):
            if outcome == "missed":
                missed.update(slot - timedelta(seconds=n) for n in range(count))
            else:
                recorded.add(slot)
        assert fired & missed == set()
        last = max(fired | missed | recorded)
        unaccounted = set(seconds(min(fired), last)) - fired - missed - recorded
        assert unaccounted == set()


def test_a_standby_pauses_and_resumes_for_the_leader_and_refuses_triggers(
    cluster: Cluster, target: Target
) -> None:
    for _ in range(2):
        cluster.add()
    leader = cluster.leader()
    standby = next(r for r in cluster.alive() if r is not leader)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert target.wait_for(lambda calls: len(calls) >= 3, timeout=20)

    status = run_cli("status", env=base_env(SCHEDULER_ADMIN_BIND=standby.admin.removeprefix("http://"),
                                            SCHEDULER_ADMIN_TOKEN=ADMIN))  # fmt: skip
    leader_id = leader.health()["replica"]
    assert status.stdout.splitlines()[0] == (
        f"{standby.health()['replica']}: standby, standby; leader {leader_id} (epoch 1)"
    )
    refused = httpx.post(f"{standby.admin}/api/jobs/a/trigger", headers=auth, timeout=5)
    assert refused.status_code == 409 and "standby" in refused.json()["error"]
    for _ in range(50):  # a trigger while the every-second job is in flight is refused (overlap)
        triggered = httpx.post(f"{leader.admin}/api/jobs/a/trigger", headers=auth, timeout=5)
        if triggered.status_code != 409 or "in flight" not in triggered.json()["error"]:
            break
        time.sleep(0.1)
    assert triggered.status_code == 202
    manual = triggered.json()["idempotency_key"]
    assert target.wait_for(lambda calls: manual in keys(calls), timeout=5)

    assert httpx.post(f"{standby.admin}/api/jobs/a/pause", headers=auth, timeout=5).json()["paused"]
    paused_at = datetime.now(UTC)
    time.sleep(3)
    assert [c for c in target.calls("/a") if c.at > paused_at + timedelta(seconds=0.2)] == []
    assert target.calls("/b")[-1].at > paused_at + timedelta(seconds=2)  # the others go on
    httpx.post(f"{standby.admin}/api/jobs/a/resume", headers=auth, timeout=5)
    resumed_at = datetime.now(UTC)
    # the leader sees a resume from a standby at its next lease cycle (ttl/3)
    assert target.wait_for(
        lambda calls: any(c.path == "/a" and c.at > resumed_at for c in calls),
        timeout=cluster.ttl / 3 + 3,
    )
    runs = httpx.get(f"{standby.admin}/api/jobs/a/runs", headers=auth, timeout=5).json()
    assert any(run["key"] == manual for run in runs)  # the leader's history, read on a standby
    cluster.stop_all()
    assert duplicates(target.calls()) == {}
