"""The dispatcher with its fast path (the wire) against real servers on loopback: the same
bytes as the ordinary path, retries, overlap, timeouts, the lease, shutdown, uvicorn."""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvicorn
from pydantic import SecretStr

from schedule_grammar import parse
from services.scheduler.clock import SystemClock
from services.scheduler.config import Job
from services.scheduler.dispatch import Dispatcher
from services.scheduler.signing import Signer, parse_secrets
from services.scheduler.slots import idempotency_key
from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.wire import Wire, serialise
from tests.scheduler.test_wire import Raw, read_request
from tests.support import Reply, Target


def job(**fields: Any) -> Job:
    values: dict[str, Any] = {"name": "sync", "schedule": parse("every 15m"),
                              "endpoint": "/api/sync/trigger", "timeout": 5.0}  # fmt: skip
    values.update(fields)
    return Job(**values)


class Quiet:
    def report(self, error: BaseException, properties: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


SPAN = "00f067aa0ba902b7"  # every attempt's span id here, so two paths' bytes compare


class World:
    def __init__(
        self,
        url: str,
        *,
        may_fire: Any = lambda: True,
        wire: bool = True,
        signer: Signer | None = None,
        wall: Any = time.time,
        span_ids: Any = lambda: SPAN,
        spans: Any = None,
    ) -> None:
        self.store = MemoryStateStore()
        self.finished: list[tuple[str, Any]] = []
        self.done = threading.Event()
        self.wire = Wire(connections=4) if wire else None

        def on_finished(j: Job, result: Any, deadline: Any) -> None:
            self.finished.append((j.name, result))
            self.done.set()

        self.dispatcher = Dispatcher(api_url=url, token=SecretStr("s3cret"), store=self.store,
                                     clock=SystemClock(), log=structlog.get_logger(),
                                     reporter=Quiet(), max_concurrency=4, may_fire=may_fire,
                                     on_finished=on_finished, wire=self.wire, signer=signer,
                                     wall=wall, span_ids=span_ids, spans=spans)  # fmt: skip

    def fire(self, j: Job, slot: datetime) -> None:
        self.dispatcher.submit(j, [slot], deadline=None)

    def wait(self, count: int = 1, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.finished) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.finished) >= count, self.finished

    def runs(self, name: str = "sync") -> list[Any]:
        return sorted(self.store.runs(name), key=lambda r: (r.started, r.attempt))


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def soon(seconds: float = 0.05) -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000) + timedelta(seconds=seconds)


def test_a_scheduled_slot_goes_on_the_wire_with_every_header(target: Target) -> None:
    world = World(target.url)
    slot = soon()
    world.fire(job(body={"full": True}), slot)
    world.wait()
    (arrival,) = target.calls()
    assert arrival.at >= slot  # never before its slot
    assert arrival.header("Authorization") == "Bearer s3cret"
    assert arrival.header("Idempotency-Key") == idempotency_key("sync", slot)
    assert arrival.header("X-Scheduler-Attempt") == "1"
    assert arrival.body == b'{"full":true}'
    (run,) = world.runs()
    assert (run.outcome, run.status, run.attempt) == ("success", 200, 1)
    assert world.dispatcher.in_flight() == {}
    assert world.wire is not None and world.wire.unwritten == 0
    world.dispatcher.shutdown(1)


def test_both_paths_send_the_same_bytes() -> None:
    """The wire writes what httpx would write for the same attempt."""
    raw = Raw()
    try:
        slot = soon()
        fast, ordinary = (
            World(f"http://127.0.0.1:{raw.port}"),
            World(f"http://127.0.0.1:{raw.port}", wire=False),
        )
        fast.fire(job(body={"a": 1}, headers={"X-Tenant": "t1"}), slot)
        fast.wait()
        ordinary.fire(job(body={"a": 1}, headers={"X-Tenant": "t1"}), slot)
        ordinary.wait()
        assert len(raw.requests) == 2
        assert raw.requests[0] == raw.requests[1]
        fast.dispatcher.shutdown(1)
        ordinary.dispatcher.shutdown(1)
    finally:
        raw.close()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"body": {"a": 1, "text": "héllo ✓"}, "headers": {"X-Tenant": "t1"}},
        {"name": "nightly.report", "method": "PUT", "body": None},
        {"body": {"mark": "1999-12-31T23:59:58.987Z"}},  # the template's own mark in the body
        {"name": "a.b:c@d-e_f", "endpoint": "/caf%C3%A9?x=1"},
    ],
)
def test_a_first_attempt_is_filled_into_its_jobs_template_byte_for_byte(
    fields: dict[str, Any], signed: bool
) -> None:
    """Issue 18: the first attempt's bytes are built with httpx once per job, then only the
    slot's own headers are filled in; they equal a fresh build for every slot and token, and
    (issue 21) with signing on, for every attempt's time too."""
    clock = iter(range(1_795_000_000, 1_795_000_100))
    now = [0.0]

    def wall() -> float:
        return now[0]

    secret = "whsec_" + base64.b64encode(b"template-signing-key-0123").decode()
    signer = Signer(parse_secrets(secret)) if signed else None
    world = World("http://127.0.0.1:9", signer=signer, wall=wall)
    j = job(**fields)
    url = world.dispatcher.url(j)
    for k, token in enumerate([None, None, 7, 7, 8], start=1):
        world.dispatcher._fencing_token = lambda token=token: token  # type: ignore[misc]
        slot = soon(60 * k)
        key = idempotency_key(j.name, slot)
        now[0] = float(next(clock))
        span = f"{k:016x}"
        filled = world.dispatcher._first_payload(j, url, slot, key, span)
        assert filled == serialise(world.dispatcher._build(j, url, slot, key, 1, span))
        assert f"traceparent: 00-{world.dispatcher.trace(key)}-{span}-01".encode() in filled
        assert (b"webhook-signature: v1," in filled) == signed
        assert (world.dispatcher._templates[j.name][2] is not None) or "mark" in str(fields)
    world.dispatcher.shutdown(1)


