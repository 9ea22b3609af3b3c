"""What every back-end implements (memory, SQLite, Redis): the job state and run history
(StateStore), runtime schedules (ScheduleStore) and leadership (Coordinator), and the records
they exchange. Imports nothing of the daemon's, so the loop, the dispatcher, the admin API and
every store can use it without a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, Protocol

Outcome = Literal[
    "success", "busy", "failed", "skipped_overlap", "skipped_claimed", "missed", "interrupted"
]
# Why a slot handed on must not be called: another replica claimed it, the job is paused (as
# the shared store says at that instant), this replica no longer leads, or the store is gone.
Refusal = Literal["taken", "paused", "not_leader", "unavailable", "inactive"]
# Runtime schedules (created through the admin API) run as jobs named `schedule/<id>`; no
# static job name can contain '/'.
RUNTIME_PREFIX = "schedule/"


def is_runtime(job: str) -> bool:
    return job.startswith(RUNTIME_PREFIX)


class StoreUnavailable(Exception):
    """A shared store cannot be reached; the operation did not happen."""


class StoreRefused(Exception):
    """SCHEDULER_STATE_URL names a store this process cannot use (another process holds it,
    it is from a newer cronclock): a configuration error, exit 2."""


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
    # False for an attempt that is retried: only a record that settles its slot counts
    # towards the job's consecutive failures (not stored; history read back settles).
    settles: bool = True
    backfill: bool = False  # fired by a backfill (POST /api/jobs/{name}/backfill)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobState:
    last_slot: datetime | None = None  # the latest slot handled: fired, skipped or missed
    last_outcome: Outcome | None = None
    last_status: int | None = None
    last_run: datetime | None = None
    last_success: datetime | None = None
    paused: bool = False
    # Why the daemon paused it (pause_after_failures, 410 Gone); None for an operator's
    # pause. Cleared by resume.
    pause_reason: str | None = None
    failures: int = 0  # consecutive slots whose final outcome was `failed`
    # Restored by a replica after the shared store (Redis) lost its data: this replica may
    # not know every slot the previous leader fired, so nothing is caught up from it.
    uncertain: bool = False


class StateStore(Protocol):
    """Persistence of job state and run history. Implementations are thread-safe."""

    def job_state(self, job: str) -> JobState: ...

    def advance(self, job: str, slot: datetime) -> None:
        """Record that every slot up to `slot` is handled (fired, skipped or missed)."""

    def mark_started(self, slots: Iterable[tuple[str, datetime, str]]) -> dict[str, Refusal]:
        """Claim and record (job, slot, key) handed to dispatch, durably, before their calls:
        at most once per slot. One call for everything handed on in one beat. Returns the
        keys that must not be called, with the reason (a shared store refuses slots another
        replica claimed); the embedded stores refuse nothing."""
        ...

    def claim(self, job: str, key: str) -> Refusal | None:
        """Claim a manual trigger's own key; None when this process may call it."""
        ...

    def refresh(self) -> None:
        """Re-read job state another process may have written (a shared store only)."""

    def mark_finished(self, job: str, key: str) -> None:
        """The call for `key` is over (whatever its outcome)."""

    def recover_interrupted(self, now: datetime) -> list[RunRecord]:
        """Slots started by a process that died mid-call: recorded `interrupted`, returned."""
        ...

    def record_run(self, record: RunRecord) -> None: ...

    def runs(self, job: str, limit: int = 50) -> list[RunRecord]:
        """The latest runs of a job, newest first."""
        ...

    def set_paused(self, job: str, paused: bool, reason: str | None = None) -> None:
        """Pause (with the daemon's reason, None for an operator's pause) or resume (which
        clears the reason); committed before it returns."""

    def forget(self, job: str) -> None:
        """Drop what is cached in memory about `job` (a runtime schedule that ended); what
        is stored stays."""

    def problem(self) -> str | None:
        """Why the store is degraded (e.g. disk full), or None when healthy."""
        ...

    def close(self) -> None: ...


def apply_outcome(state: JobState, record: RunRecord) -> JobState:
    """The job state after a run record: skipped and missed slots do not count as runs; a
    success ends a run of failures, a failure that settles its slot adds one (busy and
    interrupted slots, and backfills, which re-run the past, leave the count as it is)."""
    if record.outcome in ("skipped_overlap", "missed"):
        return state
    failures = state.failures
    if not record.backfill and record.outcome == "success":
        failures = 0
    elif not record.backfill and record.outcome == "failed" and record.settles:
        failures += 1
    return replace(
        state,
        last_outcome=record.outcome,
        last_status=record.status,
        last_run=record.started,
        last_success=record.started if record.outcome == "success" else state.last_success,
        failures=failures,
    )


def paused_as(state: JobState, paused: bool, reason: str | None) -> JobState:
    """A job's state after a pause (with the daemon's reason) or a resume (which clears the
    reason; the failures in a row go on until a success, see policies.py)."""
    return replace(state, paused=paused, pause_reason=reason if paused else None)


def not_called(
    job: str, slot: datetime, key: str, outcome: Outcome, error: str, now: datetime
) -> RunRecord:
    """The record of a slot that was not called (skipped, missed, interrupted), and why."""
    return RunRecord(
        job=job, slot=slot, key=key, attempt=0, started=now, outcome=outcome, error=error
    )


def interrupted(job: str, slot: datetime, key: str, now: datetime) -> RunRecord:
    return not_called(
        job, slot, key, "interrupted",
        "the process stopped during this call; not called again (at most once per slot)", now,
    )  # fmt: skip


# History and finished-call writes wait this long to share a commit (SQLite, Redis). A process
# killed in that window loses their rows (a finished call is then recorded `interrupted`, never
# re-fired).
COALESCE_SECONDS = 0.25


