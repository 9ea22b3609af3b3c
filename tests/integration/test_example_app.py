"""The example application (examples/app) with the real daemon, over real HTTP on loopback:
all eight built-in endpoints, the bearer token, Idempotency-Key dedupe on a retry, the 409 path."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ROOT, Daemon, base_env
from tests.support import free_port

TOKEN = "example-token"
BUILT_IN = {"data-refresh", "health-check", "script-runner", "marketplaces", "session-collector",
            "session-processor:verification", "session-processor:usage", "corporate-memory"}  # fmt: skip
EVERY_SECOND = {
    "SCHEDULER_DATA_REFRESH_INTERVAL": "1", "SCHEDULER_HEALTH_CHECK_INTERVAL": "1",
    "SCHEDULER_SCRIPT_RUN_INTERVAL": "1", "SCHEDULER_SESSION_COLLECTOR_INTERVAL": "1",
    "SCHEDULER_VERIFICATION_DETECTOR_INTERVAL": "1", "SCHEDULER_USAGE_PROCESSOR_INTERVAL": "1",
    "SCHEDULER_CORPORATE_MEMORY_INTERVAL": "1", "SCHEDULER_JOBS__MARKETPLACES__SCHEDULE": "every 1s",
}  # fmt: skip


class ExampleApp:
    def __init__(self, log: Path, **env: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "examples.app.main:create_app",
             "--host", "127.0.0.1", "--port", self.url.rpartition(":")[2], "--log-level", "warning"],
            cwd=ROOT, env=base_env(SCHEDULER_API_TOKEN=TOKEN, **env), stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"the example app did not start:\n{log.read_text()}")

    def received(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/received", headers={"Authorization": f"Bearer {TOKEN}"})
        answer.raise_for_status()
        calls: list[dict[str, Any]] = answer.json()
        return calls

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.received()):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


@pytest.fixture
def example_app(tmp_path: Path) -> Iterator[Callable[..., ExampleApp]]:
    started: list[ExampleApp] = []

    def start(**env: str) -> ExampleApp:
        app = ExampleApp(tmp_path / f"app-{len(started)}.log", **env)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def test_the_daemon_drives_all_eight_endpoints_with_its_token(
    example_app: Callable[..., ExampleApp], daemon: Callable[..., Daemon]
) -> None:
    app = example_app()
    proc = daemon(API_URL=app.url, SCHEDULER_API_TOKEN=TOKEN, **EVERY_SECOND)
    assert app.wait_for(lambda calls: {c["job"] for c in calls} >= BUILT_IN, timeout=20)
    calls = app.received()
    assert {c["status"] for c in calls} <= {202, 409}
    for call in calls:  # each job reached its own endpoint, under its own processor
        assert call["processor"] == call["job"] and call["key"].startswith(f"{call['job']}@")
    assert proc.stop() == 0
    denied = httpx.post(f"{app.url}/api/sync/trigger", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401
    assert httpx.post(f"{app.url}/api/admin/run-session-processor?processor=nope",
                      headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 422  # fmt: skip


def test_a_retry_after_a_timeout_is_answered_from_the_idempotency_key_without_new_work(
    example_app: Callable[..., ExampleApp], daemon: Callable[..., Daemon]
) -> None:
    app = example_app(EXAMPLE_RESPONSE_DELAY_SECONDS="1.0")  # slower than the job's timeout
    proc = daemon(API_URL=app.url, SCHEDULER_API_TOKEN=TOKEN,
                  SCHEDULER_DATA_REFRESH_INTERVAL="3", SCHEDULER_JOBS__DATA_REFRESH__TIMEOUT="300ms",
                  SCHEDULER_JOBS__DATA_REFRESH__RETRIES="2")  # fmt: skip
    assert app.wait_for(lambda calls: any(c["outcome"] == "replayed" for c in calls), timeout=20)
    proc.stop()
    calls = [c for c in app.received() if c["job"] == "data-refresh"]
    replayed = next(c for c in calls if c["outcome"] == "replayed")
    same_key = [c for c in calls if c["key"] == replayed["key"]]
    assert [(c["attempt"], c["outcome"]) for c in same_key][:2] == [
        ("1", "started"),
        ("2", "replayed"),
    ]
    started = [c for c in calls if c["outcome"] == "started"]
    assert len(started) == len({c["key"] for c in calls})  # the work ran once per key
    fired = [e for e in proc.events("fired") if e.get("job") == "data-refresh"]
    assert any(e["attempt"] == 2 and e["status"] == 202 for e in fired)


def test_a_call_while_the_processors_lock_is_held_is_409_and_recorded_busy(
    example_app: Callable[..., ExampleApp], daemon: Callable[..., Daemon]
) -> None:
    app = example_app(EXAMPLE_WORK_SECONDS="2.5")
    proc = daemon(API_URL=app.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_DATA_REFRESH_INTERVAL="1")
    assert app.wait_for(lambda calls: any(c["outcome"] == "busy" for c in calls), timeout=20)
    assert proc.wait_for_log("busy (409)", timeout=10)
    proc.stop()
    busy = [e for e in proc.events("busy (409)") if e.get("job") == "data-refresh"]
    assert busy and all(e["status"] == 409 for e in busy)
    assert not proc.events("failed")  # busy is not a failure
