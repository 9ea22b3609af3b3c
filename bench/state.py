"""State write cost per fire: SQLite store beside memory://, median of repeats.

Run: python bench/state.py [--fires 2000] [--repeats 5]
A fire costs the store: mark_started (waits for its commit: the slot is on disk before the
call), then record_run and mark_finished after the call (queued; committed by the writer
thread in shared transactions). Reported: the caller's cost per fire, and the time until
everything is on disk (flush) per fire.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.stores.protocols import RunRecord, StateStore
from services.scheduler.stores.sqlite import SqliteStateStore

T = datetime(2026, 11, 22, tzinfo=UTC)


def one_run(store: StateStore, fires: int) -> tuple[float, float]:
    began = time.perf_counter()
    for index in range(fires):
        slot = T + timedelta(seconds=index)
        key = f"job-{index % 10}@{index}"
        store.mark_started([(f"job-{index % 10}", slot, key)])
        store.record_run(
            RunRecord(
                job=f"job-{index % 10}",
                slot=slot,
                key=key,
                attempt=1,
                started=slot,
                outcome="success",
                duration=0.002,
                status=200,
            )
        )
        store.mark_finished(f"job-{index % 10}", key)
    caller = time.perf_counter() - began
    if isinstance(store, SqliteStateStore):
        store.flush()
    return caller / fires * 1e6, (time.perf_counter() - began) / fires * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fires", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    log = structlog.get_logger()
    rows = {"memory://": [], "sqlite (WAL)": []}
    for _ in range(args.repeats):
        rows["memory://"].append(one_run(MemoryStateStore(), args.fires))
        with tempfile.TemporaryDirectory() as directory:
            store = SqliteStateStore(Path(directory) / "state.db", log=log)
            rows["sqlite (WAL)"].append(one_run(store, args.fires))
            store.close()
    print(f"{args.fires} fires x {args.repeats} repeats; median microseconds per fire")
    print(f"{'store':<16}{'caller':>10}{'on disk':>10}")
    for name, values in rows.items():
        caller = statistics.median(v[0] for v in values)
        disk = statistics.median(v[1] for v in values)
        print(f"{name:<16}{caller:>10.1f}{disk:>10.1f}")


if __name__ == "__main__":
    main()
