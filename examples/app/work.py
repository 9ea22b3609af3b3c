"""The example applications' own part, framework-free: each processor's lock (a call while its
previous run still works is answered 409, which cronclock records as busy) and a log of every
call received with what became of it (`GET /received`). Verifying, replaying a repeated
Idempotency-Key and refusing a stale fencing token are the receiver helper's
(cronclock_receiver); this module does none of it."""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cronclock_receiver import Answer, Fire, MemoryStore, Receiver

# The built-in job table's endpoints: (method, path, processor).
TRIGGERS: tuple[tuple[str, str, str], ...] = (
    ("POST", "/api/sync/trigger", "data-refresh"),
    ("GET", "/api/health", "health-check"),
    ("POST", "/api/scripts/run-due", "script-runner"),
    ("POST", "/api/marketplaces/sync-all", "marketplaces"),
    ("POST", "/api/admin/run-session-collector", "session-collector"),
    ("POST", "/api/admin/run-session-processor", "session-processor"),  # ?processor=...
    ("POST", "/api/admin/run-corporate-memory", "corporate-memory"),
)
PROCESSORS = ("verification", "usage")
_OUTCOMES = {"stale_fencing_token": "stale leader", "in_progress": "in progress",
             "unauthorized": "refused", "malformed": "refused"}  # fmt: skip


def receiver_from(env: Mapping[str, str]) -> Receiver:
    """The bearer token and/or signing secret cronclock was given, from the same variables."""
    token = env.get("SCHEDULER_API_TOKEN") or None
    secret = env.get("SCHEDULER_SIGNING_SECRET") or None
    local = env.get("LOCAL_DEV_MODE", "").lower() in ("1", "true", "yes")
    if token is None and secret is None and not local:
        raise SystemExit(
            "example app: set SCHEDULER_API_TOKEN or SCHEDULER_SIGNING_SECRET "
            "(or LOCAL_DEV_MODE=true)"
        )
    return Receiver(token=token, signing_secret=secret, store=MemoryStore(),
                    allow_unauthenticated=local)  # fmt: skip


def may_read_log(env: Mapping[str, str], authorization: str) -> bool:
    """`GET /received` asks for the bearer token too, when one is set."""
    token = env.get("SCHEDULER_API_TOKEN")
    return not token or hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())


class Example:
    """Locks, run counts and the log of received calls."""

    def __init__(self, work_seconds: float, response_delay: float) -> None:
        self.work_seconds, self.response_delay = work_seconds, response_delay
        self.lock = threading.Lock()
        self.busy: set[str] = set()  # processors whose work is running
        self.runs: dict[str, int] = {}  # processor -> times its work ran
        self.received: list[dict[str, Any]] = []

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Example:
        return cls(float(env.get("EXAMPLE_WORK_SECONDS", "0.2")),
                   float(env.get("EXAMPLE_RESPONSE_DELAY_SECONDS", "0")))  # fmt: skip

    def run(self, processor: str, fire: Fire) -> Answer:
        """Start the processor's work (202), or 409 while its previous run still works."""
        with self.lock:
            if processor in self.busy:
                return Answer.json({"error": f"{processor} is already running"}, status=409)
            self.busy.add(processor)
            self.runs[processor] = self.runs.get(processor, 0) + 1
            run = self.runs[processor]
        threading.Thread(target=self._work, args=(processor,), daemon=True).start()
        if self.response_delay:
            time.sleep(self.response_delay)  # a slow answer: the caller may time out and retry
        return Answer.json({"processor": processor, "slot": fire.slot.isoformat(), "run": run},
                           status=202)  # fmt: skip

    def _work(self, processor: str) -> None:
        time.sleep(self.work_seconds)  # the real work would run here
        with self.lock:
            self.busy.discard(processor)

    def record(
        self, path: str, headers: Mapping[str, str], status: int, body: bytes, replayed: bool
    ) -> None:
        """Log one call and what became of it: started, busy, replayed, stale leader, …"""
        refused = json.loads(body).get("refused") if body.startswith(b"{") else None
        outcome = ("replayed" if replayed else _OUTCOMES.get(refused or "")
                   or ("busy" if status == 409 else "started"))  # fmt: skip
        fencing = headers.get("x-scheduler-fencing-token")
        with self.lock:
            self.received.append({
                "at": datetime.now(UTC).isoformat(), "path": path,
                "job": headers.get("x-scheduler-job"), "key": headers.get("idempotency-key"),
                "scheduled_for": headers.get("x-scheduled-for"),
                "attempt": headers.get("x-scheduler-attempt"),
                "fencing_token": int(fencing) if fencing else None,
                "status": status, "outcome": outcome,
            })  # fmt: skip

    def log(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)
