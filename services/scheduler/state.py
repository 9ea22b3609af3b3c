"""What cronclock remembers: per-job state and run history, behind the StateStore protocol."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, Protocol

Outcome = Literal["success", "busy", "failed", "skipped_overlap", "missed", "interrupted"]
OUTCOMES: tuple[Outcome, ...] = (
    "success",
    "busy",
    "failed",
    "skipped_overlap",
    "missed",
    "interrupted",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One attempt of one slot (or a note about slots that did not run: missed, skipped)."""

    job: str
    slot: datetime  # the slot's nominal time (for a manual trigger: when it was asked for)
    key: str  # the Idempotency-Key sent
    attempt: int
    started: datetime
    outcome: Outcome
    duration: float | None = None
    status: int | None = None
    error: str | None = None
    count: int = 1  # for `missed`: how many slots this record stands for


@dataclass(frozen=True, slots=True, kw_only=True)
class JobState:
    last_slot: datetime | None = None  # the latest slot handed to dispatch (fired or started)
    last_outcome: Outcome | None = None
    last_status: int | None = None
    last_run: datetime | None = None
    last_success: datetime | None = None
    paused: bool = False


class StateStore(Protocol):
    """Persistence of job state and run history. Implementations are thread-safe."""

    def job_state(self, job: str) -> JobState: ...

    def mark_started(self, job: str, slot: datetime) -> None:
        """Record that `slot` is handed to dispatch, before its call (at-most-once delivery)."""

    def record_run(self, record: RunRecord) -> None: ...

    def runs(self, job: str, limit: int = 50) -> list[RunRecord]:
        """The latest runs of a job, newest first."""
        ...

    def set_paused(self, job: str, paused: bool) -> None: ...

    def close(self) -> None: ...


class MemoryStateStore:
    """State kept in process memory (`memory://`): lost on restart, for tests and demos."""

    def __init__(self, *, max_runs: int = 1000, max_age: timedelta = timedelta(days=30)) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        self._runs: dict[str, deque[RunRecord]] = {}
        self._max_runs = max_runs
        self._max_age = max_age

    def job_state(self, job: str) -> JobState:
        with self._lock:
            return self._jobs.get(job, JobState())

    def mark_started(self, job: str, slot: datetime) -> None:
        with self._lock:
            state = self._jobs.get(job, JobState())
            if state.last_slot is None or slot > state.last_slot:
                self._jobs[job] = replace(state, last_slot=slot)

    def record_run(self, record: RunRecord) -> None:
        with self._lock:
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

    def set_paused(self, job: str, paused: bool) -> None:
        with self._lock:
            self._jobs[job] = replace(self._jobs.get(job, JobState()), paused=paused)

    def close(self) -> None:
        return None


def apply_outcome(state: JobState, record: RunRecord) -> JobState:
    """The job state after a run record: skipped and missed slots do not count as runs."""
    if record.outcome in ("skipped_overlap", "missed"):
        return state
    return replace(
        state,
        last_outcome=record.outcome,
        last_status=record.status,
        last_run=record.started,
        last_success=record.started if record.outcome == "success" else state.last_success,
    )


def open_store(url: str, *, max_runs: int, max_age: timedelta) -> StateStore:
    """The store a SCHEDULER_STATE_URL names."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryStateStore(max_runs=max_runs, max_age=max_age)
    raise NotImplementedError(f"state store {scheme!r} is not available in this build")
