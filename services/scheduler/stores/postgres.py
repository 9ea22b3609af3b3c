"""PostgreSQL: job state, run history, slot claims, runtime schedules and the leader lease
(DESIGN.md section 6), for several replicas. Imported only for a postgresql:// or postgres://
SCHEDULER_STATE_URL: psycopg 3 and psycopg_pool are the extra `cronclock[postgres]`.

Tables, in the schema SCHEDULER_NAMESPACE (created and migrated by the daemon; `meta` holds the
schema's version and a random instance id):

    lease       one row: holder "<identity> <token>", epoch (the fencing token; it only grows),
                expires (the server's clock)
    claims      one row per slot fired, UNIQUE (job, slot): `slot` is the Idempotency-Key's part
                after '@' (epoch ms, or manual-<uuid> for a manual trigger)
    jobs        last_slot, last_outcome, last_status, last_run, last_success, paused, restored
    in_flight   Idempotency-Key -> job, slot, since: calls started and not finished
    runs        run history, bounded per job (SCHEDULER_HISTORY_MAX_RUNS) and by age
    schedules   runtime schedules; planning reads the active ones by next slot (a partial index)

A slot is claimed by the function `claim`, in one transaction that checks this replica holds
the lease, inserts the claim (the unique constraint refuses a second one, whoever asks, even when
two replicas both believe they lead), advances the job's last slot and records the call in
flight: the call goes out only after that transaction committed. Times are microseconds since
the epoch, except the lease's, which is the server's own clock so that replicas' clocks do not
matter.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import psycopg_pool
from psycopg import errors, sql
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
    StoreRefused,
    StoreUnavailable,
    decide_puts,
    interrupted,
)
from .shared import FollowsChanges, SharedState, WriteQueue, one_line

Statement = tuple[str, tuple[object, ...]]
Op = tuple[Statement, ...]  # written together, in one transaction with the rest of a batch
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Records that account for slots not called are written at once, before the next claim can
# advance past them; call outcomes are batched (a leader killed in that window loses them).
_ACCOUNTING = frozenset({"missed", "interrupted", "skipped_claimed"})
_PRUNE_EVERY = 100  # history older than its age bound, and old claims, go every this many records
_PURGE_BATCH = 500
# The server is "away" on these: it could not be reached, a statement timed out, the schema
# was dropped under a running daemon (it is created again), or the pool had no connection.
_SCHEMA_GONE = (errors.UndefinedTable, errors.InvalidSchemaName, errors.UndefinedFunction)


class UnusableSchema(StoreRefused):
    """The schema is from a newer cronclock."""


_AWAY = (psycopg.OperationalError, psycopg.InterfaceError, *_SCHEMA_GONE, UnusableSchema)


def _us(instant: datetime | None) -> int | None:
    return None if instant is None else (instant - _EPOCH) // timedelta(microseconds=1)


def _dt(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


# -------------------------------------------------------------------------------------------
# Schema

SCHEMA_VERSION = 2
# MIGRATIONS[n] takes a schema from version n to n + 1 (run under an advisory lock, so replicas
# starting together migrate once).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE lease (
        id integer PRIMARY KEY CHECK (id = 1),
        holder text NOT NULL,
        epoch bigint NOT NULL,
        expires timestamptz NOT NULL
    );
    INSERT INTO lease VALUES (1, '', 0, '-infinity');
    CREATE TABLE claims (
        job text NOT NULL,
        slot text NOT NULL,
        key text NOT NULL,
        nonce text NOT NULL,
        epoch bigint NOT NULL,
        claimed bigint NOT NULL,
        CONSTRAINT one_claim_per_slot UNIQUE (job, slot)
    );
    CREATE INDEX claims_by_time ON claims (claimed);
    CREATE TABLE jobs (
        name text PRIMARY KEY,
        last_slot bigint,
        last_outcome text,
        last_status integer,
        last_run bigint,
        last_success bigint,
        paused boolean NOT NULL DEFAULT false,
        restored boolean NOT NULL DEFAULT false
    );
    CREATE TABLE in_flight (
        key text PRIMARY KEY,
        job text NOT NULL,
        slot bigint NOT NULL,
        since bigint NOT NULL
    );
    CREATE TABLE runs (
        id bigserial PRIMARY KEY,
        job text NOT NULL,
        slot bigint NOT NULL,
        key text NOT NULL,
        attempt integer NOT NULL,
        started bigint NOT NULL,
        duration double precision,
        status integer,
        outcome text NOT NULL,
        error text,
        count integer NOT NULL DEFAULT 1
    );
    CREATE INDEX runs_by_job ON runs (job, id);
    CREATE INDEX runs_by_start ON runs (started);
    CREATE TABLE schedules (
        id text PRIMARY KEY,
        revision integer NOT NULL,
        spec text NOT NULL,
        status text NOT NULL,
        grp text,
        created bigint NOT NULL,
        updated bigint NOT NULL,
        anchor bigint NOT NULL,
        first bigint,
        finished bigint
    );
    CREATE INDEX schedules_next ON schedules (first) WHERE status = 'active';
    CREATE INDEX schedules_by_status ON schedules (status, id);
    CREATE INDEX schedules_by_group ON schedules (grp, id);
    CREATE INDEX schedules_by_finished ON schedules (finished);

    -- Claim slots for the lease holder p_holder: per slot 'ok', 'taken' (claimed before,
    -- by anyone else), 'paused', 'inactive' (a runtime schedule that ended), or only
    -- 'not_leader'. p_slots[i] is NULL for a manual trigger (its own slot; never paused).
    CREATE FUNCTION claim(p_holder text, p_nonce text, p_now bigint, p_jobs text[],
                          p_slots bigint[], p_suffixes text[], p_keys text[])
    RETURNS text[] LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_epoch bigint;
        v_paused boolean;
        v_last bigint;
        v_status text;
        v_nonce text;
        v_result text;
        v_out text[] := '{}';
    BEGIN
        SELECT epoch INTO v_epoch FROM lease
            WHERE id = 1 AND holder = p_holder AND expires > clock_timestamp() FOR SHARE;
        IF NOT FOUND THEN
            RETURN ARRAY['not_leader'];
        END IF;
        FOR i IN 1 .. coalesce(array_length(p_jobs, 1), 0) LOOP
            v_result := 'ok';
            v_paused := NULL;
            v_last := NULL;
            SELECT paused, last_slot INTO v_paused, v_last FROM jobs WHERE name = p_jobs[i];
            IF left(p_jobs[i], 9) = 'schedule/' THEN
                SELECT status INTO v_status FROM schedules WHERE id = substr(p_jobs[i], 10);
                IF v_status IS DISTINCT FROM 'active' THEN
                    v_result := 'inactive';
                END IF;
            END IF;
            IF v_result = 'ok' AND p_slots[i] IS NOT NULL AND coalesce(v_paused, false) THEN
                v_result := 'paused';
            END IF;
            IF v_result = 'ok' THEN
                INSERT INTO claims (job, slot, key, nonce, epoch, claimed)
                    VALUES (p_jobs[i], p_suffixes[i], p_keys[i], p_nonce, v_epoch, p_now)
                    ON CONFLICT ON CONSTRAINT one_claim_per_slot DO NOTHING;
                IF NOT FOUND THEN  -- claimed before: by this very call resent, or not ours
                    SELECT nonce INTO v_nonce FROM claims
                        WHERE job = p_jobs[i] AND slot = p_suffixes[i];
                    IF v_nonce IS DISTINCT FROM p_nonce THEN
                        v_result := 'taken';
                    END IF;
                END IF;
            END IF;
            IF v_result <> 'inactive' AND p_slots[i] IS NOT NULL
                    AND (v_last IS NULL OR v_last < p_slots[i]) THEN
                INSERT INTO jobs (name, last_slot) VALUES (p_jobs[i], p_slots[i])
                    ON CONFLICT (name) DO UPDATE
                    SET last_slot = greatest(jobs.last_slot, excluded.last_slot),
                        restored = false;
            END IF;
            IF v_result = 'ok' THEN
                INSERT INTO in_flight (key, job, slot, since)
                    VALUES (p_keys[i], p_jobs[i], coalesce(p_slots[i], p_now), p_now)
                    ON CONFLICT (key) DO NOTHING;
            END IF;
            v_out := v_out || v_result;
        END LOOP;
        RETURN v_out;
    END $$;
    """,
    """
    ALTER TABLE jobs ADD COLUMN pause_reason text;
    ALTER TABLE jobs ADD COLUMN failures integer NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN backfill boolean NOT NULL DEFAULT false;
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class Database:
    """The connection pool, in the schema SCHEDULER_NAMESPACE, with statement timeouts: a
    stuck server answers `StoreUnavailable` within `timeout`, it never holds the loop."""

    def __init__(
        self, url: str, *, namespace: str, timeout: float, log: FilteringBoundLogger
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.timeout = timeout
        self.where = redact_url(url)
        self._log = log
        self._migrated = False
        self._migrating = threading.Lock()
        ms = max(1, round(timeout * 1000))
        self._session = sql.SQL(
            "SET search_path TO {}; SET statement_timeout = {}; SET lock_timeout = {}; "
            "SET idle_in_transaction_session_timeout = {}"
        ).format(sql.Identifier(namespace), ms, ms, max(5 * ms, 5000))
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=4,
            kwargs={
                "connect_timeout": max(2, round(timeout)),
                "application_name": "cronclock",
                "autocommit": False,
            },
            configure=self._configure,
            timeout=timeout,
            # one attempt at a time: tried again when a connection is next needed (within a
            # second: the lease cycle), not after a backoff that doubles without bound
            reconnect_timeout=0,
            open=False,
            name="cronclock",
        )
        self.pool.open(wait=False)

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Every new connection: in the schema, with the timeouts."""
        conn.execute(self._session)
        conn.commit()

    def run(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """`work` in one transaction, committed when it returns. A connection that broke
        while idle in the pool (the server restarted) is replaced and the work done again
        once: everything done here is idempotent or recognises itself (claims carry a nonce).
        Raises one of _AWAY when the server is away."""
        for attempt in (1, 2):
            try:
                if not self._migrated:
                    self.migrate()
                with self.pool.connection(timeout=self.timeout) as conn:
                    return work(conn)
            except _SCHEMA_GONE:
                self._migrated = False  # the schema was dropped: create it again, then retry
                if attempt == 2:
                    raise
            except (psycopg_pool.PoolTimeout, errors.QueryCanceled, errors.LockNotAvailable):
                raise  # away or stuck: nothing to gain from a second try within the bound
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if attempt == 2:
                    raise
                self.pool.check()  # drop the pool's other broken connections, then once more
        raise AssertionError("unreachable")

    def migrate(self) -> None:
        """Create the schema or take it to SCHEMA_VERSION; a newer one is refused."""
        with self._migrating, self.pool.connection(timeout=self.timeout) as conn:
            if self._migrated:
                return
            schema = sql.Identifier(self.namespace)
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cronclock:{self.namespace}",)
            )
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)"
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise UnusableSchema(
                    f"schema {self.namespace!r} is at version {version}, from a newer "
                    f"cronclock (this one knows {SCHEMA_VERSION}); upgrade cronclock"
                )
            for step in range(version, SCHEMA_VERSION):
                conn.execute(cast(Any, MIGRATIONS[step]))
            if version < SCHEMA_VERSION:
                conn.execute(
                    "INSERT INTO meta VALUES ('version', %s), ('instance', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
                    "WHERE meta.key = 'version'",
                    (str(SCHEMA_VERSION), secrets.token_hex(8)),
                )
                self._log.info(
                    "PostgreSQL schema ready", schema=self.namespace, version=SCHEMA_VERSION,
                    migrated_from=version,
                )  # fmt: skip
            self._migrated = True

    def close(self) -> None:
        self.pool.close(timeout=5)


