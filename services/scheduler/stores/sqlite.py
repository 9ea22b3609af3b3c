"""SQLite (`sqlite:///path`), the embedded default: job state, run history and runtime
schedules in one file in WAL mode, durable across restarts; one process at a time holds it
(StateLock), and that process always leads (coordination.Solo).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from structlog.typing import FilteringBoundLogger

from ..telemetry import Throttle
from .memory import MemoryStateStore
from .protocols import (
    COALESCE_SECONDS,
    RUNTIME_PREFIX,
    Change,
    JobState,
    Put,
    Refusal,
    RunRecord,
    ScheduleRecord,
    ScheduleStatus,
    StoreRefused,
    StoreUnavailable,
    decide_puts,
    interrupted,
)

SCHEMA_VERSION = 3
# MIGRATIONS[n] takes a database from user_version n to n + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        last_slot INTEGER,
        last_outcome TEXT,
        last_status INTEGER,
        last_run INTEGER,
        last_success INTEGER,
        paused INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE in_flight (
        key TEXT PRIMARY KEY,
        job TEXT NOT NULL,
        slot INTEGER NOT NULL,
        since INTEGER NOT NULL
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job TEXT NOT NULL,
        slot INTEGER NOT NULL,
        key TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        started INTEGER NOT NULL,
        duration REAL,
        status INTEGER,
        outcome TEXT NOT NULL,
        error TEXT,
        count INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX runs_by_job ON runs (job, id);
    CREATE INDEX runs_by_start ON runs (started);
    """,
    """
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        grp TEXT,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        anchor INTEGER NOT NULL,
        first INTEGER,
        finished INTEGER
    );
    CREATE INDEX schedules_by_status ON schedules (status, id);
    CREATE INDEX schedules_by_group ON schedules (grp, id);
    CREATE INDEX schedules_by_finished ON schedules (finished);
    """,
    """
    ALTER TABLE jobs ADD COLUMN pause_reason TEXT;
    ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN backfill INTEGER NOT NULL DEFAULT 0;
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WAL_CHECKPOINT_PAGES = 100
WAL_SIZE_LIMIT = 512 * 1024
# Run records refused by the disk are kept (at most this many) and written when it heals.
BACKLOG_CAP = 10_000


Statement = tuple[str, tuple[object, ...]]


def _us(instant: datetime | None) -> int | None:
    return None if instant is None else (instant - _EPOCH) // timedelta(microseconds=1)


def _dt(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


class _Commit:
    """A waiter's view of its write: set once committed (`ok`) or refused."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False


class UnusableStateFile(Exception):
    """The state file is corrupt or from a newer cronclock."""


