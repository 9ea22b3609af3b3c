"""An example application for cronclock: the eight trigger endpoints of its built-in job table.

It does what a real application's trigger endpoints should do with cronclock's calls:

- checks the bearer token (`SCHEDULER_API_TOKEN`, the token cronclock sends);
- honours `Idempotency-Key`: a repeated key is answered with the first answer and the work is
  not done again (a retry after a timeout, a replayed slot);
- answers 409 while a processor's lock is held (its previous run is still working): cronclock
  records that as `busy`, not as a failure;
- refuses a call whose `X-Scheduler-Fencing-Token` is lower than the highest it has seen (a
  replica that lost its lease), also with 409;
- records every call it received: `GET /received` (with the token).

Run:  uvicorn --factory examples.app.main:create_app --port 8000
Env:  SCHEDULER_API_TOKEN (required unless LOCAL_DEV_MODE=true), EXAMPLE_WORK_SECONDS (how long
      each job's work holds its lock, default 0.2), EXAMPLE_RESPONSE_DELAY_SECONDS (answer this
      much later, to show a timeout and a retry with the same key; default 0).
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse

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
KEYS_KEPT = 10_000  # idempotency keys remembered (oldest forgotten first)


class Example:
    """The application's state: locks, remembered keys, the highest fencing token, a log."""

    def __init__(self, token: str | None, work_seconds: float, response_delay: float) -> None:
        self.token = token
        self.work_seconds = work_seconds
        self.response_delay = response_delay
        self.lock = threading.Lock()
        self.busy: set[str] = set()  # processors whose work is running
        self.answers: OrderedDict[str, dict[str, Any]] = OrderedDict()  # key -> first answer
        self.highest_fencing = 0
        self.received: list[dict[str, Any]] = []
        self.runs: dict[str, int] = {}  # processor -> times its work ran

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.encode(), self.token.encode()
        ):
            raise HTTPException(401, "missing or wrong bearer token")

    def handle(self, request: Request, processor: str) -> JSONResponse:
        self.authorize(request)
        key = request.headers.get("Idempotency-Key")
        fencing = int(request.headers.get("X-Scheduler-Fencing-Token") or 0)
        with self.lock:
            entry: dict[str, Any] = {
                "at": datetime.now(UTC).isoformat(),
                "processor": processor,
                "path": request.url.path,
                "job": request.headers.get("X-Scheduler-Job"),
                "key": key,
                "scheduled_for": request.headers.get("X-Scheduled-For"),
                "attempt": request.headers.get("X-Scheduler-Attempt"),
                "fencing_token": fencing or None,
            }
            self.received.append(entry)
            if fencing and fencing < self.highest_fencing:
                entry.update(status=409, outcome="stale leader")
                return JSONResponse(
                    {"error": f"fencing token {fencing} is older than {self.highest_fencing}"},
                    status_code=409,
                )
            self.highest_fencing = max(self.highest_fencing, fencing)
            if key is not None and key in self.answers:
                entry.update(status=self.answers[key]["status"], outcome="replayed")
                answer = self.answers[key]
                return JSONResponse(
                    answer["body"],
                    status_code=answer["status"],
                    headers={"Idempotent-Replayed": "true"},
                )
            if processor in self.busy:
                entry.update(status=409, outcome="busy")
                return JSONResponse({"error": f"{processor} is already running"}, status_code=409)
            self.busy.add(processor)
            self.runs[processor] = self.runs.get(processor, 0) + 1
            body = {"processor": processor, "started": entry["at"], "run": self.runs[processor]}
            if key is not None:
                self.answers[key] = {"status": 202, "body": body}
                while len(self.answers) > KEYS_KEPT:
                    self.answers.popitem(last=False)
            entry.update(status=202, outcome="started")
        threading.Thread(target=self._work, args=(processor,), daemon=True).start()
        if self.response_delay:
            time.sleep(self.response_delay)  # a slow answer: the caller may time out and retry
        return JSONResponse(body, status_code=202)

    def _work(self, processor: str) -> None:
        time.sleep(self.work_seconds)  # the real work would run here
        with self.lock:
            self.busy.discard(processor)


def create_app(environ: dict[str, str] | None = None) -> FastAPI:
    env = dict(os.environ if environ is None else environ)
    token = env.get("SCHEDULER_API_TOKEN") or None
    if token is None and env.get("LOCAL_DEV_MODE", "").lower() not in ("1", "true", "yes"):
        raise SystemExit("example app: set SCHEDULER_API_TOKEN (or LOCAL_DEV_MODE=true)")
    state = Example(
        token,
        float(env.get("EXAMPLE_WORK_SECONDS", "0.2")),
        float(env.get("EXAMPLE_RESPONSE_DELAY_SECONDS", "0")),
    )
    app = FastAPI(title="cronclock example application")
    app.state.example = state

    def route(method: str, path: str, processor: str) -> None:
        def trigger(request: Request) -> JSONResponse:
            return state.handle(request, processor)

        app.add_api_route(path, trigger, methods=[method], name=processor)

    for method, path, processor in TRIGGERS:
        if processor != "session-processor":
            route(method, path, processor)

    @app.post("/api/admin/run-session-processor")
    def session_processor(
        request: Request, processor: str = Query(pattern="^(" + "|".join(PROCESSORS) + ")$")
    ) -> JSONResponse:
        return state.handle(request, f"session-processor:{processor}")

    @app.get("/received")
    def received(request: Request) -> list[dict[str, Any]]:
        state.authorize(request)
        with state.lock:
            return list(state.received)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
