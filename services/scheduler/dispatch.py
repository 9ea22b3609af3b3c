"""Firing: in-flight dedup and overlap policy, retries, and the call.

A scheduled slot's first attempt over plain HTTP is written at its instant by the event loop of
`wire.py` (requests built ahead, warm connections); everything else (TLS, a proxy, retries,
replayed batches, manual triggers) and all bookkeeping run on a small thread pool, through httpx.
"""

from __future__ import annotations

import queue
import random
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpcore
import httpx
from pydantic import SecretStr
from structlog.typing import FilteringBoundLogger

from . import __version__
from .config import Job
from .signing import Signer
from .slots import CallResult, Clock, format_slot, idempotency_key, manual_key
from .stores.protocols import Outcome, RunRecord, StateStore, not_called
from .telemetry import ErrorReporter, JobFailed, Metrics, log_batch
from .tracing import Attempt, SpanExport, new_span_id, trace_id, traceparent
from .wire import BODY_READ_CAP, KEPT_BYTES, Exchange, Wire, serialise

OutcomeClass = Literal["success", "busy", "transient", "permanent"]

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 60.0
RETRY_AFTER_CAP_SECONDS = 3600.0
LATE_WARNING_SECONDS = 1.0
CONNECT_RETRY_DELAY_SECONDS = 0.2
# The marks a job's first-attempt template is built around (see Dispatcher._first_payload).
_MARK_SLOT = datetime(1999, 12, 31, 23, 59, 58, 987000, tzinfo=UTC)
_MARK_KEY = "cronclock-template-key-5f1c3a"
# With signing on, the Standard Webhooks headers are filled in too (signing.py).
_MARK_ID = "cronclock-template-id-9b2e71"
_MARK_TS = "cronclock-template-ts-0c4d"
_MARK_SIG = "cronclock-template-signature-4d0a17"
_MARK_TRACE = "cronclock-template-traceparent-7e3f90"  # tracing.py: the attempt's traceparent
# The bookkeeper records at most this many answers at once (their log lines in one write).
BOOKS_AT_ONCE = 256
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# Of an answer, at most BODY_READ_CAP bytes are read (the rest is dropped with the
# connection), and the first ERROR_TEXT_CHARS of it go into the run's error text.
ERROR_TEXT_CHARS = KEPT_BYTES // 4  # that many characters of UTF-8 fit in the bytes kept


def classify(status: int) -> OutcomeClass:
    """DESIGN.md section 4: 2xx/3xx success, 409 busy, 408/425/429/5xx transient, else permanent."""
    if 200 <= status < 400:
        return "success"
    if status == 409:
        return "busy"
    if status in _TRANSIENT_STATUSES or status >= 500:
        return "transient"
    return "permanent"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), RETRY_AFTER_CAP_SECONDS)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), RETRY_AFTER_CAP_SECONDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """One attempt: how it went on the wire."""

    kind: OutcomeClass
    status: int | None
    error: str | None
    retry_after: float | None
    unsent: bool  # failed before anything was sent (connection refused, connect timeout)
    started: datetime
    duration: float
    lost_lease: bool = False  # not sent: the lease could not be confirmed at the slot
    span: str  # the attempt's span id, in the traceparent it carried

    @property
    def outcome(self) -> Outcome:
        if self.kind == "success":
            return "success"
        return "busy" if self.kind == "busy" else "failed"


# -- the wire: one deadline for the whole exchange -------------------------------------------
#
# httpx's timeouts bound each socket operation, so an answer dripped one byte at a time never
# times out. The network backend below bounds every connect, read and write by what is left
# of the current call's deadline, kept per thread (each call runs on one pool thread).


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    """A job's first attempt as bytes, split around the marks of the values each slot fills
    in: pieces[0] + value(order[0]) + pieces[1] + ... (and the body, for the signature)."""

    pieces: tuple[bytes, ...]
    order: tuple[str, ...]  # "slot", "key", "traceparent" and, when signing, webhook-*
    body: bytes


_deadline = threading.local()


# The application is "unreachable" after this many attempts in a row that could not connect
# (health says `degraded`: the daemon is fine, restarting it would not help).
UNREACHABLE_AFTER = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetHealth:
    """The application as the calls have found it."""

    status: Literal["unknown", "reachable", "unreachable"]
    since: datetime | None  # the first of the failed connections in a row
    failures: int  # attempts in a row that could not connect
    error: str | None  # the last of them


