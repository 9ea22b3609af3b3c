"""What the stores shared by several replicas (Redis, PostgreSQL) have in common: a queue of
writes made off the firing path, the local copy of job state with how a replica's own newer
knowledge is merged into the state it reads back from the server, claims' bookkeeping, and
trouble reports."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Generic, TypeVar, cast

from structlog.typing import FilteringBoundLogger

from ..telemetry import Throttle
from .protocols import (
    COALESCE_SECONDS,
    JobState,
    Refusal,
    RunRecord,
    StoreUnavailable,
    apply_outcome,
    is_runtime,
    paused_as,
)

Op = TypeVar("Op")

WRITE_QUEUE_CAP = 10_000  # writes kept for a server that is away; beyond, the oldest go


class WriteQueue(Generic[Op]):
    """Writes (history, outcomes, finished calls) handed to one writer thread, which waits
    COALESCE_SECONDS so the writes of one beat share a round trip after its calls went out,
    and keeps a batch the server refused, in order, to write when it answers."""

    def __init__(
        self,
        execute: Callable[[list[Op]], bool],
        *,
        name: str,
        on_drop: Callable[[], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._execute = execute  # False: the server refused; the batch is kept
        self._on_drop = on_drop
        self._monotonic = monotonic
        self._queue: list[Op] = []
        self._changed = threading.Condition()
        self._writing = False
        self._closed = False
        self._writer = threading.Thread(target=self._drain_forever, name=name, daemon=True)
        self._writer.start()

    def put(self, op: Op) -> None:
        with self._changed:
            self._queue.append(op)
            if len(self._queue) > WRITE_QUEUE_CAP:
                del self._queue[: len(self._queue) - WRITE_QUEUE_CAP]
                self._on_drop()
            if len(self._queue) == 1:
                self._changed.notify_all()

    def through(self, op: Op) -> None:
        """Write now, after what is queued (order kept); kept in the queue if refused."""
        with self._changed:
            batch, self._queue = [*self._queue, op], []
        if not self._execute(batch):
            with self._changed:
                self._requeue(batch)
                self._changed.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued writes are written; False if they are not within `timeout`."""
        deadline = self._monotonic() + timeout
        with self._changed:
            self._changed.notify_all()
            while self._queue or self._writing:
                left = deadline - self._monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        """Stop the writer; what is still queued is dropped (flush first)."""
        with self._changed:
            self._closed = True
            self._queue.clear()
            self._changed.notify_all()
        self._writer.join(5)

    def _requeue(self, batch: list[Op]) -> None:
        """Put a refused batch back in front, in order (lock held)."""
        self._queue[:0] = batch
        del self._queue[WRITE_QUEUE_CAP:]

    def _drain_forever(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                self._changed.wait(COALESCE_SECONDS)
                batch, self._queue = self._queue, []
                self._writing = True
            ok = self._execute(batch)
            with self._changed:
                self._writing = False
                if not ok:
                    self._requeue(batch)
                self._changed.notify_all()
                if not ok and not self._closed:
                    self._changed.wait(1.0)


def merge_state(local: JobState | None, fetched: JobState) -> JobState:
    """The server's state, except what this replica has newer and not yet written: a later
    last slot (claimed a moment ago) and a later run's outcome (queued)."""
    if local is None:
        return fetched
    merged = fetched
    if local.last_slot is not None and (
        fetched.last_slot is None or local.last_slot > fetched.last_slot
    ):
        merged = replace(merged, last_slot=local.last_slot, uncertain=local.uncertain)
    elif local.uncertain and local.last_slot == fetched.last_slot:
        merged = replace(merged, uncertain=True)
    if local.last_run is not None and (
        fetched.last_run is None or local.last_run > fetched.last_run
    ):
        merged = replace(
            merged,
            last_outcome=local.last_outcome,
            last_status=local.last_status,
            last_run=local.last_run,
            last_success=local.last_success,
            failures=local.failures,
        )
    return merged


class SharedState:
    """The part of a shared StateStore (Redis, PostgreSQL) that is the same for both: the local
    copy of job state that reads come from, what a claim's answers do to it, how state read
    back from the server is merged (and a server that lost its data recognised), and how
    trouble is reported. A back-end supplies `_claim_all` and the reads and writes."""

    kind: str  # "Redis", "PostgreSQL": for messages
    reset_reason: str  # how the server's data loss shows, for the log line

    def __init__(
        self, *, where: str, log: FilteringBoundLogger, monotonic: Callable[[], float]
    ) -> None:
        self._where = where
        self._log = log
        self._lock = threading.Lock()
        self._states: dict[str, JobState] = {}
        self._instance: str | None = None  # the server (its data) this replica has seen
        self._problem: str | None = None
        self._complaints = Throttle(monotonic=monotonic)  # server trouble: once a minute

    # -- the local copy ---------------------------------------------------------------------

    def job_state(self, job: str) -> JobState:
        with self._lock:
            return self._states.get(job, JobState())

    def forget(self, job: str) -> None:
        with self._lock:
            self._states.pop(job, None)

    def _advance_here(self, job: str, slot: datetime) -> None:
        with self._lock:
            state = self._states.get(job, JobState())
            if state.last_slot is None or slot > state.last_slot:
                self._states[job] = replace(state, last_slot=slot, uncertain=False)

    def _apply(self, record: RunRecord) -> JobState:
        with self._lock:
            state = self._states[record.job] = apply_outcome(
                self._states.get(record.job, JobState()), record
            )
        return state

    def _paused_here(self, job: str, paused: bool, reason: str | None) -> None:
        with self._lock:
            self._states[job] = paused_as(self._states.get(job, JobState()), paused, reason)

    def _take(self, fetched: dict[str, JobState]) -> None:
        """Merge states read back for some jobs (runtime schedules' are read with them)."""
        with self._lock:
            for name, state in fetched.items():
                self._states[name] = merge_state(self._states.get(name), state)

    def _take_all(self, instance: str | None, fetched: dict[str, JobState]) -> dict[str, JobState]:
        """Merge every static job's state read back; returns what the server no longer has,
        for the caller to write back. When the server's instance changed (it lost its data),
        what this replica knew is marked uncertain (restored), so no leader catches up from it."""
        reset = self._instance is not None and instance != self._instance
        self._instance = instance
        if reset:
            self._log.error(
                f"{self.kind} lost its state ({self.reset_reason}); slots this replica cannot "
                "be sure about are not fired, and the state it knew is written back as restored",
                **{self.kind.lower(): self._where},
                jobs=len(self._states),
            )
        with self._lock:
            if reset:
                self._states = {n: replace(s, uncertain=True) for n, s in self._states.items()}
            lost = {n: s for n, s in self._states.items() if n not in fetched and not is_runtime(n)}
            runtime = {n: s for n, s in self._states.items() if is_runtime(n)}
            merged = {name: merge_state(self._states.get(name), s) for name, s in fetched.items()}
            self._states = merged | lost | runtime
        return lost

    # -- claims -----------------------------------------------------------------------------

    def _claim_all(self, handed: Sequence[tuple[str, datetime | None, str]]) -> list[str] | None:
        """Claim (job, slot, key) in one atomic step against the lease: per slot 'ok' or a
        Refusal, or only ['not_leader']; None when the server cannot be reached. A slot of
        None is a manual trigger's own key."""
        raise NotImplementedError

    def mark_started(self, slots: Iterable[tuple[str, datetime, str]]) -> dict[str, Refusal]:
        handed = list(slots)
        if not handed:
            return {}
        results = self._claim_all(list(handed))
        if results is None:
            return {key: "unavailable" for _, _, key in handed}
        if results == ["not_leader"]:
            return {key: "not_leader" for _, _, key in handed}
        refused: dict[str, Refusal] = {}
        with self._lock:
            for (job, slot, key), result in zip(handed, results, strict=True):
                state = self._states.get(job, JobState())
                if state.last_slot is None or slot > state.last_slot:
                    state = replace(state, last_slot=slot, uncertain=False)
                if result != "ok":
                    refused[key] = cast(Refusal, result)
                    state = replace(state, paused=state.paused or result == "paused")
                self._states[job] = state
        return refused

    def claim(self, job: str, key: str) -> Refusal | None:
        results = self._claim_all([(job, None, key)])
        if results is None:
            return "unavailable"
        if results == ["not_leader"]:
            return "not_leader"
        return None if results[0] == "ok" else cast(Refusal, results[0])

    # -- trouble ----------------------------------------------------------------------------

    def problem(self) -> str | None:
        return self._problem

    def _trouble(self, error: Exception) -> StoreUnavailable:
        """Note that the server could not be reached; the exception to raise, if any."""
        self._problem = f"cannot reach {self.kind} at {self._where}: {one_line(error)}"
        self._complain(self._problem)
        return StoreUnavailable(self._problem)

    def _healthy(self) -> None:
        self._problem = None

    def _complain(self, message: str) -> None:
        if self._complaints.ready():
            self._log.error(f"state not written to {self.kind}; kept and retried", error=message)


class FollowsChanges:
    """A shared schedule store's thread that follows changes any replica makes (`_follow`
    calls `on_change(ids)`; an empty list: plan every schedule afresh)."""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def _follow(self, on_change: Callable[[list[str]], None]) -> None:
        raise NotImplementedError

    def watch(self, on_change: Callable[[list[str]], None]) -> None:
        self._watcher = threading.Thread(
            target=self._follow, args=(on_change,), name="schedule-watch", daemon=True
        )
        self._watcher.start()

    def close(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(5)


def one_line(error: Exception) -> str:
    """An error's first line (psycopg's messages carry the server's DETAIL and HINT below)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
