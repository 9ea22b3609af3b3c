"""Chaos: random faults against real daemons for N minutes, then the delivery promise counted.

Two tracks run side by side against one loopback target:
- HA: three replicas on one redis-server (lease TTL 3 s): kill -9 a replica (restarted
  later), SIGSTOP the leader for a while, restart Redis empty, SIGHUP a replica after the
  jobs file changed.
- SQLite: one daemon whose state lives on a 2 MB tmpfs (when one can be mounted; else a
  temporary directory): kill -9 and restart, SIGHUP after a change, the disk filled for a
  few seconds.

Printed: calls, slots fired twice, slots unaccounted (on the grid, neither called nor in the
history), the longest failover (the longest gap in HA calls). HA slots before the last Redis
restart are not counted as unaccounted: their history went with Redis (README: State).

Run: python bench/chaos.py [--minutes 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
from _target import BenchTarget
from ha import RedisProcess
from lateness import free_port

ROOT = Path(__file__).resolve().parents[1]
JOBS = [f"j{n}" for n in range(5)]
ADMIN = "chaos-admin"


def jobs_text(generation: int) -> str:
    return "include_builtin = false\n" + "".join(
        f'[jobs.{name}]\nschedule = "every 1s"\nendpoint = "/{name}"\n'
        f'timeout = "{5 + generation % 7}s"\n'
        for name in JOBS
    )


class Daemon:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.scheduler", "run"], env=self.env, cwd=ROOT,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            if self.stopped:
                self.process.send_signal(signal.SIGCONT)
                self.stopped = False
            self.process.kill()
            self.process.wait(10)

    @property
    def admin(self) -> str:
        return f"http://{self.env['SCHEDULER_ADMIN_BIND']}"

    def role(self) -> str | None:
        try:
            return str(httpx.get(f"{self.admin}/healthz", timeout=1).json().get("role"))
        except (httpx.HTTPError, ValueError):
            return None

    def history(self, job: str) -> list[dict[str, object]]:
        answer = httpx.get(f"{self.admin}/api/jobs/{job}/runs", params={"limit": 1000},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)  # fmt: skip
        answer.raise_for_status()
        return list(answer.json())


def env_for(target: BenchTarget, jobs: Path, state: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "API_URL"))}
    env.update(API_URL=target.url, SCHEDULER_API_TOKEN="chaos", SCHEDULER_JOBS_FILE=str(jobs),
               SCHEDULER_STATE_URL=state, SCHEDULER_TICK_SECONDS="1", SCHEDULER_LOG_FORMAT="json",
               SCHEDULER_ADMIN_BIND=f"127.0.0.1:{free_port()}", SCHEDULER_ADMIN_TOKEN=ADMIN,
               **extra)  # fmt: skip
    return env


def mount_tmpfs(directory: Path) -> bool:
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)],
                          capture_output=True, check=False)  # fmt: skip
    return made.returncode == 0


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def restart_empty(redis: RedisProcess) -> None:
    """Kill redis-server and start it again on the same port, with no data."""
    redis.process.kill()
    redis.process.wait(10)
    binary = shutil.which("redis-server") or "redis-server"
    redis.process = subprocess.Popen(
        [binary, "--port", str(redis.port), "--bind", "127.0.0.1", "--dir", redis.dir,
         "--save", "", "--appendonly", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(250):
        try:
            redis.client.ping()
            return
        except Exception:  # not listening yet
            time.sleep(0.02)


def accounted(job: str, history: list[dict[str, object]]) -> set[int]:
    """Slot times (whole seconds) the history records; `count` slots end at a record's slot."""
    seconds = set()
    for run in history:
        slot = datetime.fromisoformat(str(run["slot"]).replace("Z", "+00:00")).timestamp()
        if str(run["key"]).startswith(f"{job}@manual-"):
            continue
        for back in range(int(str(run["count"]))):
            seconds.add(round(slot) - back)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the daemons' logs")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cronclock-chaos-"))
    target = BenchTarget()
    redis = RedisProcess()
    ha_jobs, sq_jobs = work / "ha.toml", work / "sqlite.toml"
    ha_jobs.write_text(jobs_text(0))
    sq_jobs.write_text(jobs_text(0))
    disk = work / "disk"
    disk.mkdir()
    tmpfs = mount_tmpfs(disk)
    replicas = [Daemon(env_for(target, ha_jobs, redis.url, SCHEDULER_LEASE_TTL_SECONDS="3"),
                       work / f"replica-{n}.log") for n in range(3)]  # fmt: skip
    solo = Daemon(env_for(target, sq_jobs, f"sqlite:///{disk}/state.db"), work / "sqlite.log")
    for daemon in [*replicas, solo]:
        daemon.start()
    faults: Counter[str] = Counter()
    generation = 0
    last_redis_restart = 0.0
    begun = time.time()
    end = begun + args.minutes * 60
    try:
        time.sleep(5)
        while time.time() < end:
            time.sleep(rng.uniform(3, 8))
            fault = rng.choice(["kill", "stop", "redis", "reload", "sqlite-kill",
                                "sqlite-reload", "disk-full"])  # fmt: skip
            faults[fault] += 1
            if fault == "kill":
                victim = rng.choice([r for r in replicas if r.alive] or replicas)
                victim.kill()
                time.sleep(rng.uniform(0.5, 3))
                victim.start()
            elif fault == "stop":
                leaders = [r for r in replicas if r.alive and r.role() == "leader"]
                if leaders:
                    leaders[0].send(signal.SIGSTOP)
                    leaders[0].stopped = True
                    time.sleep(rng.uniform(1, 6))
                    leaders[0].send(signal.SIGCONT)
                    leaders[0].stopped = False
            elif fault == "redis":  # right after a slot, as in issue 15.2
                leaders = [r for r in replicas if r.alive and r.role() == "leader"]
                if leaders and rng.random() < 0.5:
                    leaders[0].send(signal.SIGSTOP)
                    leaders[0].stopped = True
                restart_empty(redis)
                last_redis_restart = time.time()
                time.sleep(rng.uniform(3, 6))
                for replica in replicas:
                    if replica.stopped:
                        replica.send(signal.SIGCONT)
                        replica.stopped = False
            elif fault == "reload":
                generation += 1
                ha_jobs.write_text(jobs_text(generation))
                rng.choice([r for r in replicas if r.alive] or replicas).send(signal.SIGHUP)
            elif fault == "sqlite-kill":
                solo.kill()
                time.sleep(rng.uniform(0.2, 2))
                solo.start()
            elif fault == "sqlite-reload":
                generation += 1
                sq_jobs.write_text(jobs_text(generation))
                solo.send(signal.SIGHUP)
            elif fault == "disk-full" and tmpfs:
                fill(disk / "filler")
                time.sleep(rng.uniform(1, 4))
                if rng.random() < 0.5:
                    solo.kill()
                with contextlib.suppress(FileNotFoundError):
                    (disk / "filler").unlink()
                if not solo.alive:
                    solo.start()
        time.sleep(3)
        report(target, replicas, solo, faults, begun, last_redis_restart, tmpfs)
    finally:
        for daemon in [*replicas, solo]:
            daemon.send(signal.SIGCONT)
            daemon.send(signal.SIGTERM)
        for daemon in [*replicas, solo]:
            if daemon.process is not None:
                try:
                    daemon.process.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
        redis.stop()
        if tmpfs:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(
    target: BenchTarget,
    replicas: list[Daemon],
    solo: Daemon,
    faults: Counter[str],
    begun: float,
    last_redis_restart: float,
    tmpfs: bool,
) -> None:
    arrivals = list(target.arrivals)
    counted = Counter((a.fencing > 0, a.job, round(a.scheduled)) for a in arrivals)
    twice = {key: n for key, n in counted.items() if n > 1}
    leader = next((r for r in replicas if r.alive and r.role() == "leader"), None)
    unaccounted = {"ha": 0, "sqlite": 0}
    window = {"ha": max(begun + 5, last_redis_restart + 5), "sqlite": begun + 5}
    stop = time.time() - 3
    for track, daemon in (("ha", leader), ("sqlite", solo)):
        if daemon is None:
            continue
        for job in JOBS:
            seen = {
                round(a.scheduled)
                for a in arrivals
                if a.job == job and (a.fencing > 0) == (track == "ha")
            }
            known = seen | accounted(job, daemon.history(job))
            grid = range(int(window[track]) + 1, int(stop))
            unaccounted[track] += sum(1 for second in grid if second not in known)
    ha_times = sorted(a.at for a in arrivals if a.fencing > 0)
    gap = max((b - a for a, b in itertools.pairwise(ha_times)), default=0.0)
    print(f"faults: {dict(sorted(faults.items()))}  (disk full on tmpfs: {tmpfs})")
    print(f"calls: {len(arrivals)} (HA {len(ha_times)}, SQLite {len(arrivals) - len(ha_times)})")
    print(f"slots fired twice: {len(twice)}")
    print(f"slots unaccounted: HA {unaccounted['ha']} (after the last Redis restart), "
          f"SQLite {unaccounted['sqlite']}")  # fmt: skip
    print(f"longest gap between HA calls (failover): {gap:.2f} s (cadence 1 s)")


if __name__ == "__main__":
    main()
