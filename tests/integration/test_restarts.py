"""Durable state with the real daemon: kills, restarts, catch-up, corrupt and refused files."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon
from tests.support import Reply, Target, fill, mount_tmpfs, unmount

TOKEN = "restart-token"


def env_for(target: Target, jobs: Path, state: Path, **extra: str) -> dict[str, str]:
    return {"API_URL": target.url, "SCHEDULER_API_TOKEN": TOKEN, "SCHEDULER_JOBS_FILE": str(jobs),
            "SCHEDULER_STATE_URL": f"sqlite:///{state}", **extra}  # fmt: skip


def keys(target: Target) -> list[str]:
    return [call.header("Idempotency-Key") or "" for call in target.calls()]


def grid(after: datetime, until: datetime, period: int) -> list[datetime]:
    """Slots of `every <period>s` in (after, until]."""
    slots, slot = [], after + timedelta(seconds=period)
    while slot <= until:
        slots.append(slot)
        slot += timedelta(seconds=period)
    return slots


class TestKilledMidCall:
    def test_a_slot_in_flight_at_sigkill_is_recorded_interrupted_and_never_called_again(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        target.script["/slow"] = [Reply(delay=3.0), Reply()]
        jobs = jobs_file(
            '[jobs.slow]\nschedule = "every 2s"\nendpoint = "/slow"\ntimeout = "10s"\n'
        )
        first = daemon(**env_for(target, jobs, tmp_path / "state.db"))
        assert target.wait_for(lambda calls: target.active > 0, timeout=20)
        first.signal(signal.SIGKILL)
        first.process.wait(10)
        assert target.wait_for(lambda calls: len(calls) >= 1, timeout=10)  # the server finishes it
        killed_slot = target.calls()[0].header("X-Scheduled-For")
        second = daemon(**env_for(target, jobs, tmp_path / "state.db"))
        assert second.wait_for_log(
            "interrupted: the previous process stopped during this call; not called again"
        )
        (event,) = second.events(
            "interrupted: the previous process stopped during this call; not called again"
        )
        assert (event["job"], event["slot"]) == ("slow", killed_slot)
        assert target.wait_for(lambda calls: len(calls) >= 3, timeout=20)
        assert second.stop() == 0
        assert len(keys(target)) == len(set(keys(target))), "no slot called twice"


class TestCatchUpAfterDowntime:
    def run(self, tmp_path: Path, target: Target, jobs_file: Callable[[str], Path],
            daemon: Callable[..., Daemon], catchup: str) -> tuple[datetime, datetime, Daemon]:  # fmt: skip
        jobs = jobs_file(
            f'[jobs.t]\nschedule = "every 2s"\nendpoint = "/t"\ncatchup = "{catchup}"\n'
        )
        env = env_for(target, jobs, tmp_path / "state.db")
        first = daemon(**env)
        assert target.wait_for(lambda calls: len(calls) >= 1)
        assert first.stop() == 0
        last_fired = max(call.scheduled_for for call in target.calls())
        time.sleep(6.5)  # three slots fall due while down
        before = len(target.calls())
        second = daemon(**env)
        assert second.wait_for_log("cronclock started")
        started = datetime.fromisoformat(second.events("cronclock started")[0]["timestamp"])
        assert target.wait_for(lambda calls: len(calls) > before, timeout=20)
        time.sleep(1.0)  # let every catch-up call finish
        assert second.stop() == 0
        return last_fired, started, second

    def test_latest_fires_the_latest_missed_slot_once_and_records_the_older(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        last_fired, started, second = self.run(tmp_path, target, jobs_file, daemon, "latest")
        due = grid(last_fired, started, 2)
        assert len(due) >= 3
        slots = [call.scheduled_for for call in target.calls()]
        assert due[-1] in slots, "the latest missed slot fired with its own X-Scheduled-For"
        assert not set(due[:-1]) & set(slots), "older ones did not"
        assert second.events("missed slots")[0]["count"] == len(due) - 1
        assert second.events("catch-up fire")[0]["slot"].startswith(
            due[-1].strftime("%Y-%m-%dT%H:%M:%S")
        )

    def test_none_only_records(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        last_fired, started, second = self.run(tmp_path, target, jobs_file, daemon, "none")
        due = grid(last_fired, started, 2)
        slots = {call.scheduled_for for call in target.calls()}
        assert not set(due) & slots
        assert second.events("missed slots")[0]["count"] == len(due)

    def test_all_replays_in_order(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        last_fired, started, second = self.run(tmp_path, target, jobs_file, daemon, "all")
        due = grid(last_fired, started, 2)
        replayed = [call.scheduled_for for call in target.calls() if call.scheduled_for in due]
        assert sorted(replayed) == due and not second.events("missed slots")


class TestRestartWithinTheSameSlot:
    def test_nothing_is_fired_twice(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        jobs = jobs_file('[jobs.t]\nschedule = "every 5s"\nendpoint = "/t"\n')
        env = env_for(target, jobs, tmp_path / "state.db")
        for _ in range(3):  # restart quickly, several times, right after a fire
            count = len(target.calls())
            proc = daemon(**env)
            assert target.wait_for(lambda calls, count=count: len(calls) > count, timeout=20)
            assert proc.stop() == 0
        assert len(keys(target)) == len(set(keys(target)))
        state = sqlite_rows(
            tmp_path / "state.db", "SELECT COUNT(*) FROM runs WHERE outcome = 'missed'"
        )
        assert state == [(0,)]


class TestTwoProcessesOnOneFile:
    def test_the_second_exits_2_and_the_first_fires_on_alone(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        jobs = jobs_file('[jobs.t]\nschedule = "every 1s"\nendpoint = "/t"\n')
        env = env_for(target, jobs, tmp_path / "state.db")
        first = daemon(**env)
        assert target.wait_for(lambda calls: len(calls) >= 1, timeout=20)
        second = daemon(**env)
        assert second.process.wait(30) == 2
        message = second.log_path.read_text()
        assert f"in use by another cronclock process (pid {first.process.pid})" in message
        assert "postgresql:// or redis:// state for several replicas" in message
        assert "Traceback" not in message
        count = len(target.calls())
        assert target.wait_for(lambda calls: len(calls) >= count + 2, timeout=10)
        assert first.stop() == 0
        assert len(keys(target)) == len(set(keys(target)))


def sqlite_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


class TestUnusableStateFiles:
    def test_a_corrupt_file_is_moved_aside_and_firing_goes_on(
        self,
        tmp_path: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        state = tmp_path / "state.db"
        state.write_bytes(b"\x00garbage" * 512)
        jobs = jobs_file('[jobs.t]\nschedule = "every 1s"\nendpoint = "/t"\n')
        proc = daemon(**env_for(target, jobs, state))
        assert target.wait_for(lambda calls: len(calls) >= 2)
        assert proc.stop() == 0
        (moved,) = tmp_path.glob("state.db.corrupt-*")
        (event,) = proc.events("state file unusable; moved aside, starting with fresh state")
        assert (event["state_file"], event["moved_to"]) == (str(state), str(moved))
        assert sqlite_rows(state, "SELECT COUNT(*) > 0 FROM runs") == [(1,)]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody may write to, root included (chattr +i)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed, so no directory is read-only for root")
    made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a read-only directory here: {made.stderr.decode().strip()}")
    yield directory
    subprocess.run(["chattr", "-i", str(directory)], check=False)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, mounted for the test (needs root)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if (why := mount_tmpfs(mount, "256k")) is not None:
        pytest.skip(f"cannot mount a small tmpfs here: {why}")
    yield mount
    unmount(mount)


class TestADiskThatRefuses:
    def test_a_read_only_directory_fires_nothing_and_says_why(
        self,
        read_only_dir: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        # A slot is called only once its start is on disk (issue 15.3).
        jobs = jobs_file('[jobs.t]\nschedule = "every 1s"\nendpoint = "/t"\n')
        proc = daemon(**env_for(target, jobs, read_only_dir / "state.db"))
        assert proc.wait_for_log("not fired: the slot's start could not be recorded")
        time.sleep(2)
        assert proc.stop() == 0
        assert target.calls() == []
        complaints = proc.events(
            "state not written to disk; slots are not fired until it can be written"
        )
        assert len(complaints) == 1, "logged once per minute, not per write"
        assert str(read_only_dir / "state.db") == complaints[0]["state_file"]

    def test_a_full_disk_stops_firing_logs_once_and_resumes_when_space_returns(
        self,
        full_disk: Path,
        target: Target,
        jobs_file: Callable[[str], Path],
        daemon: Callable[..., Daemon],
    ) -> None:
        jobs = jobs_file('[jobs.t]\nschedule = "every 1s"\nendpoint = "/t"\n')
        proc = daemon(**env_for(target, jobs, full_disk / "state.db"))
        assert target.wait_for(lambda calls: len(calls) >= 1)
        fill(full_disk / "filler")
        assert proc.wait_for_log("not fired: the slot's start could not be recorded")
        count = len(target.calls())
        time.sleep(2)
        assert len(target.calls()) <= count + 1, "at most the call already on its way"
        (full_disk / "filler").unlink()
        assert proc.wait_for_log("state file writable again; firing resumes")
        resumed = len(target.calls())
        assert target.wait_for(lambda calls: len(calls) >= resumed + 2)
        assert proc.stop() == 0
        complaints = proc.events(
            "state not written to disk; slots are not fired until it can be written"
        )
        assert len(complaints) == 1 and "full" in complaints[0]["error"]
