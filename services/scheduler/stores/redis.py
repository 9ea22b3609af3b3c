"""Redis: job state, run history, slot claims, runtime schedules and the leader lease
(DESIGN.md section 6), for several replicas. Imported only for a redis:// or rediss://
SCHEDULER_STATE_URL: the `redis` package is the extra `cronclock[redis]`.

Replicas contend for a lease in Redis. The holder plans; it claims every slot in the same
atomic step that checks it still holds the lease and records the slot started, so no slot is
fired twice even when two replicas both believe they lead. Calls carry the lease's epoch as
X-Scheduler-Fencing-Token. Job state and run history live in Redis, so a new leader continues
where the old one stopped.

Keys, under the namespace `ns` (SCHEDULER_NAMESPACE):

    ns:leader                  "<identity> <random token>", expires after the lease TTL
    ns:epoch                   INCR on every acquisition: the fencing token
    ns:jobs                    set of job names that have state
    ns:job:<job>               hash: last_slot, last_outcome, last_status, last_run,
                               last_success, paused
    ns:claim:<job>:<slot ms>   one slot's claim (a manual trigger: ns:claim:<job>:manual-<uuid>)
    ns:inflight                hash: Idempotency-Key -> "<job> <slot us> <since us>"
    ns:runs:<job>              stream: run history, capped

Runtime schedules (the job of schedule <id> is named `schedule/<id>`; it is not in ns:jobs):

    ns:schedule:<id>           hash: revision, spec, status, group, created, updated, anchor,
                               first, finished
    ns:schedules               sorted set (by id): every schedule
    ns:schedules:status:<s>    sorted set (by id): the schedules in status s
    ns:schedules:group:<g>     sorted set (by id): the schedules of group g
    ns:schedules:ended         sorted set (by end time): ended schedules, for retention
    ns:schedules:groups        set: every group name ever used (counts per group)
    ns:schedules:changes       stream of changed ids: the leader plans what any replica wrote
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.typing import FilteringBoundLogger

from ..config import Settings, redact_url
from ..coordination import Lease, lease_value, replica_identity, store_timeout
from .protocols import (
    RUNTIME_PREFIX,
    Change,
    JobState,
    OpenState,
    Outcome,
    Put,
    RunRecord,
    ScheduleRecord,
    ScheduleStatus,
    interrupted,
    is_runtime,
    limit_reached,
)
from .shared import FollowsChanges, SharedState, WriteQueue

# Records that account for slots not called are written at once, before the next claim can
# advance past them; call outcomes are batched (a leader killed in that window loses them).
_ACCOUNTING = frozenset({"missed", "interrupted", "skipped_claimed"})


# -------------------------------------------------------------------------------------------
# The lease

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local epoch = redis.call('INCR', KEYS[2])
  local floor = tonumber(ARGV[3])
  if epoch <= floor then
    epoch = floor + 1
    redis.call('SET', KEYS[2], epoch)
  end
  return {1, ARGV[1], epoch}
end
return {0, redis.call('GET', KEYS[1]) or '', tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLease(Lease):
    """The leader lease in Redis: `SET NX PX` with a random token, renewed by compare-and-
    extend, released by compare-and-delete, a fencing epoch from `INCR` (the timing is
    coordination.Lease's)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        ttl: float,
        log: FilteringBoundLogger,
        identity: str | None = None,
        value: str | None = None,
        where: str = "redis",
        after_cycle: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            _RedisLeaseRow(client, namespace), ttl=ttl, log=log, identity=identity, value=value,
            where=where, after_cycle=after_cycle, monotonic=monotonic,
        )  # fmt: skip


class _RedisLeaseRow:
    kind = "Redis"
    errors: tuple[type[Exception], ...] = (redis.RedisError,)

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._keys = [f"{namespace}:leader", f"{namespace}:epoch"]
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self, value: str, ttl: float, floor: int) -> tuple[bool, str, int]:
        got, holder, epoch = self._acquire(keys=self._keys, args=[value, round(ttl * 1000), floor])
        return bool(got), str(holder), int(epoch)

    def renew(self, value: str, ttl: float) -> bool:
        return bool(self._renew(keys=self._keys[:1], args=[value, round(ttl * 1000)]))

    def release(self, value: str) -> bool:
        return bool(self._release(keys=self._keys[:1], args=[value]))