# -------------------------------------------------------------------------------------------
# The lease


class _PostgresLeaseRow:
    """The lease row. Expiry is the server's clock (`clock_timestamp()`), so the replicas'
    own clocks do not matter; the epoch only grows, above any epoch a replica has seen."""

    kind = "PostgreSQL"
    errors: tuple[type[Exception], ...] = (*_AWAY, psycopg.Error)

    def __init__(self, db: Database) -> None:
        self._db = db

    def acquire(self, value: str, ttl: float, floor: int) -> tuple[bool, str, int]:
        def work(conn: psycopg.Connection[Any]) -> tuple[bool, str, int]:
            row = conn.execute(
                "UPDATE lease SET epoch = CASE WHEN holder = %(v)s AND expires > clock_timestamp()"
                " THEN epoch ELSE greatest(epoch, %(floor)s) + 1 END, holder = %(v)s,"
                " expires = clock_timestamp() + make_interval(secs => %(ttl)s)"
                " WHERE id = 1 AND (expires <= clock_timestamp() OR holder = %(v)s)"
                " RETURNING epoch",
                {"v": value, "floor": floor, "ttl": ttl},
            ).fetchone()
            if row is not None:
                return True, value, int(row[0])
            current = conn.execute("SELECT holder, epoch FROM lease WHERE id = 1").fetchone()
            holder, epoch = current if current is not None else ("", 0)
            return False, str(holder), int(epoch)

        return cast(tuple[bool, str, int], self._db.run(work))

    def renew(self, value: str, ttl: float) -> bool:
        return bool(
            self._db.run(
                lambda conn: (
                    conn.execute(
                        "UPDATE lease SET expires = clock_timestamp() + make_interval(secs => %s)"
                        " WHERE id = 1 AND holder = %s AND expires > clock_timestamp()",
                        (ttl, value),
                    ).rowcount
                )
            )
        )

    def release(self, value: str) -> bool:
        return bool(
            self._db.run(
                lambda conn: (
                    conn.execute(
                        "UPDATE lease SET expires = '-infinity' WHERE id = 1 AND holder = %s",
                        (value,),
                    ).rowcount
                )
            )
        )


