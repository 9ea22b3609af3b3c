"""An example application for cronclock, with FastAPI: the eight trigger endpoints of its
built-in job table, on top of the receiver helper (cronclock_receiver), which

- checks the bearer token (`SCHEDULER_API_TOKEN`) and/or the signature
  (`SCHEDULER_SIGNING_SECRET`), the same variables cronclock reads;
- answers a repeated `Idempotency-Key` with its first answer, without doing the work again;
- refuses a fencing token lower than the highest seen for the job (a replica that lost its
  leadership) with 409.

The application's own part (examples/app/work.py) answers 409 while a processor's previous run
still works (cronclock records busy) and lists every call it received: `GET /received`.

Run:  uvicorn --factory examples.app.main:create_app --port 8000
Env:  EXAMPLE_WORK_SECONDS (how long each job's work holds its lock, default 0.2),
      EXAMPLE_RESPONSE_DELAY_SECONDS (answer this much later, to show a timeout; default 0).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from starlette.responses import StreamingResponse

from cronclock_receiver import Answer, Fire
from examples.app.work import PROCESSORS, TRIGGERS, Example, may_read_log, receiver_from

PROCESSOR = "^(" + "|".join(PROCESSORS) + ")$"


def create_app(environ: dict[str, str] | None = None) -> FastAPI:
    env = dict(os.environ if environ is None else environ)
    receiver, example = receiver_from(env), Example.from_env(env)
    app = FastAPI(title="cronclock example application")

    def route(method: str, path: str, processor: str) -> None:
        @receiver.fastapi
        def trigger(fire: Fire) -> Answer:
            return example.run(processor, fire)

        app.add_api_route(path, trigger, methods=[method], name=processor)

    for method, path, processor in TRIGGERS:
        if processor != "session-processor":
            route(method, path, processor)

    @app.post("/api/admin/run-session-processor")
    @receiver.fastapi
    def session_processor(fire: Fire, processor: str = Query(pattern=PROCESSOR)) -> Answer:
        return example.run(f"session-processor:{processor}", fire)

    @app.middleware("http")
    async def record(
        request: Request, call_next: Callable[[Request], Awaitable[StreamingResponse]]
    ) -> Response:
        answer = await call_next(request)
        if not request.url.path.startswith("/api/"):
            return answer
        body = b"".join([chunk async for chunk in answer.body_iterator if isinstance(chunk, bytes)])
        example.record(request.url.path, request.headers, answer.status_code, body,
                       answer.headers.get("idempotent-replayed") == "true")  # fmt: skip
        return Response(body, status_code=answer.status_code, headers=dict(answer.headers))

    @app.get("/received")
    def received(request: Request) -> list[dict[str, Any]]:
        if not may_read_log(env, request.headers.get("authorization", "")):
            raise HTTPException(401, "missing or wrong bearer token")
        return example.log()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
