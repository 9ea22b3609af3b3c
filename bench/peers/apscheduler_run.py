"""APScheduler 3.x peer for bench/lateness.py: the same jobs, threads and HTTP client.

python bench/peers/apscheduler_run.py URL JOBS CADENCE_SECONDS THREADS DURATION [--idle]
Each job fires on CronTrigger(second="*/CADENCE") (aligned like cronclock's epoch grid) and
POSTs with X-Scheduled-For = its slot, so the target measures lateness the same way.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime

import httpx
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger


def main() -> None:
    url, jobs, cadence, threads, duration = (
        sys.argv[1],
        *map(int, sys.argv[2:5]),
        float(sys.argv[5]),
    )
    idle = "--idle" in sys.argv
    client = httpx.Client(
        base_url=url,
        limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads),
    )

    def fire(name: str) -> None:
        now = time.time()
        slot = now - (now % cadence)  # the slot this run belongs to (lateness < cadence here)
        stamp = datetime.fromtimestamp(slot, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        client.post("/bench", headers={"X-Scheduled-For": stamp, "X-Scheduler-Job": name})

    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(threads)},
        job_defaults={"coalesce": False, "max_instances": 1, "misfire_grace_time": 30},
        timezone=UTC,
    )
    for index in range(jobs):
        trigger = (
            CronTrigger(minute=(datetime.now(UTC).minute + 30) % 60, second=0, timezone=UTC)
            if idle
            else CronTrigger(second=f"*/{cadence}", timezone=UTC)
        )
        scheduler.add_job(fire, trigger, args=[f"job-{index}"], id=f"job-{index}")
    scheduler.start()
    print("ready", flush=True)
    time.sleep(duration)
    scheduler.shutdown(wait=True)
    client.close()


if __name__ == "__main__":
    main()
