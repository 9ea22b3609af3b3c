"""The admin API: health, metrics, the job table with its history, and controls.

FastAPI, served by uvicorn on a background thread. Handlers only read state and hand work to
the dispatcher; none of them can block the clock loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import html
import importlib.resources
import inspect
import socket
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from structlog.typing import FilteringBoundLogger

from schedule_grammar import ScheduleError, dst_warnings

from . import __version__
from .clock import Scheduler
from .config import Job
from .coordination import Solo
from .dispatch import Dispatcher
from .policies import Silence, paused_by, silence
from .schedules import (
    BATCH_LIMIT,
    MAX_BATCH_BYTES,
    MAX_REQUEST_BYTES,
    SCHEDULE_ID,
    RuntimeSchedules,
    ScheduleInvalid,
    ScheduleSpec,
)
from .slots import Clock, format_slot
from .stores.protocols import (
    Change,
    Coordinator,
    LimitReached,
    RunRecord,
    ScheduleRecord,
    ScheduleStatus,
    StateStore,
    StoreUnavailable,
)
from .telemetry import Metrics, ThreadDeaths

if TYPE_CHECKING:
    from .wire import LoopThread

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminContext:
    """What the admin API reads and acts on."""

    scheduler: Scheduler
    dispatcher: Dispatcher
    store: StateStore
    metrics: Metrics
    clock: Clock
    admin_token: SecretStr | None
    local_dev_mode: bool
    tick_seconds: float
    coordinator: Coordinator = field(default_factory=Solo)
    schedules: RuntimeSchedules | None = None
    thread_deaths: ThreadDeaths | None = None
    # A job that never succeeded is silent since then (max_silence, policies.silence).
    started: datetime | None = None  # None: when the app is created


BACKFILL_MAX = 1000


def backfill_slots(job: Job, start: datetime, end: datetime, now: datetime,
                   limit: int) -> list[datetime]:  # fmt: skip
    """The job's slots from `start` to `end`, both included; ValueError says why not."""
    for name, instant in (("from", start), ("to", end)):
        if instant.tzinfo is None:
            raise ValueError(f"{name}={instant.isoformat()!r}: give an offset or Z (RFC 3339)")
    if end < start:
        raise ValueError(f"to ({format_slot(end)}) is before from ({format_slot(start)})")
    if end > now:
        raise ValueError(
            f"to ({format_slot(end)}) is in the future; a backfill fires past slots only "
            f"(now {format_slot(now)})"
        )
    slots: list[datetime] = []
    slot = job.next_slot(start - timedelta(microseconds=1))
    while slot is not None and slot <= end:
        if len(slots) == limit:
            raise ValueError(
                f"more than {limit} slots of {str(job.schedule)!r} from {format_slot(start)} to "
                f"{format_slot(end)}; narrow the range or raise limit (at most {BACKFILL_MAX})"
            )
        slots.append(slot)
        slot = job.next_slot(slot)
    if not slots:
        raise ValueError(
            f"no slot of {str(job.schedule)!r} from {format_slot(start)} to {format_slot(end)}"
        )
    return slots


def dst_effects(job: Job, now: datetime) -> list[str]:
    """Every DST effect on the job's fires within a year; a schedule that cannot be evaluated
    has none to show (the loop has logged why it is not planned)."""
    try:
        return [warning.message for warning in dst_warnings(job.schedule, now)]
    except ScheduleError:
        return []


# -- response models ------------------------------------------------------------------------


class LastRun(BaseModel):
    at: str | None
    outcome: str | None
    status: int | None


class JobView(BaseModel):
    name: str
    schedule: str
    timezone: str
    method: str
    endpoint: str
    enabled: bool
    overlap: str
    catchup: str
    next_run: str | None
    next_run_local: str | None
    last_run: LastRun
    last_success: str | None
    paused: bool
    # Why the daemon paused it ("auto-paused after 5 consecutive failures", a 410 Gone);
    # null when it is not paused or an operator paused it.
    pause_reason: str | None
    consecutive_failures: int
    pause_after_failures: int  # 0: never
    max_silence: float | None
    stale: bool  # no success for longer than max_silence
    in_flight: int
    dst_warning: str | None  # the first of dst_effects
    dst_effects: list[str]  # every DST effect on its fires in the next 365 days


class RunView(BaseModel):
    slot: str
    key: str
    attempt: int
    started: str
    duration_seconds: float | None
    status: int | None
    outcome: str
    error: str | None
    count: int
    backfill: bool = False  # fired by POST /api/jobs/{name}/backfill


