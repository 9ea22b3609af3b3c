"""Runtime schedules: creates per second through the admin API, planning time and memory with
10,000 and 100,000 schedules, and the lateness of a one-time schedule while 10,000 are planned.

Run: python bench/schedules.py [--repeats 3] [--only creates|batch|planning|lateness]

Every figure has its peer measured in the same run: creates/s beside plain GET /healthz
requests/s through the same server; planning and memory beside the same daemon with no
runtime schedules; lateness beside the same probes with nothing else planned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import mkdtemp

import httpx
from _target import BenchTarget, percentiles
from lateness import Cronclock, free_port, rss_mb

from services.scheduler.stores.sqlite import MIGRATIONS, SCHEMA_VERSION

ADMIN = "bench-admin"


def admin_client(port: int) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )


def at(instant: datetime) -> str:
    return f"at {instant:%Y-%m-%dT%H:%M:%S}Z"


# -- creates per second ---------------------------------------------------------------------


def rate(port: int, clients: int, count: int, request: str) -> float:
    """Requests per second from `clients` keep-alive connections, each sending its next request
    when the last is answered. The client writes prepared bytes and reads only the status line
    and Content-Length on one event loop, so it costs a few µs per request and the figure is the
    daemon's (httpx cost ~0.5 ms per request here, as much as the daemon's side)."""
    later = datetime.now(UTC) + timedelta(hours=2)
    per = count // clients
    stamp = time.time_ns()

    def prepared(k: int, n: int) -> bytes:
        if request == "healthz":
            return b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
        body = json.dumps({"schedule": at(later + timedelta(seconds=n)), "endpoint": f"/r/{k}/{n}",
                           "body": {"user": n}, "group": "bench"}).encode()  # fmt: skip
        head = (f"PUT /api/schedules/c{stamp}-{k}-{n} HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        return head.encode() + body

    wanted = b"201" if request == "create" else b"200"
    batches = [[prepared(k, n) for n in range(per)] for k in range(clients)]

    async def client(requests: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for raw in requests:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            answer = await reader.readexactly(length)
            assert status == wanted, (head, answer)
        writer.close()

    async def all_clients() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(client(requests) for requests in batches))
        return per * clients / (time.perf_counter() - began)

    return asyncio.run(all_clients())


def creates(target: BenchTarget, state: str, repeats: int) -> list[str]:
    lines = []
    for clients in (1, 8):
        made, plain = [], []
        for _ in range(repeats):
            port = free_port()
            daemon = Cronclock(target, 1, "daily 04:00", state, admin_port=port)
            made.append(rate(port, clients, 1000, "create"))
            plain.append(rate(port, clients, 1000, "healthz"))
            daemon.stop()
        lines.append(
            f"creates/s, {state}, {clients} client(s): {statistics.median(made):.0f} "
            f"(GET /healthz: {statistics.median(plain):.0f}/s, ratio "
            f"{statistics.median(made) / statistics.median(plain):.2f}); runs: "
            + ", ".join(f"{value:.0f}" for value in made)
        )
        print(lines[-1], flush=True)
    return lines


def batched(port: int, batches: int, size: int = 1000) -> float:
    """Schedules per second created through POST /api/schedules:batch, one client."""
    later = datetime.now(UTC) + timedelta(hours=2)
    stamp = time.time_ns()
    with admin_client(port) as client:
        began = time.perf_counter()
        for b in range(batches):
            items = [{"id": f"b{stamp}-{b}-{n}", "schedule": at(later + timedelta(seconds=n)),
                      "endpoint": f"/r/{b}/{n}", "body": {"user": n}, "group": "bench"}
                     for n in range(size)]  # fmt: skip
            response = client.post("/api/schedules:batch", json={"schedules": items})
            assert response.status_code == 200 and response.json()["created"] == size, response.text
        return batches * size / (time.perf_counter() - began)


def batches(target: BenchTarget, state: str, repeats: int) -> list[str]:
    """Batches of 1,000 beside single PUTs (1 client) on the same daemon, in the same run."""
    batch, single = [], []
    for _ in range(repeats):
        port = free_port()
        daemon = Cronclock(target, 1, "daily 04:00", state, admin_port=port)
        batch.append(batched(port, 10))
        single.append(rate(port, 1, 1000, "create"))
        daemon.stop()
    line = (f"schedules/s, {state}, batches of 1,000 (10 per run): {statistics.median(batch):.0f} "
            f"(single PUTs, 1 client: {statistics.median(single):.0f}/s, ratio "
            f"{statistics.median(batch) / statistics.median(single):.1f}); runs: "
            + ", ".join(f"{value:.0f}" for value in batch))  # fmt: skip
    print(line, flush=True)
    return [line]


# -- planning and memory --------------------------------------------------------------------


def prefilled(count: int, recurring: bool = False) -> Path:
    """A state file holding `count` active schedules due over the next hours (written directly:
    the bench measures planning, not creating)."""
    directory = Path(mkdtemp(prefix="cronclock-bench-"))
    db = sqlite3.connect(directory / "state.db")
    for step in MIGRATIONS:
        db.executescript(step)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    now = datetime.now(UTC)
    us = int(now.timestamp() * 1_000_000)
    rows = []
    for n in range(count):
        first = now.replace(microsecond=0) + timedelta(hours=1, seconds=n % 7200)
        schedule = f"every 2h offset {n % 120}m" if recurring and n % 2 else at(first)
        spec = json.dumps(
            {"body": {"user": n}, "catchup": "latest", "dst_gap": None, "dst_repeat": None,
             "endpoint": f"/api/remind/{n}", "expires_at": None, "group": "bench",
             "headers": {"X-User": str(n)}, "method": "POST", "misfire_grace": 300.0,
             "overlap": "skip", "retries": 0, "schedule": schedule, "timeout": 30.0,
             "timezone": None},
            sort_keys=True, separators=(",", ":"),
        )  # fmt: skip
        rows.append((f"s{n:06d}", 1, spec, "active", "bench", us, us, us,
                     int(first.timestamp() * 1_000_000), None))  # fmt: skip
    db.executemany("INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return directory


def planning(target: BenchTarget, repeats: int) -> list[str]:
    lines = []
    for count in (0, 10_000, 100_000):
        ready, rss = [], []
        for _ in range(repeats):
            directory = prefilled(count)
            daemon = Cronclock(target, 8, "every 1h", "sqlite", directory=directory)
            ready.append(daemon.ready)
            time.sleep(2)
            rss.append(rss_mb(daemon.process.pid))
            daemon.stop()
        lines.append(
            f"{count:>7} one-time schedules: start-up to ready {statistics.median(ready):.2f} s, "
            f"RSS {statistics.median(rss):.1f} MB (runs: "
            + ", ".join(f"{r:.2f} s/{m:.0f} MB" for r, m in zip(ready, rss, strict=True))
            + ")"
        )
        print(lines[-1], flush=True)
    return lines


# -- lateness of a one-time schedule among 10,000 ---------------------------------------------


def probes(target: BenchTarget, planned: int, count: int) -> dict[str, float]:
    """`count` one-time probes, one a second, each created ~2 s ahead, while `planned` other
    schedules (due later) are planned."""
    target.reset()
    port = free_port()
    directory = prefilled(planned) if planned else None
    daemon = Cronclock(target, 1, "daily 04:00", "sqlite", admin_port=port, directory=directory)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    with admin_client(port) as client:
        for n in range(count):
            slot = start + timedelta(seconds=n)
            time.sleep(max(0.0, (slot - timedelta(seconds=2) - datetime.now(UTC)).total_seconds()))
            body = {"schedule": at(slot), "endpoint": "/probe"}
            assert client.put(f"/api/schedules/probe-{n}", json=body).status_code == 201
    time.sleep(2)
    daemon.stop()
    late = [a.at - a.scheduled for a in target.arrivals if a.job.startswith("schedule/probe-")]
    return percentiles(late)


def lateness(target: BenchTarget, repeats: int, count: int) -> list[str]:
    lines = []
    runs: dict[int, list[dict[str, float]]] = {0: [], 10_000: []}
    for _ in range(repeats):
        for planned in runs:
            runs[planned].append(probes(target, planned, count))
    for planned, stats in runs.items():
        lines.append(
            f"one-time probe lateness, {planned:>6} others planned: "
            + "  ".join(
                f"{key}={statistics.median(s[key] for s in stats):.1f}"
                for key in ("n", "p50", "p99", "max")
            )
            + " ms (p99s: "
            + ", ".join(f"{s['p99']:.1f}" for s in stats)
            + ")"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, default=30, help="one-time probes per run")
    parser.add_argument("--redis", default=None, help="also measure creates on this redis:// URL")
    parser.add_argument("--only", choices=["creates", "batch", "planning", "lateness"],
                        default=None)  # fmt: skip
    args = parser.parse_args()
    target = BenchTarget()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", flush=True)  # fmt: skip
    if args.only in (None, "creates"):
        creates(target, "sqlite", args.repeats)
        if args.redis:
            creates(target, args.redis, args.repeats)
    if args.only in (None, "batch"):
        batches(target, "sqlite", args.repeats)
        if args.redis:
            batches(target, args.redis, args.repeats)
    if args.only in (None, "planning"):
        planning(target, args.repeats)
    if args.only in (None, "lateness"):
        lateness(target, args.repeats, args.probes)
    target.stop()


if __name__ == "__main__":
    main()
