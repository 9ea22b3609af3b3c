"""Fixtures that run the real daemon as a subprocess against a real loopback HTTP target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Target

ROOT = Path(__file__).resolve().parents[2]


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing of the developer's SCHEDULER_* settings leaks in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SCHEDULER_", "API_URL", "POSTHOG_", "LOCAL_DEV_MODE"))
    }
    env.update(
        {
            "SCHEDULER_STATE_URL": "memory://",
            "SCHEDULER_ADMIN_BIND": "off",
            "SCHEDULER_LOG_FORMAT": "json",
        }
    )
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.scheduler", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


class Daemon:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.scheduler", "run"],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"event": line})
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]

    def wait_for_log(self, name: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.events(name):
                return True
            time.sleep(0.05)
        return False

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


@pytest.fixture
def jobs_file(tmp_path: Path) -> Callable[[str], Path]:
    path = tmp_path / "jobs.toml"

    def write(text: str) -> Path:
        path.write_text("include_builtin = false\n" + text)
        return path

    return write


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(**env: str) -> Daemon:
        process = Daemon(base_env(**env), tmp_path / f"daemon-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