# -------------------------------------------------------------------------------------------
# Job state, history and slot claims in Redis

# Checks the lease, then per slot: paused (the slot passes), claimed elsewhere (taken), or
# claimed here now; advances the job's last slot and records the claimed ones in flight.
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'not_leader'} end
local ns, nonce, ttl, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out = {}
for i = 6, #ARGV, 4 do
  local job, slot, suffix, key = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jk = ns .. ':job:' .. job
  local state = redis.call('HMGET', jk, 'paused', 'last_slot')
  local runtime = string.sub(job, 1, 9) == 'schedule/'
  local result = 'ok'
  if runtime and redis.call('HGET', ns .. ':schedule:' .. string.sub(job, 10), 'status')
      ~= 'active' then
    result = 'inactive'
  elseif slot ~= '' and state[1] == '1' then
    result = 'paused'
  else
    local ck = ns .. ':claim:' .. job .. ':' .. suffix
    if not redis.call('SET', ck, nonce, 'NX', 'PX', ttl) and redis.call('GET', ck) ~= nonce then
      result = 'taken'
    end
  end
  if result ~= 'inactive' and slot ~= ''
      and (not state[2] or tonumber(state[2]) < tonumber(slot)) then
    redis.call('HSET', jk, 'last_slot', slot)
    redis.call('HDEL', jk, 'restored')
    if not state[2] and not runtime then redis.call('SADD', ns .. ':jobs', job) end
  end
  if result == 'ok' then
    local at = slot
    if at == '' then at = now end
    redis.call('HSET', KEYS[2], key, job .. ' ' .. at .. ' ' .. now)
  end
  out[#out + 1] = result
end
return out
"""
_ADVANCE = """
local last = redis.call('HGET', KEYS[1], 'last_slot')
if not last or tonumber(last) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'last_slot', ARGV[1])
  redis.call('HDEL', KEYS[1], 'restored')
  if string.sub(ARGV[2], 1, 9) ~= 'schedule/' then redis.call('SADD', KEYS[2], ARGV[2]) end
end
return 1
"""

# Who this Redis is: a random value set once. A replica that saw one value and then finds
# another (or none) knows that Redis lost its data (restarted without persistence, flushed,
# failed over to an empty replica).
_INSTANCE = """
local value = redis.call('GET', KEYS[1])
if value then return value end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(instant: datetime) -> int:
    return (instant - _EPOCH) // timedelta(microseconds=1)


def _dt(value: str | None) -> datetime | None:
    return None if not value else _EPOCH + timedelta(microseconds=int(value))


Op = Callable[[Any], None]  # one queued write, given a pipeline


