"""Firing lateness, burst dispatch, idle cost, memory and start-up: cronclock beside APScheduler.

Run: python bench/lateness.py [--duration 20] [--idle 60] [--only NAME]
Needs the bench extra (pip install -e '.[bench]') for the APScheduler 3.x peer.

Every sender runs as its own process against one loopback target (bench/_target.py) that
stamps each request's arrival; lateness = arrival - X-Scheduled-For. Same jobs, 8 connections
(or threads) each. cronclock runs with its default SQLite state store, with its fast path
(the wire: one event loop writing requests built ahead) and, as `cronclock-threads`, with
SCHEDULER_FAST_PATH=false (every call through httpx on the thread pool). APScheduler 3.11 is
the peer; `floor` (bench/peers/floor_run.py) is a minimal raw-socket sender with no scheduler,
the machine's limit for a Python sender. CPU per fire is the daemon's process CPU time over
the run divided by the calls it made (all bookkeeping included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _target import BenchTarget, percentiles

ROOT = Path(__file__).resolve().parent.parent
THREADS = 8
WARMUP = 2.0  # seconds of slots ignored after start


@dataclass
class Result:
    label: str
    stats: dict[str, float]
    extra: str = ""


def _jobs_file(directory: Path, jobs: int, schedule: str) -> Path:
    path = directory / "jobs.toml"
    lines = ["include_builtin = false"]
    for index in range(jobs):
        lines += [f'[jobs."job-{index}"]', f'schedule = "{schedule}"', 'endpoint = "/bench"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_for_line(path: Path, needle: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return time.monotonic()
        time.sleep(0.002)
    raise RuntimeError(f"{needle!r} never appeared in {path}:\n{path.read_text()[-2000:]}")


class Cronclock:
    def __init__(
        self,
        target: BenchTarget,
        jobs: int,
        schedule: str,
        state: str,
        admin_port: int | None = None,
        extra_env: dict[str, str] | None = None,
        wait_ready: bool = True,
        directory: Path | None = None,
    ) -> None:
        self.dir = directory or Path(tempfile.mkdtemp(prefix="cronclock-bench-"))
        self.log = self.dir / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        env.update(
            API_URL=target.url,
            SCHEDULER_API_TOKEN="bench",
            SCHEDULER_JOBS_FILE=str(_jobs_file(self.dir, jobs, schedule)),
            SCHEDULER_STATE_URL=(
                f"sqlite:///{self.dir}/state.db"
                if state == "sqlite"
                else state
                if state.startswith(("redis://", "postgresql://"))
                else "memory://"
            ),
            SCHEDULER_ADMIN_BIND=f"127.0.0.1:{admin_port}" if admin_port else "off",
            SCHEDULER_ADMIN_TOKEN="bench-admin",
            SCHEDULER_MAX_CONCURRENCY=str(THREADS),
            SCHEDULER_LOG_FORMAT="json",
        )
        env.update(extra_env or {})
        self.began = time.monotonic()
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.scheduler", "run"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.ready = (
            _wait_for_line(self.log, '"scheduler ready"') - self.began if wait_ready else math.nan
        )

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class Peer:
    """A sender from bench/peers/ (`script` URL JOBS CADENCE THREADS DURATION [extra ...]),
    running once it prints "ready"."""

    def __init__(self, script: str, target: BenchTarget, jobs: int, cadence: int,
                 duration: float, *extra: str) -> None:  # fmt: skip
        args = [sys.executable, str(ROOT / "bench" / "peers" / script), target.url, str(jobs),
                str(cadence), str(THREADS), str(duration), *extra]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        self.process.wait(120)


def _peer(who: str, target: BenchTarget, jobs: int, cadence: int, duration: float) -> Peer:
    """`apscheduler` (APScheduler 3.x) or `floor` (the raw-socket sender)."""
    script = "apscheduler_run.py" if who == "apscheduler" else "floor_run.py"
    return Peer(script, target, jobs, cadence, duration)


def _daemon(target: BenchTarget, jobs: int, schedule: str, who: str) -> Cronclock:
    """cronclock as `who` names it: cronclock-sqlite|memory (fast path, uvloop where installed),
    cronclock-asyncio (fast path on asyncio's loop), cronclock-threads (no fast path)."""
    if who == "cronclock-asyncio":
        hide = str(ROOT / "bench" / "peers" / "no_uvloop")
        return Cronclock(target, jobs, schedule, "sqlite", extra_env={"PYTHONPATH": hide})
    if who == "cronclock-threads":
        return Cronclock(
            target, jobs, schedule, "sqlite", extra_env={"SCHEDULER_FAST_PATH": "false"}
        )
    return Cronclock(target, jobs, schedule, who.removeprefix("cronclock-"))


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """Each thread's CPU time to the nanosecond (its schedstat; /proc/<pid>/stat counts
    10 ms ticks), by thread id."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds[task.name] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return seconds


def cpu_seconds(pid: int) -> float:
    """The process's CPU time: its live threads' (see thread_cpu_seconds)."""
    return sum(thread_cpu_seconds(pid).values())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lateness(target: BenchTarget, since: float) -> list[float]:
    return [a.at - a.scheduled for a in list(target.arrivals) if a.scheduled >= since]


def steady(target: BenchTarget, jobs: int, duration: float, who: str) -> Result:
    """`jobs` jobs every second for `duration` seconds."""
    target.reset()
    cpu_us = math.nan
    if who in ("apscheduler", "floor"):
        peer = _peer(who, target, jobs, 1, duration + WARMUP)
        since = time.time() + WARMUP
        peer.stop()
    else:
        daemon = _daemon(target, jobs, "every 1s", who)
        time.sleep(WARMUP)
        pid = daemon.process.pid
        since, before, calls = time.time(), cpu_seconds(pid), len(target.arrivals)
        time.sleep(duration)
        used, calls = cpu_seconds(pid) - before, len(target.arrivals) - calls
        cpu_us = used / max(calls, 1) * 1e6
        daemon.stop()
    stats = percentiles(lateness(target, since))
    return Result(f"{jobs} jobs every 1s: {who}", {**stats, "cpu_us_per_fire": cpu_us})


def burst(target: BenchTarget, duration: float, who: str, size: int = 1000) -> Result:
    """`size` jobs due at the same instant, every 10 s: how late the whole burst lands."""
    target.reset()
    if who in ("apscheduler", "floor"):
        peer = _peer(who, target, size, 10, duration + WARMUP)
        since = time.time() + WARMUP
        peer.stop()
    else:
        daemon = _daemon(target, size, "every 10s", who)
        since = time.time() + WARMUP
        time.sleep(duration + WARMUP)
        daemon.stop()
    late = lateness(target, since)
    bursts: dict[float, list[float]] = {}
    for arrival in target.arrivals:
        if arrival.scheduled >= since:
            bursts.setdefault(arrival.scheduled, []).append(arrival.at - arrival.scheduled)
    complete = [max(values) for values in bursts.values() if len(values) == size]
    extra = (
        f"bursts complete={len(complete)}/{len(bursts)}, last call of a burst (median)={statistics.median(complete) * 1000:.0f} ms"
        if complete
        else "no complete burst"
    )
    return Result(f"{size} jobs at one instant: {who}", percentiles(late), extra)


def idle(target: BenchTarget, seconds: float, who: str) -> Result:
    """1,000 hourly jobs, none due: CPU seconds over `seconds`, and resident memory."""
    minute = (datetime.now(UTC).minute + 30) % 60
    if who == "apscheduler":
        peer = Peer("apscheduler_run.py", target, 1000, 3600, seconds + 5, "--idle")
        pid = peer.process.pid
        time.sleep(2)
        before = cpu_seconds(pid)
        time.sleep(seconds)
        used, rss = cpu_seconds(pid) - before, rss_mb(pid)
        peer.stop()
        ready = float("nan")
    else:
        daemon = Cronclock(target, 1000, f"every 1h offset {minute}m", "sqlite")
        pid, ready = daemon.process.pid, daemon.ready
        time.sleep(2)
        before = cpu_seconds(pid)
        time.sleep(seconds)
        used, rss = cpu_seconds(pid) - before, rss_mb(pid)
        daemon.stop()
    return Result(
        f"idle, 1000 hourly jobs, {seconds:g}s: {who}",
        {"cpu_s": used, "rss_mb": rss, "ready_s": ready},
    )


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_load(target: BenchTarget, duration: float, loaded: bool) -> tuple[dict[str, float], str]:
    """10 jobs every 1 s with the admin API on, idle or under 200 requests per second."""
    target.reset()
    port = free_port()
    daemon = Cronclock(target, 10, "every 1s", "sqlite", admin_port=port)
    since = time.time() + WARMUP
    load = None
    if loaded:
        load = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "peers" / "admin_load.py"), f"http://127.0.0.1:{port}",
             "bench-admin", "200", str(duration + WARMUP)], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    time.sleep(duration + WARMUP)
    achieved = load.communicate(timeout=60)[0].strip() if load else ""
    daemon.stop()
    return percentiles(lateness(target, since)), achieved


def startup(target: BenchTarget, repeats: int = 5) -> Result:
    """Spawn to 'scheduler ready' with the 8 built-in-sized table and with 1,000 jobs."""
    small, large = [], []
    for _ in range(repeats):
        daemon = Cronclock(target, 8, "every 1h", "sqlite")
        small.append(daemon.ready)
        daemon.stop()
        daemon = Cronclock(target, 1000, "every 1h", "sqlite")
        large.append(daemon.ready)
        daemon.stop()
    return Result(
        "start-up to ready (median)",
        {"8 jobs s": statistics.median(small), "1000 jobs s": statistics.median(large)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per steady scenario")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle scenario")
    parser.add_argument("--repeats", type=int, default=3, help="runs per steady scenario")
    parser.add_argument(
        "--only", choices=["steady", "burst", "burst10k", "idle", "admin", "startup"], default=None
    )
    parser.add_argument("--who", default="cronclock-sqlite,cronclock-threads,apscheduler,floor",
                        help="senders of the steady and burst scenarios, comma-separated")  # fmt: skip
    args = parser.parse_args()
    target = BenchTarget()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
          f"threads={THREADS}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", flush=True)  # fmt: skip
    results: list[Result] = []

    def show(result: Result) -> None:
        stats = "  ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.stats.items()
        )
        print(f"{result.label:<48} {stats}  {result.extra}", flush=True)
        results.append(result)

    if args.only in (None, "steady"):
        for jobs in (10, 100):
            runs: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.repeats):  # interleaved, so drift hits every peer alike
                for who in args.who.split(","):
                    runs.setdefault(who, []).append(steady(target, jobs, args.duration, who).stats)
            for who, stats in runs.items():
                show(Result(
                    f"{jobs} jobs every 1s: {who}",
                    {key: statistics.median(s[key] for s in stats) for key in ("n", "p50", "p99", "max", "cpu_us_per_fire")},
                    f"(median of {len(stats)} runs; p99s: " + ", ".join(f"{s['p99']:.1f}" for s in stats) + ")",
                ))  # fmt: skip
    if args.only in (None, "burst"):
        for who in args.who.split(","):
            show(burst(target, 25.0, who))
    if args.only in (None, "burst10k"):
        for who in ("cronclock-sqlite", "floor"):
            show(burst(target, 25.0, who, size=10_000))
    if args.only in (None, "idle"):
        for who in ("cronclock", "apscheduler"):
            show(idle(target, args.idle, who))
    if args.only in (None, "admin"):
        runs_by: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        notes = []
        for _ in range(args.repeats):
            for loaded in (False, True):
                stats, achieved = admin_load(target, args.duration, loaded)
                runs_by[loaded].append(stats)
                if achieved:
                    notes.append(achieved)
        for loaded, stats in runs_by.items():
            show(Result(
                f"10 jobs/1s, admin API {'under 200 req/s' if loaded else 'idle'}",
                {key: statistics.median(s[key] for s in stats) for key in ("n", "p50", "p99", "max")},
                "p99s: " + ", ".join(f"{s['p99']:.1f}" for s in stats) + ("; load: " + "; ".join(notes) if loaded else ""),
            ))  # fmt: skip
        ready = []
        for _ in range(5):
            daemon = Cronclock(target, 8, "every 1h", "sqlite", admin_port=free_port())
            ready.append(daemon.ready)
            daemon.stop()
        show(
            Result(
                "start-up to ready with the admin API on (median of 5)",
                {"8 jobs s": statistics.median(ready)},
            )
        )
    if args.only in (None, "startup"):
        show(startup(target))
    (ROOT / "bench" / "last-lateness.json").write_text(
        json.dumps([{"label": r.label, **r.stats, "extra": r.extra} for r in results], indent=1)
    )
    target.stop()


if __name__ == "__main__":
    main()