class PostgresLease(Lease):
    """The leader lease in PostgreSQL (the timing is coordination.Lease's)."""

    def __init__(
        self,
        db: Database,
        *,
        ttl: float,
        log: FilteringBoundLogger,
        identity: str | None = None,
        value: str | None = None,
        after_cycle: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            _PostgresLeaseRow(db), ttl=ttl, log=log, identity=identity, value=value,
            where=db.where, after_cycle=after_cycle, monotonic=monotonic,
        )  # fmt: skip


# -------------------------------------------------------------------------------------------
# Job state, history and slot claims

_JOB_COLUMNS = (
    "name, last_slot, last_outcome, last_status, last_run, last_success, paused, restored, "
    "pause_reason, failures"
)


def _job_state(row: Sequence[Any]) -> JobState:
    (_, last_slot, last_outcome, last_status, last_run, last_success, paused, restored,
     pause_reason, failures) = row  # fmt: skip
    return JobState(
        last_slot=_dt(last_slot),
        last_outcome=cast(Outcome | None, last_outcome),
        last_status=last_status,
        last_run=_dt(last_run),
        last_success=_dt(last_success),
        paused=bool(paused),
        pause_reason=pause_reason,
        failures=failures,
        uncertain=bool(restored),
    )


def _write_state(job: str, state: JobState) -> Statement:
    """A job's whole state, as this replica knows it (written back after a loss)."""
    return (
        f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET last_slot = greatest(jobs.last_slot, "
        "excluded.last_slot), last_outcome = excluded.last_outcome, last_status = "
        "excluded.last_status, last_run = excluded.last_run, last_success = "
        "excluded.last_success, paused = excluded.paused, restored = excluded.restored, "
        "pause_reason = excluded.pause_reason, failures = excluded.failures",
        (job, _us(state.last_slot), state.last_outcome, state.last_status, _us(state.last_run),
         _us(state.last_success), state.paused, state.uncertain, state.pause_reason,
         state.failures),
    )  # fmt: skip


def _outcome(job: str, state: JobState) -> Statement:
    return (
        "INSERT INTO jobs (name, last_outcome, last_status, last_run, last_success, failures) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET last_outcome = "
        "excluded.last_outcome, last_status = excluded.last_status, last_run = "
        "excluded.last_run, last_success = coalesce(excluded.last_success, jobs.last_success), "
        "failures = excluded.failures",
        (job, state.last_outcome, state.last_status, _us(state.last_run),
         _us(state.last_success), state.failures),
    )  # fmt: skip


def _insert_run(record: RunRecord) -> Statement:
    return (
        "INSERT INTO runs (job, slot, key, attempt, started, duration, status, outcome, "
        "error, count, backfill) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (record.job, _us(record.slot), record.key, record.attempt, _us(record.started),
         record.duration, record.status, record.outcome, record.error, record.count,
         record.backfill),
    )  # fmt: skip