class RedisStateStore(SharedState):
    """StateStore on Redis, shared by every replica.

    Reads of job state come from a local copy, refreshed from Redis when this replica starts
    leading and on every lease cycle. Slot claims (`mark_started`), manual claims and pauses
    go to Redis at once; history and outcomes are queued and written in batches by a writer
    thread, kept and retried while Redis is away.
    """

    kind = "Redis"
    reset_reason = "its data was reset"

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        lease_value: str,
        claim_ttl: float,
        log: FilteringBoundLogger,
        max_runs: int = 1000,
        max_age: timedelta = timedelta(days=30),
        where: str = "redis",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(where=where, log=log, monotonic=monotonic)
        self._client = client
        self._ns = namespace
        self._lease_key = f"{namespace}:leader"
        self._inflight_key = f"{namespace}:inflight"
        self._lease_value = lease_value
        self._claim_ttl_ms = round(claim_ttl * 1000)
        self._max_runs = max_runs
        self._max_age = max_age
        self._claim = client.register_script(_CLAIM)
        self._advance = client.register_script(_ADVANCE)
        self._instance_script = client.register_script(_INSTANCE)
        self._registered: set[str] = set()  # jobs this process has added to ns:jobs
        self._records = 0
        self._writes: WriteQueue[Op] = WriteQueue(
            self._execute,
            name="redis-writer",
            on_drop=lambda: self._complain("state writes dropped: Redis away too long"),
            monotonic=monotonic,
        )

    # -- keys -------------------------------------------------------------------------------

    def _job_key(self, job: str) -> str:
        return f"{self._ns}:job:{job}"

    def _runs_key(self, job: str) -> str:
        return f"{self._ns}:runs:{job}"

    # -- reads ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pull every job's state from Redis. A job Redis has no record of keeps what this
        replica knew, written back; when Redis lost its data, that knowledge is marked
        uncertain (restored), so no leader catches up from it."""
        try:
            pipe = self._client.pipeline(transaction=False)
            self._instance_script(
                keys=[f"{self._ns}:instance"], args=[secrets.token_hex(8)], client=pipe
            )
            pipe.smembers(f"{self._ns}:jobs")
            instance, members = pipe.execute()
            names = sorted(cast(set[str], members))
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self._job_key(name))
            rows = cast(list[dict[str, str]], pipe.execute())
        except redis.RedisError as error:
            self._trouble(error)
            return
        self._healthy()
        fetched = {name: _job_state(row) for name, row in zip(names, rows, strict=True) if row}
        lost = self._take_all(instance, fetched)
        for name, state in lost.items():
            self._writes.put(_write_state(self._ns, name, state))

    def load_states(self, names: list[str]) -> None:
        """Read the state of these jobs (runtime schedules: not refreshed every cycle)."""
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._job_key(name))
        try:
            rows = cast(list[dict[str, str]], pipe.execute())
        except redis.RedisError as error:
            raise self._trouble(error) from None
        self._take({name: _job_state(row) for name, row in zip(names, rows, strict=True) if row})

    def forget(self, job: str) -> None:
        super().forget(job)
        with self._lock:
            self._registered.discard(job)

    def runs(self, job: str, limit: int = 50) -> list[RunRecord]:
        self.flush(timeout=2.0)
        try:
            entries = cast(
                list[tuple[str, dict[str, str]]],
                self._client.xrevrange(self._runs_key(job), count=limit),
            )
        except redis.RedisError as error:
            raise self._trouble(error) from None
        return [_run_record(job, fields) for _, fields in entries]

    # -- claims (synchronous: a slot is claimed before its call) ----------------------------

    def _claim_all(self, handed: Sequence[tuple[str, datetime | None, str]]) -> list[str] | None:
        args: list[str | int] = []
        for job, slot, key in handed:
            args += [job, "" if slot is None else _us(slot), key.partition("@")[2], key]
        return self._run_claim(args)

    def _run_claim(self, slot_args: list[str | int]) -> list[str] | None:
        try:
            results = self._claim(
                keys=[self._lease_key, self._inflight_key],
                args=[
                    self._lease_value,
                    self._ns,
                    secrets.token_hex(8),  # this claim's own value: a resend is recognised
                    self._claim_ttl_ms,
                    _us(datetime.now(UTC)),
                    *slot_args,
                ],
            )
        except redis.RedisError as error:
            self._trouble(error)
            return None
        self._healthy()
        return [str(result) for result in results]

    # -- writes -----------------------------------------------------------------------------

    def advance(self, job: str, slot: datetime) -> None:
        self._advance_here(job, slot)
        job_key, jobs_key, value = self._job_key(job), f"{self._ns}:jobs", _us(slot)
        self._writes.put(
            lambda pipe: self._advance(keys=[job_key, jobs_key], args=[value, job], client=pipe)
        )

    def mark_finished(self, job: str, key: str) -> None:
        inflight = self._inflight_key
        self._writes.put(lambda pipe: pipe.hdel(inflight, key))

    def recover_interrupted(self, now: datetime) -> list[RunRecord]:
        """Calls a dead leader left in flight, recorded `interrupted` and cleared in one
        transaction: a leader killed in the middle leaves them for the next one."""
        try:
            left = cast(dict[str, str], self._client.hgetall(self._inflight_key))
        except redis.RedisError as error:
            self._trouble(error)
            return []
        if not left:
            return []
        records = []
        for key, value in sorted(left.items(), key=lambda item: item[1]):
            job, slot, _ = value.rsplit(" ", 2)
            records.append(interrupted(job, _dt(slot) or now, key, now))
        try:
            pipe = self._client.pipeline(transaction=True)
            for record in records:
                self._record_op(record)(pipe)
            pipe.hdel(self._inflight_key, *left)
            pipe.execute()
        except redis.RedisError as error:
            self._trouble(error)
            return []
        return records

    def record_run(self, record: RunRecord) -> None:
        op = self._record_op(record)
        if record.outcome in _ACCOUNTING:
            self._writes.through(op)
        else:
            self._writes.put(op)

    def _record_op(self, record: RunRecord) -> Op:
        state = self._apply(record)
        fields = _record_fields(record)
        outcome = _outcome_fields(state)
        runs_key, job_key, jobs_key = (
            self._runs_key(record.job),
            self._job_key(record.job),
            f"{self._ns}:jobs",
        )
        self._records += 1
        horizon = (
            round((record.started - self._max_age).timestamp() * 1000)
            if self._records % 100 == 0
            else None
        )
        max_runs = self._max_runs
        # ns:jobs names it from then on (not a runtime schedule's job: those are planned from
        # the schedules, and ns:jobs is read on every lease cycle)
        register = record.job not in self._registered and not is_runtime(record.job)
        if register:
            self._registered.add(record.job)

        def write(pipe: Any) -> None:
            pipe.xadd(runs_key, fields, maxlen=max_runs, approximate=True)
            if outcome:
                pipe.hset(job_key, mapping=outcome)
            if register:
                pipe.sadd(jobs_key, record.job)
            if horizon is not None:
                pipe.xtrim(runs_key, minid=horizon, approximate=True)

        return write

    def set_paused(self, job: str, paused: bool, reason: str | None = None) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            key = self._job_key(job)
            pipe.hset(key, "paused", int(paused))
            if paused and reason is not None:
                pipe.hset(key, "pause_reason", reason)
            else:
                pipe.hdel(key, "pause_reason")
            pipe.sadd(f"{self._ns}:jobs", job)
            pipe.execute()
        except redis.RedisError as error:
            raise self._trouble(error) from None
        self._healthy()
        self._paused_here(job, paused, reason)

    # -- the writer -------------------------------------------------------------------------

    def _execute(self, batch: list[Op]) -> bool:
        try:
            pipe = self._client.pipeline(transaction=False)
            for op in batch:
                op(pipe)
            pipe.execute()
        except redis.RedisError as error:
            self._trouble(error)
            return False
        self._healthy()
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued writes are in Redis; False if they are not within `timeout`."""
        return self._writes.flush(timeout)

    def close(self) -> None:
        if not self.flush(timeout=5.0):
            self._log.warning("state writes not flushed to Redis at shutdown", redis=self._where)
        self._writes.close()


