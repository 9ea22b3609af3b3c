"""The SQLite store: durability, bounds, migrations, corrupt files and a disk that refuses."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from services.scheduler.config import load_settings, sqlite_path
from services.scheduler.stores import open_store
from services.scheduler.stores.memory import MemorySchedules, MemoryStateStore
from services.scheduler.stores.protocols import JobState, RunRecord
from services.scheduler.stores.sqlite import (
    SCHEMA_VERSION,
    SqliteSchedules,
    SqliteStateStore,
    StateInUse,
)

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def record(
    job: str = "j", minutes: int = 0, outcome: str = "success", **fields: object
) -> RunRecord:
    values: dict[str, object] = {"job": job, "slot": T + timedelta(minutes=minutes), "key": f"{job}@{minutes}",
                                 "attempt": 1, "started": T + timedelta(minutes=minutes), "outcome": outcome}  # fmt: skip
    values.update(fields)
    return RunRecord(**values)  # type: ignore[arg-type]


def read_only(path: Path) -> sqlite3.Connection:
    """The same file opened read-only: a real SQLite refusal of every write."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                           isolation_level=None)  # fmt: skip


def store(path: Path, **kwargs: object) -> SqliteStateStore:
    return SqliteStateStore(path, log=structlog.get_logger(), **kwargs)  # type: ignore[arg-type]


class TestDurability:
    def test_job_state_and_history_survive_a_reopen(self, tmp_path: Path) -> None:
        db = store(tmp_path / "state.db")
        db.mark_started([("j", T, "j@1")])
        db.record_run(record(status=200, duration=0.25))
        db.mark_finished("j", "j@1")
        db.set_paused("j", True)
        db.close()
        again = store(tmp_path / "state.db")
        state = again.job_state("j")
        assert state == JobState(
            last_slot=T,
            last_outcome="success",
            last_status=200,
            last_run=T,
            last_success=T,
            paused=True,
        )
        (run,) = again.runs("j")
        assert (run.slot, run.status, run.duration, run.outcome) == (T, 200, 0.25, "success")
        assert again.recover_interrupted(T) == []

    def test_it_uses_wal_and_records_its_schema_version(self, tmp_path: Path) -> None:
        store(tmp_path / "state.db").close()
        raw = sqlite3.connect(tmp_path / "state.db")
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_the_directory_is_created(self, tmp_path: Path) -> None:
        store(tmp_path / "deep" / "er" / "state.db").close()
        assert (tmp_path / "deep" / "er" / "state.db").exists()

    def test_a_started_slot_that_never_finished_is_recovered_as_interrupted(
        self, tmp_path: Path
    ) -> None:
        db = store(tmp_path / "state.db")
        db.mark_started([("j", T, "j@1000")])
        db.close()  # the process died mid-call: no mark_finished
        again = store(tmp_path / "state.db")
        (interrupted,) = again.recover_interrupted(T + timedelta(minutes=1))
        assert (interrupted.job, interrupted.slot, interrupted.key, interrupted.outcome) == (
            "j",
            T,
            "j@1000",
            "interrupted",
        )
        assert again.job_state("j").last_slot == T
        assert again.job_state("j").last_outcome == "interrupted"
        assert again.recover_interrupted(T) == [], "recorded once"

    def test_last_slot_only_moves_forward(self, tmp_path: Path) -> None:
        db = store(tmp_path / "state.db")
        db.advance("j", T + timedelta(hours=1))
        db.advance("j", T)
        assert db.job_state("j").last_slot == T + timedelta(hours=1)


