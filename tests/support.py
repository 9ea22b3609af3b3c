"""Test helpers: a recording HTTP target on loopback, a virtual clock, a fake firer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    drip: float = 0.0  # send the body one byte every `drip` seconds (a slow-loris answer)
    size: int = 0  # answer with a body of this many bytes, streamed (never held in memory)


@dataclass(frozen=True)
class Arrival:
    at: datetime
    done: datetime
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    @property
    def scheduled_for(self) -> datetime:
        value = self.header("X-Scheduled-For")
        assert value is not None
        return datetime.fromisoformat(value.replace("Z", "+00:00"))


class Target:
    """A real HTTP server on 127.0.0.1 that records every request and answers as told.

    `script[path]` is a list of replies used in turn (the last one repeats)."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.script: dict[str, list[Reply]] = {}
        self.active = 0
        self.max_active: dict[str, int] = {}  # most concurrent requests seen per path
        self._path_active: dict[str, int] = {}
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                target._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        at = datetime.now(UTC)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        path = request.path
        with self._lock:
            n = self._counts.get(path, 0)
            self._counts[path] = n + 1
            replies = self.script.get(path.split("?")[0], [Reply()])
            reply = replies[min(n, len(replies) - 1)]
            self.active += 1
            self._path_active[path] = self._path_active.get(path, 0) + 1
            self.max_active[path] = max(self.max_active.get(path, 0), self._path_active[path])
        try:
            if reply.delay:
                time.sleep(reply.delay)
            data = json.dumps({"status": reply.status}).encode()
            if reply.drip:
                data = b"x" * 200
            length = reply.size or len(data)
            request.send_response(reply.status)
            for name, value in reply.headers.items():
                request.send_header(name, value)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(length))
            request.end_headers()
            try:
                if reply.size:
                    chunk = b"y" * 65536
                    for start in range(0, reply.size, len(chunk)):
                        request.wfile.write(chunk[: reply.size - start])
                elif reply.drip:
                    for byte in range(len(data)):
                        request.wfile.write(data[byte : byte + 1])
                        request.wfile.flush()
                        time.sleep(reply.drip)
                else:
                    request.wfile.write(data)
            except OSError:  # the client went away (a bounded read, a timeout)
                request.close_connection = True
        finally:
            with self._lock:
                self.active -= 1
                self._path_active[path] -= 1
                self.arrivals.append(
                    Arrival(
                        at, datetime.now(UTC), request.command, path, dict(request.headers), body
                    )
                )

    def calls(self, path: str | None = None) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if path is None or a.path == path]

    def wait_for(self, predicate: Callable[[list[Arrival]], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.calls()):
                return True
            time.sleep(0.05)
        return predicate(self.calls())


class VirtualClock:
    """Time that moves only when told: `wait` advances it by the timeout."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._mono = 1000.0
        self.waits: list[float] = []

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def set(self, instant: datetime) -> None:
        """Step the wall clock (forward or back); monotonic time is unaffected."""
        self._now = instant

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.advance(timeout)
        return False

    def wake(self) -> None:
        return None


class RecordingFirer:
    """Collects what the scheduler hands on."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, datetime, datetime | None]] = []

    def submit(self, job: object, slots: list[datetime], *, deadline: datetime | None) -> None:
        for slot in slots:
            self.fired.append((job.name, slot, deadline))  # type: ignore[attr-defined]

    def slots(self, name: str) -> list[datetime]:
        return [slot for job, slot, _ in self.fired if job == name]


class RedisServer:
    """A real redis-server of the test's own, on a free loopback port in a temporary directory.

    It keeps nothing on disk, so a restart is a Redis that lost its data (the harder case)."""

    def __init__(self, directory: Path, binary: str) -> None:
        self.directory = directory
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--daemonize", "no",
                "--appendonly", "no", "--loglevel", "warning"]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def find_initdb() -> str | None:
    """initdb on PATH, or the newest of Debian's (which keeps it off PATH, in
    /usr/lib/postgresql/<major>/bin)."""
    found = shutil.which("initdb")
    if found is not None:
        return found
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)  # fmt: skip
    return str(debian[-1]) if debian else None


class PostgresServer:
    """A real PostgreSQL cluster of the test's own (`initdb` + `pg_ctl`), on a free loopback
    port in a temporary directory. As root, the server runs as the `postgres` user (it refuses
    to run as root), so its directory lies outside pytest's root-only tmp_path.

    fsync is off: these tests kill and restart the server process, never the machine."""

    def __init__(self, initdb: str) -> None:
        self.bin = Path(initdb).resolve().parent
        self.directory = Path(tempfile.mkdtemp(prefix="cronclock-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.directory, "postgres")
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_postgres, *map(str, args)], capture_output=True,
                              text=True, check=check, timeout=120)  # fmt: skip

    def start(self) -> PostgresServer:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")  # fmt: skip
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.directory / "server.log",
                  "-w", "-t", "60", "-o", options, "start")  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def sql(self, query: str, database: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg  # the extra cronclock[postgres]

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(query)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mount_tmpfs(mount: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at the existing directory `mount` (needs root); why not, or None."""
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, check=False)  # fmt: skip
    return None if made.returncode == 0 else made.stderr.decode().strip() or "mount failed"


def unmount(mount: Path) -> None:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Take every free byte of the file system `path` is on (a file that grows until ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
