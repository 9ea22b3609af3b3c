"""A built-in demo: a loopback target application and a fast job table, for a first run."""

from __future__ import annotations

import functools
import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import SecretStr

from schedule_grammar import parse

from .config import Config, Job, Settings

# Second-level cadences so a newcomer sees every behaviour within half a minute.
DEMO_TABLE = (
    Job(name="demo-tick", schedule=parse("every 2s"), endpoint="/demo/tick", source="demo"),
    # takes 4 s, due every 3 s: overlapping slots are skipped
    Job(name="demo-slow", schedule=parse("every 3s"), endpoint="/demo/slow", timeout=10.0,
        source="demo"),
    # 503 with Retry-After: 1, then 200: one retry
    Job(name="demo-flaky", schedule=parse("every 5s"), endpoint="/demo/flaky", retries=2,
        source="demo"),
    # the application's own lock is held: 409, recorded as busy
    Job(name="demo-busy", schedule=parse("every 7s"), endpoint="/demo/busy", source="demo"),
    # a 6-field cron: every 10 s
    Job(name="demo-cron", schedule=parse("cron */10 * * * * *"), endpoint="/demo/tick",
        source="demo"),
)  # fmt: skip


def demo_config(api_url: str, token: str) -> Config:
    """The demo job table against the demo target, with an in-memory state store."""
    settings = Settings.model_validate(
        {
            "API_URL": api_url,
            "SCHEDULER_STATE_URL": "memory://",
            "SCHEDULER_ADMIN_BIND": "off",
            "SCHEDULER_TICK_SECONDS": "5",
            "SCHEDULER_SHUTDOWN_GRACE_SECONDS": "5",
            "SCHEDULER_MAX_CONCURRENCY": "4",
        }
    )
    return Config(settings=settings, jobs=DEMO_TABLE, api_token=SecretStr(token))


class DemoTarget:
    """The demo application: checks the bearer token and prints each call it receives."""

    def __init__(
        self, *, token: str | None = None, echo: Callable[[str], None] | None = None
    ) -> None:
        self.token = token or secrets.token_urlsafe(16)
        self._echo = echo or functools.partial(print, flush=True)
        self._flaky_calls = 0
        self._lock = threading.Lock()
        self.calls = 0
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                target._handle(self)

            def do_POST(self) -> None:
                target._handle(self)

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> DemoTarget:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        arrived = datetime.now(UTC)
        length = int(request.headers.get("Content-Length") or 0)
        if length:
            request.rfile.read(length)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self._reply(request, 401, {"error": "bad token"})
            return
        path = request.path
        status, extra = 200, {}
        if path == "/demo/slow":
            time.sleep(4)
        elif path == "/demo/flaky":
            with self._lock:
                self._flaky_calls += 1
                odd = self._flaky_calls % 2 == 1
            if odd:
                status, extra = 503, {"Retry-After": "1"}
        elif path == "/demo/busy":
            status = 409
        elif path != "/demo/tick":
            status = 404
        with self._lock:
            self.calls += 1
        scheduled = request.headers.get("X-Scheduled-For", "")
        late = ""
        if scheduled:
            slot = datetime.fromisoformat(scheduled.replace("Z", "+00:00"))
            late = f" late={(arrived - slot).total_seconds() * 1000:.1f}ms"
        self._echo(
            f"demo app <- {request.command} {path} -> {status}  "
            f"job={request.headers.get('X-Scheduler-Job')} slot={scheduled} "
            f"attempt={request.headers.get('X-Scheduler-Attempt')}{late}"
        )
        self._reply(request, status, {"ok": status < 300}, extra)

    @staticmethod
    def _reply(
        request: BaseHTTPRequestHandler,
        status: int,
        body: dict[str, object],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
