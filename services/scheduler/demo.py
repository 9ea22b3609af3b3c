"""A built-in demo: a loopback target application and a fast job table, for a first run."""

from __future__ import annotations

import io
import json
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from pydantic import SecretStr

from schedule_grammar import parse

from .config import Config, Job, Settings
from .stores.protocols import RunRecord, StateStore

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


def demo_config(
    api_url: str, token: str, *, admin_bind: str = "off", admin_token: str | None = None
) -> Config:
    """The demo job table against the demo target, with an in-memory state store."""
    settings = Settings.model_validate(
        {
            "API_URL": api_url,
            "SCHEDULER_STATE_URL": "memory://",
            "SCHEDULER_ADMIN_BIND": admin_bind,
            **({"SCHEDULER_ADMIN_TOKEN": admin_token} if admin_token else {}),
            "SCHEDULER_TICK_SECONDS": "5",
            "SCHEDULER_SHUTDOWN_GRACE_SECONDS": "5",
            "SCHEDULER_MAX_CONCURRENCY": "4",
        }
    )
    return Config(settings=settings, jobs=DEMO_TABLE, api_token=SecretStr(token))


# The demo's stdout (its application's lines) and stderr (the daemon's log) usually share one
# terminal or pipe; every line of either goes out whole, one at a time, under this lock.
_OUT_LOCK = threading.RLock()


def whole_line(text: str, stream: TextIO | None = None) -> None:
    """One line in one write, flushed: `print` writes a text and its newline apart, so a line
    of another thread or of the other stream could land between them."""
    out = stream or sys.stdout
    with _OUT_LOCK:
        out.write(text + "\n")
        out.flush()


class WholeLines(io.TextIOBase):
    """A stream for the daemon's log in the demo: it passes on whole lines only, each with
    `whole_line`, so a log line and an application line never share a line."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._pending = ""

    def write(self, text: str) -> int:
        with _OUT_LOCK:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                whole_line(line, self._out)
        return len(text)

    def flush(self) -> None:
        return None  # a line is flushed when it is whole

    def isatty(self) -> bool:
        return self._out.isatty()


def admin_address(preferred: int = 8089) -> str:
    """127.0.0.1:8089 (where `status` looks by default) when it is free, else a free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def summary(store: StateStore, jobs: Sequence[Job], seconds: float) -> str:
    """One paragraph of what the demo did: calls, slot outcomes, retries, skips."""
    records = [record for job in jobs for record in store.runs(job.name, limit=10_000)]
    calls = [record for record in records if record.attempt > 0]
    last: dict[str, RunRecord] = {}
    for record in calls:
        if record.key not in last or record.attempt > last[record.key].attempt:
            last[record.key] = record
    outcomes = Counter(record.outcome for record in last.values())
    retries = sum(record.attempt - 1 for record in last.values())
    skipped = Counter(r.job for r in records if r.outcome == "skipped_overlap")
    told = ", ".join(f"{count} {outcome}" for outcome, count in outcomes.most_common())
    text = (f"cronclock demo: {seconds:.0f} s, {len(calls)} call{'s' if len(calls) != 1 else ''} "
            f"for {len(last)} slot{'s' if len(last) != 1 else ''} ({told or 'none yet'}); "
            f"{retries} retr{'ies' if retries != 1 else 'y'}")  # fmt: skip
    if skipped:
        text += "; skipped as overlapping: " + ", ".join(f"{n} of {job}" for job, n in
                                                         skipped.most_common())  # fmt: skip
    return text + "."


class DemoTarget:
    """The demo application: checks the bearer token and prints each call it receives."""

    def __init__(
        self, *, token: str | None = None, echo: Callable[[str], None] | None = None
    ) -> None:
        self.token = token or secrets.token_urlsafe(16)
        self._echo = echo or whole_line
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
