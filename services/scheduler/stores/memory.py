"""`memory://`: job state, run history and runtime schedules in process memory, lost on
restart (tests, demos). One process: it always leads (coordination.Solo).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from .protocols import (
    RUNTIME_PREFIX,
    Change,
    JobState,
    Put,
    Refusal,
    RunRecord,
    ScheduleRecord,
    ScheduleStatus,
    StateStore,
    apply_outcome,
    decide_puts,
    interrupted,
    paused_as,
)


class MemoryStateStore:
    """State kept in process memory (`memory://`): lost on restart, for tests and demos."""

    def __init__(self, *, max_runs: int = 1000, max_age: timedelta = timedelta(days=30)) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        self._runs: dict[str, deque[RunRecord]] = {}
        self._in_flight: dict[str, tuple[str, datetime, datetime]] = {}  # key -> job, slot, since
        self._max_runs = max_runs
        self._max_age = max_age

    def job_state(self, job: str) -> JobState:
        with self._lock:
            return self._jobs.get(job, JobState())

    def job_states(self) -> dict[str, JobState]:
        with self._lock:
            return dict(self._jobs)

    def put(self, job: str, state: JobState) -> None:
        with self._lock:
            self._jobs[job] = state

    def advance(self, job: str, slot: datetime) -> None:
        with self._lock:
            self._advance(job, slot)

    def _advance(self, job: str, slot: datetime) -> JobState:
        state = self._jobs.get(job, JobState())
        if state.last_slot is None or slot > state.last_slot:
            state = self._jobs[job] = replace(state, last_slot=slot)
        return state

    def mark_started(self, slots: Iterable[tuple[str, datetime, str]]) -> dict[str, Refusal]:
        with self._lock:
            for job, slot, key in slots:
                self._advance(job, slot)
                self._in_flight[key] = (job, slot, datetime.now(UTC))
        return {}

    def claim(self, job: str, key: str) -> Refusal | None:
        return None

    def refresh(self) -> None:
        return None

    def mark_finished(self, job: str, key: str) -> None:
        with self._lock:
            self._in_flight.pop(key, None)

    def in_flight(self) -> dict[str, tuple[str, datetime, datetime]]:
        """key -> (job, slot, since) of the calls started and not finished."""
        with self._lock:
            return dict(self._in_flight)

    def recover_interrupted(self, now: datetime) -> list[RunRecord]:
        with self._lock:
            left, self._in_flight = self._in_flight, {}
        records = [interrupted(job, slot, key, now) for key, (job, slot, _) in left.items()]
        for record in records:
            self.record_run(record)
        return records

    def record_run(self, record: RunRecord, *, keep: bool = True) -> None:
        """Apply the record to the job's state and, with `keep`, add it to the history."""
        with self._lock:
            if keep:
                history = self._runs.setdefault(record.job, deque(maxlen=self._max_runs))
                history.append(record)
                horizon = record.started - self._max_age
                while history and history[0].started < horizon:
                    history.popleft()
            self._jobs[record.job] = apply_outcome(self._jobs.get(record.job, JobState()), record)

    def runs(self, job: str, limit: int = 50) -> list[RunRecord]:
        with self._lock:
            history = list(self._runs.get(job, ()))
        return history[::-1][:limit]

    def set_paused(self, job: str, paused: bool, reason: str | None = None) -> None:
        with self._lock:
            self._jobs[job] = paused_as(self._jobs.get(job, JobState()), paused, reason)

    def forget(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)
            self._runs.pop(job, None)

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        return None


class MemorySchedules:
    """Runtime schedules in process memory (memory:// state): lost on restart."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._records: dict[str, ScheduleRecord] = {}

    def put_schedules(
        self, puts: Sequence[Put], *, now: datetime, limit: int
    ) -> list[tuple[ScheduleRecord, Change]]:
        with self._lock:
            decided, _ = decide_puts(self._records, puts, now=now, active=self._active(),
                                     limit=limit)  # fmt: skip
            for record, _ in decided:
                self._records[record.id] = record
        return decided

    def _active(self) -> int:
        return sum(record.status == "active" for record in self._records.values())

    def get_schedule(self, id: str) -> ScheduleRecord | None:
        with self._lock:
            return self._records.get(id)

    def get_schedules(self, ids: Iterable[str]) -> dict[str, ScheduleRecord]:
        with self._lock:
            return {id: self._records[id] for id in ids if id in self._records}

    def list_schedules(
        self, *, status: ScheduleStatus | None, group: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        with self._lock:
            chosen = [
                record
                for id, record in sorted(self._records.items())
                if id > after
                and (status is None or record.status == status)
                and (group is None or record.group == group)
            ]
        return chosen[:limit]

    def cancel_schedule(self, id: str, now: datetime) -> ScheduleRecord | None:
        with self._lock:
            record = self._records.get(id)
            if record is not None and record.status == "active":
                record = self._records[id] = replace(
                    record, status="cancelled", updated=now, finished=now
                )
            return record

    def finish_schedule(
        self, id: str, revision: int, status: ScheduleStatus, now: datetime
    ) -> bool:
        with self._lock:
            record = self._records.get(id)
            if record is None or record.revision != revision or record.status != "active":
                return False
            self._records[id] = replace(record, status=status, updated=now, finished=now)
            return True

    def active_plan(self) -> Iterator[tuple[str, datetime, datetime | None]]:
        with self._lock:
            active = [r for r in self._records.values() if r.status == "active"]
        return iter([(r.id, r.anchor, r.first) for r in active])

    def group_counts(self) -> dict[str | None, tuple[int, int]]:
        counts: dict[str | None, tuple[int, int]] = {}
        with self._lock:
            for record in self._records.values():
                active, ended = counts.get(record.group, (0, 0))
                live = record.status == "active"
                counts[record.group] = (active + live, ended + (not live))
        return counts

    def purge_schedules(self, before: datetime) -> list[str]:
        with self._lock:
            gone = [
                id
                for id, record in self._records.items()
                if record.finished is not None and record.finished < before
            ]
            for id in gone:
                del self._records[id]
        for id in gone:
            self._state.forget(RUNTIME_PREFIX + id)
        return gone

    def watch(self, on_change: Callable[[list[str]], None]) -> None:
        return None

    def close(self) -> None:
        return None
