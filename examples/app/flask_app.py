"""The example application again, with Flask: the same eight endpoints on the receiver helper
(cronclock_receiver), the same behaviour as examples/app/main.py (read it first).

Run:  flask --app 'examples.app.flask_app:create_app()' run --port 8000
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, abort, request

from cronclock_receiver import Answer, Fire
from examples.app.work import PROCESSORS, TRIGGERS, Example, may_read_log, receiver_from


def create_app(environ: dict[str, str] | None = None) -> Flask:
    env = dict(os.environ if environ is None else environ)
    receiver, example = receiver_from(env), Example.from_env(env)
    app = Flask("cronclock-example")

    def route(method: str, path: str, processor: str) -> None:
        @receiver.flask
        def trigger(fire: Fire) -> Answer:
            return example.run(processor, fire)

        app.add_url_rule(path, processor, trigger, methods=[method])

    for method, path, processor in TRIGGERS:
        if processor != "session-processor":
            route(method, path, processor)

    @app.post("/api/admin/run-session-processor")
    @receiver.flask
    def session_processor(fire: Fire) -> Answer:
        processor = request.args.get("processor", "")
        if processor not in PROCESSORS:
            return Answer.json({"error": f"processor {processor!r} is not one of {PROCESSORS}"},
                               status=422)  # fmt: skip
        return example.run(f"session-processor:{processor}", fire)

    @app.after_request
    def record(response: Response) -> Response:
        if request.path.startswith("/api/"):
            headers = {name.lower(): value for name, value in request.headers.items()}
            example.record(request.path, headers, response.status_code, response.get_data(),
                           response.headers.get("Idempotent-Replayed") == "true")  # fmt: skip
        return response

    @app.get("/received")
    def received() -> list[dict[str, Any]]:
        if not may_read_log(env, request.headers.get("Authorization", "")):
            abort(401)
        return example.log()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