class PostgresStateStore(SharedState):
    """StateStore on PostgreSQL, shared by every replica.

    Reads of job state come from a local copy, refreshed when this replica starts leading and
    on every lease cycle. Slot claims, manual claims and pauses are committed at once; history
    and outcomes are queued and written in batches by a writer thread (one transaction per
    batch), kept and retried while the server is away.
    """

    kind = "PostgreSQL"
    reset_reason = "the schema was created anew"

    def __init__(
        self,
        db: Database,
        *,
        lease_value: str,
        log: FilteringBoundLogger,
        max_runs: int = 1000,
        max_age: timedelta = timedelta(days=30),
        claim_retention: timedelta = timedelta(hours=1),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(where=db.where, log=log, monotonic=monotonic)
        self._db = db
        self._lease_value = lease_value
        self._max_runs = max_runs
        self._max_age = max_age
        self._claim_retention = claim_retention
        self._records = 0
        # records per job since its history was trimmed; a job is trimmed after a tenth of its
        # bound (at most 100), so the table holds at most 1.1 x SCHEDULER_HISTORY_MAX_RUNS
        self._unpruned: dict[str, int] = {}
        self._trim_after = max(1, min(_PRUNE_EVERY, max_runs // 10))
        self._writes: WriteQueue[Op] = WriteQueue(
            self._execute,
            name="postgres-writer",
            on_drop=lambda: self._complain("state writes dropped: PostgreSQL away too long"),
            monotonic=monotonic,
        )

    def transact(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """`work` in a transaction; StoreUnavailable (noted) when the server is away."""
        try:
            result = self._db.run(work)
        except _AWAY as error:
            raise self._trouble(error) from None
        self._healthy()
        return result

    # -- reads ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pull every job's state. A job the database has no record of keeps what this
        replica knew, written back; when the database lost its data (its instance id
        changed), that knowledge is marked uncertain (restored)."""

        def read(conn: psycopg.Connection[Any]) -> tuple[str | None, list[Any]]:
            row = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE name NOT LIKE 'schedule/%'"
            ).fetchall()
            return (row[0] if row else None), rows

        try:
            instance, rows = self.transact(read)
        except StoreUnavailable:
            return
        lost = self._take_all(instance, {row[0]: _job_state(row) for row in rows})
        for name, state in lost.items():
            self._writes.put((_write_state(name, state),))

    def load_states(self, rows: Iterable[Sequence[Any]]) -> None:
        """Take the state of these jobs, read with their schedules (runtime schedules' states
        are not refreshed every cycle)."""
        self._take({row[0]: _job_state(row) for row in rows})

    def runs(self, job: str, limit: int = 50) -> list[RunRecord]:
        self.flush(timeout=2.0)
        rows = self.transact(
            lambda conn: conn.execute(
                "SELECT job, slot, key, attempt, started, duration, status, outcome, error, "
                "count, backfill FROM runs WHERE job = %s ORDER BY id DESC LIMIT %s",
                (job, limit),
            ).fetchall()
        )
        return [
            RunRecord(
                job=row[0],
                slot=_dt(row[1]) or _EPOCH,
                key=row[2],
                attempt=row[3],
                started=_dt(row[4]) or _EPOCH,
                outcome=row[7],
                duration=row[5],
                status=row[6],
                error=row[8],
                count=row[9],
                backfill=bool(row[10]),
            )
            for row in rows
        ]

    # -- claims (synchronous: a slot is claimed before its call) ----------------------------

    def _claim_all(self, handed: Sequence[tuple[str, datetime | None, str]]) -> list[str] | None:
        nonce = secrets.token_hex(8)  # this claim's own: a resend recognises itself
        params = (
            self._lease_value, nonce, _us(datetime.now(UTC)), [job for job, _, _ in handed],
            [_us(slot) for _, slot, _ in handed], [key.partition("@")[2] for _, _, key in handed],
            [key for _, _, key in handed],
        )  # fmt: skip
        try:
            row = self.transact(
                lambda conn: conn.execute(
                    "SELECT claim(%s, %s, %s::bigint, %s::text[], %s::bigint[], %s::text[], "
                    "%s::text[])",
                    params,
                ).fetchone()
            )
        except StoreUnavailable:
            return None
        return [str(result) for result in row[0]]

    # -- writes -----------------------------------------------------------------------------

    def advance(self, job: str, slot: datetime) -> None:
        self._advance_here(job, slot)
        self._writes.put(
            (
                (
                    "INSERT INTO jobs (name, last_slot) VALUES (%s, %s) ON CONFLICT (name) DO "
                    "UPDATE SET last_slot = greatest(jobs.last_slot, excluded.last_slot), "
                    "restored = false",
                    (job, _us(slot)),
                ),
            )
        )

    def mark_finished(self, job: str, key: str) -> None:
        self._writes.put((("DELETE FROM in_flight WHERE key = %s", (key,)),))

    def recover_interrupted(self, now: datetime) -> list[RunRecord]:
        """Calls a dead leader left in flight, recorded `interrupted` and cleared in one
        transaction: a leader killed in the middle leaves them for the next one."""

        def work(conn: psycopg.Connection[Any]) -> list[RunRecord]:
            rows = conn.execute("DELETE FROM in_flight RETURNING key, job, slot, since").fetchall()
            records = [
                interrupted(job, _dt(slot) or now, key, now)
                for key, job, slot, _ in sorted(rows, key=lambda row: (row[3], row[0]))
            ]
            for record in records:
                conn.execute(*_insert_run(record))
                conn.execute(*_outcome(record.job, self._apply(record)))
            return records

        try:
            return cast(list[RunRecord], self.transact(work))
        except StoreUnavailable:
            return []

    def record_run(self, record: RunRecord) -> None:
        state = self._apply(record)
        statements = [_insert_run(record)]
        if state.last_outcome is not None:
            statements.append(_outcome(record.job, state))
        self._records += 1
        count = self._unpruned[record.job] = self._unpruned.get(record.job, 0) + 1
        if count >= self._trim_after:
            statements.append(self._trim(record.job))
        if self._records % _PRUNE_EVERY == 0:  # by age, and claims past their retention
            statements += [
                ("DELETE FROM runs WHERE started < %s", (_us(record.started - self._max_age),)),
                ("DELETE FROM claims WHERE claimed < %s",
                 (_us(record.started - self._claim_retention),)),
            ]  # fmt: skip
        if record.outcome in _ACCOUNTING:
            self._writes.through(tuple(statements))
        else:
            self._writes.put(tuple(statements))

    def _trim(self, job: str) -> Statement:
        """Keep the job's latest SCHEDULER_HISTORY_MAX_RUNS records."""
        self._unpruned.pop(job, None)
        return (
            "DELETE FROM runs WHERE job = %s AND id <= (SELECT id FROM runs WHERE job = %s "
            "ORDER BY id DESC OFFSET %s LIMIT 1)",
            (job, job, self._max_runs),
        )

    def set_paused(self, job: str, paused: bool, reason: str | None = None) -> None:
        self.transact(
            lambda conn: conn.execute(
                "INSERT INTO jobs (name, paused, pause_reason) VALUES (%s, %s, %s) ON CONFLICT "
                "(name) DO UPDATE SET paused = excluded.paused, pause_reason = "
                "excluded.pause_reason",
                (job, paused, reason if paused else None),
            )
        )
        self._paused_here(job, paused, reason)

    def _execute(self, batch: list[Op]) -> bool:
        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.pipeline(), conn.cursor() as cursor:
                for op in batch:
                    for query, params in op:
                        cursor.execute(cast(Any, query), params)

        try:
            self.transact(work)
        except StoreUnavailable:
            return False
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued writes are committed; False if they are not within `timeout`."""
        return self._writes.flush(timeout)

    def close(self) -> None:
        if self._unpruned:  # every job's history within its bound at shutdown
            self._writes.put(tuple(self._trim(job) for job in sorted(self._unpruned)))
        if not self.flush(timeout=5.0):
            self._log.warning(
                "state writes not flushed to PostgreSQL at shutdown", postgres=self._where
            )
        self._writes.close()


# -------------------------------------------------------------------------------------------
# Runtime schedules

_COLUMNS = "id, revision, spec, status, grp, created, updated, anchor, first, finished"


def _schedule(row: Sequence[Any]) -> ScheduleRecord:
    id, revision, spec, status, group, created, updated, anchor, first, finished = row
    return ScheduleRecord(
        id=id, revision=revision, spec=spec, status=status, group=group,
        created=_dt(created) or _EPOCH, updated=_dt(updated) or _EPOCH,
        anchor=_dt(anchor) or _EPOCH, first=_dt(first), finished=_dt(finished),
    )  # fmt: skip


class PostgresSchedules(FollowsChanges):
    """Runtime schedules in the `schedules` table, shared by every replica. A change is one
    transaction under an advisory lock (the limit is checked in the same step as the write)
    and is announced with NOTIFY, which every replica LISTENs to, so the leader plans a
    schedule created through any replica at once."""

    def __init__(
        self, db: Database, state: PostgresStateStore, *, log: FilteringBoundLogger
    ) -> None:
        self._db = db
        self._state = state
        self._log = log
        self._channel = f"{db.namespace}:schedules"[:63]
        super().__init__()

    def _announce(self, conn: psycopg.Connection[Any], ids: Sequence[str]) -> None:
        """Delivered to the listeners when the transaction commits (ids in chunks: a
        notification's payload is at most 8,000 bytes)."""
        for start in range(0, len(ids), 50):
            conn.execute(
                "SELECT pg_notify(%s, %s)", (self._channel, " ".join(ids[start : start + 50]))
            )

    def put_schedules(
        self, puts: Sequence[Put], *, now: datetime, limit: int
    ) -> list[tuple[ScheduleRecord, Change]]:
        def work(conn: psycopg.Connection[Any]) -> list[tuple[ScheduleRecord, Change]]:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('cronclock:schedules'))")
            existing = {
                row[0]: _schedule(row)
                for row in conn.execute(
                    f"SELECT {_COLUMNS} FROM schedules WHERE id = ANY(%s)",
                    ([put.id for put in puts],),
                )
            }
            (active,) = cast(
                tuple[int],
                conn.execute("SELECT count(*) FROM schedules WHERE status = 'active'").fetchone(),
            )
            decided, _ = decide_puts(existing, puts, now=now, active=active, limit=limit)
            changed = [record for record, change in decided if change != "unchanged"]
            if changed:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO schedules ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                        "%s, %s, NULL) ON CONFLICT (id) DO UPDATE SET revision = "
                        "excluded.revision, spec = excluded.spec, status = excluded.status, "
                        "grp = excluded.grp, created = excluded.created, updated = "
                        "excluded.updated, anchor = excluded.anchor, first = excluded.first, "
                        "finished = NULL",
                        [
                            (r.id, r.revision, r.spec, r.status, r.group, _us(r.created),
                             _us(r.updated), _us(r.anchor), _us(r.first))
                            for r in changed
                        ],
                    )  # fmt: skip
                self._announce(conn, [record.id for record in changed])
            return decided

        return cast(list[tuple[ScheduleRecord, Change]], self._state.transact(work))

    def get_schedule(self, id: str) -> ScheduleRecord | None:
        return self.get_schedules([id]).get(id)

    def get_schedules(self, ids: Iterable[str]) -> dict[str, ScheduleRecord]:
        wanted = list(ids)
        rows = self._state.transact(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM schedules WHERE id = ANY(%s)", (wanted,)
            ).fetchall()
        )
        return {row[0]: _schedule(row) for row in rows}

    def list_schedules(
        self, *, status: ScheduleStatus | None, group: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        where, params = ["id > %s"], [after]
        if status is not None:
            where.append("status = %s")
            params.append(status)
        if group is not None:
            where.append("grp = %s")
            params.append(group)
        clause = " AND ".join(where)
        query = f"SELECT {_COLUMNS} FROM schedules WHERE {clause} ORDER BY id LIMIT %s"
        rows = self._state.transact(
            lambda conn: conn.execute(cast(Any, query), (*params, limit)).fetchall()
        )
        return [_schedule(row) for row in rows]

    def cancel_schedule(self, id: str, now: datetime) -> ScheduleRecord | None:
        def work(conn: psycopg.Connection[Any]) -> ScheduleRecord | None:
            row = conn.execute(
                f"UPDATE schedules SET status = 'cancelled', updated = %s, finished = %s "
                f"WHERE id = %s AND status = 'active' RETURNING {_COLUMNS}",
                (_us(now), _us(now), id),
            ).fetchone()
            if row is not None:
                self._announce(conn, [id])
                return _schedule(row)
            row = conn.execute(f"SELECT {_COLUMNS} FROM schedules WHERE id = %s", (id,)).fetchone()
            return None if row is None else _schedule(row)

        return cast(ScheduleRecord | None, self._state.transact(work))

    def finish_schedule(
        self, id: str, revision: int, status: ScheduleStatus, now: datetime
    ) -> bool:
        ended = self._state.transact(
            lambda conn: (
                conn.execute(
                    "UPDATE schedules SET status = %s, updated = %s, finished = %s "
                    "WHERE id = %s AND revision = %s AND status = 'active'",
                    (status, _us(now), _us(now), id, revision),
                ).rowcount
            )
        )
        if ended:
            self._state.forget(RUNTIME_PREFIX + id)
        return bool(ended)

    def active_plan(self) -> Iterator[tuple[str, datetime, datetime | None]]:
        rows = self._state.transact(
            lambda conn: conn.execute(
                "SELECT s.id, s.anchor, s.first, j.name, j.last_slot, j.last_outcome, "
                "j.last_status, j.last_run, j.last_success, j.paused, j.restored "
                "FROM schedules s LEFT JOIN jobs j ON j.name = 'schedule/' || s.id "
                "WHERE s.status = 'active' ORDER BY s.first"  # the partial index schedules_next
            ).fetchall()
        )
        self._state.load_states(row[3:] for row in rows if row[3] is not None)
        return ((id, _dt(anchor) or _EPOCH, _dt(first)) for id, anchor, first, *_ in rows)

    def group_counts(self) -> dict[str | None, tuple[int, int]]:
        rows = self._state.transact(
            lambda conn: conn.execute(
                "SELECT grp, count(*) FILTER (WHERE status = 'active'), count(*) "
                "FROM schedules GROUP BY grp"
            ).fetchall()
        )
        return {group: (active, total - active) for group, active, total in rows}

    def purge_schedules(self, before: datetime) -> list[str]:
        def work(conn: psycopg.Connection[Any]) -> list[str]:
            ids = [
                id
                for (id,) in conn.execute(
                    "DELETE FROM schedules WHERE id IN (SELECT id FROM schedules WHERE "
                    "finished < %s ORDER BY finished LIMIT %s) RETURNING id",
                    (_us(before), _PURGE_BATCH),
                )
            ]
            names = [RUNTIME_PREFIX + id for id in ids]
            if names:
                conn.execute("DELETE FROM jobs WHERE name = ANY(%s)", (names,))
                conn.execute("DELETE FROM runs WHERE job = ANY(%s)", (names,))
            return ids

        ids = cast(list[str], self._state.transact(work))
        for id in ids:
            self._state.forget(RUNTIME_PREFIX + id)
        return ids

    # -- following changes made on any replica ---------------------------------------------

    def _follow(self, on_change: Callable[[list[str]], None]) -> None:
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._db.url,
                    autocommit=True,
                    connect_timeout=max(2, round(self._db.timeout)),
                    application_name="cronclock",
                ) as conn:
                    conn.execute(listen)
                    on_change([])  # listening from now on: plan every schedule afresh once
                    while not self._stopping.is_set():
                        ids: set[str] = set()
                        for notice in conn.notifies(timeout=0.5, stop_after=1000):
                            ids.update(notice.payload.split())
                        if ids:
                            on_change(sorted(ids))
            except psycopg.Error:
                on_change([])  # the server away: every schedule again from when it answers
                self._stopping.wait(1.0)


# -------------------------------------------------------------------------------------------
# Wiring


def claim_retention(settings: Settings) -> timedelta:
    """How long slot claims are kept: long past any takeover. After that the job's last slot,
    advanced in the same transaction as the claim, still keeps the slot from being planned."""
    return timedelta(seconds=max(3600.0, 10 * settings.lease_ttl_seconds))


def open_postgres(settings: Settings, log: FilteringBoundLogger) -> OpenState:
    """PostgreSQL state, runtime schedules and the lease for SCHEDULER_STATE_URL=postgresql://"""
    db = Database(
        settings.state_url,
        namespace=settings.namespace,
        timeout=store_timeout(settings.lease_ttl_seconds),
        log=log,
    )
    try:
        db.migrate()
    except UnusableSchema:
        db.close()
        raise
    except _AWAY as error:  # not reachable yet: the daemon starts, unhealthy, and waits
        log.warning(
            "PostgreSQL not reachable at start; firing waits for it",
            postgres=db.where,
            error=one_line(error),
        )
    identity = replica_identity()
    value = lease_value(identity)
    store = PostgresStateStore(
        db,
        lease_value=value,
        log=log,
        max_runs=settings.history_max_runs,
        max_age=timedelta(seconds=settings.history_max_age),
        claim_retention=claim_retention(settings),
    )
    schedules = PostgresSchedules(db, store, log=log)
    lease = PostgresLease(
        db,
        ttl=settings.lease_ttl_seconds,
        log=log,
        identity=identity,
        value=value,
        after_cycle=store.refresh,
    )

    def close() -> None:
        schedules.close()
        store.close()
        db.close()

    return OpenState(store=store, coordinator=lease, schedules=schedules, close=close)