class TargetView(BaseModel):
    """The application, as the latest calls found it (DESIGN: degraded, not unhealthy)."""

    status: str  # unknown (no call yet) | reachable | unreachable
    since: str | None  # unreachable since: the first of the failed connections in a row
    consecutive_failures: int
    last_error: str | None


class Health(BaseModel):
    # ok | standby | degraded (200: the daemon is fine, the application does not answer) |
    # unhealthy (503)
    status: str
    reason: str | None = None
    heartbeat_age_seconds: float
    version: str
    role: str  # solo | leader | standby
    replica: str  # this replica's identity (host:pid)
    leader: str | None  # who leads, as far as this replica knows
    fencing_token: int | None  # the leader's epoch (Redis coordination only)
    target: TargetView
    # Jobs without a success for longer than their max_silence: the daemon is fine (200),
    # the application's work is not getting done.
    stale: list[str] = []


class Triggered(BaseModel):
    job: str
    idempotency_key: str
    # With ?wait=S, once the call has ended within S seconds (else null: it goes on):
    outcome: str | None = None
    status: int | None = None
    attempts: int | None = None
    error: str | None = None


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: datetime = Field(alias="from", description="RFC 3339 with an offset or Z")
    end: datetime = Field(alias="to", description="RFC 3339; not in the future")
    limit: int = Field(100, ge=1, le=BACKFILL_MAX)
    overlap: Literal["skip", "allow"] = "skip"  # allow: also while a run of the job is in flight


class Backfill(BaseModel):
    job: str
    backfill_key: str  # what the backfill was claimed under (the calls carry their slots' keys)
    count: int
    slots: list[str]  # in the order they are fired


class Paused(BaseModel):
    job: str
    paused: bool


class ErrorBody(BaseModel):
    error: str


class JobStatus(JobView):
    runs: list[RunView]  # newest first


class GroupView(BaseModel):
    group: str | None  # null: schedules without a group
    active: int
    ended: int


class Overview(BaseModel):
    health: Health
    jobs: list[JobStatus]
    groups: list[GroupView]
    generated: str


class ScheduleView(BaseModel):
    id: str
    status: str  # active | executed | cancelled | expired
    revision: int
    group: str | None
    schedule: str
    timezone: str
    method: str
    endpoint: str
    headers: dict[str, str]
    body: Any
    timeout: float
    retries: int
    overlap: str
    catchup: str
    misfire_grace: float
    expires_at: str | None
    created: str
    updated: str
    finished: str | None
    next_run: str | None
    next_run_local: str | None
    pause_after_failures: int
    on_gone: str
    paused: bool  # by POST /api/schedules/{id}/pause or by its failure policy
    pause_reason: str | None
    consecutive_failures: int


class ScheduleDetail(ScheduleView):
    change: str | None = None  # after a PUT: created | replaced | unchanged
    last_run: LastRun | None = None
    runs: list[RunView] = []


class BatchItem(BaseModel):
    id: str
    change: str  # created | replaced | unchanged
    revision: int
    status: str  # active, or the status an unchanged schedule has
    first_slot: str | None  # the first slot this revision arms (GET the schedule for its next)


class BatchResult(BaseModel):
    schedules: list[BatchItem]  # in the order they were sent
    created: int
    replaced: int
    unchanged: int


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]
    next_after: str | None  # pass as `after` for the next page; null on the last page


def _iso(instant: datetime | None) -> str | None:
    return format_slot(instant) if instant is not None else None


# -- the app --------------------------------------------------------------------------------

MAX_HOLD_SECONDS = 0.5
BATCH_PATH = "/api/schedules:batch"
JobName = Annotated[str, Path(min_length=1, max_length=200, description="the job's name")]
ScheduleId = Annotated[
    str, Path(pattern=SCHEDULE_ID.pattern, description="the schedule's id, chosen by the caller")
]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong admin token"},
    404: {"model": ErrorBody, "description": "no such job"},
    503: {"model": ErrorBody, "description": "the shared state store (Redis) cannot be reached"},
}
SCHEDULE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorBody, "description": "no such schedule"},
    422: {"model": ErrorBody, "description": "the schedule is not valid; the message says why"},
    503: {"model": ErrorBody, "description": "the state store cannot be written or read"},
}


