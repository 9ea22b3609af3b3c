"""Fault injection with the real daemon: each test breaks one thing and checks the promise
(at most one call per slot, no slot dropped silently, a daemon that fires or says why not)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import conftest as integration
from tests.integration.conftest import ROOT, base_env
from tests.support import Arrival, Target, free_port

target = integration.target  # the recording loopback target, a fixture shared with integration/

TOKEN = "fault-token"
ADMIN = "fault-admin"


def duplicates(calls: list[Arrival]) -> dict[str, int]:
    """Idempotency-Keys the target received more than once."""
    counted = Counter(call.header("Idempotency-Key") or "" for call in calls)
    return {key: n for key, n in counted.items() if n > 1}


def env_for(target: Target, jobs: Path, state_url: str, **extra: str) -> dict[str, str]:
    port = free_port()
    return {
        "API_URL": target.url, "SCHEDULER_API_TOKEN": TOKEN, "SCHEDULER_JOBS_FILE": str(jobs),
        "SCHEDULER_STATE_URL": state_url, "SCHEDULER_TICK_SECONDS": "1",
        "SCHEDULER_ADMIN_BIND": f"127.0.0.1:{port}", "SCHEDULER_ADMIN_TOKEN": ADMIN, **extra,
    }  # fmt: skip


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path: sqlite:////tmp/...


def admin_url(env: dict[str, str]) -> str:
    return f"http://{env['SCHEDULER_ADMIN_BIND']}"


def health(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    try:
        answer = httpx.get(f"{admin_url(env)}/healthz", timeout=2)
    except httpx.HTTPError:
        return 0, {}
    return answer.status_code, answer.json()


def runs(env: dict[str, str], job: str, limit: int = 500) -> list[dict[str, Any]]:
    answer = httpx.get(f"{admin_url(env)}/api/jobs/{job}/runs", params={"limit": limit},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)  # fmt: skip
    answer.raise_for_status()
    body = answer.json()
    return list(body["runs"] if isinstance(body, dict) else body)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class Process:
    """The daemon (or the fault launcher) as a subprocess, its JSON log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, *args], env=base_env(**env), cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": line})
        return out

    def events(self, prefix: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if str(line.get("event", "")).startswith(prefix)]

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(env: dict[str, str], *args: str) -> Process:
        command = list(args) or ["-m", "services.scheduler", "run"]
        process = Process(command, env, tmp_path / f"process-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.process.wait(15)
        process.close()