def _job_state(row: dict[str, str]) -> JobState:
    status = row.get("last_status")
    return JobState(
        last_slot=_dt(row.get("last_slot")),
        last_outcome=cast(Outcome | None, row.get("last_outcome") or None),
        last_status=int(status) if status else None,
        last_run=_dt(row.get("last_run")),
        last_success=_dt(row.get("last_success")),
        paused=row.get("paused") == "1",
        pause_reason=row.get("pause_reason"),
        failures=int(row.get("failures") or 0),
        uncertain=row.get("restored") == "1",
    )


def _outcome_fields(state: JobState) -> dict[str, str | int]:
    fields: dict[str, str | int] = {}
    if state.last_outcome is not None:
        fields["last_outcome"] = state.last_outcome
        fields["failures"] = state.failures
    if state.last_status is not None:
        fields["last_status"] = state.last_status
    if state.last_run is not None:
        fields["last_run"] = _us(state.last_run)
    if state.last_success is not None:
        fields["last_success"] = _us(state.last_success)
    return fields


def _write_state(ns: str, job: str, state: JobState) -> Op:
    fields = _outcome_fields(state) | {"paused": int(state.paused)}
    if state.pause_reason is not None:
        fields["pause_reason"] = state.pause_reason
    if state.last_slot is not None:
        fields["last_slot"] = _us(state.last_slot)
    if state.uncertain:
        fields["restored"] = 1

    def write(pipe: Any) -> None:
        pipe.hset(f"{ns}:job:{job}", mapping=fields)
        pipe.sadd(f"{ns}:jobs", job)

    return write


