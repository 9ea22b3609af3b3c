"""Issue 16 against the real daemon: what `check` accepts runs, what it refuses never starts,
and a bad file on SIGHUP is one "reload rejected" line while the old table keeps firing."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuzz_inputs import JOB_FIELDS, SECRET, SETTINGS, environment, jobs_toml, refused
from tests.integration.conftest import Daemon, base_env, run_cli
from tests.support import RedisServer, Target

TOKEN = "integration-token"
REJECTED = "reload rejected; keeping the current job table"
TICK = '[jobs.tick]\nschedule = "every 1s"\nendpoint = "/tick"\n'


def test_an_empty_token_in_dev_mode_means_no_token(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    # `SCHEDULER_API_TOKEN=` is how an env file says "unset" in development.
    env = {"API_URL": target.url, "SCHEDULER_API_TOKEN": "", "LOCAL_DEV_MODE": "true",
           "SCHEDULER_JOBS_FILE": str(jobs_file(TICK))}  # fmt: skip
    assert run_cli("check", env=base_env(**env)).returncode == 0
    proc = daemon(**env)
    assert target.wait_for(lambda calls: len(calls) >= 1)
    assert all("Authorization" not in call.headers for call in target.calls("/tick"))
    assert proc.events("LOCAL_DEV_MODE: calls carry no Authorization header")
    assert proc.stop() == 0


def test_an_upper_case_state_url_scheme_runs_as_check_said(
    target: Target,
    jobs_file: Callable[[str], Path],
    daemon: Callable[..., Daemon],
    redis_server: RedisServer,
) -> None:
    url = redis_server.url.replace("redis://", "REDIS://")
    env = {"API_URL": target.url, "SCHEDULER_API_TOKEN": TOKEN, "SCHEDULER_STATE_URL": url,
           "SCHEDULER_JOBS_FILE": str(jobs_file(TICK))}  # fmt: skip
    checked = run_cli("check", env=base_env(**env))
    assert checked.returncode == 0, checked.stderr
    proc = daemon(**env)
    assert target.wait_for(lambda calls: len(calls) >= 1), proc.log_path.read_text()
    assert redis_server.client().exists("cronclock:leader")
    assert not proc.events("dispatch crashed")
    assert proc.stop() == 0


def test_sighup_with_an_over_nested_or_non_utf8_file_is_rejected_and_firing_goes_on(
    target: Target, jobs_file: Callable[[str], Path], daemon: Callable[..., Daemon]
) -> None:
    path = jobs_file(TICK)
    proc = daemon(API_URL=target.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_JOBS_FILE=str(path))
    assert target.wait_for(lambda calls: len(calls) >= 1)
    bad_files = [
        (TICK + "body = " + "[" * 5000 + "]" * 5000 + "\n").encode(),
        TICK.encode() + b'method = "P\xffST"\n',
    ]
    for number, bad in enumerate(bad_files, 1):
        path.write_bytes(bad)
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while len(proc.events(REJECTED)) < number and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.process.poll() is None
    rejected = proc.events(REJECTED)
    assert len(rejected) == 2
    assert "nested too deeply" in rejected[0]["error"]
    assert "not UTF-8" in rejected[1]["error"]
    count = len(target.calls("/tick"))
    assert target.wait_for(lambda calls: len(calls) > count + 1)
    assert proc.stop() == 0
    assert "Traceback" not in proc.log_path.read_text()


@pytest.mark.parametrize("seed", range(6))
def test_a_fuzzed_configuration_check_accepts_fires_in_the_real_daemon(
    seed: int, tmp_path: Path, target: Target, daemon: Callable[..., Daemon]
) -> None:
    """A sample of tests/scheduler/test_bad_input_fuzz.py's good configurations, run by the
    daemon as a subprocess: the first slot is called (or recorded failed), nothing crashes."""
    chooser = random.Random(seed)
    while True:
        fields = {name: chooser.choice(good) for name, (good, _) in JOB_FIELDS.items()}
        chosen = {name: chooser.choice(good) for name, (good, _) in SETTINGS.items()}
        fields |= {"schedule": "every 1s", "enabled": True}
        if refused(fields, chosen) is None:
            break
    path = tmp_path / "jobs.toml"
    path.write_text(jobs_toml(fields))
    env = environment(chosen, target=target.url, tmp=str(tmp_path), jobs_file=str(path))
    env.setdefault("SCHEDULER_STATE_URL", "memory://")
    checked = run_cli("check", env=base_env(**env))
    assert checked.returncode == 0, checked.stderr
    proc = daemon(**env)
    assert proc.wait_for_log("fired") or proc.events("failed"), proc.log_path.read_text()
    assert proc.stop() == 0
    text = proc.log_path.read_text()
    assert "crashed" not in text and "Traceback" not in text and SECRET not in text
