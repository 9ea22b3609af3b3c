"""Issue 15, scenario by scenario, with the real daemon as a subprocess, a loopback target
that records every request, and (for HA) a real redis-server of the test's own."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import (
    Process,
    admin_url,
    duplicates,
    env_for,
    health,
    runs,
    sqlite_url,
    wait_until,
)
from tests.support import Arrival, RedisServer, Reply, Target, fill, mount_tmpfs, unmount


def grid_keys(job: str, first: datetime, last: datetime, step: float = 1.0) -> set[str]:
    """Idempotency-Keys of every slot of an `every <step>s` job from `first` to `last`."""
    keys, slot = set(), first
    while slot <= last:
        keys.add(f"{job}@{round(slot.timestamp() * 1000)}")
        slot += timedelta(seconds=step)
    return keys


def accounted(
    job: str, history: list[dict[str, object]], calls: list[Arrival], step: int = 1
) -> set[str]:
    """Every slot key the target received or the history records (a record of several
    missed slots stands for `count` slots ending at its slot)."""
    keys = {call.header("Idempotency-Key") or "" for call in calls if call.path == f"/{job}"}
    for run in history:
        slot = datetime.fromisoformat(str(run["slot"]).replace("Z", "+00:00"))
        for back in range(int(str(run["count"]))):
            keys.add(f"{job}@{round((slot - timedelta(seconds=back * step)).timestamp() * 1000)}")
    return keys


# -- 1. a reload just before a slot ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["skip", "queue", "allow"])
def test_a_reload_sent_just_before_each_slot_never_calls_a_slot_twice(
    overlap: str,
    tmp_path: Path,
    target: Target,
    spawn: Callable[..., Process],
) -> None:
    jobs = tmp_path / "jobs.toml"

    def write(timeout: int) -> None:
        jobs.write_text(f'include_builtin = false\n[jobs.j]\nschedule = "every 1s"\n'
                        f'endpoint = "/j"\noverlap = "{overlap}"\ntimeout = "{timeout}s"\n')  # fmt: skip

    write(10)
    env = env_for(target, jobs, sqlite_url(tmp_path / "state.db"))
    proc = spawn(env)
    assert target.wait_for(lambda calls: len(calls) >= 2)
    for n in range(8):  # SIGHUP 15-35 ms before a slot, the job changed each time
        now = time.time()
        time.sleep(max(0.0, (int(now) + 1 - now) - 0.015 - 0.02 * (n % 2)))
        write(11 + n)
        proc.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
    time.sleep(1.5)
    proc.process.terminate()
    assert proc.wait() == 0
    assert len(proc.events("job table reloaded")) == 8
    calls = target.calls()
    assert duplicates(calls) == {}
    assert not proc.events("skipped: overlap"), "no false skipped_overlap beside a success"
    slots = sorted(call.scheduled_for for call in calls)
    called = {call.header("Idempotency-Key") for call in calls}
    assert grid_keys("j", slots[0], slots[-1]) - called == set(), "no slot lost to a reload"


# -- 2. Redis restarted empty during a failover -----------------------------------------------


@pytest.mark.slow
def test_redis_reset_during_a_failover_never_fires_a_slot_again(
    tmp_path: Path, target: Target, spawn: Callable[..., Process], redis_server: RedisServer
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1s"\nendpoint = "/j"\n')
    envs = [env_for(target, jobs, redis_server.url, SCHEDULER_LEASE_TTL_SECONDS="3")
            for _ in range(3)]  # fmt: skip
    procs = [spawn(env) for env in envs]

    def leader() -> int | None:
        roles = [health(env)[1].get("role") for env in envs]
        leaders = [i for i, role in enumerate(roles) if role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    for attempt in range(4):
        assert wait_until(lambda: leader() is not None, 30), "a single leader"
        index = leader()
        assert index is not None
        seen = len(target.calls())
        assert target.wait_for(lambda calls, seen=seen: len(calls) > seen)  # a slot fired
        stop = signal.SIGSTOP if attempt % 2 == 0 else signal.SIGKILL
        procs[index].process.send_signal(stop)
        redis_server.restart()  # empty: no persistence
        assert wait_until(lambda index=index: leader() not in (None, index), 30)
        fired = len(target.calls())
        assert target.wait_for(lambda calls, fired=fired: len(calls) > fired + 2)
        if stop == signal.SIGSTOP:
            procs[index].process.send_signal(signal.SIGCONT)
        else:
            procs[index] = spawn(envs[index])
        time.sleep(2)
    assert duplicates(target.calls()) == {}
    assert any(p.events("Redis lost its state") for p in procs)


# -- 3. a full disk, then kill -9 ----------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if (why := mount_tmpfs(mount, "2m")) is not None:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {why}")
    yield mount
    unmount(mount)


@pytest.mark.slow
def test_a_full_disk_then_kill_9_calls_no_slot_twice_and_loses_none_silently(
    small_tmpfs: Path, tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    # As reported: 10 jobs every 5 s on a 2 MB tmpfs; fill it; kill -9 just after a slot;
    # free the space; restart at once (so the restart's catch-up reaches that very slot).
    names = [f"j{n}" for n in range(10)]
    jobs = tmp_path / "jobs.toml"
    jobs.write_text("include_builtin = false\n" + "".join(
        f'[jobs.{name}]\nschedule = "every 5s"\nendpoint = "/{name}"\n' for name in names))  # fmt: skip
    env = env_for(target, jobs, sqlite_url(small_tmpfs / "state.db"))
    proc = spawn(env)
    assert target.wait_for(lambda calls: len(calls) >= 10, 30)
    fill(small_tmpfs / "filler")
    assert wait_until(lambda: health(env)[0] == 503, 10), "health says the state cannot be written"
    _, body = health(env)
    assert "full" in str(body.get("reason")), body
    now = time.time()
    time.sleep((5 - now % 5) + 0.3)  # just after the next slot
    proc.process.kill()
    proc.wait()
    (small_tmpfs / "filler").unlink()
    again = spawn(env)
    time.sleep(7)
    history = {name: runs(env, name) for name in names}
    again.process.terminate()
    assert again.wait() == 0
    calls = target.calls()
    assert duplicates(calls) == {}
    first = min(call.scheduled_for for call in calls)
    last = max(call.scheduled_for for call in calls)
    for name in names:
        missing = grid_keys(name, first, last - timedelta(seconds=5), step=5)
        missing -= accounted(name, history[name], calls, step=5)
        assert not missing, f"{name}: slots neither called nor recorded: {sorted(missing)[:5]}"


# -- 4. the state directory deleted while running -------------------------------------------


def test_a_deleted_state_directory_is_re_created_and_a_second_daemon_is_refused(
    tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1s"\nendpoint = "/j"\n')
    directory = tmp_path / "state"
    env = env_for(target, jobs, sqlite_url(directory / "state.db"))
    first = spawn(env)
    assert target.wait_for(lambda calls: len(calls) >= 2)
    shutil.rmtree(directory)
    second = spawn(env_for(target, jobs, sqlite_url(directory / "state.db")))
    assert second.wait(30) == 2
    refusal = second.log_path.read_text()
    assert "in use by another cronclock process" in refusal
    assert f"pid {first.process.pid}" in refusal
    assert wait_until(lambda: (directory / "state.db").exists(), 10), "re-created"
    assert wait_until(lambda: health(env)[0] == 200, 10)
    time.sleep(2)
    first.process.terminate()
    assert first.wait() == 0
    assert duplicates(target.calls()) == {}
    assert first.events("state file deleted or replaced while running")


# -- 5 and 6. the wire: a dripped answer, a huge answer ---------------------------------------


@pytest.mark.slow
def test_a_dripped_answer_ends_at_the_job_timeout_and_later_slots_fire(
    tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    target.script["/slow"] = [Reply(drip=0.5)]
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.slow]\nschedule = "every 3s"\n'
                    'endpoint = "/slow"\ntimeout = "1s"\n')  # fmt: skip
    env = env_for(target, jobs, "memory://")
    proc = spawn(env)
    assert target.wait_for(lambda calls: len(calls) >= 3, 30), "each slot gets its call"
    begun = time.monotonic()
    proc.process.terminate()
    assert proc.wait() == 0
    assert time.monotonic() - begun < 10, "SIGTERM does not wait for a dripping answer"
    failed = proc.events("failed")
    assert failed and all(line["error"] == "timed out after 1s" for line in failed)
    assert not proc.events("skipped: overlap")


def test_a_huge_answer_is_not_read_into_memory(
    tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    target.script["/big"] = [Reply(size=200_000_000)]
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.big]\nschedule = "every 2s"\n'
                    'endpoint = "/big"\ntimeout = "20s"\n')  # fmt: skip
    proc = spawn(env_for(target, jobs, "memory://"))
    assert wait_until(lambda: len(proc.events("fired")) >= 2, 30)
    status = Path(f"/proc/{proc.process.pid}/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    proc.process.terminate()
    assert proc.wait() == 0
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB for 200 MB answers"


# -- 7. an internal thread dies --------------------------------------------------------------


def test_a_dead_state_writer_turns_health_503_and_the_daemon_exits_1(
    tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1s"\nendpoint = "/j"\n')
    env = env_for(target, jobs, sqlite_url(tmp_path / "state.db"))
    proc = spawn(env, "-m", "tests.faults.inject", "writer-dies")
    begun = time.monotonic()
    code = proc.wait(30)
    assert code == 1
    assert time.monotonic() - begun < 25, "it never hangs"
    (death,) = proc.events("internal thread died")
    assert death["thread"] == "state-writer"
    assert proc.events("the daemon stops unexpectedly")
    assert duplicates(target.calls()) == {}


def test_health_says_why_while_a_dead_thread_stops_the_daemon(
    tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1s"\nendpoint = "/j"\n'
                    'timeout = "5s"\n')  # fmt: skip
    target.script["/j"] = [Reply(delay=3)]  # the stop waits for the call in flight
    env = env_for(target, jobs, sqlite_url(tmp_path / "state.db"),
                  SCHEDULER_SHUTDOWN_GRACE_SECONDS="4")  # fmt: skip
    proc = spawn(env, "-m", "tests.faults.inject", "writer-dies")
    seen: list[tuple[int, str]] = []

    def unhealthy() -> bool:
        status, body = health(env)
        seen.append((status, str(body.get("reason"))))
        return status == 503 and "state-writer" in str(body.get("reason"))

    assert wait_until(unhealthy, 20), seen[-3:]
    assert proc.wait(30) == 1


# -- 8. signals during start-up --------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_during_start_up_ends_cleanly_with_exit_0(
    signum: int, delay: float, tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1m"\nendpoint = "/j"\n')
    proc = spawn(env_for(target, jobs, sqlite_url(tmp_path / "state.db")))
    time.sleep(delay)
    proc.process.send_signal(signum)
    assert proc.wait(30) == 0
    assert "Traceback" not in proc.log_path.read_text()


@pytest.mark.parametrize("delay", [0.1, 0.4, 0.7])
def test_a_sighup_during_start_up_is_never_fatal(
    delay: float, tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1s"\nendpoint = "/j"\n')
    proc = spawn(env_for(target, jobs, sqlite_url(tmp_path / "state.db")))
    time.sleep(delay)
    proc.process.send_signal(signal.SIGHUP)
    assert target.wait_for(lambda calls: len(calls) >= 2, 20), "still running and firing"
    assert proc.process.poll() is None
    proc.process.terminate()
    assert proc.wait() == 0


def test_the_console_script_handles_signals_during_start_up_too(
    tmp_path: Path, target: Target
) -> None:
    import sys

    script = shutil.which("cronclock", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the cronclock console script is not installed beside this Python")
    from tests.integration.conftest import base_env

    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1m"\nendpoint = "/j"\n')
    env = base_env(**env_for(target, jobs, "memory://"))
    process = subprocess.Popen([script, "run"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out.decode()[-2000:]


# -- 9. a schedule whose next fire cannot be computed ---------------------------------------


def test_a_runtime_schedule_that_cannot_be_evaluated_is_refused_in_bounded_time(
    tmp_path: Path, target: Target, spawn: Callable[..., Process]
) -> None:
    """A schedule evaluation that does not advance is cut off with a clear error (issue 15.9).
    The text is one that may loop in the cron evaluator near its DST change (issue 17); from
    today's date it may evaluate fine, and either way the request answers at once."""
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('include_builtin = false\n[jobs.j]\nschedule = "every 1m"\nendpoint = "/j"\n')
    env = env_for(target, jobs, "memory://")
    spawn(env)
    assert wait_until(lambda: health(env)[0] == 200, 20)
    begun = time.monotonic()
    answer = httpx.put(f"{admin_url(env)}/api/schedules/chatham",
                       json={"schedule": "at 2026-04-05T03:05 in Pacific/Chatham", "endpoint": "/j"},
                       headers={"Authorization": "Bearer fault-admin"}, timeout=30)  # fmt: skip
    assert time.monotonic() - begun < 10
    assert answer.status_code in (201, 422), answer.text
    status, _ = health(env)
    assert status == 200, "the daemon is not frozen"
