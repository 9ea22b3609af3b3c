"""The fast path: requests built ahead of their slot, written at its instant by one event loop.

A scheduled slot's first attempt over plain HTTP does not go through httpx's client on a pool
thread. The dispatcher builds it with httpx (the same `Request`, headers and body as the
ordinary path) and serialises it once, ahead of the slot; `Wire.send` hands the bytes to one
asyncio event loop in a thread of its own, which warms a keep-alive connection ahead of the
instant and, at the instant, writes every request due onto a connection in one callback. Answers
are parsed with httptools (llhttp, uvicorn's parser), bounded as on the ordinary path (the job's
timeout covers the whole exchange, at most BODY_READ_CAP bytes of an answer are read), and
handed back only once no due request is left waiting to be written: bookkeeping (history, logs,
metrics) never delays a call of the same instant.

Everything unusual takes the ordinary path in dispatch.py: TLS, a proxy, a retry, a replayed
batch, a manual trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import httptools
import httpx

BODY_READ_CAP = 64 * 1024
KEPT_BYTES = 800  # the answer's first bytes, kept for the error text
# A connection idle longer than this is not written to: a server may close an idle
# connection just as a request arrives (uvicorn after 5 s, gunicorn after 2 s). One is opened
# ahead of the slot instead: when the request is handed over and again WARM_AHEAD_SECONDS
# before its instant; the rule holds at the instant itself (a stale one is closed, not used).
REUSE_IDLE_SECONDS = 1.0
WARM_AHEAD_SECONDS = 0.02
# The event loop's timers wake up to a millisecond late (epoll's resolution); a request's
# timer is set this much early and the instant is then met exactly by a short wait.
EARLY_SECONDS = 0.001
# Answers are held while due requests wait to be written, but not longer than this: past the
# instant a request waiting for a free connection waits for the application, and bookkeeping
# held behind it would come all at once at the end (1,000 calls to a slow target, 5 s late).
HOLD_ANSWERS_SECONDS = 0.25

Failure = Literal["connect", "timeout", "closed", "protocol", "lease", "stopped"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """How one request went on the wire."""

    status: int | None
    retry_after: str | None
    prefix: bytes  # the answer's first KEPT_BYTES bytes
    failure: Failure | None  # None: an answer arrived
    error: str | None
    written: float | None  # time.monotonic() when the request was written; None: never
    ended: float


def serialise(request: httpx.Request) -> bytes:
    """The request as HTTP/1.1 bytes: what httpcore would write for it."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)]
    lines.extend(name + b": " + value + b"\r\n" for name, value in request.headers.raw)
    lines.append(b"\r\n")
    return b"".join(lines) + request.content


class _Request:
    __slots__ = ("at", "connection", "done", "may_fire", "payload", "timeout", "timer", "written")

    def __init__(
        self,
        payload: bytes,
        at: float,
        timeout: float,
        may_fire: Callable[[], bool],
        done: Callable[[Exchange], None],
    ) -> None:
        self.payload = payload
        self.at = at
        self.timeout = timeout
        self.may_fire = may_fire
        self.done = done
        self.timer: asyncio.TimerHandle | None = None
        self.connection: _Connection | None = None
        self.written: float | None = None