# FastAPI 0.165 and later look for OpenTelemetry providers on every request (when
# opentelemetry-api is installed); the admin API exports no spans, so that is switched off.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(ctx: AdminContext) -> FastAPI:
    started = ctx.started or ctx.clock.now()
    app = FastAPI(
        title="cronclock admin API",
        version=__version__,
        description="Health, metrics, the job table, run history and controls of one cronclock.",
        # /docs and /redoc load scripts from a CDN: off. The schema stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        **_NO_TELEMETRY,
    )
    app.add_middleware(BodyLimit, limit=MAX_REQUEST_BYTES, larger={BATCH_PATH: MAX_BATCH_BYTES})
    app.add_middleware(YieldToFiring, dispatcher=ctx.dispatcher)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status_code == 405:  # every method the path has, not only the first route's
            methods = {
                method
                for route in app.routes
                if isinstance(route, APIRoute) and route.path_regex.match(request.url.path)
                for method in route.methods or ()
            }
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code,
                            headers=headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        return JSONResponse({"error": f"bad parameters: {problems}"}, status_code=422)

    async def authorized(request: Request) -> None:
        expected = ctx.admin_token.get_secret_value() if ctx.admin_token else None
        if expected is None:
            if ctx.local_dev_mode:
                return
            raise HTTPException(
                401, "the admin API needs SCHEDULER_ADMIN_TOKEN to be set on the daemon"
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            raise HTTPException(
                401,
                "missing or wrong admin token: send Authorization: Bearer <SCHEDULER_ADMIN_TOKEN>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(authorized)]

    def job_or_404(name: str) -> Job:
        job = ctx.scheduler.jobs().get(name)
        if job is None:
            raise HTTPException(404, f"no job named {name!r}")
        return job

    def view(job: Job, planned: dict[str, datetime], in_flight: dict[str, int]) -> JobView:
        state = ctx.store.job_state(job.name)
        upcoming = planned.get(job.name)
        effects = dst_effects(job, ctx.clock.now())
        return JobView(
            name=job.name,
            schedule=str(job.schedule),
            timezone=job.schedule.timezone,
            method=job.method,
            endpoint=job.endpoint,
            enabled=job.enabled,
            overlap=job.overlap,
            catchup=job.catchup,
            next_run=_iso(upcoming),
            next_run_local=(
                upcoming.astimezone(job.schedule.tzinfo).isoformat() if upcoming else None
            ),
            last_run=LastRun(
                at=_iso(state.last_run), outcome=state.last_outcome, status=state.last_status
            ),
            last_success=_iso(state.last_success),
            paused=state.paused,
            pause_reason=state.pause_reason,
            consecutive_failures=state.failures,
            pause_after_failures=job.pause_after_failures,
            max_silence=job.max_silence,
            stale=silence(job, state, ctx.clock.now(), started).stale,
            in_flight=in_flight.get(job.name, 0),
            dst_warning=effects[0] if effects else None,
            dst_effects=effects,
        )

    def health() -> Health:
        age = ctx.clock.monotonic() - ctx.scheduler.heartbeat
        leadership = ctx.coordinator.status()
        reason = None
        if ctx.thread_deaths is not None and ctx.thread_deaths.reason is not None:
            reason = ctx.thread_deaths.reason
        elif ctx.scheduler.stopping:
            reason = "shutting down"
        elif age > 2 * ctx.tick_seconds + 5:
            reason = f"the clock loop has not run for {age:.0f}s"
        elif leadership.problem is not None:
            reason = f"coordination: {leadership.problem}"
        elif (problem := ctx.store.problem()) is not None:
            reason = f"state store: {problem}"
        target = ctx.dispatcher.target()
        status = (
            "unhealthy" if reason
            else "standby" if leadership.role == "standby"
            else "degraded" if target.status == "unreachable"
            else "ok"
        )  # fmt: skip
        return Health(
            status=status,
            reason=reason,
            heartbeat_age_seconds=round(age, 3),
            version=__version__,
            role=leadership.role,
            replica=leadership.identity,
            leader=leadership.leader,
            fencing_token=leadership.epoch,
            target=TargetView(
                status=target.status,
                since=_iso(target.since),
                consecutive_failures=target.failures,
                last_error=target.error,
            ),
            stale=[job.name for job, quiet in silences() if quiet.stale],
        )

    def silences() -> list[tuple[Job, Silence]]:
        now = ctx.clock.now()
        return [(job, silence(job, ctx.store.job_state(job.name), now, started))
                for job in ctx.scheduler.jobs().values()]  # fmt: skip

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz() -> JSONResponse:
        """200 while the clock loop's heartbeat is fresh and the state store (and Redis, when
        coordinated) healthy; a healthy standby answers 200 with status `standby`, and a daemon
        whose application has not accepted a connection for its last calls 200 with `degraded`
        (restarting the daemon would not help)."""
        body = health()
        return JSONResponse(body.model_dump(), status_code=200 if body.reason is None else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        """The status page for people: health rendered here, the rest by its script."""
        body = health()
        leader = f"; leader {body.leader or 'unknown'}" if body.role == "standby" else ""
        values = {
            "version": __version__,
            "status": body.status,
            "replica": body.replica,
            "role": body.role,
            "leader_text": leader,
            "reason_text": f" — {body.reason}" if body.reason else "",
        }
        page = _asset("status.html").substitute({k: html.escape(v) for k, v in values.items()})
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        media = {"status.js": "text/javascript", "status.css": "text/css"}.get(name)
        if media is None:
            raise HTTPException(404, f"no asset {name!r}")
        return Response(_asset(name).template, media_type=media, headers=PAGE_HEADERS)

    @app.get("/api/overview", dependencies=auth, responses=ERRORS)
    def overview(runs: Annotated[int, Query(ge=0, le=100)] = 30) -> Overview:
        """Everything the status page shows, in one request: health, every job with its
        latest `runs`, and the runtime schedule groups."""
        planned, in_flight = ctx.scheduler.planned(), ctx.dispatcher.in_flight()
        jobs = []
        try:
            for job in ctx.scheduler.jobs().values():
                history = [_run_view(run) for run in ctx.store.runs(job.name, runs)] if runs else []
                jobs.append(JobStatus(**view(job, planned, in_flight).model_dump(), runs=history))
            counts = ctx.schedules.store.group_counts() if ctx.schedules is not None else {}
        except StoreUnavailable as error:
            raise HTTPException(503, f"state unavailable: {error}") from None
        groups = [
            GroupView(group=group, active=active, ended=ended)
            for group, (active, ended) in sorted(counts.items(), key=lambda kv: kv[0] or "")
        ]
        return Overview(
            health=health(), jobs=jobs, groups=groups, generated=format_slot(ctx.clock.now())
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus exposition."""
        ctx.metrics.in_flight.set(sum(ctx.dispatcher.in_flight().values()))
        now = ctx.clock.now()
        conditions = []
        for job in ctx.scheduler.jobs().values():
            state = ctx.store.job_state(job.name)
            quiet = silence(job, state, now, started)
            stale = quiet.stale if quiet.silent_seconds is not None else None
            conditions.append((job.name, paused_by(state), state.failures, stale))
        ctx.metrics.conditions(conditions)
        return PlainTextResponse(
            generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/api/jobs", dependencies=auth, responses=ERRORS)
    def list_jobs() -> list[JobView]:
        """Every job with its schedule, next run (UTC and local), last run and state."""
        planned, in_flight = ctx.scheduler.planned(), ctx.dispatcher.in_flight()
        return [view(job, planned, in_flight) for job in ctx.scheduler.jobs().values()]

    @app.get("/api/jobs/{name}", dependencies=auth, responses=ERRORS)
    def get_job(name: JobName) -> JobView:
        return view(job_or_404(name), ctx.scheduler.planned(), ctx.dispatcher.in_flight())

    @app.get("/api/jobs/{name}/runs", dependencies=auth, responses=ERRORS)
    def job_runs(name: JobName, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[RunView]:
        """The job's latest runs, newest first."""
        job_or_404(name)
        try:
            return [_run_view(record) for record in ctx.store.runs(name, limit)]
        except StoreUnavailable as error:
            raise HTTPException(503, f"run history unavailable: {error}") from None

    @app.post(
        "/api/jobs/{name}/trigger",
        dependencies=auth,
        status_code=202,
        response_model=Triggered,
        responses={**ERRORS, 200: {"model": Triggered, "description": "ended within wait"},
                   409: {"model": ErrorBody, "description": "in flight or standby"}},
    )  # fmt: skip
    async def trigger(name: JobName, wait: Annotated[float, Query(ge=0, le=3600)] = 0) -> Any:
        """Fire the job now, with a manual Idempotency-Key. Answers at once (202), or with
        `wait` seconds: 200 with the outcome when the call ends within them, else 202."""
        job = job_or_404(name)
        started = ctx.dispatcher.trigger(job)
        if isinstance(started, str):
            raise HTTPException(409, started)
        key, future = started
        if wait > 0:
            # asyncio.wait, not wait_for: running out of time must not cancel the call.
            done, _ = await asyncio.wait([asyncio.wrap_future(future)], timeout=wait)
            if done:
                result = future.result()
                ended = Triggered(job=name, idempotency_key=key, outcome=result.outcome,
                                  status=result.status, attempts=result.attempts,
                                  error=result.error)  # fmt: skip
                return JSONResponse(ended.model_dump(), status_code=200)
        return Triggered(job=name, idempotency_key=key)

    @app.post(
        "/api/jobs/{name}/backfill",
        dependencies=auth,
        status_code=202,
        response_model=Backfill,
        responses={**ERRORS, 409: {"model": ErrorBody, "description": "in flight or standby"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": BackfillRequest.model_json_schema(by_alias=True)}}}},
    )  # fmt: skip
    async def backfill(name: JobName, request: Request) -> Backfill:
        """Fire every slot of the job's schedule from `from` to `to` (both included), in
        order, now, each with its own slot's X-Scheduled-For and Idempotency-Key; at most
        `limit` slots (1-1000), none in the future. Recorded in the history as backfill."""
        job = job_or_404(name)
        body = await json_body(request)
        try:
            asked = BackfillRequest.model_validate(body)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
                for item in error.errors()
            )
            raise HTTPException(422, f"bad parameters: {problems}") from None
        return await asyncio.to_thread(start_backfill, job, asked)

    def start_backfill(job: Job, asked: BackfillRequest) -> Backfill:
        try:
            slots = backfill_slots(job, asked.start, asked.end, ctx.clock.now(), asked.limit)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        started = ctx.dispatcher.backfill(job, slots, overlap=asked.overlap)
        if isinstance(started, str):
            raise HTTPException(409, started)
        return Backfill(job=job.name, backfill_key=started[0], count=len(slots),
                        slots=[format_slot(slot) for slot in slots])  # fmt: skip

    @app.post("/api/jobs/{name}/pause", dependencies=auth, responses=ERRORS)
    def pause(name: JobName) -> Paused:
        """Let the job's slots pass without firing until resumed (kept across restarts)."""
        job_or_404(name)
        set_paused(name, True)
        return Paused(job=name, paused=True)

    @app.post("/api/jobs/{name}/resume", dependencies=auth, responses=ERRORS)
    def resume(name: JobName) -> Paused:
        job_or_404(name)
        set_paused(name, False)
        return Paused(job=name, paused=False)

    def set_paused(name: str, paused: bool) -> None:
        try:
            ctx.store.set_paused(name, paused)
        except StoreUnavailable as error:
            raise HTTPException(503, f"not {'paused' if paused else 'resumed'}: {error}") from None

    _schedule_routes(app, ctx, auth)
    return app


def _schedule_routes(app: FastAPI, ctx: AdminContext, auth: list[Any]) -> None:
    """PUT|GET|DELETE /api/schedules/{id}, GET /api/schedules: runtime schedules."""

    def runtime() -> RuntimeSchedules:
        if ctx.schedules is None:
            raise HTTPException(404, "runtime schedules are not enabled in this process")
        return ctx.schedules

    def unavailable(error: StoreUnavailable) -> HTTPException:
        return HTTPException(503, f"the state store cannot be reached: {error}")

    def view(record: ScheduleRecord, cls: type[ScheduleView] = ScheduleView) -> Any:
        schedules = runtime()
        job = schedules.job(record)
        state = ctx.store.job_state(job.name)
        upcoming = None
        if record.status == "active":
            upcoming = ctx.scheduler.planned_schedule(job.name)
            if upcoming is None:  # a standby (or not planned yet): as the leader plans it
                now = ctx.clock.now()
                upcoming = record.first
                if upcoming is None or upcoming < now - timedelta(seconds=job.misfire_grace):
                    upcoming = job.next_slot(max(now, record.anchor))
        return cls(
            id=record.id,
            status=record.status,
            revision=record.revision,
            group=record.group,
            schedule=str(job.schedule),
            timezone=job.schedule.timezone,
            method=job.method,
            endpoint=job.endpoint,
            headers=dict(job.headers),
            body=job.body,
            timeout=job.timeout,
            retries=job.retries,
            overlap=job.overlap,
            catchup=job.catchup,
            misfire_grace=job.misfire_grace,
            expires_at=_iso(job.ends),
            created=format_slot(record.created),
            updated=format_slot(record.updated),
            finished=_iso(record.finished),
            next_run=_iso(upcoming),
            next_run_local=(
                upcoming.astimezone(job.schedule.tzinfo).isoformat() if upcoming else None
            ),
            pause_after_failures=job.pause_after_failures,
            on_gone=job.on_gone,
            paused=state.paused,
            pause_reason=state.pause_reason,
            consecutive_failures=state.failures,
        )

    def detail(record: ScheduleRecord, change: str | None = None) -> ScheduleDetail:
        try:  # a schedule just created has no history (a purge deletes it with the schedule)
            runs = [] if change == "created" else ctx.store.runs(record.job_name, 50)
        except StoreUnavailable as error:
            raise unavailable(error) from None
        last = next((run for run in runs if run.attempt > 0 or run.outcome == "interrupted"),
                    None)  # fmt: skip
        result: ScheduleDetail = view(record, ScheduleDetail)
        result.change = change
        result.runs = [_run_view(run) for run in runs]
        result.last_run = (
            LastRun(at=format_slot(last.started), outcome=last.outcome, status=last.status)
            if last
            else None
        )
        return result

    @app.put(
        "/api/schedules/{id}",
        dependencies=auth,
        responses={**SCHEDULE_ERRORS, 201: {"model": ScheduleDetail}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScheduleSpec.model_json_schema()}},
            }
        },
    )
    async def put_schedule(id: ScheduleId, request: Request) -> JSONResponse:
        """Create (201) or replace (200) a runtime schedule. The same body again changes
        nothing; a replacement keeps the history and never fires a slot already handled."""
        answer = await put_together((id, await json_body(request)))
        if isinstance(answer, HTTPException):
            raise answer
        return answer

    def store_schedules(pairs: list[tuple[str, Any]]) -> list[JSONResponse | HTTPException]:
        """Single PUTs that came together: each judged alone, stored in one transaction."""
        answers: list[JSONResponse | HTTPException] = []
        outcomes = runtime().put_each(pairs, ctx.clock.now())
        plan([outcome for outcome in outcomes if isinstance(outcome, tuple)])
        for outcome in outcomes:
            if not isinstance(outcome, tuple):
                answers.append(refusal(outcome, batch=False))
                continue
            record, change = outcome
            try:
                view = detail(record, change)
            except HTTPException as error:
                answers.append(error)
                continue
            status = 201 if change == "created" else 200
            answers.append(JSONResponse(view.model_dump(mode="json"), status_code=status))
        return answers

    put_together = Together(store_schedules)

    def refusal(
        error: ScheduleInvalid | LimitReached | StoreUnavailable, *, batch: bool
    ) -> HTTPException:
        if isinstance(error, StoreUnavailable):
            return unavailable(error)
        if isinstance(error, LimitReached):
            none = "nothing of the batch was stored; " if batch else ""
            return HTTPException(
                422, f"{error} (SCHEDULER_MAX_RUNTIME_SCHEDULES); {none}cancel some or raise it"
            )
        return HTTPException(422, str(error))

    def put_or_refuse(
        pairs: list[tuple[str, Any]], *, batch: bool
    ) -> list[tuple[ScheduleRecord, Change]]:
        """Store (all or none) and let the loop plan what changed, or the HTTP error."""
        try:
            stored = runtime().put_many(pairs, ctx.clock.now(), batch=batch)
        except (ScheduleInvalid, LimitReached, StoreUnavailable) as error:
            raise refusal(error, batch=batch) from None
        plan(stored)
        return stored

    def plan(stored: list[tuple[ScheduleRecord, Change]]) -> None:
        """Let the loop plan what changed, from the records just committed."""
        changed = {record.id: record for record, change in stored if change != "unchanged"}
        if changed:
            ctx.scheduler.schedules_changed(changed, records=changed)

    @app.post(
        BATCH_PATH,
        dependencies=auth,
        responses=SCHEDULE_ERRORS,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _batch_schema()}}}},
    )  # fmt: skip
    async def put_schedules(request: Request) -> BatchResult:
        """Create or replace up to 1,000 runtime schedules in one request, all or none:
        `{"schedules": [{"id": ..., <the PUT body>}, ...]}`. Every one is validated first; one
        invalid (422, naming its index and id), a repeated id or the limit refuses the whole
        batch and stores nothing. The batch is committed in one transaction (one Redis
        script) before the answer."""
        return await asyncio.to_thread(store_batch, await json_body(request))

    def store_batch(body: Any) -> BatchResult:
        items = body.get("schedules") if isinstance(body, dict) else None
        if not isinstance(items, list) or set(body) != {"schedules"}:
            raise HTTPException(422, 'expected {"schedules": [{"id": ..., "schedule": ..., '
                                '"endpoint": ...}, ...]}')  # fmt: skip
        if not 1 <= len(items) <= BATCH_LIMIT:
            raise HTTPException(422, f"schedules: {len(items)} given; send 1 to {BATCH_LIMIT}")
        pairs = []
        for index, item in enumerate(items):
            id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(id, str):
                raise HTTPException(422, f"schedules[{index}]: expected an object with an "
                                    '"id" (text) and the fields of a PUT body')  # fmt: skip
            pairs.append((id, {k: v for k, v in item.items() if k != "id"}))
        stored = put_or_refuse(pairs, batch=True)
        counts = Counter(change for _, change in stored)
        return BatchResult(
            schedules=[
                BatchItem(
                    id=record.id,
                    change=change,
                    revision=record.revision,
                    status=record.status,
                    first_slot=_iso(record.first),
                )
                for record, change in stored
            ],
            created=counts["created"],
            replaced=counts["replaced"],
            unchanged=counts["unchanged"],
        )

    @app.get("/api/schedules", dependencies=auth, responses=SCHEDULE_ERRORS)
    def list_schedules(
        status: Annotated[ScheduleStatus | None, Query(description="only this status")] = None,
        group: Annotated[str | None, Query(max_length=64, description="only this group")] = None,
        after: Annotated[str, Query(max_length=128, description="the page after this id")] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ScheduleList:
        """Runtime schedules ordered by id, a page at a time."""
        try:
            records = runtime().store.list_schedules(
                status=status, group=group, after=after, limit=limit + 1
            )
        except StoreUnavailable as error:
            raise unavailable(error) from None
        page = records[:limit]
        return ScheduleList(
            schedules=[view(record) for record in page],
            next_after=page[-1].id if len(records) > limit else None,
        )

    @app.get("/api/schedules/{id}", dependencies=auth, responses=SCHEDULE_ERRORS)
    def get_schedule(id: ScheduleId) -> ScheduleDetail:
        """One runtime schedule with its next run and its latest runs (newest first)."""
        try:
            record = runtime().store.get_schedule(id)
        except StoreUnavailable as error:
            raise unavailable(error) from None
        if record is None:
            raise HTTPException(404, f"no schedule with id {id!r}")
        return detail(record)

    def set_paused(id: str, paused: bool) -> ScheduleDetail:
        try:
            record = runtime().store.get_schedule(id)
            if record is None:
                raise HTTPException(404, f"no schedule with id {id!r}")
            if record.status != "active":
                raise HTTPException(409, f"schedule {id!r} has already ended: {record.status}")
            ctx.store.set_paused(record.job_name, paused)
        except StoreUnavailable as error:
            raise unavailable(error) from None
        return detail(record)

    ended = {**SCHEDULE_ERRORS, 409: {"model": ErrorBody, "description": "already ended"}}

    @app.post("/api/schedules/{id}/pause", dependencies=auth, responses=ended)
    def pause_schedule(id: ScheduleId) -> ScheduleDetail:
        """Let its slots pass until resumed (as a job's pause)."""
        return set_paused(id, True)

    @app.post("/api/schedules/{id}/resume", dependencies=auth, responses=ended)
    def resume_schedule(id: ScheduleId) -> ScheduleDetail:
        """Resume it; clears a pause its failure policy made, and the failure count."""
        return set_paused(id, False)

    @app.delete(
        "/api/schedules/{id}",
        dependencies=auth,
        responses={**SCHEDULE_ERRORS, 409: {"model": ErrorBody, "description": "already ended"}},
    )
    def cancel_schedule(id: ScheduleId) -> ScheduleDetail:
        """Cancel: no slot of it fires from now on (a call already sent completes).
        Cancelling a cancelled schedule again is fine; an executed or expired one is 409."""
        try:
            record = runtime().store.cancel_schedule(id, ctx.clock.now())
        except StoreUnavailable as error:
            raise unavailable(error) from None
        if record is None:
            raise HTTPException(404, f"no schedule with id {id!r}")
        if record.status in ("executed", "expired"):
            raise HTTPException(409, f"schedule {id!r} has already ended: {record.status}")
        ctx.scheduler.schedules_changed([id])
        return detail(record)


async def json_body(request: Request) -> Any:
    """The request's JSON body, or 422 saying why it is not one."""
    try:
        return await request.json()
    except ValueError:
        raise HTTPException(422, "the body must be JSON") from None
    except RecursionError:
        raise HTTPException(422, "the body is nested too deeply") from None


def _batch_schema() -> dict[str, Any]:
    """The batch body: {"schedules": [a PUT body with its "id", ...]}."""
    item = ScheduleSpec.model_json_schema()
    item = {**item, "properties": {"id": {"type": "string", "pattern": SCHEDULE_ID.pattern},
                                   **item["properties"]},
            "required": ["id", *item.get("required", [])]}  # fmt: skip
    return {"type": "object", "additionalProperties": False, "required": ["schedules"],
            "properties": {"schedules": {"type": "array", "minItems": 1,
                                         "maxItems": BATCH_LIMIT, "items": item}}}  # fmt: skip


# The status page: no inline script, nothing from elsewhere, never cached, never framed.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _asset(name: str) -> string.Template:
    """A file of the status page, shipped in the package (services/scheduler/static)."""
    text = importlib.resources.files(__package__).joinpath("static", name).read_text("utf-8")
    return string.Template(text)


def _run_view(record: RunRecord) -> RunView:
    return RunView(
        slot=format_slot(record.slot),
        key=record.key,
        attempt=record.attempt,
        started=format_slot(record.started),
        duration_seconds=record.duration,
        status=record.status,
        outcome=record.outcome,
        error=record.error,
        count=record.count,
        backfill=record.backfill,
    )


class Together(Generic[T, R]):
    """Requests that arrive while earlier ones are being handled wait, then are handled
    together in one call on a worker thread. Single PUTs that come together so share one
    transaction and one commit; before, each took the store's lock in turn with its own
    commit and its own thread, and eight clients were slower than one."""

    def __init__(self, handle: Callable[[list[T]], list[R]]) -> None:
        self._handle = handle
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    answers = await asyncio.to_thread(self._handle, [item for item, _ in group])
                except Exception as error:  # each waiter gets it: the handler's 500
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), answer in zip(group, answers, strict=True):
                    if not future.done():  # a client that went away cancelled its wait
                        future.set_result(answer)
        finally:
            self._draining = None