# -------------------------------------------------------------------------------------------
# Runtime schedules

ScheduleStatus = Literal["active", "executed", "cancelled", "expired"]
Change = Literal["created", "replaced", "unchanged"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRecord:
    """One runtime schedule as stored."""

    id: str
    revision: int  # +1 on every replacement
    spec: str  # the validated body, canonical JSON (equal text: the same schedule)
    status: ScheduleStatus
    group: str | None
    created: datetime
    updated: datetime
    anchor: datetime  # slots count from here: when this revision was armed
    first: datetime | None  # its first slot after `anchor` (planning needs no parse)
    finished: datetime | None  # when it ended (executed, cancelled, expired)

    @property
    def job_name(self) -> str:
        return RUNTIME_PREFIX + self.id


class LimitReached(Exception):
    """SCHEDULER_MAX_RUNTIME_SCHEDULES active schedules exist already."""


def limit_reached(active: int, adds: int, limit: int) -> LimitReached:
    more = "" if adds == 1 else f" and this batch adds {adds}"
    return LimitReached(f"{active} active runtime schedules exist{more}; the limit is {limit}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    """One validated create-or-replace, as it is stored."""

    id: str
    spec: str  # canonical JSON
    group: str | None
    anchor: datetime
    first: datetime | None


class ScheduleStore(Protocol):
    """Where runtime schedules persist: the same place as the job state (SQLite or Redis)."""

    def put_schedules(
        self, puts: Sequence[Put], *, now: datetime, limit: int
    ) -> list[tuple[ScheduleRecord, Change]]:
        """Create or replace each (distinct ids), all or none, committed before it returns;
        the same spec again is a no-op (unless it was cancelled). Raises LimitReached, storing
        nothing, when the active schedules would then be more than `limit`."""
        ...

    def get_schedule(self, id: str) -> ScheduleRecord | None: ...

    def get_schedules(self, ids: Iterable[str]) -> dict[str, ScheduleRecord]: ...

    def list_schedules(
        self, *, status: ScheduleStatus | None, group: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        """Ordered by id, from the first id above `after`."""
        ...

    def cancel_schedule(self, id: str, now: datetime) -> ScheduleRecord | None:
        """active -> cancelled; an ended one is returned as it is; None if unknown."""
        ...

    def finish_schedule(
        self, id: str, revision: int, status: ScheduleStatus, now: datetime
    ) -> bool:
        """active -> `status`, only if still at `revision` (a replacement re-arms it)."""
        ...

    def active_plan(self) -> Iterator[tuple[str, datetime, datetime | None]]:
        """(id, anchor, first) of every active schedule; job state for them is loaded."""
        ...

    def group_counts(self) -> dict[str | None, tuple[int, int]]:
        """Per group (None: no group): how many schedules are active and how many ended."""
        ...

    def purge_schedules(self, before: datetime) -> list[str]:
        """Delete schedules that ended before `before`, with their state and history."""
        ...

    def watch(self, on_change: Callable[[list[str]], None]) -> None:
        """Call `on_change(ids)` when another replica changes schedules (shared stores)."""

    def close(self) -> None: ...


def decide_puts(
    existing: dict[str, ScheduleRecord],
    puts: Sequence[Put],
    *,
    now: datetime,
    active: int,
    limit: int,
) -> tuple[list[tuple[ScheduleRecord, Change]], int]:
    """What a batch of PUTs does to the `existing` records, and how many active schedules it
    adds (the Redis store does the same in a script); LimitReached before anything is
    decided to be written."""
    decided: list[tuple[ScheduleRecord, Change]] = []
    adds = 0
    for put in puts:
        old = existing.get(put.id)
        if old is not None and old.spec == put.spec and old.status != "cancelled":
            decided.append((old, "unchanged"))
            continue
        adds += old is None or old.status != "active"
        record = ScheduleRecord(
            id=put.id, revision=old.revision + 1 if old else 1, spec=put.spec, status="active",
            group=put.group, created=old.created if old else now, updated=now,
            anchor=put.anchor, first=put.first, finished=None,
        )  # fmt: skip
        decided.append((record, "replaced" if old else "created"))
    if adds and active + adds > limit:
        raise limit_reached(active, adds, limit)
    return decided, adds


# -------------------------------------------------------------------------------------------
# Leadership

Role = Literal["solo", "leader", "standby"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Leadership:
    """Who leads, as this replica sees it."""

    role: Role
    identity: str  # this replica
    leader: str | None  # the leader's identity (this replica's when it leads), None if unknown
    epoch: int | None  # the leader's fencing epoch
    problem: str | None  # why coordination is unhealthy (Redis unreachable), None when fine


class Coordinator(Protocol):
    def term(self) -> int | None:
        """The epoch this replica leads in now, None when it may not plan or fire."""
        ...

    def leading(self) -> bool:
        """May this replica send a call now? False before its lease could expire."""
        ...

    def fencing_token(self) -> int | None:
        """X-Scheduler-Fencing-Token for calls (None: not coordinated, header not sent)."""
        ...

    def step_down(self) -> None:
        """The store refused a claim because another replica holds the lease."""

    def status(self) -> Leadership: ...

    def start(self, on_change: Callable[[], None]) -> None:
        """Begin (contending for the lease); `on_change` is called when leadership changes."""

    def stop(self) -> None:
        """Stop, releasing the lease if held."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenState:
    """What SCHEDULER_STATE_URL selects: the stores, the coordinator, how to close them."""

    store: StateStore
    coordinator: Coordinator
    schedules: ScheduleStore
    close: Callable[[], None]