class SqliteStateStore:
    """The embedded default: SQLite in WAL mode, writes serialised, reads from memory.

    Every write goes to disk before the method returns. If the disk refuses (read-only, full),
    the store keeps working in memory, logs the error at most once a minute, reports it through
    `problem()`, and writes the full job state again as soon as the disk accepts writes.
    """

    def __init__(
        self,
        path: Path,
        *,
        log: FilteringBoundLogger,
        max_runs: int = 1000,
        max_age: timedelta = timedelta(days=30),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._log = log
        self._memory = MemoryStateStore(max_runs=max_runs, max_age=max_age)
        self._max_runs = max_runs
        self._max_age = max_age
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._complaints = Throttle(monotonic=monotonic)  # "not written" once a minute
        self._monotonic = monotonic
        self._next_open = -float("inf")  # when a file that would not open is tried again
        self._dirty = False  # job state changed while the disk refused writes
        self._backlog: list[Statement] = []  # run records the disk refused
        self._records = 0
        self._queue: list[tuple[list[Statement], _Commit | None]] = []
        self._queue_changed = threading.Condition()
        self._committing = False
        self._flushers = 0  # threads waiting in flush(): the writer commits at once
        self._closed = False
        self._dead: str | None = None  # why the writer thread stopped, if it did
        self._db: sqlite3.Connection | None = None
        self._lock_file = StateLock.acquire(path)
        try:
            self._db = self._open()
        except UnusableStateFile as error:
            moved = self._move_aside()
            self._log.error(
                "state file unusable; moved aside, starting with fresh state",
                state_file=str(path),
                moved_to=str(moved),
                error=str(error),
            )
            self._db = self._open_or_degrade()
        except sqlite3.Error as error:
            self._degrade(f"cannot open {path}: {error}")
        except OSError as error:
            self._degrade(f"cannot open {path}: {error.strerror or error}")
        self._identity = _identity(path)
        if self._db is not None:
            self._load()
        self._writer = threading.Thread(
            target=self._drain_forever, name="state-writer", daemon=True
        )
        self._writer.start()

    # -- opening ----------------------------------------------------------------------------

    def _open_or_degrade(self) -> sqlite3.Connection | None:
        try:
            return self._open()
        except (sqlite3.Error, OSError, UnusableStateFile) as error:
            self._degrade(f"cannot open {self.path}: {error}")
            return None

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UnusableStateFile(
                    f"schema version {version} is newer than this cronclock's {SCHEMA_VERSION}"
                )
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise UnusableStateFile(f"integrity check failed: {check}")
            db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a committed write survives a killed process (the case
            # at-most-once delivery guards against); only an OS crash may lose the last ones.
            db.execute("PRAGMA synchronous = NORMAL")
            # A small WAL: SQLite's default checkpoint at 1,000 pages lets it grow to 4 MB,
            # which alone fills a small volume; truncated back after each checkpoint.
            db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            for step in range(version, SCHEMA_VERSION):
                db.executescript(
                    f"BEGIN; {MIGRATIONS[step]}; PRAGMA user_version = {step + 1}; COMMIT;"
                )
        except sqlite3.OperationalError:
            db.close()
            raise  # cannot open, locked, read-only: not the file's fault, never moved aside
        except sqlite3.DatabaseError as error:
            db.close()
            raise UnusableStateFile(str(error)) from None
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        self.path.replace(target)
        for suffix in ("-wal", "-shm"):
            sidecar = self.path.with_name(self.path.name + suffix)
            if sidecar.exists():
                sidecar.replace(target.with_name(target.name + suffix))
        return target

    def _load(self) -> None:
        for name, state in self._stored_states().items():
            self._memory.put(name, state)

    def _stored_states(self) -> dict[str, JobState]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT name, last_slot, last_outcome, last_status, last_run, last_success, paused, "
            "pause_reason, failures FROM jobs WHERE name NOT LIKE 'schedule/%' OR "
            "substr(name, 10) IN (SELECT id FROM schedules WHERE status = 'active')"
        )
        return {row[0]: _job_state(row) for row in rows}

    def _attach(self) -> list[Statement]:
        """Open the file this store has none of: one that could not be opened at start (a
        volume not mounted yet, a full disk; tried at most once a second) or one re-created
        after it was deleted. What the file says is merged into what this process did
        meanwhile (the later slot, the later run; a pause from either side holds), calls a
        dead process left in flight are recorded `interrupted`, and this process's own calls
        in flight are written. Returns those statements, for the transaction about to run."""
        now = self._monotonic()
        if now < self._next_open:
            return []
        self._next_open = now + 1.0
        try:
            lock = self._lock_file or StateLock.acquire(self.path)
        except StateInUse as error:
            self._problem = str(error)
            return []
        if lock is None:
            return []
        try:
            db = self._open()
        except (sqlite3.Error, OSError, UnusableStateFile) as error:
            if self._lock_file is None:
                lock.close()
            self._problem = f"cannot open {self.path}: {error}"
            return []
        self._lock_file, self._db, self._identity = lock, db, _identity(self.path)
        self._dirty = True
        mine = self._memory.job_states()
        for name, stored in self._stored_states().items():
            self._memory.put(name, _merged(stored, mine.get(name)))
        ours = self._memory.in_flight()
        rows = db.execute("SELECT key, job, slot FROM in_flight ORDER BY slot").fetchall()
        left = [(key, job, slot) for key, job, slot in rows if key not in ours]
        statements: list[Statement] = []
        wall = datetime.now(UTC)
        for key, job, slot in left:
            record = interrupted(job, _dt(slot) or wall, key, wall)
            self._memory.record_run(record, keep=False)
            statements += [_insert_run(record), ("DELETE FROM in_flight WHERE key = ?", (key,))]
        statements += [
            _in_flight_row(key, job, slot, since) for key, (job, slot, since) in ours.items()
        ]
        self._log.info("state file opened; firing resumes", state_file=str(self.path),
                       interrupted=len(left))  # fmt: skip
        return statements

    # -- the write path ---------------------------------------------------------------------
    #
    # One writer thread commits whatever is queued in one transaction, so a hundred slots
    # handed on at one instant cost one commit, and the threads that make calls never wait
    # for the disk. Only mark_started and set_paused wait for their commit: a slot must be
    # on disk before its call, and a pause before it is acknowledged.

    def _write(self, statements: list[Statement], *, wait: bool = False) -> bool:
        """Queue statements for the writer; with `wait`, True once they are committed."""
        done = _Commit() if wait else None
        with self._queue_changed:
            if self._dead is not None:
                return False
            if self._closed:
                return self._commit(statements)  # after close: write through, in the caller
            self._queue.append((statements, done))
            # Wake the writer for the first item or for a waiter; others ride along in the
            # transaction it is gathering (waking it per call would cost the calls CPU).
            if done is not None or len(self._queue) == 1:
                self._queue_changed.notify_all()
        if done is None:
            return False
        done.event.wait()
        return done.ok

    def _drain_forever(self) -> None:
        try:
            self._drain()
        except BaseException as error:
            # Nobody may wait for a writer that is gone: release every waiter (their writes
            # failed), refuse writes from now on, and let the thread die loudly (the daemon's
            # thread hook turns health 503 and stops the process).
            with self._queue_changed:
                self._dead = f"the state writer thread stopped: {type(error).__name__}: {error}"
                self._problem = self._dead
                batch, self._queue = self._queue, []
                self._committing = False
                self._queue_changed.notify_all()
            for _, done in batch:
                if done is not None:
                    done.event.set()
            raise

    def _drain(self) -> None:
        while True:
            with self._queue_changed:
                while not self._queue and not self._closed:
                    self._queue_changed.wait()
                if not self._queue:
                    return
                # Gather what comes within the coalescing window into one transaction, so a
                # burst of calls is not slowed by a commit per call; a waiter cuts it short.
                until = time.monotonic() + COALESCE_SECONDS
                while (
                    not self._closed
                    and not self._flushers
                    and not any(done is not None for _, done in self._queue)
                    and (left := until - time.monotonic()) > 0
                ):
                    self._queue_changed.wait(left)
                batch, self._queue = self._queue, []
                self._committing = True
            try:
                ok = self._commit(
                    [statement for statements, _ in batch for statement in statements]
                )
            except BaseException:
                self._queue[:0] = batch  # released as failed by _drain_forever
                raise
            with self._queue_changed:
                self._committing = False
                self._queue_changed.notify_all()
            for _, done in batch:
                if done is not None:
                    done.ok = ok
                    done.event.set()

    def flush(self) -> None:
        """Wait until everything queued is committed (or refused)."""
        with self._queue_changed:
            self._flushers += 1
            self._queue_changed.notify_all()
            try:
                while (self._queue or self._committing) and self._dead is None:
                    self._queue_changed.wait()
            finally:
                self._flushers -= 1

    def _commit(self, statements: list[Statement]) -> bool:
        """Run statements in one transaction; True when committed. On failure the job state
        stays in memory and is written whole once the file accepts writes again."""
        with self._lock:
            self._follow_path()
            if self._db is None and not self._closed:
                statements = self._attach() + statements
            if self._db is None:
                self._dirty = True
                self._keep_history(statements)
                self._complain()
                return False
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if self._dirty:
                    self._write_all_jobs()
                for sql, params in self._backlog:
                    self._db.execute(sql, params)
                for sql, params in statements:
                    self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                self._dirty = True
                self._keep_history(statements)
                self._degrade(f"cannot write {self.path}: {error}")
                with contextlib.suppress(sqlite3.Error):  # give the WAL's space back
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                return False
            self._backlog = []
            if self._problem is not None:
                self._log.info("state file writable again; firing resumes",
                               state_file=str(self.path))  # fmt: skip
            self._problem, self._dirty = None, False
            return True

    def _follow_path(self) -> None:
        """The state file must still be the one this process opened: a deleted or replaced
        file (`rm -rf` of the state directory, a tmp cleaner) is let go and re-created at
        its path at once (`_attach`). The lock survives the deletion (see StateLock), so no
        other process can have started on the path meanwhile."""
        if self._lock_file is None or not self._moved():
            return
        self._log.error(
            "state file deleted or replaced while running; re-creating it with the job "
            "state kept in memory (run history before now is lost)",
            state_file=str(self.path),
        )
        assert self._db is not None
        self._db.close()
        self._db = None
        self._next_open = -float("inf")
        try:
            self._lock_file.renew()
        except OSError as error:
            self._degrade(f"cannot re-create {self.path}: {error}")

    def _moved(self) -> bool:
        """True when the open file or its lock file is no longer the one at the path."""
        assert self._lock_file is not None
        return self._db is not None and (
            not self._lock_file.current() or _identity(self.path) != self._identity
        )

    def _keep_history(self, statements: list[Statement]) -> None:
        """Run records the disk refused, kept for the next commit that succeeds (the job
        state is written whole then anyway; refused starts were never called)."""
        self._backlog += [st for st in statements if st[0].startswith("INSERT INTO runs")]
        if len(self._backlog) > BACKLOG_CAP:
            dropped = len(self._backlog) - BACKLOG_CAP
            del self._backlog[:dropped]
            self._log.error("run history dropped: the disk refused writes for too long",
                            state_file=str(self.path), dropped=dropped)  # fmt: skip

    def _rollback(self) -> None:
        assert self._db is not None
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            self._db.execute("ROLLBACK")

    def _degrade(self, problem: str) -> None:
        self._problem = problem
        self._complain()

    def _complain(self) -> None:
        if self._complaints.ready():
            self._log.error(
                "state not written to disk; slots are not fired until it can be written",
                state_file=str(self.path),
                error=self._problem,
            )

    def _write_all_jobs(self) -> None:
        assert self._db is not None
        for name, state in self._memory.job_states().items():
            self._db.execute(*_upsert(name, state))

    def _job_write(self, job: str) -> Statement:
        return _upsert(job, self._memory.job_state(job))

    # -- StateStore -------------------------------------------------------------------------

    def job_state(self, job: str) -> JobState:
        return self._memory.job_state(job)

    def advance(self, job: str, slot: datetime) -> None:
        self._memory.advance(job, slot)
        self._write([self._job_write(job)])

    def mark_started(self, slots: Iterable[tuple[str, datetime, str]]) -> dict[str, Refusal]:
        handed = list(slots)
        self._memory.mark_started(handed)
        since = datetime.now(UTC)
        statements = [self._job_write(job) for job in dict.fromkeys(job for job, _, _ in handed)]
        statements += [_in_flight_row(key, job, slot, since) for job, slot, key in handed]
        if self._write(statements, wait=True):
            return {}
        # The starts are not on disk, so a process killed now would fire these slots again
        # after its restart: they are not called (at most once per slot). Memory keeps them
        # handled, and the file gets them when it accepts writes again.
        for job, _, key in handed:
            self._memory.mark_finished(job, key)
        return {key: "unavailable" for _, _, key in handed}

    def claim(self, job: str, key: str) -> Refusal | None:
        return None

    def refresh(self) -> None:
        return None

    def mark_finished(self, job: str, key: str) -> None:
        self._memory.mark_finished(job, key)
        self._write([("DELETE FROM in_flight WHERE key = ?", (key,))])

    def recover_interrupted(self, now: datetime) -> list[RunRecord]:
        self.flush()
        with self._lock:
            rows = (
                self._db.execute("SELECT key, job, slot FROM in_flight ORDER BY slot").fetchall()
                if self._db is not None
                else []
            )
        records = [interrupted(job, _dt(slot) or now, key, now) for key, job, slot in rows]
        for record in records:
            self.record_run(record)
            self._memory.advance(record.job, record.slot)
        if rows:
            self._write([("DELETE FROM in_flight", ())])
        return records

    def record_run(self, record: RunRecord) -> None:
        # History is read from the file; memory keeps it only while the file refuses writes.
        self._memory.record_run(record, keep=self._problem is not None)
        statements: list[Statement] = [_insert_run(record), self._job_write(record.job)]
        # History bounds, amortised: every 100th record (and at close) trims each job to its
        # newest max_runs and drops what is older than max_age.
        self._records += 1
        if self._records % 100 == 0:
            statements += self._prune(record.started)
        self._write(statements)

    def _prune(self, now: datetime) -> list[Statement]:
        return [
            ("DELETE FROM runs WHERE started < ?", (_us(now - self._max_age),)),
            (
                "DELETE FROM runs WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER "
                "(PARTITION BY job ORDER BY id DESC) AS n FROM runs) WHERE n > ?)",
                (self._max_runs,),
            ),
        ]

    def runs(self, job: str, limit: int = 50) -> list[RunRecord]:
        self.flush()
        with self._lock:
            if self._db is None or self._problem is not None:
                return self._memory.runs(job, limit)
            rows = self._db.execute(
                "SELECT slot, key, attempt, started, duration, status, outcome, error, count, "
                "backfill FROM runs WHERE job = ? ORDER BY id DESC LIMIT ?",
                (job, limit),
            ).fetchall()
        return [_run_record(job, row) for row in rows]

    def set_paused(self, job: str, paused: bool, reason: str | None = None) -> None:
        self._memory.set_paused(job, paused, reason)
        self._write([self._job_write(job)], wait=True)

    def forget(self, job: str) -> None:
        self._memory.forget(job)

    def problem(self) -> str | None:
        if self._problem is None and self._lock_file is not None and self._moved():
            self._write([])  # the writer re-creates the file at once
            return f"{self.path} was deleted or replaced; re-creating it"
        return self._problem

    # -- for the runtime schedules kept in the same file (SqliteSchedules) -------------------

    def write(self, statements: list[Statement], *, wait: bool = False) -> None:
        self._write(statements, wait=wait)

    def read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query, after every queued write; StoreUnavailable when the file cannot
        be read."""
        self.flush()
        with self._lock:
            if self._db is None:
                raise StoreUnavailable(self._problem or f"{self.path} is not open")
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as error:
                raise StoreUnavailable(f"cannot read {self.path}: {error}") from None

    def close(self) -> None:
        self._write(self._prune(datetime.now(UTC)))
        with self._queue_changed:
            self._closed = True
            self._queue_changed.notify_all()
        self._writer.join(10)  # a dead writer has already released its waiters
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as error:
                    self._log.warning("state checkpoint failed", error=str(error))
                self._db.close()
                self._db = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None


class StateInUse(StoreRefused):
    """Another live cronclock process holds this state file."""


class StateLock:
    """One process per state file, held for the life of the store: two processes planning
    from one SQLite file would both fire every slot.

    Two locks: `flock` on `<state file>.lock` (seen by every process that opens that file,
    in any container), and an abstract unix socket named after the file's path and file
    system, which lives in the kernel, so it survives the state directory being deleted: a
    second daemon started on the same path then is refused even though the lock file is gone.
    """

    def __init__(self, path: Path, handle: TextIO, beacon: socket.socket | None) -> None:
        self._path = path.with_name(path.name + ".lock")
        self._handle = handle
        self._beacon = beacon

    @classmethod
    def acquire(cls, path: Path) -> StateLock | None:
        """None when the directory cannot be written (the store then says so)."""
        beacon = _beacon(path)
        try:
            handle = _flock(path.with_name(path.name + ".lock"))
        except BaseException:
            if beacon is not None:
                beacon.close()
            raise
        if handle is None:
            if beacon is not None:
                beacon.close()
            return None
        return cls(path, handle, beacon)

    def current(self) -> bool:
        """True while the lock file at the path is the one this process holds."""
        try:
            return _identity(self._path) == _identity_of(self._handle)
        except OSError:
            return False

    def renew(self) -> None:
        """Lock the file at the path again (after it was deleted)."""
        handle = _flock(self._path)
        if handle is None:
            raise OSError(f"cannot create {self._path}")
        self._handle.close()
        self._handle = handle

    def close(self) -> None:
        self._handle.close()  # releases the flock
        if self._beacon is not None:
            self._beacon.close()


def _in_use(path: Path, holder: str) -> StateInUse:
    return StateInUse(
        f"{path} is in use by another cronclock process (pid {holder}); run one process "
        "per SQLite file, or postgresql:// or redis:// state for several replicas"
    )


def _flock(lock_path: Path) -> TextIO | None:
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a+")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise _in_use(lock_path.with_suffix(""), holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _beacon(path: Path) -> socket.socket | None:
    """Listen on the abstract socket of this state file; StateInUse when another process
    does. None where abstract sockets do not exist (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    absolute = Path(os.path.abspath(path))
    anchor = next((p for p in (absolute, *absolute.parents) if p.exists()), Path("/"))
    digest = hashlib.sha256(f"{absolute}\0{anchor.stat().st_dev}".encode()).hexdigest()[:40]
    name = f"\0cronclock-state-{digest}"
    beacon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        beacon.bind(name)
        beacon.listen(1)
    except OSError as error:
        beacon.close()
        if error.errno != errno.EADDRINUSE:
            return None
        raise _in_use(path, _peer_pid(name)) from None
    return beacon


def _peer_pid(name: str) -> str:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(name)
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return str(struct.unpack("3i", credentials)[0])
    except OSError:
        return "unknown"
    finally:
        probe.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _identity_of(handle: TextIO) -> tuple[int, int]:
    stat = os.fstat(handle.fileno())
    return stat.st_dev, stat.st_ino


def _in_flight_row(key: str, job: str, slot: datetime, since: datetime) -> Statement:
    return (
        "INSERT OR REPLACE INTO in_flight (key, job, slot, since) VALUES (?, ?, ?, ?)",
        (key, job, _us(slot), _us(since)),
    )


def _insert_run(record: RunRecord) -> Statement:
    return (
        "INSERT INTO runs (job, slot, key, attempt, started, duration, status, outcome, "
        "error, count, backfill) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.job,
            _us(record.slot),
            record.key,
            record.attempt,
            _us(record.started),
            record.duration,
            record.status,
            record.outcome,
            record.error,
            record.count,
            int(record.backfill),
        ),
    )


def _run_record(job: str, row: tuple[Any, ...]) -> RunRecord:
    slot, key, attempt, started, duration, status, outcome, error, count, backfill = row
    return RunRecord(
        job=job,
        slot=_dt(slot) or _EPOCH,
        key=key,
        attempt=attempt,
        started=_dt(started) or _EPOCH,
        duration=duration,
        status=status,
        outcome=outcome,
        error=error,
        count=count,
        backfill=bool(backfill),
    )


def _job_state(row: tuple[Any, ...]) -> JobState:
    _, last_slot, outcome, status, last_run, last_success, paused, reason, failures = row
    return JobState(
        last_slot=_dt(last_slot),
        last_outcome=outcome,
        last_status=status,
        last_run=_dt(last_run),
        last_success=_dt(last_success),
        paused=bool(paused),
        pause_reason=reason,
        failures=failures,
    )


def _merged(stored: JobState, mine: JobState | None) -> JobState:
    """A job's state from a file opened late and from what this process did meanwhile."""
    if mine is None:
        return stored
    slots = [slot for slot in (stored.last_slot, mine.last_slot) if slot is not None]
    later = mine if (mine.last_run or _EPOCH) >= (stored.last_run or _EPOCH) else stored
    return replace(
        later,
        last_slot=max(slots, default=None),
        last_success=max((t for t in (stored.last_success, mine.last_success) if t), default=None),
        paused=stored.paused or mine.paused,
        pause_reason=mine.pause_reason if mine.paused else stored.pause_reason,
    )


def _upsert(name: str, state: JobState) -> Statement:
    return (
        "INSERT INTO jobs (name, last_slot, last_outcome, last_status, last_run, last_success, "
        "paused, pause_reason, failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) "
        "DO UPDATE SET last_slot = excluded.last_slot, last_outcome = excluded.last_outcome, "
        "last_status = excluded.last_status, last_run = excluded.last_run, "
        "last_success = excluded.last_success, paused = excluded.paused, "
        "pause_reason = excluded.pause_reason, failures = excluded.failures",
        (
            name,
            _us(state.last_slot),
            state.last_outcome,
            state.last_status,
            _us(state.last_run),
            _us(state.last_success),
            int(state.paused),
            state.pause_reason,
            state.failures,
        ),
    )


# -------------------------------------------------------------------------------------------
# Runtime schedules

_COLUMNS = "id, revision, spec, status, grp, created, updated, anchor, first, finished"
_PURGE_BATCH = 500


def _row(row: tuple[Any, ...]) -> ScheduleRecord:
    id, revision, spec, status, group, created, updated, anchor, first, finished = row
    return ScheduleRecord(
        id=id,
        revision=revision,
        spec=spec,
        status=status,
        group=group,
        created=_dt(created) or _EPOCH,
        updated=_dt(updated) or _EPOCH,
        anchor=_dt(anchor) or _EPOCH,
        first=_dt(first),
        finished=_dt(finished),
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
        return ((id, _dt(anchor) or _EPOCH, _dt(first)) for id, anchor, first in rows)

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