def _record_fields(record: RunRecord) -> dict[str, str | int | float]:
    fields: dict[str, str | int | float] = {
        "slot": _us(record.slot),
        "key": record.key,
        "attempt": record.attempt,
        "started": _us(record.started),
        "outcome": record.outcome,
        "count": record.count,
    }
    if record.duration is not None:
        fields["duration"] = record.duration
    if record.status is not None:
        fields["status"] = record.status
    if record.error is not None:
        fields["error"] = record.error
    if record.backfill:
        fields["backfill"] = 1
    return fields


def _run_record(job: str, fields: dict[str, str]) -> RunRecord:
    duration, status = fields.get("duration"), fields.get("status")
    return RunRecord(
        job=job,
        slot=_dt(fields["slot"]) or _EPOCH,
        key=fields["key"],
        attempt=int(fields["attempt"]),
        started=_dt(fields["started"]) or _EPOCH,
        outcome=cast(Outcome, fields["outcome"]),
        duration=float(duration) if duration is not None else None,
        status=int(status) if status is not None else None,
        error=fields.get("error"),
        count=int(fields.get("count", 1)),
        backfill=fields.get("backfill") == "1",
    )


# -------------------------------------------------------------------------------------------
# Runtime schedules on Redis

# Create or replace a batch, all or none (ARGV: ns, now, limit, then id, spec, group, anchor,
# first for each). The first pass decides, the second writes: a batch over the limit changes
# nothing. Returns {'limit', active, adds} or, per schedule, change, revision, created.
_PUT_SCHEDULES = """
local ns, now, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = (#ARGV - 3) / 5
local olds, adds = {}, 0
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local id, spec = ARGV[base + 1], ARGV[base + 2]
  local old = redis.call('HMGET', ns .. ':schedule:' .. id, 'revision', 'spec', 'status', 'group',
    'created')
  olds[i] = old
  if not (old[1] and old[2] == spec and old[3] ~= 'cancelled') and old[3] ~= 'active' then
    adds = adds + 1
  end
end
local active = redis.call('ZCARD', ns .. ':schedules:status:active')
if adds > 0 and active + adds > limit then return {'limit', tostring(active), tostring(adds)} end
local out = {}
for i = 1, n do
  local base = 3 + (i - 1) * 5
  local id, spec, group = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local anchor, first = ARGV[base + 4], ARGV[base + 5]
  local key, old = ns .. ':schedule:' .. id, olds[i]
  if old[1] and old[2] == spec and old[3] ~= 'cancelled' then
    table.insert(out, 'unchanged'); table.insert(out, old[1]); table.insert(out, old[5])
  else
    local revision, created, change = 1, now, 'created'
    if old[1] then
      revision, created, change = tonumber(old[1]) + 1, old[5], 'replaced'
      redis.call('ZREM', ns .. ':schedules:status:' .. old[3], id)
      if old[4] ~= '' and old[4] ~= group then
        redis.call('ZREM', ns .. ':schedules:group:' .. old[4], id)
      end
    end
    redis.call('HSET', key, 'revision', revision, 'spec', spec, 'status', 'active',
      'group', group, 'created', created, 'updated', now, 'anchor', anchor, 'first', first,
      'finished', '')
    redis.call('ZADD', ns .. ':schedules', 0, id)
    redis.call('ZADD', ns .. ':schedules:status:active', 0, id)
    redis.call('ZREM', ns .. ':schedules:ended', id)
    if group ~= '' then
      redis.call('ZADD', ns .. ':schedules:group:' .. group, 0, id)
      redis.call('SADD', ns .. ':schedules:groups', group)
    end
    redis.call('XADD', ns .. ':schedules:changes', 'MAXLEN', '~', 10000, '*', 'id', id)
    table.insert(out, change); table.insert(out, tostring(revision)); table.insert(out, created)
  end
end
return out
"""
# End an active schedule (ARGV: ns, id, status, now, revision or '' for any, announce).
_END_SCHEDULE = """
local ns, id, status, now, revision = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = ns .. ':schedule:' .. id
local old = redis.call('HMGET', key, 'status', 'revision')
if not old[1] then return 'missing' end
if old[1] ~= 'active' or (revision ~= '' and old[2] ~= revision) then return old[1] end
redis.call('HSET', key, 'status', status, 'updated', now, 'finished', now)
redis.call('ZREM', ns .. ':schedules:status:active', id)
redis.call('ZADD', ns .. ':schedules:status:' .. status, 0, id)
redis.call('ZADD', ns .. ':schedules:ended', now, id)
if ARGV[6] == '1' then
  redis.call('XADD', ns .. ':schedules:changes', 'MAXLEN', '~', 10000, '*', 'id', id)
end
return 'ended'
"""
# Delete ended schedules with their job state and history (ARGV: ns, ids...).
_PURGE_SCHEDULES = """
local ns = ARGV[1]
local gone = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local key = ns .. ':schedule:' .. id
  local old = redis.call('HMGET', key, 'status', 'group')
  if old[1] ~= 'active' then
    if old[1] then redis.call('ZREM', ns .. ':schedules:status:' .. old[1], id) end
    if old[2] and old[2] ~= '' then redis.call('ZREM', ns .. ':schedules:group:' .. old[2], id) end
    redis.call('ZREM', ns .. ':schedules', id)
    redis.call('ZREM', ns .. ':schedules:ended', id)
    redis.call('DEL', key, ns .. ':job:schedule/' .. id, ns .. ':runs:schedule/' .. id)
    gone = gone + 1
  end
end
return gone
"""
_SCHEDULE_FIELDS = (
    "revision", "spec", "status", "group", "created", "updated", "anchor", "first", "finished",
)  # fmt: skip
_BATCH = 1000


