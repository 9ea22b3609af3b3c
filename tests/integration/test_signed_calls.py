"""Signed calls from the real daemon to a real loopback server, verified by the Standard
Webhooks reference library (`standardwebhooks`): scheduled first attempts (the fast path),
retries (httpx), manual triggers, with and without a body, across a rotation."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from standardwebhooks.webhooks import Webhook

from tests.integration.conftest import Daemon
from tests.support import Arrival, Reply, Target, free_port

OLD = "whsec_" + base64.b64encode(b"old-key-" * 4).decode()
NEW = "whsec_" + base64.b64encode(b"new-key-" * 4).decode()
JOBS = """
[jobs.push]
schedule = "every 1s"
endpoint = "/push"
body = { full = true, note = "a.b" }

[jobs.ping]
schedule = "every 1s"
endpoint = "/ping"
method = "GET"

[jobs.flaky]
schedule = "every 2s"
endpoint = "/flaky"
retries = 1
"""


def verified(secret: str, call: Arrival) -> None:
    Webhook(secret).verify(call.body, call.headers, json_parse=False)


def test_every_call_verifies_with_the_reference_library(
    daemon: Callable[..., Daemon], target: Target, jobs_file: Callable[[str], Path]
) -> None:
    target.script["/flaky"] = [Reply(status=503, headers={"Retry-After": "0"}), Reply(status=200)]
    admin = free_port()
    process = daemon(API_URL=target.url, SCHEDULER_API_TOKEN="tok",
                     SCHEDULER_SIGNING_SECRET=f"{NEW} {OLD}",
                     SCHEDULER_JOBS_FILE=str(jobs_file(JOBS)),
                     SCHEDULER_ADMIN_BIND=f"127.0.0.1:{admin}", SCHEDULER_ADMIN_TOKEN="adm")  # fmt: skip
    assert target.wait_for(lambda calls: len([c for c in calls if c.path == "/flaky"]) >= 2, 20)
    for _ in range(50):  # refused while the every-second job is in flight (its overlap policy)
        triggered = httpx.post(f"http://127.0.0.1:{admin}/api/jobs/push/trigger",
                               headers={"Authorization": "Bearer adm"}, timeout=5)  # fmt: skip
        if triggered.status_code == 202:
            break
        time.sleep(0.1)
    manual = triggered.json()["idempotency_key"]
    assert target.wait_for(lambda calls: any(c.header("Idempotency-Key") == manual for c in calls))
    assert process.stop() == 0
    calls = target.calls()
    assert {c.path for c in calls} == {"/push", "/ping", "/flaky"}
    for call in calls:
        verified(OLD, call)  # the application may still hold either secret (a rotation)
        verified(NEW, call)
        key = call.header("Idempotency-Key") or ""
        assert call.header("webhook-id") == key.replace("%", "%25").replace(".", "%2E")
        assert call.header("Authorization") == "Bearer tok"  # the bearer token stays
    assert {c.body for c in calls if c.path == "/ping"} == {b""}
    assert all(c.body == b'{"full":true,"note":"a.b"}' for c in calls if c.path == "/push")
    flaky = [c for c in calls if c.path == "/flaky"]
    attempts = [(c.header("webhook-id"), c.header("X-Scheduler-Attempt")) for c in flaky[:2]]
    assert attempts[0][0] == attempts[1][0] and [a for _, a in attempts] == ["1", "2"]
    logs = process.log_path.read_text()
    assert "old-key" not in logs and base64.b64encode(b"old-key-").decode() not in logs