class YieldToFiring:
    """ASGI middleware: calls due now come first. A request is held (at most half a second)
    while the dispatcher is sending, instead of taking the GIL from it."""

    def __init__(self, app: Any, dispatcher: Any) -> None:
        self.app = app
        self.dispatcher = dispatcher

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        waited = 0.0
        while self.dispatcher.firing and waited < MAX_HOLD_SECONDS:
            await asyncio.sleep(0.002)
            waited += 0.002
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: every request body is read here, at most `limit` bytes, before any
    route sees it. A larger one is 413 when its Content-Length says so, or as soon as that
    many bytes of a chunked body have arrived; nothing beyond the limit is ever held."""

    def __init__(self, app: Any, limit: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.larger = larger or {}  # paths allowed a larger body (the batch endpoint)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope["path"], self.limit)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await self._refuse(scope, send, f"request body of {int(length)} bytes", limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(scope, send, f"request body of more than {limit} bytes", limit)
                return
            if not message.get("more_body", False):
                break
        whole: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Any:
            nonlocal whole
            if whole is None:
                return await receive()  # the disconnect, when it comes
            message, whole = whole, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, send: Any, what: str, limit: int) -> None:
        response = JSONResponse(
            {"error": f"{what}; at most {limit}"},
            status_code=413,
            headers={"Connection": "close"},  # the rest of the body is not read
        )
        await response(scope, self._nothing, send)

    @staticmethod
    async def _nothing() -> Any:
        return {"type": "http.disconnect"}


class AdminServer:
    """uvicorn, served on the daemon's event loop (the one the wire writes calls on)."""

    def __init__(
        self, app: FastAPI, bind: str, log: FilteringBoundLogger, loop: LoopThread
    ) -> None:
        host, _, port = bind.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._log = log
        self._loop = loop
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        )
        self._serving: concurrent.futures.Future[None] | None = None

    def start(self, timeout: float = 10.0) -> str:
        """Start serving; the URL it listens on. Raises OSError when it cannot listen."""
        # Bound here, so a port in use is this caller's OSError (uvicorn would exit).
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(2048)
        except OSError as error:
            sock.close()
            raise OSError(f"cannot listen: {error.strerror or error}") from None
        self._serving = asyncio.run_coroutine_threadsafe(
            self._server.serve(sockets=[sock]), self._loop.loop
        )
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._serving.done() or time.monotonic() > deadline:
                sock.close()
                raise OSError("cannot serve (see the log)")
            time.sleep(0.005)
        host, port = sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        if self._serving is not None:
            with contextlib.suppress(Exception):
                self._serving.result(5)
