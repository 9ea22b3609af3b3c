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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError, field_validator
from structlog.typing import FilteringBoundLogger

from schedule_grammar import Once, ScheduleError

from .config import CallSpec, Job, field_shown, format_seconds
from .stores.protocols import (
    RUNTIME_PREFIX,
    Change,
    LimitReached,
    Put,
    ScheduleRecord,
    ScheduleStatus,
    ScheduleStore,
    StoreUnavailable,
)

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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# RuntimeSchedules.job keeps this many parsed jobs (two batches' worth), then starts afresh.
PARSED_KEPT = 2000

# A batch (POST /api/schedules:batch) holds at most this many schedules.
BATCH_LIMIT = 1000


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
    job: Job  # as parsed here (revision 0): what is stored runs as this, once stored


def _parse_key(record: ScheduleRecord) -> tuple[str, int, str, datetime]:
    return (record.id, record.revision, record.spec, record.anchor)


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
        return Validated(spec=spec, anchor=anchor, first=first, job=job)

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
        stored = self.store.put_schedules([put for put, _ in puts], now=now, limit=self.limit)
        self._parsed_as(stored, [job for _, job in puts])
        return stored

    def put_each(self, items: Sequence[tuple[str, Any]], now: datetime) -> list[PutOutcome]:
        """Single PUTs that arrived together, each judged as if it came alone, in order, but
        stored in as few transactions as their ids allow: the PUTs up to an id seen again are
        one transaction, so one commit serves them all. A group that would pass the limit is
        stored one by one, so the PUTs before the limit succeed; an invalid one fails alone."""
        outcomes: list[PutOutcome] = [ScheduleInvalid("not stored")] * len(items)
        group: list[tuple[int, tuple[Put, Job]]] = []

        def store(group: list[tuple[int, tuple[Put, Job]]]) -> None:
            try:
                stored = self.store.put_schedules([put for _, (put, _) in group], now=now,
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
            self._parsed_as(stored, [job for _, (_, job) in group])
            for (index, _), outcome in zip(group, stored, strict=True):
                outcomes[index] = outcome

        for index, (id, body) in enumerate(items):
            try:
                put = self._put(id, body, now)
            except ScheduleInvalid as error:
                outcomes[index] = error
                continue
            if any(other.id == id for _, (other, _) in group):
                store(group)
                group = []
            group.append((index, put))
        if group:
            store(group)
        return outcomes

    def _put(self, id: str, body: Any, now: datetime) -> tuple[Put, Job]:
        checked = self.validate(id, body, now)
        spec = json.dumps(checked.spec.model_dump(mode="json"), sort_keys=True,
                          separators=(",", ":"))  # fmt: skip
        put = Put(id=id, spec=spec, group=checked.spec.group, anchor=checked.anchor,
                  first=checked.first)  # fmt: skip
        return put, checked.job

    def _parsed_as(self, stored: list[tuple[ScheduleRecord, Change]], jobs: list[Job]) -> None:
        """What was just stored runs as it was parsed to validate it: job(record) finds it
        (the loop plans it, the answer shows it) without parsing the stored JSON again."""
        for (record, _), job in zip(stored, jobs, strict=True):
            self._keep(record, replace(job, revision=record.revision, anchor=record.anchor))

    def job(self, record: ScheduleRecord) -> Job:
        """The job a stored schedule runs as. The last few are kept: the answer to a PUT and
        the loop planning it then share one parse."""
        if (job := self._parsed.get(_parse_key(record))) is None:
            spec = ScheduleSpec.model_validate_json(record.spec)
            job = self._job(record.id, spec, revision=record.revision, anchor=record.anchor)
            self._keep(record, job)
        return job

    def _keep(self, record: ScheduleRecord, job: Job) -> None:
        if len(self._parsed) >= PARSED_KEPT:
            self._parsed.clear()
        self._parsed[_parse_key(record)] = job

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