def test_over_http_no_ca_bundle_is_loaded_and_over_https_certificates_are_still_checked(
    tmp_path: Path,
) -> None:
    """Issue 18: loading the CA bundle costs ~30 ms of start-up and 1.2 MB; over http:// it is
    not loaded. Over https:// a self-signed server is refused (the certificate is checked)."""
    plain = World("http://127.0.0.1:9")
    assert plain.dispatcher._client._transport._pool._ssl_context is None  # type: ignore[attr-defined]
    plain.dispatcher.shutdown(1)
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a self-signed certificate)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                with contextlib.suppress(ssl.SSLError, OSError):
                    context.wrap_socket(connection, server_side=True).recv(1024)
                connection.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    world = World(f"https://127.0.0.1:{listener.getsockname()[1]}")
    world.fire(job(retries=0), soon())
    world.wait()
    runs = world.runs()  # a failed connect is tried once more
    assert runs and all("CERTIFICATE_VERIFY_FAILED" in (run.error or "") for run in runs)
    assert runs[-1].outcome == "failed"
    world.dispatcher.shutdown(1)
    listener.close()


def test_a_transient_failure_is_retried_on_the_ordinary_path(target: Target) -> None:
    target.script["/api/sync/trigger"] = [Reply(503, {"Retry-After": "0"}), Reply(200)]
    world = World(target.url)
    world.fire(job(retries=2), soon())
    world.wait()
    assert [a.header("X-Scheduler-Attempt") for a in target.calls()] == ["1", "2"]
    runs = world.runs()
    assert [(r.attempt, r.outcome, r.status) for r in runs] == [
        (1, "failed", 503), (2, "success", 200)]  # fmt: skip
    assert "HTTP 503" in (runs[0].error or "")
    world.dispatcher.shutdown(1)


def test_a_job_in_flight_on_the_wire_is_not_fired_again(target: Target) -> None:
    target.script["/api/sync/trigger"] = [Reply(200, delay=0.5)]
    world = World(target.url)
    j = job(overlap="skip")
    first = soon()
    world.fire(j, first)
    time.sleep(0.2)
    world.fire(j, first + timedelta(milliseconds=1))
    world.wait(2)
    assert len(target.calls()) == 1
    assert sorted(r.outcome for r in world.runs()) == ["skipped_overlap", "success"]
    world.dispatcher.shutdown(1)


def test_the_timeout_bounds_a_dripped_answer(target: Target) -> None:
    target.script["/api/sync/trigger"] = [Reply(200, drip=0.05)]
    world = World(target.url)
    world.fire(job(timeout=0.5), soon())
    world.wait()
    (run,) = world.runs()
    assert run.outcome == "failed" and run.error == "timed out after 0.5s"
    assert run.duration is not None and run.duration < 3
    world.dispatcher.shutdown(1)


def test_without_the_lease_at_the_slot_nothing_is_sent(target: Target) -> None:
    world = World(target.url, may_fire=lambda: False)
    world.fire(job(), soon())
    world.wait()
    (run,) = world.runs()
    assert run.outcome == "missed" and "lease" in (run.error or "")
    assert target.calls() == []
    world.dispatcher.shutdown(1)


def test_a_refused_connection_is_retried_once_then_recorded(target: Target) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    world = World(f"http://127.0.0.1:{port}")
    world.fire(job(), soon())
    world.wait()
    runs = world.runs()
    assert [r.outcome for r in runs] == ["failed", "failed"]  # the one connect retry
    assert all((r.error or "").startswith("connection failed") for r in runs)
    assert world.dispatcher.target().failures == 2
    world.dispatcher.shutdown(1)