class RedisSchedules(FollowsChanges):
    """Runtime schedules in Redis, shared by every replica. Changes go through scripts (the
    limit is checked in the same step as the write) and are announced on a stream that every
    replica follows, so the leader plans a schedule created through any replica at once."""

    def __init__(
        self,
        client: redis.Redis,
        state: RedisStateStore,
        *,
        namespace: str,
        log: FilteringBoundLogger,
        block_seconds: float = 1.0,
    ) -> None:
        self._client = client
        self._state = state
        self._ns = namespace
        self._log = log
        self._block_ms = max(50, round(block_seconds * 1000))
        self._put = client.register_script(_PUT_SCHEDULES)
        self._end = client.register_script(_END_SCHEDULE)
        self._purge = client.register_script(_PURGE_SCHEDULES)
        super().__init__()

    def _key(self, id: str) -> str:
        return f"{self._ns}:schedule:{id}"

    def _call(self, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except redis.RedisError as error:
            raise self._state._trouble(error) from None

    def put_schedules(
        self, puts: Sequence[Put], *, now: datetime, limit: int
    ) -> list[tuple[ScheduleRecord, Change]]:
        args: list[str | int] = [self._ns, _us(now), limit]
        for put in puts:
            args += [put.id, put.spec, put.group or "", _us(put.anchor),
                     _us(put.first) if put.first else ""]  # fmt: skip
        result = [str(part) for part in self._call(lambda: self._put(args=args))]
        if result[0] == "limit":
            raise limit_reached(int(result[1]), int(result[2]), limit)
        unchanged = {put.id for put, change in zip(puts, result[::3], strict=True)
                     if change == "unchanged"}  # fmt: skip
        kept = self.get_schedules(unchanged) if unchanged else {}
        decided: list[tuple[ScheduleRecord, Change]] = []
        for put, change, revision, created in zip(puts, result[::3], result[1::3], result[2::3],
                                                  strict=True):  # fmt: skip
            if change == "unchanged":
                decided.append((kept[put.id], "unchanged"))
                continue
            decided.append((ScheduleRecord(
                id=put.id, revision=int(revision), spec=put.spec, status="active",
                group=put.group, created=_dt(created) or now, updated=now, anchor=put.anchor,
                first=put.first, finished=None,
            ), cast(Change, change)))  # fmt: skip
        return decided

    def get_schedule(self, id: str) -> ScheduleRecord | None:
        return self.get_schedules([id]).get(id)

    def get_schedules(self, ids: Iterable[str]) -> dict[str, ScheduleRecord]:
        wanted = list(ids)
        found: dict[str, ScheduleRecord] = {}
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start : start + _BATCH]
            pipe = self._client.pipeline(transaction=False)
            for id in chunk:
                pipe.hmget(self._key(id), _SCHEDULE_FIELDS)
            rows = cast(list[list[str | None]], self._call(pipe.execute))
            for id, row in zip(chunk, rows, strict=True):
                if row[0] is not None:
                    found[id] = _schedule_record(id, row)
        return found

    def list_schedules(
        self, *, status: ScheduleStatus | None, group: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        index = (
            f"{self._ns}:schedules:group:{group}" if group is not None
            else f"{self._ns}:schedules:status:{status}" if status is not None
            else f"{self._ns}:schedules"
        )  # fmt: skip
        chosen: list[ScheduleRecord] = []
        cursor = after

        def page() -> list[str]:
            start = f"({cursor}" if cursor else "-"
            return cast(list[str], self._client.zrangebylex(index, start, "+", 0, _BATCH))

        while len(chosen) < limit:
            ids = cast(list[str], self._call(page))
            if not ids:
                break
            records = self.get_schedules(ids)
            for id in ids:
                record = records.get(id)
                if record is not None and (status is None or record.status == status):
                    chosen.append(record)
            cursor = ids[-1]
        return chosen[:limit]

    def cancel_schedule(self, id: str, now: datetime) -> ScheduleRecord | None:
        self._call(lambda: self._end(args=[self._ns, id, "cancelled", _us(now), "", "1"]))
        return self.get_schedule(id)

    def finish_schedule(
        self, id: str, revision: int, status: ScheduleStatus, now: datetime
    ) -> bool:
        args: list[str | int] = [self._ns, id, status, _us(now), revision, "0"]
        ended = bool(self._call(lambda: self._end(args=args)) == "ended")
        if ended:
            self._state.forget(RUNTIME_PREFIX + id)
        return ended

    def active_plan(self) -> Iterator[tuple[str, datetime, datetime | None]]:
        ids = cast(
            list[str],
            self._call(lambda: self._client.zrange(f"{self._ns}:schedules:status:active", 0, -1)),
        )
        plan: list[tuple[str, datetime, datetime | None]] = []
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            pipe = self._client.pipeline(transaction=False)
            for id in chunk:
                pipe.hmget(self._key(id), "anchor", "first")
            rows = cast(list[list[str | None]], self._call(pipe.execute))
            self._state.load_states([RUNTIME_PREFIX + id for id in chunk])
            for id, (anchor, first) in zip(chunk, rows, strict=True):
                if anchor:
                    plan.append((id, _dt(anchor) or _EPOCH, _dt(first)))
        return iter(plan)

    def group_counts(self) -> dict[str | None, tuple[int, int]]:
        ns = self._ns
        active_key = f"{ns}:schedules:status:active"

        def read() -> tuple[list[str], list[int]]:
            groups = sorted(cast(set[str], self._client.smembers(f"{ns}:schedules:groups")))
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(f"{ns}:schedules")
            pipe.zcard(active_key)
            for group in groups:
                pipe.zcard(f"{ns}:schedules:group:{group}")
                pipe.zintercard(2, [f"{ns}:schedules:group:{group}", active_key])
            return groups, [int(value) for value in pipe.execute()]

        groups, values = cast(tuple[list[str], list[int]], self._call(read))
        total, active = values[0], values[1]
        counts: dict[str | None, tuple[int, int]] = {}
        for index, group in enumerate(groups):
            in_group, live = values[2 + 2 * index], values[3 + 2 * index]
            if in_group:
                counts[group] = (live, in_group - live)
                total, active = total - in_group, active - live
        if total:
            counts[None] = (active, total - active)
        return counts

    def purge_schedules(self, before: datetime) -> list[str]:
        key = f"{self._ns}:schedules:ended"
        ids = cast(
            list[str],
            self._call(lambda: self._client.zrangebyscore(key, "-inf", f"({_us(before)}", 0, 500)),
        )
        if ids:
            self._call(lambda: self._purge(args=[self._ns, *ids]))
            for id in ids:
                self._state.forget(RUNTIME_PREFIX + id)
        return ids

    # -- following changes made on any replica ---------------------------------------------

    def _follow(self, on_change: Callable[[list[str]], None]) -> None:
        key = f"{self._ns}:schedules:changes"
        last: str | None = None
        while not self._stopping.is_set():
            try:
                if last is None:  # from now on (a new term reads every schedule anyway)
                    newest = cast(list[tuple[str, Any]], self._client.xrevrange(key, count=1))
                    last = newest[0][0] if newest else "0-0"
                reply = cast(
                    list[tuple[str, list[tuple[str, dict[str, str]]]]] | None,
                    self._client.xread({key: last}, count=_BATCH, block=self._block_ms),
                )
            except redis.RedisError:
                last = None  # Redis away: every id again from when it answers
                on_change([])  # an empty list: plan every schedule afresh
                self._stopping.wait(1.0)
                continue
            for _, entries in reply or ():
                if entries:
                    last = entries[-1][0]
                    on_change(sorted({fields["id"] for _, fields in entries if "id" in fields}))


def _schedule_record(id: str, row: list[str | None]) -> ScheduleRecord:
    revision, spec, status, group, created, updated, anchor, first, finished = row
    return ScheduleRecord(
        id=id,
        revision=int(revision or 0),
        spec=spec or "{}",
        status=cast(ScheduleStatus, status),
        group=group or None,
        created=_dt(created) or _EPOCH,
        updated=_dt(updated) or _EPOCH,
        anchor=_dt(anchor) or _EPOCH,
        first=_dt(first),
        finished=_dt(finished),
    )


# -------------------------------------------------------------------------------------------
# Wiring


def connect_redis(settings: Settings) -> redis.Redis:
    """A client for SCHEDULER_STATE_URL: short timeouts (a hung Redis must not hold the loop
    past the lease), one resend on a dropped connection, nothing retried for longer."""
    timeout = store_timeout(settings.lease_ttl_seconds)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "decode_responses": True,
    }
    if settings.redis_password is not None and "@" not in settings.state_url:
        options["password"] = settings.redis_password.get_secret_value()
    return redis.Redis.from_url(settings.state_url, **options)


