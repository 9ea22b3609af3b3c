"""Runtime schedules: one-time and recurring calls the application creates through the admin API.

A runtime schedule is a job named `schedule/<id>` that lives in the state store instead of the
job table. It fires exactly like a static job (same headers, outcomes, overlap, catch-up and
claims); one that has no more slots ends `executed` (its last slot was called) or `expired`
(missed beyond its grace, or past `expires_at`), and `DELETE` ends it `cancelled`.

Only what planning needs is held in memory (each active schedule's next slot); its definition
is read from the store when it falls due, so 100,000 schedules fit in a small process.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import ValidationError, field_validator
from structlog.typing import FilteringBoundLogger

from schedule_grammar import Once, ScheduleError

from .config import CallSpec, Job, field_shown, format_seconds
from .state import (
    RUNTIME_PREFIX,
    SqliteStateStore,
    StateStore,
    StoreUnavailable,
)

ScheduleStatus = Literal["active", "executed", "cancelled", "expired"]
Change = Literal["created", "replaced", "unchanged"]
SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_REQUEST_BYTES = 256 * 1024  # a PUT body larger than this is refused before it is parsed
MAX_BATCH_BYTES = 8 * 1024 * 1024  # the same for a batch of up to BATCH_LIMIT schedules


class ScheduleSpec(CallSpec):
    """The body of `PUT /api/schedules/{id}`."""

    group: str | None = None
    expires_at: datetime | None = None  # no slot after this instant; naive: the schedule's zone

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not GROUP.fullmatch(value):
            raise ValueError(
                "use 1-64 letters, digits and . _ : -, starting with a letter or digit"
            )
        return value


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


# RuntimeSchedules.job keeps this many parsed jobs (a batch's worth), then starts afresh.
PARSED_KEPT = 1000

# A batch (POST /api/schedules:batch) holds at most this many schedules.
BATCH_LIMIT = 1000


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
# Stores of one process: memory and SQLite


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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COLUMNS = "id, revision, spec, status, grp, created, updated, anchor, first, finished"
_PURGE_BATCH = 500


def _us(instant: datetime | None) -> int | None:
    return None if instant is None else (instant - _EPOCH) // timedelta(microseconds=1)


def _at(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def _row(row: tuple[Any, ...]) -> ScheduleRecord:
    id, revision, spec, status, group, created, updated, anchor, first, finished = row
    return ScheduleRecord(
        id=id,
        revision=revision,
        spec=spec,
        status=status,
        group=group,
        created=_at(created) or _EPOCH,
        updated=_at(updated) or _EPOCH,
        anchor=_at(anchor) or _EPOCH,
        first=_at(first),
        finished=_at(finished),
    )


class SqliteSchedules:
    """Runtime schedules in the state file's `schedules` table. Every change is committed
    before it is acknowledged; a file that refuses writes refuses the change (503)."""

    def __init__(self, state: SqliteStateStore) -> None:
        self._state = state
        self._lock = threading.Lock()  # one change at a time: read, decide, write
        self._active: int | None = None

    def _write(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Committed in one transaction before it returns, or StoreUnavailable."""
        self._state.write(list(statements), wait=True)
        if (problem := self._state.problem()) is not None:
            raise StoreUnavailable(problem)

    def _count(self) -> int:
        if self._active is None:
            self._active = self._state.read(
                "SELECT COUNT(*) FROM schedules WHERE status = 'active'"
            )[0][0]
        return self._active

    def put_schedules(
        self, puts: Sequence[Put], *, now: datetime, limit: int
    ) -> list[tuple[ScheduleRecord, Change]]:
        with self._lock:
            existing = self.get_schedules(put.id for put in puts)
            decided, adds = decide_puts(existing, puts, now=now, active=self._count(),
                                        limit=limit)  # fmt: skip
            changed = [record for record, change in decided if change != "unchanged"]
            if changed:  # one transaction, one commit: all or none
                self._write(*[
                    (f"INSERT OR REPLACE INTO schedules ({_COLUMNS}) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (record.id, record.revision, record.spec, record.status, record.group,
                      _us(record.created), _us(record.updated), _us(record.anchor),
                      _us(record.first), None))
                    for record in changed
                ])  # fmt: skip
                self._active = self._count() + adds
        return decided

    def get_schedule(self, id: str) -> ScheduleRecord | None:
        rows = self._state.read(f"SELECT {_COLUMNS} FROM schedules WHERE id = ?", (id,))
        return _row(rows[0]) if rows else None

    def get_schedules(self, ids: Iterable[str]) -> dict[str, ScheduleRecord]:
        wanted = list(ids)
        found: dict[str, ScheduleRecord] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._state.read(
                f"SELECT {_COLUMNS} FROM schedules WHERE id IN ({marks})", tuple(chunk)
            ):
                found[row[0]] = _row(row)
        return found

    def list_schedules(
        self, *, status: ScheduleStatus | None, group: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        where, params = ["id > ?"], [after]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if group is not None:
            where.append("grp = ?")
            params.append(group)
        rows = self._state.read(
            f"SELECT {_COLUMNS} FROM schedules WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*params, limit),
        )
        return [_row(row) for row in rows]

    def cancel_schedule(self, id: str, now: datetime) -> ScheduleRecord | None:
        with self._lock:
            record = self.get_schedule(id)
            if record is None or record.status != "active":
                return record
            self._write(
                (
                    "UPDATE schedules SET status = 'cancelled', updated = ?, finished = ? "
                    "WHERE id = ?",
                    (_us(now), _us(now), id),
                )
            )
            self._active = self._count() - 1
        return replace(record, status="cancelled", updated=now, finished=now)

    def finish_schedule(
        self, id: str, revision: int, status: ScheduleStatus, now: datetime
    ) -> bool:
        with self._lock:
            record = self.get_schedule(id)
            if record is None or record.revision != revision or record.status != "active":
                return False
            self._write(
                (
                    "UPDATE schedules SET status = ?, updated = ?, finished = ? WHERE id = ?",
                    (status, _us(now), _us(now), id),
                )
            )
            self._active = self._count() - 1
        self._state.forget(RUNTIME_PREFIX + id)
        return True

    def active_plan(self) -> Iterator[tuple[str, datetime, datetime | None]]:
        rows = self._state.read(
            "SELECT id, anchor, first FROM schedules WHERE status = 'active' ORDER BY id"
        )
        return ((id, _at(anchor) or _EPOCH, _at(first)) for id, anchor, first in rows)

    def group_counts(self) -> dict[str | None, tuple[int, int]]:
        counts: dict[str | None, tuple[int, int]] = {}
        for group, active, total in self._state.read(
            "SELECT grp, SUM(status = 'active'), COUNT(*) FROM schedules GROUP BY grp"
        ):
            counts[group] = (active, total - active)
        return counts

    def purge_schedules(self, before: datetime) -> list[str]:
        ids = [
            id
            for (id,) in self._state.read(
                "SELECT id FROM schedules WHERE finished IS NOT NULL AND finished < ? LIMIT ?",
                (_us(before), _PURGE_BATCH),
            )
        ]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        names = tuple(RUNTIME_PREFIX + id for id in ids)
        self._state.write(
            [
                (f"DELETE FROM schedules WHERE id IN ({marks})", tuple(ids)),
                (f"DELETE FROM jobs WHERE name IN ({marks})", names),
                (f"DELETE FROM runs WHERE job IN ({marks})", names),
            ],
            wait=True,
        )
        for name in names:
            self._state.forget(name)
        return ids

    def watch(self, on_change: Callable[[list[str]], None]) -> None:
        return None

    def close(self) -> None:
        return None


# -------------------------------------------------------------------------------------------
# The service the admin API and the clock use


class ScheduleInvalid(ValueError):
    """A PUT body that cannot become a schedule; the message names the field (422)."""


# What one of several single PUTs stored together came to (RuntimeSchedules.put_each).
PutOutcome = tuple[ScheduleRecord, Change] | ScheduleInvalid | LimitReached | StoreUnavailable


@dataclass(frozen=True, slots=True, kw_only=True)
class Validated:
    spec: ScheduleSpec
    anchor: datetime
    first: datetime | None


def job_name(id: str) -> str:
    return RUNTIME_PREFIX + id


class RuntimeSchedules:
    """Validation, limits and retention of runtime schedules, over a ScheduleStore."""

    def __init__(
        self,
        store: ScheduleStore,
        *,
        timezone: str = "UTC",
        limit: int = 100_000,
        retention: float = 7 * 86400.0,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.store = store
        self._log = log
        self._timezone = timezone
        self.limit = limit
        self.retention = timedelta(seconds=retention)
        self._parsed: dict[tuple[str, int, str, datetime], Job] = {}  # by job()

    # -- validation -------------------------------------------------------------------------

    def validate(self, id: str, body: Any, now: datetime) -> Validated:
        if not SCHEDULE_ID.fullmatch(id):
            raise ScheduleInvalid(
                f"id {id!r}: use 1-128 letters, digits and . _ : -, starting with a letter or digit"
            )
        if not isinstance(body, dict):
            raise ScheduleInvalid("the body must be a JSON object with at least schedule, endpoint")
        try:
            spec = ScheduleSpec.model_validate(body)
        except ValidationError as error:
            detail = error.errors()[0]
            where = ".".join(str(part) for part in detail["loc"]) or "body"
            message = str(detail["msg"]).removeprefix("Value error, ")
            if detail["type"] == "extra_forbidden":
                message = f"unknown field; fields are {', '.join(ScheduleSpec.model_fields)}"
            field = str(detail["loc"][0]) if detail["loc"] else ""
            shown = field_shown(field, detail["input"]) if detail["type"] != "missing" else ""
            raise ScheduleInvalid(f"{where}{shown}: {message}") from None
        job = self._job(id, spec, revision=0, anchor=now)
        try:
            return self._first(spec, job, now)
        except ScheduleError as error:  # a schedule whose next fire cannot be computed
            raise ScheduleInvalid(f"schedule: {error}") from None

    def _first(self, spec: ScheduleSpec, job: Job, now: datetime) -> Validated:
        anchor = now
        if isinstance(job.schedule, Once):
            at = job.schedule.next_after(_EPOCH)
            if at is not None and at <= now:
                if now - at > timedelta(seconds=spec.misfire_grace):
                    raise ScheduleInvalid(
                        f"schedule={spec.schedule!r}: {at:%Y-%m-%dT%H:%M:%SZ} is more than "
                        f"misfire_grace ({format_seconds(spec.misfire_grace)}) in the past; "
                        "it would never fire"
                    )
                anchor = at - timedelta(microseconds=1)  # a moment ago, within grace: now
        if job.ends is not None and job.ends <= now:
            raise ScheduleInvalid(f"expires_at={spec.expires_at}: is not in the future")
        first = job.next_slot(anchor)
        if first is None:
            raise ScheduleInvalid(
                f"schedule={spec.schedule!r}: no slot before expires_at={spec.expires_at}; "
                "it would never fire"
            )
        return Validated(spec=spec, anchor=anchor, first=first)

    def _job(self, id: str, spec: ScheduleSpec, *, revision: int, anchor: datetime) -> Job:
        zone = spec.timezone or self._timezone
        try:
            schedule = spec.parse_schedule(zone)
        except ScheduleError as error:
            field = "timezone" if "time zone" in str(error) and spec.timezone else "schedule"
            raise ScheduleInvalid(f"{field}: {error}") from None
        ends = spec.expires_at
        if ends is not None and ends.tzinfo is None:
            ends = ends.replace(tzinfo=schedule.tzinfo)
        return Job(
            name=job_name(id),
            schedule=schedule,
            **spec.call_fields(),
            source="admin API",
            schedule_id=id,
            revision=revision,
            group=spec.group,
            anchor=anchor,
            ends=ends.astimezone(UTC) if ends is not None else None,
        )

    # -- changes ----------------------------------------------------------------------------

    def put_many(
        self, items: Sequence[tuple[str, Any]], now: datetime, *, batch: bool = True
    ) -> list[tuple[ScheduleRecord, Change]]:
        """Validate every one, then store them all or none (one transaction or script):
        ScheduleInvalid, LimitReached or StoreUnavailable. In a batch an error names the
        schedule's index and id."""
        puts, seen = [], set()
        for index, (id, body) in enumerate(items):
            try:
                if id in seen:
                    raise ScheduleInvalid("this id appears twice in the batch")
                seen.add(id)
                puts.append(self._put(id, body, now))
            except ScheduleInvalid as error:
                if not batch:
                    raise
                raise ScheduleInvalid(f"schedules[{index}] (id {id!r}): {error}") from None
        return self.store.put_schedules(puts, now=now, limit=self.limit)

    def put_each(self, items: Sequence[tuple[str, Any]], now: datetime) -> list[PutOutcome]:
        """Single PUTs that arrived together, each judged as if it came alone, in order, but
        stored in as few transactions as their ids allow: the PUTs up to an id seen again are
        one transaction, so one commit serves them all. A group that would pass the limit is
        stored one by one, so the PUTs before the limit succeed; an invalid one fails alone."""
        outcomes: list[PutOutcome] = [ScheduleInvalid("not stored")] * len(items)
        group: list[tuple[int, Put]] = []

        def store(group: list[tuple[int, Put]]) -> None:
            try:
                stored = self.store.put_schedules([put for _, put in group], now=now,
                                                  limit=self.limit)  # fmt: skip
            except LimitReached as error:
                if len(group) == 1:
                    outcomes[group[0][0]] = error
                    return
                for one in group:
                    store([one])
                return
            except StoreUnavailable as error:
                for index, _ in group:
                    outcomes[index] = error
                return
            for (index, _), outcome in zip(group, stored, strict=True):
                outcomes[index] = outcome

        for index, (id, body) in enumerate(items):
            try:
                put = self._put(id, body, now)
            except ScheduleInvalid as error:
                outcomes[index] = error
                continue
            if any(other.id == id for _, other in group):
                store(group)
                group = []
            group.append((index, put))
        if group:
            store(group)
        return outcomes

    def _put(self, id: str, body: Any, now: datetime) -> Put:
        checked = self.validate(id, body, now)
        spec = json.dumps(checked.spec.model_dump(mode="json"), sort_keys=True,
                          separators=(",", ":"))  # fmt: skip
        return Put(id=id, spec=spec, group=checked.spec.group, anchor=checked.anchor,
                   first=checked.first)  # fmt: skip

    def job(self, record: ScheduleRecord) -> Job:
        """The job a stored schedule runs as. The last few are kept: the answer to a PUT and
        the loop planning it then share one parse."""
        key = (record.id, record.revision, record.spec, record.anchor)
        if (job := self._parsed.get(key)) is None:
            spec = ScheduleSpec.model_validate_json(record.spec)
            job = self._job(record.id, spec, revision=record.revision, anchor=record.anchor)
            if len(self._parsed) >= PARSED_KEPT:
                self._parsed.clear()
            self._parsed[key] = job
        return job

    def jobs(self, ids: Iterable[str]) -> dict[str, Job]:
        """The jobs of the active schedules among `ids` (by id). One whose stored definition
        no longer validates (a time zone gone from tzdata, say) is logged and left out."""
        jobs = {}
        for id, record in self.store.get_schedules(ids).items():
            if record.status != "active":
                continue
            try:
                jobs[id] = self.job(record)
            except ValueError as error:
                if self._log is not None:
                    self._log.error("stored schedule unusable; not fired",
                                    job=record.job_name, error=str(error))  # fmt: skip
        return jobs

    def finish(self, job: Job, status: ScheduleStatus, now: datetime) -> bool:
        assert job.schedule_id is not None
        return self.store.finish_schedule(job.schedule_id, job.revision, status, now)

    def purge(self, now: datetime) -> list[str]:
        """Ended schedules older than the retention, deleted (at most a batch per call)."""
        return self.store.purge_schedules(now - self.retention)
