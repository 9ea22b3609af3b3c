"""The example applications (examples/app, FastAPI and Flask, both on the receiver helper) with
the real daemon, over real HTTP on loopback: all eight built-in endpoints, the bearer token,
a retry answered from its Idempotency-Key, the 409 path, signed calls (a forged signature and a
replayed old call refused) and a stale fencing token refused."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from examples.app.work import TRIGGERS
from tests.integration.conftest import ROOT, Daemon, base_env
from tests.support import RedisServer, free_port

TOKEN = "example-token"
BUILT_IN = {"data-refresh", "health-check", "script-runner", "marketplaces", "session-collector",
            "session-processor:verification", "session-processor:usage", "corporate-memory"}  # fmt: skip
EVERY_SECOND = {
    "SCHEDULER_DATA_REFRESH_INTERVAL": "1", "SCHEDULER_HEALTH_CHECK_INTERVAL": "1",
    "SCHEDULER_SCRIPT_RUN_INTERVAL": "1", "SCHEDULER_SESSION_COLLECTOR_INTERVAL": "1",
    "SCHEDULER_VERIFICATION_DETECTOR_INTERVAL": "1", "SCHEDULER_USAGE_PROCESSOR_INTERVAL": "1",
    "SCHEDULER_CORPORATE_MEMORY_INTERVAL": "1", "SCHEDULER_JOBS__MARKETPLACES__SCHEDULE": "every 1s",
}  # fmt: skip


PATHS = {processor: path for _, path, processor in TRIGGERS}
SERVE = {  # how each example application is served
    "fastapi": ["-m", "uvicorn", "--factory", "examples.app.main:create_app", "--host",
                "127.0.0.1", "--log-level", "warning", "--port"],
    "flask": ["-m", "flask", "--app", "examples.app.flask_app:create_app()", "run", "--host",
              "127.0.0.1", "--port"],
}  # fmt: skip


class ExampleApp:
    def __init__(self, framework: str, log: Path, **env: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = log.open("w")
        env.setdefault("SCHEDULER_API_TOKEN", TOKEN)
        self.process = subprocess.Popen(
            [sys.executable, *SERVE[framework], self.url.rpartition(":")[2]],
            cwd=ROOT, env=base_env(**env), stdout=self._log, stderr=subprocess.STDOUT,
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


@pytest.fixture(params=["fastapi", "flask"])
def example_app(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ExampleApp]]:
    started: list[ExampleApp] = []

    def start(**env: str) -> ExampleApp:
        app = ExampleApp(request.param, tmp_path / f"app-{len(started)}.log", **env)
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
    for call in calls:  # each job reached its own endpoint
        assert call["path"] == PATHS[call["job"].partition(":")[0]]
        assert call["key"].startswith(f"{call['job']}@")
    assert proc.stop() == 0
    denied = httpx.post(f"{app.url}/api/sync/trigger", headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401
    looks_right = {"Authorization": f"Bearer {TOKEN}", "X-Scheduler-Job": "session-processor:x",
                   "X-Scheduled-For": "2026-11-22T03:00:00.000Z",
                   "Idempotency-Key": "session-processor:x@1795316400000"}  # fmt: skip
    assert httpx.post(f"{app.url}/api/admin/run-session-processor?processor=nope",
                      headers=looks_right).status_code == 422  # fmt: skip


def test_a_retry_after_a_timeout_is_answered_from_the_idempotency_key_without_new_work(
    example_app: Callable[..., ExampleApp], daemon: Callable[..., Daemon]
) -> None:
    # slower than the job's timeout, done before the retry comes (0.5-1 s after the timeout)
    app = example_app(EXAMPLE_RESPONSE_DELAY_SECONDS="0.4")
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


SECRET = "whsec_" + base64.b64encode(b"example-app-signing-key-32-bytes").decode()
FORGER = "whsec_" + base64.b64encode(b"not-the-secret-the-app-was-given").decode()


def signed_call(secret: str, at: float, key: str) -> dict[str, str]:
    """A call as cronclock signs it, signed here by the Standard Webhooks reference library."""
    slot = datetime.fromtimestamp(int(key.rpartition("@")[2]) / 1000, UTC)
    stamp = datetime.fromtimestamp(int(at), UTC)
    return {"X-Scheduler-Job": "data-refresh", "Idempotency-Key": key,
            "X-Scheduled-For": slot.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "webhook-id": key, "webhook-timestamp": str(int(at)),
            "webhook-signature": Webhook(secret).sign(key, stamp, "")}  # fmt: skip


def test_signed_calls_are_verified_and_forged_or_replayed_old_ones_refused(
    example_app: Callable[..., ExampleApp], daemon: Callable[..., Daemon]
) -> None:
    app = example_app(SCHEDULER_API_TOKEN="", SCHEDULER_SIGNING_SECRET=SECRET)  # no bearer check
    proc = daemon(API_URL=app.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_SIGNING_SECRET=SECRET,
                  SCHEDULER_DATA_REFRESH_INTERVAL="1")  # fmt: skip
    assert app.wait_for(lambda calls: any(c["outcome"] == "started" for c in calls))
    assert proc.stop() == 0
    assert all(c["status"] in (202, 409) for c in app.received())  # the daemon's all verified
    trigger = f"{app.url}/api/sync/trigger"
    slot_ms = (int(time.time()) - 3600) * 1000
    forged = httpx.post(
        trigger, headers=signed_call(FORGER, time.time(), f"data-refresh@{slot_ms}")
    )
    assert forged.status_code == 401 and forged.json()["refused"] == "unauthorized"
    old = signed_call(SECRET, time.time() - 600, f"data-refresh@{slot_ms + 1000}")
    replayed = httpx.post(trigger, headers=old)
    assert replayed.status_code == 401 and "outside the tolerance" in replayed.json()["error"]
    fresh = httpx.post(trigger, headers=signed_call(SECRET, time.time(), f"data-refresh@{slot_ms}"))
    assert fresh.status_code == 202  # the same call, signed now with the right secret
    outcomes = [c["outcome"] for c in app.received()[-3:]]
    assert outcomes == ["refused", "refused", "started"]


def test_a_call_with_a_fencing_token_older_than_the_highest_seen_is_refused(
    example_app: Callable[..., ExampleApp], daemon: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    app = example_app(EXAMPLE_WORK_SECONDS="0.02")
    proc = daemon(API_URL=app.url, SCHEDULER_API_TOKEN=TOKEN, SCHEDULER_STATE_URL=redis_server.url,
                  SCHEDULER_DATA_REFRESH_INTERVAL="1")  # fmt: skip
    assert app.wait_for(lambda calls: any(c["fencing_token"] for c in calls))
    epoch = next(c["fencing_token"] for c in app.received() if c["fencing_token"])
    # Another leader, elected since (as after a partition), has called with a higher token:
    newer = {"Authorization": f"Bearer {TOKEN}", "X-Scheduler-Job": "data-refresh",
             "X-Scheduled-For": "2026-11-22T03:00:00.000Z",
             "Idempotency-Key": "data-refresh@manual-newer-leader",
             "X-Scheduler-Fencing-Token": str(epoch + 1)}  # fmt: skip
    for _ in range(50):  # 409 busy while the every-second job's own run holds its lock
        if httpx.post(f"{app.url}/api/sync/trigger", headers=newer).status_code != 409:
            break
        time.sleep(0.05)
    assert any(c["key"] == newer["Idempotency-Key"] and c["status"] == 202 for c in app.received())
    assert app.wait_for(lambda calls: any(c["outcome"] == "stale leader" for c in calls))
    assert proc.wait_for_log("busy (409)")  # the daemon records the refusal, does not retry
    assert proc.stop() == 0
    stale = [c for c in app.received() if c["outcome"] == "stale leader"]
    assert all(c["fencing_token"] == epoch and c["status"] == 409 for c in stale)