def claim_ttl(settings: Settings) -> float:
    """How long a slot's claim is kept: long past any takeover. After it expires the job's last
    slot, advanced in the same atomic step as the claim, still keeps the slot from being planned."""
    return max(300.0, 10 * settings.lease_ttl_seconds)


def open_redis(settings: Settings, log: FilteringBoundLogger) -> OpenState:
    """Redis state, runtime schedules and the lease for SCHEDULER_STATE_URL=redis://..."""
    max_age = timedelta(seconds=settings.history_max_age)
    where = redact_url(settings.state_url)
    client = connect_redis(settings)
    identity = replica_identity()
    value = lease_value(identity)
    redis_store = RedisStateStore(
        client,
        namespace=settings.namespace,
        lease_value=value,
        claim_ttl=claim_ttl(settings),
        log=log,
        max_runs=settings.history_max_runs,
        max_age=max_age,
        where=where,
    )
    redis_schedules = RedisSchedules(
        client,
        redis_store,
        namespace=settings.namespace,
        log=log,
        # a blocked read ends before the socket's timeout
        block_seconds=store_timeout(settings.lease_ttl_seconds) / 2,
    )
    lease = RedisLease(
        client,
        namespace=settings.namespace,
        ttl=settings.lease_ttl_seconds,
        log=log,
        identity=identity,
        value=value,
        where=where,
        after_cycle=redis_store.refresh,
    )

    def close() -> None:
        redis_schedules.close()
        redis_store.close()
        client.close()

    return OpenState(store=redis_store, coordinator=lease, schedules=redis_schedules, close=close)