class TestTheWriter:
    def test_writes_from_many_threads_all_land_and_mark_started_is_durable_at_return(
        self, tmp_path: Path
    ) -> None:
        import threading

        db = store(tmp_path / "state.db")

        def work(job: str) -> None:
            for minute in range(50):
                db.record_run(record(job, minute))

        threads = [threading.Thread(target=work, args=(f"j{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        db.mark_started([("x", T, "x@1")])
        raw = sqlite3.connect(tmp_path / "state.db")
        assert raw.execute("SELECT key FROM in_flight").fetchall() == [("x@1",)]
        for thread in threads:
            thread.join()
        db.close()
        assert raw.execute("SELECT COUNT(*) FROM runs").fetchone() == (400,)


class TestBounds:
    def test_history_keeps_at_most_max_runs_per_job(self, tmp_path: Path) -> None:
        db = store(tmp_path / "state.db", max_runs=5)
        for minute in range(40):
            db.record_run(record("a", minute))
            db.record_run(record("b", minute))
        db.close()
        raw = sqlite3.connect(tmp_path / "state.db")
        counts = dict(raw.execute("SELECT job, COUNT(*) FROM runs GROUP BY job").fetchall())
        assert counts == {"a": 5, "b": 5}
        again = store(tmp_path / "state.db", max_runs=5)
        assert [r.slot.minute for r in again.runs("a")] == [39, 38, 37, 36, 35]

    def test_history_older_than_max_age_is_dropped(self, tmp_path: Path) -> None:
        db = store(tmp_path / "state.db", max_age=timedelta(hours=1))
        for minute in range(0, 300, 2):  # 150 writes over five hours
            db.record_run(record("a", minute))
        runs = db.runs("a", limit=1000)
        # Pruned by age every 100 writes: the first hours are gone, the last hour is kept.
        assert all(r.started >= T + timedelta(minutes=100) for r in runs)
        assert all(
            T + timedelta(minutes=m) in {r.started for r in runs} for m in range(240, 300, 2)
        )


class TestUnusableFiles:
    def test_a_corrupt_file_is_moved_aside_and_named(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        path.write_bytes(b"this is not a database" * 100)
        with capture_logs() as logs:
            db = store(path)
        moved = list(tmp_path.glob("state.db.corrupt-*"))
        assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
        (event,) = [e for e in logs if e["log_level"] == "error"]
        assert event["state_file"] == str(path) and event["moved_to"] == str(moved[0])
        db.record_run(record())
        db.flush()
        assert db.problem() is None and db.runs("j")

    def test_a_file_from_a_newer_schema_is_moved_aside(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        raw = sqlite3.connect(path)
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        raw.close()
        with capture_logs() as logs:
            store(path)
        assert list(tmp_path.glob("state.db.corrupt-*"))
        assert "newer than this cronclock" in logs[0]["error"]

    def test_an_older_schema_is_migrated_in_place(self, tmp_path: Path) -> None:
        path = tmp_path / "state.db"
        sqlite3.connect(path).close()  # version 0: an empty database
        store(path).close()
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert not list(tmp_path.glob("state.db.corrupt-*"))


clock = {"now": 0.0}


class TestADiskThatRefuses:
    def test_it_keeps_working_in_memory_logs_once_a_minute_and_heals(self, tmp_path: Path) -> None:
        clock = {"now": 0.0}
        db = store(tmp_path / "state.db", monotonic=lambda: clock["now"])
        db.advance("j", T)
        db.flush()
        writable = db._db
        # A real SQLite refusal: the same file opened read-only.
        db._db = sqlite3.connect(
            f"file:{tmp_path / 'state.db'}?mode=ro",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
        )
        with capture_logs() as logs:
            db.advance("j", T + timedelta(minutes=1))
            db.set_paused("j", True)
            db.flush()
            clock["now"] = 30.0
            db.advance("j", T + timedelta(minutes=2))
            db.flush()
            clock["now"] = 61.0
            db.advance("j", T + timedelta(minutes=3))
            db.flush()
        assert db.job_state("j") == JobState(last_slot=T + timedelta(minutes=3), paused=True)
        assert "readonly" in (db.problem() or "")
        complaints = [e for e in logs if e["event"].startswith("state not written")]
        assert len(complaints) == 2, "once at first, once after a minute"
        db._db = writable
        db.record_run(record(minutes=4))
        db.flush()
        assert db.problem() is None
        db.close()
        again = store(tmp_path / "state.db")
        assert again.job_state("j").paused is True
        assert again.job_state("j").last_slot == T + timedelta(minutes=3)

    def test_an_unopenable_path_starts_degraded_and_refuses_every_start(
        self, tmp_path: Path
    ) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("a file where a directory should be")
        db = store(blocker / "state.db")
        assert db.problem() is not None and "cannot open" in db.problem()  # type: ignore[operator]
        assert db.mark_started([("j", T, "k")]) == {"k": "unavailable"}
        assert db.job_state("j").last_slot == T, "handled: never planned again"

    def test_a_file_that_could_not_be_opened_at_start_is_opened_once_it_can_be(
        self, tmp_path: Path
    ) -> None:
        # The directory is a file at start (a volume not mounted yet, say), then fixed.
        first = store(tmp_path / "old" / "state.db")
        first.mark_started([("j", T, "j@0")])  # left in flight by a process that died
        first.set_paused("p", True)
        first.flush()
        first._db.close()  # type: ignore[union-attr]  # "killed": nothing else is written
        first._lock_file.close()  # type: ignore[union-attr]
        first._db = None
        (tmp_path / "state").write_text("not a directory yet")
        db = store(tmp_path / "state" / "state.db", monotonic=lambda: clock["now"])
        assert db.mark_started([("j", T + timedelta(minutes=1), "j@1")]) == {"j@1": "unavailable"}
        (tmp_path / "state").unlink()
        (tmp_path / "old").rename(tmp_path / "state")
        clock["now"] += 5  # re-opening is tried at most once a second
        assert db.mark_started([("j", T + timedelta(minutes=2), "j@2")]) == {}
        assert db.problem() is None
        assert db.job_state("p").paused, "what the file says is merged in"
        assert db.job_state("j").last_slot == T + timedelta(minutes=2)
        assert [r.key for r in db.runs("j") if r.outcome == "interrupted"] == ["j@0"]
        with pytest.raises(StateInUse):
            store(tmp_path / "state" / "state.db")
        db.close()

    def test_a_start_that_is_not_on_disk_is_refused_and_written_once_the_disk_heals(
        self, tmp_path: Path
    ) -> None:
        # Issue 15.3: a slot whose start is not durable would be fired again after a kill -9.
        db = store(tmp_path / "state.db")
        writable = db._db
        db._db = read_only(tmp_path / "state.db")
        assert db.mark_started([("j", T, "j@1"), ("k", T, "k@1")]) == {
            "j@1": "unavailable", "k@1": "unavailable"}  # fmt: skip
        assert db.job_state("j").last_slot == T
        db._db = writable
        assert db.mark_started([("j", T + timedelta(minutes=1), "j@2")]) == {}
        db.close()
        again = store(tmp_path / "state.db")
        assert again.job_state("k").last_slot == T, "the refused slot is handled on disk too"
        assert [r.key for r in again.recover_interrupted(T)] == ["j@2"]

    def test_history_refused_by_the_disk_is_written_once_it_accepts_writes(
        self, tmp_path: Path
    ) -> None:
        # Found by bench/chaos.py: records of slots not fired while the disk was full were
        # kept in memory only, so the history lost them once the disk healed.
        db = store(tmp_path / "state.db")
        writable = db._db
        db._db = read_only(tmp_path / "state.db")
        db.record_run(record(minutes=1, outcome="missed", error="not fired: disk full"))
        db.flush()
        assert db.problem() is not None
        db._db = writable
        db.record_run(record(minutes=2))
        db.flush()
        assert db.problem() is None
        assert [r.outcome for r in db.runs("j")] == ["success", "missed"]
        db.close()

    def test_the_wal_is_kept_small(self, tmp_path: Path) -> None:
        # Found by bench/chaos.py: on a 2 MB volume the WAL alone filled the disk, since
        # SQLite checkpoints only at 1,000 pages (4 MB). The daemon commits once per beat.
        db = store(tmp_path / "state.db")
        for n in range(1500):
            db.mark_started([(f"j{n % 10}", T + timedelta(seconds=n), f"k{n}")])
            db.mark_finished(f"j{n % 10}", f"k{n}")
        db.flush()
        wal = tmp_path / "state.db-wal"
        assert wal.stat().st_size < 1_000_000, f"WAL {wal.stat().st_size:,} bytes"
        db.close()


class TestTheWriterThread:
    def test_a_writer_that_dies_releases_its_waiters_and_refuses_writes(
        self, tmp_path: Path
    ) -> None:
        # Issue 15.7: a writer thread killed by an unexpected error left mark_started waiting
        # forever (firing stopped for good) and close() hanging.
        import threading

        db = store(tmp_path / "state.db")
        died = threading.Event()
        hook = threading.excepthook
        threading.excepthook = lambda args: died.set()
        try:

            def explode(statements: object) -> bool:
                raise OverflowError("Python int too large to convert to SQLite INTEGER")

            db._commit = explode  # type: ignore[assignment,method-assign]
            assert db.mark_started([("j", T, "k")]) == {"k": "unavailable"}
            assert died.wait(5)
        finally:
            threading.excepthook = hook
        assert "state writer thread stopped: OverflowError" in (db.problem() or "")
        assert db.mark_started([("j", T + timedelta(minutes=1), "k2")]) == {"k2": "unavailable"}
        db.flush()  # returns
        db.close()  # returns


class TestTheStateDirectoryDeleted:
    def test_the_file_is_re_created_with_the_state_kept_in_memory(self, tmp_path: Path) -> None:
        import shutil

        directory = tmp_path / "state"
        db = store(directory / "state.db")
        db.mark_started([("j", T, "j@1")])
        db.mark_finished("j", "j@1")
        db.mark_started([("j", T + timedelta(minutes=1), "j@2")])
        db.flush()
        shutil.rmtree(directory)
        assert "was deleted or replaced" in (db.problem() or "")
        db.flush()
        assert db.problem() is None
        assert (directory / "state.db").exists() and (directory / "state.db.lock").exists()
        db.mark_started([("j", T + timedelta(minutes=2), "j@3")])
        db.close()
        again = store(directory / "state.db")
        assert again.job_state("j").last_slot == T + timedelta(minutes=2)
        assert sorted(r.key for r in again.recover_interrupted(T)) == ["j@2", "j@3"]

    def test_a_second_store_is_refused_after_the_directory_was_deleted(
        self, tmp_path: Path
    ) -> None:
        import shutil

        directory = tmp_path / "state"
        first = store(directory / "state.db")
        shutil.rmtree(directory)
        with pytest.raises(StateInUse, match=rf"\(pid {os.getpid()}\)"):
            store(directory / "state.db")
        first.close()
        store(directory / "state.db").close()


class TestUrls:
    @pytest.mark.parametrize(
        ("url", "path"),
        [("sqlite:///./.cronclock/state.db", ".cronclock/state.db"), ("sqlite:////var/lib/cronclock/state.db", "/var/lib/cronclock/state.db"), ("sqlite:///state.db", "state.db")],
    )  # fmt: skip
    def test_sqlite_urls(self, url: str, path: str) -> None:
        assert sqlite_path(url) == Path(path)

    def test_memory_and_sqlite_stores_are_opened_by_url(self, tmp_path: Path) -> None:
        log = structlog.get_logger()
        memory = open_store(load_settings({"SCHEDULER_STATE_URL": "memory://"}), log)
        assert isinstance(memory.store, MemoryStateStore)
        assert isinstance(memory.schedules, MemorySchedules)
        url = f"sqlite:///{tmp_path}/s.db"
        sqlite = open_store(load_settings({"SCHEDULER_STATE_URL": url}), log)
        assert isinstance(sqlite.store, SqliteStateStore)
        assert isinstance(sqlite.schedules, SqliteSchedules)
        sqlite.close()


class TestOneProcessPerFile:
    def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(
        self, tmp_path: Path
    ) -> None:
        first = store(tmp_path / "state.db")
        with pytest.raises(
            StateInUse, match=rf"in use by another cronclock process \(pid {os.getpid()}\)"
        ):
            store(tmp_path / "state.db")
        first.close()
        store(tmp_path / "state.db").close()