def test_shutdown_records_a_slot_the_wire_never_wrote(target: Target) -> None:
    world = World(target.url)
    world.fire(job(), soon(30))
    assert world.dispatcher.firing
    assert world.dispatcher.shutdown(0) == []
    (run,) = world.runs()
    assert run.outcome == "skipped_overlap" and run.error == "shutting down"
    assert target.calls() == []
    assert world.dispatcher.in_flight() == {}


def test_a_slot_already_due_is_sent_at_once(target: Target) -> None:
    world = World(target.url)
    world.fire(job(), soon(-2))  # a catch-up fire: its slot has passed
    world.wait()
    assert len(target.calls()) == 1
    world.dispatcher.shutdown(1)


def test_https_and_replayed_batches_take_the_ordinary_path() -> None:
    raw = Raw()
    try:
        world = World(f"http://127.0.0.1:{raw.port}")
        slots = [soon(-3), soon(-2)]
        world.dispatcher.submit(job(catchup="all"), slots, deadline=None)
        world.wait()
        assert len(raw.requests) == 2
        assert world.wire is not None and not world.wire._origins  # the wire was not used
        world.dispatcher.shutdown(1)
    finally:
        raw.close()


class Uvicorn:
    """A real uvicorn server (its h11 or httptools protocol) with a short keep-alive."""

    def __init__(self, http: str) -> None:
        self.seen: list[dict[str, str]] = []

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            self.seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"done"})

        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, http=http, log_level="error", timeout_keep_alive=1,
                                lifespan="off")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)  # fmt: skip
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_uvicorn_answers_every_fire_across_its_keep_alive_timeout(http: str) -> None:
    """Fires spaced across uvicorn's keep-alive timeout (1 s): the connections it closes
    while idle are never written to; every slot is answered once."""
    server = Uvicorn(http)
    try:
        world = World(f"http://127.0.0.1:{server.port}")
        j = job()
        for index, gap in enumerate([0.05, 0.5, 1.0, 1.05, 0.2]):
            world.fire(j, soon(gap))
            world.wait(index + 1)
        assert [r.outcome for r in world.runs()] == ["success"] * 5
        assert len(server.seen) == 5
        world.dispatcher.shutdown(1)
    finally:
        server.close()


def test_a_server_that_reads_slowly_still_gets_the_whole_request() -> None:
    """A body larger than the socket buffers is written in parts by the transport."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        sock, _ = listener.accept()
        time.sleep(0.3)  # the client's writes fill the buffers meanwhile
        request = read_request(sock, bytearray())
        assert request is not None
        received.append(request)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    world = World(f"http://127.0.0.1:{port}")
    world.fire(job(body={"blob": "z" * 3_000_000}), soon())
    world.wait()
    assert world.runs()[0].outcome == "success"
    assert received and received[0].endswith(b'"}')
    world.dispatcher.shutdown(1)
    listener.close()


def test_a_proxy_in_the_environment_turns_the_fast_path_off(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx sends through HTTP_PROXY; the wire does not know proxies, so it steps aside."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    world = World(target.url)
    assert world.dispatcher.fast_path == "off (a proxy is set in the environment)"
    assert not world.dispatcher.firing
    world.dispatcher.shutdown(0)


NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[str]:
    """A real nginx on a free port with a 1 s keep-alive timeout, from its own directory."""
    if NGINX is None:
        pytest.skip("nginx is not installed (.ci/run installs it: apt-get install nginx)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = " ".join(f"{kind}_temp_path {tmp_path}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    (tmp_path / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {temp}
    keepalive_timeout 1s;
    server {{
        listen 127.0.0.1:{port};
        location /ok {{ return 200 "ok"; }}
        location /down {{ return 503 "down for maintenance"; }}
    }}
}}
""")
    process = subprocess.Popen([NGINX, "-p", str(tmp_path), "-e", f"{tmp_path}/error.log",
                                "-c", str(tmp_path / "nginx.conf")])  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def test_nginx_answers_every_fire_across_its_keep_alive_timeout(nginx: str) -> None:
    world = World(nginx)
    ok, down = job(endpoint="/ok"), job(name="down", endpoint="/down")
    for index, gap in enumerate([0.05, 0.6, 1.1, 1.05]):
        world.fire(ok, soon(gap))
        world.wait(index + 1)
    world.fire(down, soon())
    world.wait(5)
    assert [r.outcome for r in world.runs()] == ["success"] * 4
    (failed,) = world.runs("down")
    assert (failed.outcome, failed.status) == ("failed", 503)
    assert failed.error == "HTTP 503: down for maintenance"
    world.dispatcher.shutdown(1)