class Reachability:
    """Counts attempts in a row that could not connect; any answer (or a timeout after the
    request was sent) resets it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen = False
        self._failures = 0
        self._since: datetime | None = None
        self._error: str | None = None

    def attempted(self, sent: Sent) -> None:
        with self._lock:
            self._seen = True
            if sent.unsent:
                self._failures += 1
                self._since = self._since or sent.started
                self._error = sent.error
            elif self._failures:
                self._failures, self._since, self._error = 0, None, None

    def health(self) -> TargetHealth:
        with self._lock:
            if not self._seen:
                return TargetHealth(status="unknown", since=None, failures=0, error=None)
            down = self._failures >= UNREACHABLE_AFTER
            return TargetHealth(status="unreachable" if down else "reachable",
                                since=self._since, failures=self._failures,
                                error=self._error)  # fmt: skip


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    until: float | None = getattr(_deadline, "until", None)
    if until is None:
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise error("the job's timeout ran out")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, bounded, local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def http_client(max_concurrency: int, *, tls: bool = True) -> httpx.Client:
    """The client calls go out on: keep-alive connections whose every socket operation is
    bounded by the call's deadline. Without `tls` (API_URL is http://) the CA bundle is not
    loaded (30 ms and 1.2 MB); httpcore would load its default, verifying, context if a TLS
    connection were ever made."""
    limits = httpx.Limits(
        max_connections=max_concurrency, max_keepalive_connections=max_concurrency
    )
    context = httpx.create_ssl_context() if tls else None
    # The transport's own pool is replaced below; the context it is built with is not used.
    transport = httpx.HTTPTransport(
        verify=context or ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), limits=limits
    )
    # httpx takes no network backend, so the transport's pool is rebuilt with ours.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_DeadlineBackend(),
    )
    # Answers are read only for their status and an error's first characters: uncompressed
    # (the wire reads them raw, and both paths send the same headers).
    return httpx.Client(transport=transport, headers={"Accept-Encoding": "identity"})


def _error_text(status: int, prefix: bytes) -> str:
    """`HTTP 500: <the answer's first characters>`, on one line, printable."""
    text = " ".join(prefix.decode("utf-8", "replace").split())[:ERROR_TEXT_CHARS]
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _settle(future: Future[Any], done: Future[Any]) -> None:
    """Give `future` the outcome of `done`."""
    if done.cancelled():
        future.cancel()
    elif (error := done.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(done.result())


def _proxied() -> bool:
    """Whether the environment routes plain HTTP through a proxy (httpx honours it)."""
    proxies = urllib.request.getproxies()
    return "http" in proxies or "all" in proxies


class Dispatcher:
    """Fires calls, on the wire's event loop (`wire`) or a pool of `max_concurrency`
    threads; never the same job twice at once unless its overlap policy is `allow`."""

    def __init__(
        self,
        *,
        api_url: str,
        token: SecretStr | None,
        store: StateStore,
        clock: Clock,
        log: FilteringBoundLogger,
        reporter: ErrorReporter,
        max_concurrency: int,
        client: httpx.Client | None = None,
        sleep: Callable[[float], bool] | None = None,
        rng: random.Random | None = None,
        fencing_token: Callable[[], int | None] = lambda: None,
        may_fire: Callable[[], bool] = lambda: True,
        pause: Callable[[float], None] = time.sleep,
        metrics: Metrics | None = None,
        on_finished: Callable[[Job, CallResult | None, datetime | None], None] | None = None,
        on_settled: Callable[[Job, CallResult, int], None] | None = None,
        wire: Wire | None = None,
        signer: Signer | None = None,
        wall: Callable[[], float] = time.time,
        spans: SpanExport | None = None,
        span_ids: Callable[[], str] = new_span_id,
    ) -> None:
        self._store = store
        self._signer = signer  # Standard Webhooks headers on every call (signing.py)
        self._wall = wall
        # Trace context (tracing.py): a trace per slot and target, a span per attempt.
        self._trace_seed = api_url.rstrip("/").encode()
        self._spans, self._span_ids = spans, span_ids
        # Scheduled first attempts over plain HTTP go on the wire (not through a proxy).
        self._proxied = _proxied()
        self._wire = wire if wire is not None and not self._proxied else None
        if wire is not None and self._wire is None:
            wire.close()
        self._wire_closing = False
        # Told when a batch of calls is over (or skipped), with the job's next slot.
        self._on_finished = on_finished
        # Told each slot's final outcome and the job's failures in a row before it (the
        # failure policies and notifications, policies.py).
        self._on_settled = on_settled
        self._clock = clock
        self._log = log
        self._reporter = reporter
        self._token = token
        self._fencing_token = fencing_token
        self._may_fire = may_fire
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._client = client or http_client(
            max_concurrency, tls=api_url.lower().startswith("https:")
        )
        self._base = httpx.URL(api_url.rstrip("/"))
        self._urls: dict[str, httpx.URL] = {}
        # job name -> (the job, (fencing token, URL), its first attempt split around the marks)
        self._templates: dict[str, tuple[Job, tuple[int | None, httpx.URL], Template | None]] = {}
        self._pause = pause
        self._metrics = metrics if metrics is not None else Metrics()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="fire")
        # The wire's answers are recorded by one thread, in the order they were handed back;
        # only an attempt that may be retried (and so sleep) goes on to the pool.
        self._answers: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._bookkeeper = threading.Thread(target=self._keep_books, name="bookkeeper",
                                            daemon=True)  # fmt: skip
        if self._wire is not None:
            self._bookkeeper.start()
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._firing = 0  # batches handed on whose first call has not been sent yet
        self._backfilling: set[str] = set()  # jobs with a backfill running
        # job -> the batch queued behind its run in flight (overlap = "queue")
        self._pending: dict[str, tuple[Job, list[tuple[datetime, str]], datetime | None]] = {}
        self._futures: set[Future[Any]] = set()
        self._reachability = Reachability()

    # -- submission -----------------------------------------------------------------------

    def submit(self, job: Job, slots: Sequence[datetime], *, deadline: datetime | None) -> None:
        """Fire `slots` of `job` (one, or several replayed in order) on the pool, one task,
        subject to the job's overlap policy. `deadline` is the job's next planned slot."""
        batch = [(slot, idempotency_key(job.name, slot)) for slot in slots]
        with self._lock:
            busy = self._in_flight.get(job.name, 0) > 0
            if busy and job.overlap == "skip":
                for slot, key in batch:
                    self._skipped(job, slot, key, "a previous run is still in flight")
                self._finished(job, None, deadline)
                return
            if busy and job.overlap == "queue":
                displaced = self._pending.get(job.name)
                self._pending[job.name] = (job, batch, deadline)
                for slot, key in displaced[1] if displaced else ():
                    self._skipped(job, slot, key, "replaced by a newer queued slot")
                self._log.info(
                    "queued behind the run in flight", job=job.name, slot=format_slot(batch[-1][0])
                )
                return
            if not self._on_wire(job, batch, deadline):
                self._start(job, batch, deadline)

    def _on_wire(
        self, job: Job, batch: list[tuple[datetime, str]], deadline: datetime | None
    ) -> bool:
        """Hand a single slot's first attempt to the wire: built now, written at the slot.
        False when it takes the ordinary path. Called with self._lock held."""
        if self._wire is None or len(batch) != 1:
            return False
        url = self.url(job)
        if url.scheme != "http":
            return False
        slot, key = batch[0]
        span = self._span_ids()
        try:
            payload = self._first_payload(job, url, slot, key, span)
        except Exception:  # the ordinary path records it as a failed run
            return False
        at = time.monotonic() + (slot - self._clock.now()).total_seconds()
        future: Future[CallResult | None] = Future()

        def answered(exchange: Exchange) -> None:  # on the wire's loop
            self._answers.put(
                lambda: self._after_wire(future, job, batch, deadline, exchange, at, span)
            )

        try:
            self._wire.send(url.host, url.port or 80, payload, at=at, timeout=job.timeout,
                            may_fire=self._may_fire, done=answered)  # fmt: skip
        except RuntimeError:  # the wire is closed: shutting down
            return False
        self._in_flight[job.name] = self._in_flight.get(job.name, 0) + 1
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return True

    def _after_wire(
        self,
        future: Future[CallResult | None],
        job: Job,
        batch: list[tuple[datetime, str]],
        deadline: datetime | None,
        exchange: Exchange,
        at: float,
        span: str,
    ) -> None:
        """The bookkeeping of a call the wire made (and its retries, on the ordinary path)."""
        try:
            if exchange.failure == "stopped" and exchange.written is None:
                slot, key = batch[0]
                self._skipped(job, slot, key, "shutting down")
                self._finished(job, None, deadline)
                self._release(job)
                future.set_result(None)
                return
            first = self._sent_from(job, batch[0], exchange, at, span)
            if first.kind == "transient" and not first.lost_lease and not self._wire_closing:
                retried = self._pool.submit(self._run, job, batch, deadline, first)
                retried.add_done_callback(lambda done: _settle(future, done))
                return
            future.set_result(self._run(job, batch, deadline, first=first))
        except BaseException as error:
            future.set_exception(error)

    def _keep_books(self) -> None:
        """Record the wire's answers: all those waiting at once, their log lines written
        together in one write (log_batch)."""
        while (task := self._answers.get()) is not None:
            tasks: list[Callable[[], None] | None] = [task]
            while len(tasks) < BOOKS_AT_ONCE:
                try:
                    more = self._answers.get_nowait()
                except queue.Empty:
                    break
                tasks.append(more)
                if more is None:
                    break
            with log_batch():
                for task in tasks:
                    if task is None:
                        return
                    try:
                        task()
                    except Exception:  # _after_wire settles its future; this is the last guard
                        self._log.exception("after the call: bookkeeping failed")
                    if self._wire is not None and self._wire.writing:
                        # A burst is still being written: let the wire's loop have the GIL now,
                        # not after the 5 ms switch interval (it costs ~75 µs, so only then).
                        time.sleep(0)

    def _sent_from(
        self, job: Job, scheduled: tuple[datetime, str], exchange: Exchange, at: float, span: str
    ) -> Sent:
        """The wire's exchange, classified as the ordinary path classifies an attempt."""
        slot, key = scheduled
        written = exchange.written if exchange.written is not None else exchange.ended
        self._observe_lateness(job, slot, key, written - at)
        started = slot + timedelta(seconds=written - at)
        duration = exchange.ended - written
        status, retry_after, unsent = exchange.status, None, False
        if exchange.failure is None:
            assert status is not None
            kind = classify(status)
            error = None if kind == "success" else _error_text(status, exchange.prefix)
            if kind == "transient":
                retry_after = parse_retry_after(exchange.retry_after, self._clock.now())
        else:
            kind, error = "transient", exchange.error
            unsent = exchange.failure == "connect"
        return Sent(kind=kind, status=status, error=error, retry_after=retry_after,
                    unsent=unsent, started=started, duration=duration,
                    lost_lease=exchange.failure == "lease", span=span)  # fmt: skip

    def trigger(self, job: Job) -> tuple[str, Future[CallResult]] | str:
        """Fire `job` now with a manual key (claimed like a slot); or why not."""
        if self.in_flight().get(job.name, 0) > 0 and job.overlap != "allow":
            return f"job {job.name!r} is in flight and its overlap policy is {job.overlap!r}"
        key = manual_key(job.name)
        refused = self._claim(job, key, "trigger")
        if refused is not None:
            return refused
        with self._lock:
            if self._in_flight.get(job.name, 0) > 0 and job.overlap != "allow":
                self._store.mark_finished(job.name, key)
                return f"job {job.name!r} is in flight and its overlap policy is {job.overlap!r}"
            return key, self._start(job, [(self._clock.now(), key)], None)

    def backfill(
        self, job: Job, slots: Sequence[datetime], *, overlap: str
    ) -> tuple[str, Future[CallResult]] | str:
        """Fire past `slots` of `job` now, in order, each with its own slot's Idempotency-Key
        (so the application deduplicates against the slot's first call); or why not. One
        backfill of a job at a time; claimed as one manual call (on HA: on the leader)."""
        if self.in_flight().get(job.name, 0) > 0 and overlap != "allow":
            return f'job {job.name!r} is in flight; ask again, or with overlap "allow"'
        claim = f"{job.name}@backfill-{uuid.uuid4()}"
        refused = self._claim(job, claim, "backfill")
        if refused is not None:
            return refused
        with self._lock:
            busy = self._in_flight.get(job.name, 0) > 0 and overlap != "allow"
            if busy or job.name in self._backfilling:
                self._store.mark_finished(job.name, claim)
                if busy:
                    return f'job {job.name!r} is in flight; ask again, or with overlap "allow"'
                return f"a backfill of {job.name!r} is running; wait for it to end"
            self._backfilling.add(job.name)
            batch = [(slot, idempotency_key(job.name, slot)) for slot in slots]
            return claim, self._start(job, batch, None, claim=claim)

    def _claim(self, job: Job, key: str, what: str) -> str | None:
        """Claim a call made by hand (a trigger, a backfill); None, or why it may not be."""
        refusal = self._store.claim(job.name, key)
        if refusal is None:
            return None
        return {
            "not_leader": f"this replica is a standby; {what} the job on the leader",
            "unavailable": "the state store cannot be reached; nothing was fired",
        }.get(refusal, f"the {what} could not be claimed ({refusal})")

    def _start(
        self,
        job: Job,
        batch: list[tuple[datetime, str]],
        deadline: datetime | None,
        *,
        claim: str | None = None,
    ) -> Future[CallResult]:
        # Called with self._lock held. `claim`: a backfill's own key (its slots' keys are
        # the slots' own, not claimed again).
        self._in_flight[job.name] = self._in_flight.get(job.name, 0) + 1
        self._firing += 1
        future = self._pool.submit(self._run, job, batch, deadline, claim=claim)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def _run(
        self,
        job: Job,
        batch: list[tuple[datetime, str]],
        deadline: datetime | None,
        first: Sent | None = None,
        *,
        claim: str | None = None,
    ) -> CallResult:
        """Call the batch's slots in order; `first`: the first slot's first attempt, made
        on the wire; `claim`: the key a backfill was claimed under."""
        backfill = claim is not None
        done, sent = 0, False  # first_sent runs on this thread only

        def first_sent() -> None:
            nonlocal sent
            if not sent:
                sent = True
                if first is None:
                    with self._lock:
                        self._firing -= 1

        result: CallResult | None = None
        try:
            for index, (slot, key) in enumerate(batch):
                if index and self._stopping.is_set():
                    break
                # A replayed slot's retries must not run into the slot replayed after it.
                until = batch[index + 1][0] if index + 1 < len(batch) else deadline
                if backfill:
                    until = None  # past slots: each has its retries, one after another
                before = self._store.job_state(job.name).failures if self._on_settled else 0
                try:
                    result = self.call(job, slot, key=key, deadline=until, on_sent=first_sent,
                                       first=first if index == 0 else None,
                                       backfill=backfill)  # fmt: skip
                except Exception as error:  # a bug must not kill the pool thread silently
                    self._log.exception("dispatch crashed", job=job.name, slot=format_slot(slot))
                    self._reporter.report(error, {"job": job.name, "slot": format_slot(slot)})
                    raise
                finally:
                    if not backfill:
                        self._store.mark_finished(job.name, key)
                    done += 1
                if not backfill:  # a backfill's failures neither pause the job nor notify
                    self._settled(job, result, before)
            assert result is not None
            return result
        finally:
            first_sent()
            for slot, key in batch[done:]:
                self._skipped(job, slot, key, "shutting down", claimed=not backfill)
            if claim is not None:
                self._store.mark_finished(job.name, claim)
                with self._lock:
                    self._backfilling.discard(job.name)
            self._finished(job, result, deadline)
            self._release(job)

    def _release(self, job: Job) -> None:
        """A run of `job` is over; the batch queued behind it (overlap = "queue") starts."""
        with self._lock:
            self._in_flight[job.name] -= 1
            if not self._in_flight[job.name]:
                del self._in_flight[job.name]
                queued = self._pending.pop(job.name, None)
                if queued is not None and not self._stopping.is_set():
                    self._start(*queued)

    def _finished(self, job: Job, result: CallResult | None, deadline: datetime | None) -> None:
        if self._on_finished is None:
            return
        try:
            self._on_finished(job, result, deadline)
        except Exception:  # bookkeeping must not cost the pool thread
            self._log.exception("after the call: bookkeeping failed", job=job.name)

    def _settled(self, job: Job, result: CallResult, before: int) -> None:
        if self._on_settled is None:
            return
        try:
            self._on_settled(job, result, before)
        except Exception:  # a policy must not cost the pool thread or the slots after
            self._log.exception("after the call: failure policy failed", job=job.name)

    def _skipped(
        self, job: Job, slot: datetime, key: str, reason: str, *, claimed: bool = True
    ) -> None:
        self._metrics.outcome(job.label, "skipped_overlap")
        if claimed:
            self._store.mark_finished(job.name, key)
        self._store.record_run(
            not_called(job.name, slot, key, "skipped_overlap", reason, self._clock.now())
        )
        self._log.warning("skipped: overlap", job=job.name, slot=format_slot(slot), reason=reason)

    # -- state for readers ----------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def firing(self) -> bool:
        """True while calls handed on are waiting for their instant or being sent: the admin
        API holds its requests back then, so they do not compete with firing for the GIL."""
        return self._firing > 0 or (self._wire is not None and self._wire.unwritten > 0)

    @property
    def fast_path(self) -> str:
        """The event loop first attempts go out on, or why they do not take the fast path."""
        if self._wire is not None:
            return self._wire.loop_name
        return "off (a proxy is set in the environment)" if self._proxied else "off"

    def target(self) -> TargetHealth:
        """Whether the application answers, as the latest attempts found it."""
        return self._reachability.health()

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    # -- the call -------------------------------------------------------------------------

    def trace(self, key: str) -> str:
        """The slot's trace id (the same on every attempt, restart and replica)."""
        return trace_id(self._trace_seed, key)

    def headers(
        self, job: Job, slot: datetime, key: str, attempt: int, span: str
    ) -> dict[str, str]:
        headers = dict(job.headers)
        headers.update(
            {
                "User-Agent": f"cronclock/{__version__}",
                "X-Scheduler-Job": job.name,
                "X-Scheduled-For": format_slot(slot),
                "Idempotency-Key": key,
                "X-Scheduler-Attempt": str(attempt),
                "traceparent": traceparent(self.trace(key), span),
            }
        )
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        fencing = self._fencing_token()
        if fencing is not None:
            headers["X-Scheduler-Fencing-Token"] = str(fencing)
        return headers

    def url(self, job: Job) -> httpx.URL:
        url = self._urls.get(job.endpoint)
        if url is None:  # parsing a URL costs more than sending the request; do it once
            url = httpx.URL(str(self._base) + job.endpoint)
            if job.schedule_id is None:  # runtime schedules' endpoints are not kept
                self._urls[job.endpoint] = url
        return url

    def _await_slot(self, job: Job, slot: datetime, key: str) -> None:
        """Send at the slot, not before: the loop hands slots on a little ahead of time so the
        request is built and the state written when the instant comes."""
        ahead = (slot - self._clock.now()).total_seconds()
        if ahead > 0:
            self._pause(ahead)
            ahead = (slot - self._clock.now()).total_seconds()
        self._observe_lateness(job, slot, key, -ahead)

    def _observe_lateness(self, job: Job, slot: datetime, key: str, late: float) -> None:
        if "@manual-" not in key:
            self._metrics.lateness.observe(max(0.0, late))
        if late > LATE_WARNING_SECONDS:
            self._log.warning(
                "late fire", job=job.name, slot=format_slot(slot), late_seconds=round(late, 3)
            )

    def _first_payload(
        self, job: Job, url: httpx.URL, slot: datetime, key: str, span: str
    ) -> bytes:
        """A first attempt's bytes for the wire. Built with httpx once per job (and fencing
        token) around marks, then only the slot's own header values are filled in
        (X-Scheduled-For, Idempotency-Key, traceparent and, when signing, webhook-id,
        -timestamp and -signature): the same bytes as a fresh build, at a fraction of its cost."""
        if job.schedule_id is not None:  # runtime schedules' jobs are not kept: build it
            return serialise(self._build(job, url, slot, key, 1, span))
        fencing = self._fencing_token()
        template = self._templates.get(job.name)
        if template is None or template[0] is not job or template[1] != (fencing, url):
            template = self._templates[job.name] = (job, (fencing, url), self._template(job, url))
        filling = template[2]
        if filling is None or not key.isascii():
            return serialise(self._build(job, url, slot, key, 1, span))
        values = {"slot": format_slot(slot), "key": key,
                  "traceparent": traceparent(self.trace(key), span)}  # fmt: skip
        if self._signer is not None:
            values |= self._signer.headers(key, filling.body, int(self._wall()))
        pieces = filling.pieces
        parts = [pieces[0]]
        for name, piece in zip(filling.order, pieces[1:], strict=True):
            parts += (values[name].encode(), piece)
        return b"".join(parts)

    def _template(self, job: Job, url: httpx.URL) -> Template | None:
        """The job's first attempt split around the marks of its slot's own header values;
        None when a mark is not found exactly once (the job's own bytes contain one)."""
        request = self._build(job, url, _MARK_SLOT, _MARK_KEY, 1, "0")
        request.headers["traceparent"] = _MARK_TRACE
        marks = {"slot": format_slot(_MARK_SLOT), "key": _MARK_KEY, "traceparent": _MARK_TRACE}
        if self._signer is not None:  # the same places as the headers _build signed with
            signed = {"webhook-id": _MARK_ID, "webhook-timestamp": _MARK_TS,
                      "webhook-signature": _MARK_SIG}  # fmt: skip
            request.headers.update(signed)
            marks |= signed
        whole = serialise(request)
        found = {name: mark.encode() for name, mark in marks.items()}
        if any(whole.count(mark) != 1 for mark in found.values()):
            return None
        order = tuple(sorted(found, key=lambda name: whole.index(found[name])))
        pieces, rest = [], whole
        for name in order:
            head, rest = rest.split(found[name])
            pieces.append(head)
        pieces.append(rest)
        return Template(pieces=tuple(pieces), order=order, body=request.content)

    def _build(
        self, job: Job, url: httpx.URL, slot: datetime, key: str, attempt: int, span: str
    ) -> httpx.Request:
        request = self._client.build_request(
            job.method,
            url,
            headers=self.headers(job, slot, key, attempt, span),
            json=job.body,
            timeout=job.timeout,
        )
        if self._signer is not None:  # over the body bytes as sent, this attempt's time
            request.headers.update(self._signer.headers(key, request.content, int(self._wall())))
        return request

    def call(
        self,
        job: Job,
        slot: datetime,
        *,
        key: str,
        deadline: datetime | None,
        on_sent: Callable[[], None] | None = None,
        first: Sent | None = None,
        backfill: bool = False,
    ) -> CallResult:
        """Call the job's endpoint for `slot`, retrying transient failures; record every
        attempt. `first`: the first attempt, already made on the wire; `backfill`: a past
        slot fired now (not awaited, no lateness observed, recorded as a backfill)."""
        attempt, retries_left, connect_retry_used = 0, job.retries, False
        trace = self.trace(key)
        begun = self._clock.monotonic()
        if first is not None:
            begun -= first.duration
        while True:
            attempt += 1
            if first is not None:
                sent, first = first, None
                if sent.lost_lease:
                    return self._lost_lease(job, slot, key, begun)
            else:
                span = self._span_ids()
                try:
                    request = self._build(job, self.url(job), slot, key, attempt, span)
                except Exception as failure:  # config refuses such jobs; this is the last guard
                    return self._unbuildable(job, slot, key, attempt, failure, begun)
                if attempt == 1:
                    if not backfill:
                        self._await_slot(job, slot, key)
                    if not self._may_fire():
                        return self._lost_lease(job, slot, key, begun)
                sent = self._send(job, request, span)
            self._reachability.attempted(sent)
            if on_sent is not None:
                on_sent()
            # Transient failure: retried (decided first, so the record says whether it settles
            # the slot); success, busy and permanent failure: the slot's outcome.
            delay: float | None = None
            error = sent.error
            if sent.kind == "transient" and sent.unsent and not connect_retry_used:
                connect_retry_used, delay = True, CONNECT_RETRY_DELAY_SECONDS
            elif sent.kind == "transient" and retries_left > 0:
                retries_left -= 1
                delay = max(self._backoff(attempt), sent.retry_after or 0.0)
            if (
                delay is not None
                and deadline is not None
                and self._clock.now() + timedelta(seconds=delay) >= deadline
            ):
                error = f"{error}; not retried: the next slot ({format_slot(deadline)}) comes first"
                delay = None
            self._store.record_run(
                RunRecord(
                    job=job.name,
                    slot=slot,
                    key=key,
                    attempt=attempt,
                    started=sent.started,
                    outcome=sent.outcome,
                    duration=sent.duration,
                    status=sent.status,
                    error=sent.error,
                    settles=delay is None,
                    backfill=backfill,
                )
            )
            if self._spans is not None:
                self._spans.attempt(Attempt(job=job, slot=slot, key=key, attempt=attempt,
                                            trace=trace, span=sent.span, started=sent.started,
                                            duration=sent.duration, status=sent.status,
                                            outcome=sent.outcome, error=sent.error))  # fmt: skip
            fields: dict[str, Any] = {
                "job": job.name,
                "slot": format_slot(slot),
                "attempt": attempt,
                "status": sent.status,
                "duration_ms": round(sent.duration * 1000, 1),
                "trace_id": trace,
            }
            if backfill:
                fields["backfill"] = True
            if sent.kind in ("success", "busy"):
                self._log.info("fired" if sent.kind == "success" else "busy (409)", **fields)
                return self._result(job, slot, key, sent.outcome, attempt, sent.status, None, begun)
            if delay is None:
                return self._give_up(job, slot, key, fields, error, begun)
            self._log.warning("retrying", **fields, error=error, retry_in=round(delay, 3))
            if self._sleep(delay):
                error = f"{error}; not retried: shutting down"
                self._log.error("failed", **fields, error=error)
                return self._result(job, slot, key, "failed", attempt, sent.status, error, begun)

    def _unbuildable(
        self, job: Job, slot: datetime, key: str, attempt: int, failure: Exception, begun: float
    ) -> CallResult:
        """A request that cannot be built is a failed run in the history. The exception's
        text is not kept: it may quote a header value, and the token is one."""
        error = (
            f"not sent: the request could not be built ({type(failure).__name__}); check the "
            "job's headers, body and the API token"
        )
        self._store.record_run(not_called(job.name, slot, key, "failed", error, self._clock.now()))
        fields = {"job": job.name, "slot": format_slot(slot), "attempt": attempt, "status": None,
                  "trace_id": self.trace(key)}  # fmt: skip
        return self._give_up(job, slot, key, fields, error, begun)

    def _give_up(
        self,
        job: Job,
        slot: datetime,
        key: str,
        fields: dict[str, Any],
        error: str | None,
        begun: float,
    ) -> CallResult:
        """The slot's final failure: logged, reported to error tracking, returned."""
        self._log.error("failed", **fields, error=error, endpoint=job.endpoint)
        self._reporter.report(
            JobFailed(f"{job.name}: {error}"),
            {key_: fields[key_] for key_ in ("job", "status", "attempt", "slot")}
            | {"endpoint": job.endpoint},
        )
        return self._result(
            job, slot, key, "failed", fields["attempt"], fields["status"], error, begun
        )

    def _lost_lease(self, job: Job, slot: datetime, key: str, begun: float) -> CallResult:
        """The lease could not be confirmed when the call was due: it is not sent (another
        replica may lead by now, and a slot is called at most once)."""
        error = "not sent: this replica's lease could not be confirmed at the slot"
        self._store.record_run(not_called(job.name, slot, key, "missed", error, self._clock.now()))
        self._log.error("not fired: leadership lost before the call", job=job.name,
                        slot=format_slot(slot), trace_id=self.trace(key))  # fmt: skip
        return self._result(job, slot, key, "missed", 0, None, error, begun)

    def _send(self, job: Job, request: httpx.Request, span: str) -> Sent:
        """One attempt on the wire, classified; never raises for HTTP or network trouble."""
        started, t0 = self._clock.now(), self._clock.monotonic()
        status: int | None = None
        retry_after: float | None = None
        unsent = False
        _deadline.until = time.monotonic() + job.timeout
        try:
            response = self._client.send(request, follow_redirects=False, stream=True)
            try:
                status = response.status_code
                kind = classify(status)
                prefix = self._read_prefix(response)
            finally:
                response.close()  # what was not read is dropped with the connection
            error = None if kind == "success" else _error_text(status, prefix)
            if kind == "transient":
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as failure:
            kind, unsent = "transient", True  # nothing reached the application
            error = f"connection failed: {failure or type(failure).__name__}"
        except httpx.TimeoutException:
            kind, error = "transient", f"timed out after {job.timeout:g}s"
        except httpx.LocalProtocolError as failure:  # its text may quote a header: not kept
            kind, error = (
                "permanent",
                f"not sent: the HTTP client refused the request ({type(failure).__name__})",
            )
        except httpx.HTTPError as failure:
            kind, error = "transient", f"{type(failure).__name__}: {failure}"
        finally:
            _deadline.until = None
        return Sent(
            kind=kind,
            status=status,
            error=error,
            retry_after=retry_after,
            unsent=unsent,
            started=started,
            duration=self._clock.monotonic() - t0,
            span=span,
        )

    @staticmethod
    def _read_prefix(response: httpx.Response) -> bytes:
        """Read at most BODY_READ_CAP bytes of the answer (so a connection whose answer was
        short is kept alive); the first of them explain a failure."""
        if response.is_stream_consumed:  # an answer built in memory (a mock transport)
            return response.content[:KEPT_BYTES]
        kept, read = b"", 0
        for chunk in response.iter_raw(16384):
            if len(kept) < KEPT_BYTES:
                kept += chunk[: KEPT_BYTES - len(kept)]
            read += len(chunk)
            if read >= BODY_READ_CAP:
                break
        return kept

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: 1s, 2s, 4s ... capped at 60s, each times 0.5-1."""
        ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** (attempt - 1))
        return ceiling * self._rng.uniform(0.5, 1.0)

    def _result(
        self,
        job: Job,
        slot: datetime,
        key: str,
        outcome: Outcome,
        attempts: int,
        status: int | None,
        error: str | None,
        begun: float,
    ) -> CallResult:
        at = self._clock.now().timestamp() if outcome == "success" else 0.0
        self._metrics.finished(job.label, outcome, self._clock.monotonic() - begun, at)
        return CallResult(
            job=job.name,
            slot=slot,
            key=key,
            outcome=outcome,
            attempts=attempts,
            status=status,
            error=error,
            duration=self._clock.monotonic() - begun,
        )

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self, grace_seconds: float) -> list[str]:
        """Stop retrying, wait up to `grace_seconds` for calls in flight; names left running."""
        self._stopping.set()
        with self._lock:
            for job, batch, _ in self._pending.values():
                for slot, key in batch:
                    self._skipped(job, slot, key, "shutting down")
            self._pending.clear()
            futures = list(self._futures)
            running = sorted(self._in_flight)
        if running:
            self._log.info("waiting for jobs to finish", jobs=running, grace_seconds=grace_seconds)
        deadline = self._clock.monotonic() + grace_seconds
        for future in futures:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                break
            try:
                future.result(timeout=remaining)
            except Exception:  # outcome already recorded and logged by the call
                continue
        if self._wire is not None:
            self._wire_closing = True
            self._wire.close()  # what it still holds is failed, and recorded so
            self._answers.put(None)
            self._bookkeeper.join(timeout=10)
        left = sorted(self.in_flight())
        if left:
            self._log.warning("abandoning calls still in flight after the grace period", jobs=left)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        return left
