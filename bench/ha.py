"""High availability on PostgreSQL and Redis: failover time, lateness with coordination beside
SQLite in the same run, and server commands (Redis) or statements (PostgreSQL) per fire.

Run: python bench/ha.py [--only failover|lateness|commands] [--kills 20] [--ttl 15]
                        [--backends postgres,redis]
Starts its own redis-server and PostgreSQL cluster (initdb, pg_ctl on PATH; as root, run as
the postgres user) on free ports in temporary directories; nothing is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import redis
from _target import BenchTarget, percentiles
from lateness import WARMUP, Cronclock, cpu_seconds, free_port, lateness


class RedisProcess:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cronclock-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, decode_responses=True)
        for _ in range(200):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    kind = "redis"

    def reset(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def counters(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def reset_counters(self) -> None:
        self.client.config_resetstat()


class PostgresProcess:
    """A cluster of the benchmark's own, durable as configured by default (fsync on), with
    pg_stat_statements to count what the daemon runs."""

    kind = "postgres"

    def __init__(self) -> None:
        initdb = shutil.which("initdb")
        if initdb is None:
            raise SystemExit("initdb is not on PATH (apt-get install postgresql)")
        bin = Path(initdb).resolve().parent
        self.dir = tempfile.mkdtemp(prefix="cronclock-pg-")
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        data = f"{self.dir}/data"
        subprocess.run([*self.as_postgres, str(bin / "initdb"), "-D", data, "-U", "postgres",
                        "--auth=trust", "--no-instructions"], check=True, capture_output=True)  # fmt: skip
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                   "-c shared_preload_libraries=pg_stat_statements")  # fmt: skip
        self.ctl = [*self.as_postgres, str(bin / "pg_ctl"), "-D", data]
        subprocess.run([*self.ctl, "-l", f"{self.dir}/log", "-w", "-o", options, "start"],
                       check=True, capture_output=True)  # fmt: skip
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.sql("CREATE EXTENSION pg_stat_statements")

    def sql(self, query: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(query)  # type: ignore[call-overload]
            return cursor.fetchall() if cursor.description else []

    def reset(self) -> None:
        self.sql("DROP SCHEMA IF EXISTS cronclock CASCADE")

    def stop(self) -> None:
        subprocess.run([*self.ctl, "-m", "immediate", "stop"], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def counters(self) -> dict[str, int]:
        rows = self.sql(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 48), sum(calls)::bigint "
            "FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat%' GROUP BY 1"
        )
        commits = self.sql("SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'")[
            0
        ][0]
        return {str(name): int(str(n)) for name, n in rows} | {"(transactions)": int(str(commits))}

    def reset_counters(self) -> None:
        self.sql("SELECT pg_stat_statements_reset(), pg_stat_reset()")


Server = RedisProcess | PostgresProcess


def steady(target: BenchTarget, state: str, duration: float) -> dict[str, float]:
    """100 jobs every second for `duration` seconds."""
    target.reset()
    daemon = Cronclock(target, 100, "every 1s", state)
    since = time.time() + WARMUP
    time.sleep(WARMUP)
    cpu = cpu_seconds(daemon.process.pid)
    time.sleep(duration)
    cpu = cpu_seconds(daemon.process.pid) - cpu
    daemon.stop()
    stats = percentiles(lateness(target, since))
    return stats | {"cpu_us_per_fire": cpu / max(1.0, stats["n"]) * 1e6}


def compare_lateness(
    target: BenchTarget, servers: list[Server], repeats: int, duration: float
) -> None:
    by_kind = {server.kind: server for server in servers}
    runs: dict[str, list[dict[str, float]]] = {"sqlite": []} | {kind: [] for kind in by_kind}
    for _ in range(repeats):  # interleaved, so drift hits all alike
        for who in runs:
            if who in by_kind:
                by_kind[who].reset()
            url = by_kind[who].url if who in by_kind else who
            runs[who].append(steady(target, url, duration))
    medians = {}
    for who, stats in runs.items():
        medians[who] = {
            k: statistics.median(s[k] for s in stats)
            for k in ("n", "p50", "p99", "max", "cpu_us_per_fire")
        }
        print(f"100 jobs every 1s, {who:<8}  " + "  ".join(f"{k}={v:.1f}" for k, v in medians[who].items())
              + "   p99s: " + ", ".join(f"{s['p99']:.1f}" for s in stats), flush=True)  # fmt: skip
    for kind in by_kind:
        print(f"{kind} - sqlite: median p99 {medians[kind]['p99'] - medians['sqlite']['p99']:+.1f} ms, "
              f"p50 {medians[kind]['p50'] - medians['sqlite']['p50']:+.1f} ms", flush=True)  # fmt: skip


def commands_per_fire(target: BenchTarget, server: Server, duration: float) -> None:
    server.reset()
    target.reset()
    daemon = Cronclock(target, 100, "every 1s", server.url)
    time.sleep(WARMUP)
    server.reset_counters()
    fired_before = len(target.arrivals)
    time.sleep(duration)
    calls = server.counters()
    fires = len(target.arrivals) - fired_before
    daemon.stop()
    transactions = calls.pop("(transactions)", None)
    total = sum(calls.values())
    top = ", ".join(
        f"{name} {n / fires:.2f}" for name, n in sorted(calls.items(), key=lambda i: -i[1])
    )
    what = "commands" if server.kind == "redis" else "statements"
    extra = "" if transactions is None else f"; transactions per fire {transactions / fires:.2f}"
    print(f"{server.kind} {what} per fire (100 jobs every 1s, {duration:g}s, {fires} fires): "
          f"{total / fires:.2f} in all{extra}; by {what[:-1]}: {top}", flush=True)  # fmt: skip


def failover(target: BenchTarget, server: Server, kills: int, ttl: float) -> None:
    """Two replicas, one job every second; SIGKILL the leader `kills` times."""
    server.reset()
    target.reset()

    def replica() -> tuple[Cronclock, str]:
        port = free_port()
        daemon = Cronclock(target, 1, "every 1s", server.url, admin_port=port, wait_ready=False,
                           extra_env={"SCHEDULER_LEASE_TTL_SECONDS": str(ttl)})  # fmt: skip
        return daemon, f"http://127.0.0.1:{port}"

    def health(admin: str) -> dict[str, object]:
        try:
            body: dict[str, object] = httpx.get(f"{admin}/healthz", timeout=2).json()
            return body
        except (httpx.HTTPError, ValueError):
            return {}

    replicas = [replica(), replica()]
    times = []
    rng = random.Random(6)
    for _ in range(kills):
        deadline = time.monotonic() + ttl * 3 + 30
        leader = None
        while leader is None and time.monotonic() < deadline:
            ready = [(r, health(r[1])) for r in replicas]
            leaders = [(r, h) for r, h in ready if h.get("role") == "leader"]
            if len(leaders) == 1 and all(h.get("status") in ("ok", "standby") for _, h in ready):
                leader = leaders[0]
            else:
                time.sleep(0.1)
        assert leader is not None, "no leader"
        (daemon, _), info = leader
        epoch = int(info["fencing_token"])  # type: ignore[call-overload]
        # a random moment in the renewal cycle, after the leader has fired a slot or two
        time.sleep(rng.uniform(1.5, 1.5 + ttl / 3))
        killed = time.time()
        daemon.process.kill()
        daemon.process.wait(10)
        while not any(a.fencing > epoch for a in list(target.arrivals)):
            if time.time() - killed > ttl * 3 + 30:
                raise RuntimeError("no takeover")
            time.sleep(0.01)
        first = min(a.at for a in list(target.arrivals) if a.fencing > epoch)
        times.append(first - killed)
        print(
            f"  kill {len(times)}: next fire by the new leader after {times[-1]:.2f} s", flush=True
        )
        replicas = [r for r in replicas if r[0] is not daemon] + [replica()]
    for daemon, _ in replicas:
        daemon.stop()
    keys = [(a.job, a.scheduled) for a in target.arrivals]
    print(f"{server.kind} failover, lease TTL {ttl:g}s, {kills} kills: median {statistics.median(times):.2f} s, "
          f"max {max(times):.2f} s, min {min(times):.2f} s; duplicate slots: {len(keys) - len(set(keys))}",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["failover", "lateness", "commands"], default=None)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--ttl", type=float, default=15.0, help="lease TTL for the failover runs")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="postgres,redis")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", flush=True)  # fmt: skip
    target = BenchTarget()
    make = {"postgres": PostgresProcess, "redis": RedisProcess}
    servers: list[Server] = [make[name]() for name in args.backends.split(",")]
    try:
        if args.only in (None, "lateness"):
            compare_lateness(target, servers, args.repeats, args.duration)
        for server in servers:
            if args.only in (None, "commands"):
                commands_per_fire(target, server, args.duration)
            if args.only in (None, "failover"):
                failover(target, server, args.kills, args.ttl)
    finally:
        for server in servers:
            server.stop()
        target.stop()


if __name__ == "__main__":
    main()