class LoopThread:
    """One asyncio event loop (uvloop where installed and wanted) running in a thread of its
    own. The daemon runs one: the wire writes the calls on it and the admin API is served on
    it, so an instant's writes wait at most for the callback running, never for another
    thread to give up the GIL (up to its 5 ms switch interval)."""

    def __init__(self, *, uvloop: bool = True, name: str = "wire") -> None:
        self.loop = _new_loop(uvloop)
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        """uvloop or asyncio."""
        return type(self.loop).__module__.split(".")[0]

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class Wire:
    """Writes prepared requests at their instant onto warm keep-alive connections (at most
    `connections` per origin), on a LoopThread: the one given, or one of its own."""

    def __init__(
        self, *, connections: int, loop: LoopThread | None = None, uvloop: bool = True
    ) -> None:
        self._limit = connections
        self._owned = loop is None
        self._thread = loop or LoopThread(uvloop=uvloop)
        self._loop = self._thread.loop
        self._origins: dict[tuple[str, int], _Origin] = {}
        self._lock = threading.Lock()
        self._unwritten = 0  # sent to the loop and not written (nor failed) yet
        self._waiting = 0  # due, not yet on a connection
        self._answered: list[tuple[_Request, Exchange]] = []
        self._held_since = 0.0  # when the oldest answer held was kept
        self._connecting: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def unwritten(self) -> int:
        """Requests handed to the loop whose bytes have not been written yet."""
        return self._unwritten

    @property
    def writing(self) -> bool:
        """Requests are due and waiting for a connection (a burst is being written)."""
        return self._waiting > 0

    @property
    def loop_name(self) -> str:
        return self._thread.name

    def send(
        self,
        host: str,
        port: int,
        payload: bytes,
        *,
        at: float,
        timeout: float,
        may_fire: Callable[[], bool],
        done: Callable[[Exchange], None],
    ) -> None:
        """Write `payload` to host:port at `at` (time.monotonic()), unless `may_fire()` says
        no then; `done(exchange)` is called once, from the loop's thread."""
        request = _Request(payload, at, timeout, may_fire, done)
        with self._lock:  # (so nothing is handed to the loop after close() began)
            if self._closed:
                raise RuntimeError("the wire is closed")
            self._unwritten += 1
            self._loop.call_soon_threadsafe(self._schedule, host, port, request)

    def close(self) -> None:
        """Fail what has not been written, close every connection; stop the loop when it is
        the wire's own."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop is already closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        if self._owned:
            self._thread.stop()

    # -- on the loop ----------------------------------------------------------------------

    def _schedule(self, host: str, port: int, request: _Request) -> None:
        origin = self._origins.get((host, port))
        if origin is None:
            origin = self._origins[(host, port)] = _Origin(self, host, port)
        origin.pending.add(request)
        origin.warm(request.timeout)
        delay = request.at - time.monotonic() - EARLY_SECONDS
        request.timer = self._loop.call_later(max(0.0, delay), origin.due, request)
        if delay > WARM_AHEAD_SECONDS and request.at not in origin.rewarm:  # once per instant
            origin.rewarm.add(request.at)
            self._loop.call_later(delay - WARM_AHEAD_SECONDS, origin.warm_again, request)

    def _written(self) -> None:
        with self._lock:
            self._unwritten -= 1

    def finish(self, request: _Request, exchange: Exchange) -> None:
        """Keep an answer until no due request is left waiting to be written."""
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        if request.written is None:
            self._written()
        if not self._answered:
            self._held_since = time.monotonic()
        self._answered.append((request, exchange))
        if not self._waiting or time.monotonic() - self._held_since >= HOLD_ANSWERS_SECONDS:
            self.hand_back()

    def hand_back(self) -> None:
        answered, self._answered = self._answered, []
        for request, exchange in answered:
            request.done(exchange)

    async def _shutdown(self) -> None:
        for origin in self._origins.values():
            origin.close()
        self.hand_back()
        connecting = list(self._connecting)
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)


class _Origin:
    """The connections to one host:port and the requests due there."""

    def __init__(self, wire: Wire, host: str, port: int) -> None:
        self.wire = wire
        self.loop = wire._loop
        self.host = host
        self.port = port
        self.idle: list[_Connection] = []
        self.busy: set[_Connection] = set()
        self.opening = 0
        self.waiting: deque[_Request] = deque()  # due, not yet on a connection
        self.pending: set[_Request] = set()  # scheduled, not yet due
        self.rewarm: set[float] = set()  # instants with a warm-up planned just before them

    def warm(self, timeout: float) -> None:
        """Open connections ahead of the instant, one per request to come (up to the
        limit); idle ones the server may be about to close are replaced."""
        now = time.monotonic()
        for connection in [c for c in self.idle if c.stale(now)]:
            self.idle.remove(connection)
            connection.close()
        have = len(self.idle) + self.opening + len(self.busy)
        wanted = min(self.wire._limit, len(self.pending) + len(self.waiting) + len(self.busy))
        for _ in range(wanted - have):
            self.open(timeout)

    def warm_again(self, request: _Request) -> None:
        self.rewarm.discard(request.at)
        self.warm(request.timeout)

    def open(self, timeout: float) -> None:
        self.opening += 1
        task = self.loop.create_task(self._connect(timeout))
        self.wire._connecting.add(task)
        task.add_done_callback(self.wire._connecting.discard)
        task.add_done_callback(_consume)

    async def _connect(self, timeout: float) -> None:
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.host, self.port),
                timeout,
            )
        except (OSError, TimeoutError) as failure:
            self.opening -= 1
            self.connect_failed(failure)
            return
        self.opening -= 1
        connection.idle_since = time.monotonic()
        self.idle.append(connection)
        self.pump()

    def connect_failed(self, failure: BaseException) -> None:
        """Nothing reached the application: every request due here fails unsent (the
        dispatcher retries such a failure once, on the ordinary path)."""
        if isinstance(failure, TimeoutError):
            error = "connect timed out"
        else:
            error = f"connection failed: {str(failure) or type(failure).__name__}"
        if self.opening or self.idle or self.busy:
            return  # another connection may yet serve them
        while self.waiting:
            request = self.waiting.popleft()
            self.wire._waiting -= 1
            self.wire.finish(request, _failed("connect", error, None))

    def due(self, request: _Request) -> None:
        """The request's instant: write it now, or queue it for the next free connection."""
        while (left := request.at - time.monotonic()) > 0:
            if left > EARLY_SECONDS * 2:  # woken far too early: wait again
                request.timer = self.loop.call_later(left - EARLY_SECONDS, self.due, request)
                return
        self.pending.discard(request)
        try:
            allowed = request.may_fire()
        except Exception:  # cannot tell: a slot is called at most once, so not now
            allowed = False
        if not allowed:
            self.wire.finish(request, _failed("lease", "the lease could not be confirmed", None))
            return
        request.timer = self.loop.call_later(request.timeout, self.expire, request)
        self.waiting.append(request)
        self.wire._waiting += 1
        self.pump()

    def pump(self) -> None:
        """Put waiting requests on idle connections; open more while some wait."""
        now = time.monotonic()
        while self.waiting and self.idle:
            connection = self.idle.pop()
            if connection.stale(now):  # the server may be closing it
                connection.close()
                continue
            request = self.waiting.popleft()
            self.wire._waiting -= 1
            self.busy.add(connection)
            connection.start(request)
            self.wire._written()
        room = self.wire._limit - self.opening - len(self.busy)
        for _ in range(min(len(self.waiting) - self.opening, room)):  # (opening ones serve too)
            self.open(self.waiting[0].timeout)
        if not self.wire._waiting and self.wire._answered:
            self.wire.hand_back()

    def expire(self, request: _Request) -> None:
        """The job's timeout ran out: the whole exchange, waiting for a connection included."""
        request.timer = None
        error = f"timed out after {request.timeout:g}s"
        if request.connection is not None:
            request.connection._fail("timeout", error)
            return
        if request in self.waiting:
            self.waiting.remove(request)
            self.wire._waiting -= 1
            if self.idle or self.busy:  # the application is there, but slow
                failure = _failed("timeout", f"{error} waiting for a free connection", None)
            else:  # no connection could be made in time: nothing reached the application
                failure = _failed("connect", f"connection failed: {error} connecting", None)
            self.wire.finish(request, failure)

    def released(self, connection: _Connection, keep: bool) -> None:
        self.busy.discard(connection)
        if keep:
            connection.idle_since = time.monotonic()
            self.idle.append(connection)
            self.pump()
        else:
            connection.abort()  # what was not read is dropped with the connection
            if self.waiting:
                self.pump()

    def lost(self, connection: _Connection) -> None:
        self.busy.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if self.waiting:
            self.pump()

    def close(self) -> None:
        for connection in list(self.busy):
            connection._fail("stopped", "no answer before shutdown; the call was sent")
        for connection in self.idle:
            connection.abort()
        self.idle.clear()
        unsent = [*self.pending, *self.waiting]
        self.wire._waiting -= len(self.waiting)
        self.pending.clear()
        self.waiting.clear()
        for request in unsent:
            self.wire.finish(request, _failed("stopped", "not sent: shutting down", None))


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request on it at a time."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.request: _Request | None = None
        self.idle_since = 0.0
        self.status: int | None = None
        self.retry_after: str | None = None
        self.kept = b""
        self.read = 0

    def stale(self, now: float) -> bool:
        """Idle so long that the server may be closing it: not to be written to."""
        return now - self.idle_since > REUSE_IDLE_SECONDS

    # -- asyncio --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.request is None:  # bytes nobody asked for: the connection is not trusted
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as failure:
            self._fail("protocol", f"RemoteProtocolError: {failure}")

    def eof_received(self) -> bool | None:
        self._closed_early()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_early()
        self.origin.lost(self)

    # -- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if len(self.kept) < KEPT_BYTES:
            self.kept += body[: KEPT_BYTES - len(self.kept)]
        self.read += len(body)
        if self.read >= BODY_READ_CAP and self.request is not None:
            self._answer(keep=False)  # the rest is dropped with the connection

    def on_message_complete(self) -> None:
        if self.status is not None and self.status < 200:  # an interim answer (1xx)
            self.status, self.retry_after = None, None
            return
        if self.request is not None:
            self._answer(keep=self.parser.should_keep_alive())

    # -- the exchange ---------------------------------------------------------------------

    def start(self, request: _Request) -> None:
        assert self.transport is not None
        self.request, request.connection = request, self
        self.status, self.retry_after, self.kept, self.read = None, None, b"", 0
        request.written = time.monotonic()
        self.transport.write(request.payload)

    def _answer(self, *, keep: bool) -> None:
        request, self.request = self.request, None
        assert request is not None
        request.connection = None
        exchange = Exchange(status=self.status, retry_after=self.retry_after, prefix=self.kept,
                            failure=None, error=None, written=request.written,
                            ended=time.monotonic())  # fmt: skip
        self.origin.released(self, keep and self.read < BODY_READ_CAP)
        self.origin.wire.finish(request, exchange)

    def _closed_early(self) -> None:
        """The server closed the connection during an exchange."""
        if self.request is None:
            return
        if self.status is not None:  # an answer delimited by the connection's end
            self._answer(keep=False)
            return
        self._fail("closed", "RemoteProtocolError: Server disconnected without sending a response.")

    def _fail(self, kind: Failure, error: str) -> None:
        request, self.request = self.request, None
        if request is None:
            return
        request.connection = None
        self.origin.busy.discard(self)
        self.abort()
        self.origin.wire.finish(request, _failed(kind, error, request.written))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _failed(kind: Failure, error: str, written: float | None) -> Exchange:
    return Exchange(status=None, retry_after=None, prefix=b"", failure=kind, error=error,
                    written=written, ended=time.monotonic())  # fmt: skip


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _new_loop(prefer_uvloop: bool) -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (and wanted), the standard loop otherwise."""
    if prefer_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
