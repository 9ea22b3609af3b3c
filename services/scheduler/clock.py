"""The loop: plans each job's next slot, sleeps until the earliest, hands due slots on.

The loop reads the clock once per beat and passes `now` down (as arq does). It never polls to
decide firing: it sleeps exactly until the earliest planned slot, and at most a tick (the
heartbeat) so housekeeping and health stay fresh.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from .config import Job
from .coordination import Coordinator, Solo
from .state import Outcome, Refusal, RunRecord, StateStore, not_called
from .telemetry import Metrics

CATCHUP_ALL_CAP = 100  # `catchup = "all"` replays at most this many missed slots
_COUNT_CAP = 100_000  # missed slots counted beyond this are reported as "at least"
# The loop hands slots to dispatch this far ahead; dispatch builds the request, the state is
# written, and the call goes out at the slot's instant (bench/README.md shows why).
DEFAULT_LEAD_SECONDS = 0.05


class Clock(Protocol):
    """Time, injected: the loop is tested in virtual time without real sleeps."""

    def now(self) -> datetime:
        """The wall-clock time, aware UTC."""
        ...

    def monotonic(self) -> float: ...

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True when woken early by `wake()`."""
        ...

    def wake(self) -> None: ...


class SystemClock:
    """The real clock; `wait` is interruptible by `wake` (signals, reloads, admin actions)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(max(0.0, timeout))
        self._event.clear()
        return woken

    def wake(self) -> None:
        self._event.set()


class Firer(Protocol):
    """Where due slots go (the dispatcher)."""

    def submit(self, job: Job, slots: Sequence[datetime], *, deadline: datetime | None) -> None:
        """Fire `slots` of `job` in order; `deadline` is the job's next planned slot."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the slots of one job that are due at `now`."""

    fire: list[datetime]
    missed: list[datetime]
    missed_more: bool  # more missed slots than were counted
    next_slot: datetime | None


def decide(job: Job, first_due: datetime, now: datetime, *, restart: bool = False) -> Decision:
    """Apply the catch-up policy to every slot of `job` from `first_due` up to `now`.

    `restart`: the slots fell due while no process was running, so even a single one is a
    missed slot (`catchup = "none"` never fires it).
    """
    due = [first_due]
    following = job.schedule.next_after(first_due)
    while following is not None and following <= now and len(due) < _COUNT_CAP:
        due.append(following)
        following = job.schedule.next_after(following)
    more = following is not None and following <= now
    while following is not None and following <= now:  # beyond the count cap: skip ahead
        following = job.schedule.next_after(following)

    grace = timedelta(seconds=job.misfire_grace)
    latest = due[-1]
    if job.catchup == "all":
        cut = max(0, len(due) - CATCHUP_ALL_CAP)
        return Decision(due[cut:], due[:cut], more, following)
    if len(due) == 1 and now - latest <= grace and not (restart and job.catchup == "none"):
        return Decision([latest], [], False, following)  # the ordinary case: on time
    if job.catchup == "latest" and now - latest <= grace:
        return Decision([latest], due[:-1], more, following)
    return Decision([], due, more, following)


class Scheduler:
    """Plans slots and hands due ones to the firer. One thread runs `run()`."""

    def __init__(
        self,
        *,
        jobs: Iterable[Job],
        firer: Firer,
        store: StateStore,
        clock: Clock,
        log: FilteringBoundLogger,
        tick_seconds: float,
        reload: Callable[[], tuple[Job, ...]] | None = None,
        lead_seconds: float = 0.0,
        metrics: Metrics | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        self._jobs = {job.name: job for job in jobs}
        self._coordinator = coordinator if coordinator is not None else Solo()
        self._term: int | None = None  # the leadership term this loop plans in, if any
        self._has_led = False
        self._firer = firer
        self._store = store
        self._clock = clock
        self._log = log
        self._tick = tick_seconds
        self._reload = reload
        self._lead = timedelta(seconds=lead_seconds)
        self._metrics = metrics if metrics is not None else Metrics()
        self._heap: list[tuple[datetime, int, str]] = []
        self._planned: dict[str, datetime] = {}
        self._counter = itertools.count()
        self._handoffs: list[tuple[Job, list[datetime], datetime | None]] = []
        self._stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._lock = threading.Lock()  # guards _jobs/_planned for readers in other threads
        self.heartbeat = clock.monotonic()

    # -- control from other threads -------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._clock.wake()

    def request_reload(self) -> None:
        self._reload_requested.set()
        self._clock.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def jobs(self) -> dict[str, Job]:
        with self._lock:
            return dict(self._jobs)

    def planned(self) -> dict[str, datetime]:
        """Each enabled job's next planned slot. A standby plans nothing; it shows when each
        job's next slot falls, as the leader would plan it."""
        with self._lock:
            if self._term is not None:
                return dict(self._planned)
            jobs = list(self._jobs.values())
        now = self._clock.now()
        projected = {}
        for job in jobs:
            if not job.enabled:
                continue
            last = self._store.job_state(job.name).last_slot
            upcoming = job.schedule.next_after(max(now, last) if last else now)
            if upcoming is not None:
                projected[job.name] = upcoming
        return projected

    @property
    def leading(self) -> bool:
        return self._term is not None

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        self._coordinator.start(self._clock.wake)
        self._metrics.is_leader.set(0)
        while not self._stopping.is_set():
            self.heartbeat = self._clock.monotonic()
            try:
                self._follow_leadership()
            except Exception:  # the caller sees the loop end unasked and exits non-zero
                self._log.exception("planning the job table failed")
                return
            try:
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self._do_reload()
                pause = self._tick
                if self._term is not None:
                    self.fire_due(self._clock.now())
                    pause = self.seconds_until_next(self._clock.now())
            except Exception:  # a bug must not stop every job: log it and keep the beat
                self._log.exception("clock loop error; planning continues")
                pause = min(self._tick, 1.0)
            self._clock.wait(pause)
        self._log.info("scheduler stopped planning")

    def _follow_leadership(self) -> None:
        """Plan while this replica leads; stop planning the moment it does not. A new term
        (even this replica's own, after a lapse) plans afresh from the shared state."""
        term = self._coordinator.term()
        if term == self._term:
            return
        if self._term is not None:
            self._step_down()
        if term is not None:
            self._store.refresh()
            self.start(self._clock.now(), term=term)
            self._metrics.is_leader.set(1)
            upcoming = min(self._planned.values(), default=None)
            self._log.info(
                "scheduler ready",
                planned=len(self._planned),
                next_slot=format_slot(upcoming) if upcoming else None,
                **({} if isinstance(self._coordinator, Solo) else {"epoch": term}),
            )

    def _forget_plans(self) -> None:
        with self._lock:
            names, self._planned = list(self._planned), {}
        self._heap.clear()
        self._handoffs.clear()
        for name in names:
            self._metrics.planned(name, None)

    def _step_down(self) -> None:
        self._forget_plans()
        self._term = None
        self._metrics.is_leader.set(0)
        status = self._coordinator.status()
        self._log.warning(
            "standby: not the leader any more; planning stopped",
            leader=status.leader,
            error=status.problem,
        )

    def start(self, now: datetime, term: int = 0) -> None:
        """Plan every enabled job, leading in `term`: after its last handled slot when the
        store remembers one (catching up under its policy), else from `now` (first start:
        nothing fires at once)."""
        self._forget_plans()
        for record in self._store.recover_interrupted(now):
            self._metrics.outcome(record.job, "interrupted")
            self._log.warning(
                "interrupted: the previous process stopped during this call; not called again",
                job=record.job,
                slot=format_slot(record.slot),
            )
        self._term = term
        for job in self._jobs.values():
            self._plan_first(job, now)
        self._has_led = True
        self._hand_on()

    def seconds_until_next(self, now: datetime) -> float:
        """How long the loop may sleep: until the earliest slot, at most a tick."""
        self._drop_stale()
        if not self._heap:
            return self._tick
        return max(0.0, min(self._tick, (self._heap[0][0] - self._lead - now).total_seconds()))

    def fire_due(self, now: datetime) -> None:
        """Hand every slot due by `now` (plus the lead) to the firer; plan each job's next."""
        while self._heap and self._heap[0][0] <= now + self._lead:
            slot, _, name = heapq.heappop(self._heap)
            job = self._jobs.get(name)
            if job is None or self._planned.get(name) != slot:
                continue  # removed or replanned by a reload
            try:
                self._handle(job, slot, now)
            except Exception:
                # The slot was popped: plan the job's next one, or it would silently stop.
                self._log.exception(
                    "handling a slot failed; the job continues", job=name, slot=format_slot(slot)
                )
                if self._planned.get(name) == slot:
                    self._plan(job, job.schedule.next_after(max(slot, now)))
        self._hand_on()

    # -- internals ------------------------------------------------------------------------

    def _plan_first(self, job: Job, now: datetime) -> None:
        if not job.enabled:
            return
        run_on_start = job.run_on_start and not self._has_led  # once per process, not per term
        if run_on_start:
            # A slot of its own, at the start instant, so its Idempotency-Key is unique.
            start_slot = now.replace(microsecond=now.microsecond // 1000 * 1000)
            self._log.info("run on start", job=job.name, slot=format_slot(start_slot))
            self._fire(job, [start_slot], job.schedule.next_after(now))
        last = self._store.job_state(job.name).last_slot
        if last is None or run_on_start:
            self._plan(job, job.schedule.next_after(now))
            return
        # Continue after the last handled slot. A wall clock now behind it plans the slot
        # after it anyway: a slot already fired is never fired again.
        first_due = job.schedule.next_after(last)
        if first_due is not None and first_due <= now:
            self._handle(job, first_due, now, restart=True)
        else:
            self._plan(job, first_due)

    def _plan(self, job: Job, slot: datetime | None) -> None:
        self._metrics.planned(job.name, slot)
        with self._lock:
            if slot is None:
                self._planned.pop(job.name, None)
                self._log.info("no more slots", job=job.name)
                return
            self._planned[job.name] = slot
        heapq.heappush(self._heap, (slot, next(self._counter), job.name))

    def _handle(
        self, job: Job, first_due: datetime, now: datetime, *, restart: bool = False
    ) -> None:
        decision = decide(job, first_due, now, restart=restart)
        if self._store.job_state(job.name).paused:
            self._log.debug("paused; slot passes", job=job.name, slot=format_slot(first_due))
            self._store.advance(job.name, (decision.fire or decision.missed)[-1])
        else:
            if decision.missed:
                self._record_missed(job, decision, now)
            if restart or decision.missed:
                for slot in decision.fire:
                    self._log.warning(
                        "catch-up fire",
                        job=job.name,
                        slot=format_slot(slot),
                        late_seconds=round((now - slot).total_seconds(), 3),
                        catchup=job.catchup,
                    )
            if decision.fire:
                self._fire(job, decision.fire, decision.next_slot)
        self._plan(job, decision.next_slot)

    def _fire(self, job: Job, slots: list[datetime], next_slot: datetime | None) -> None:
        self._handoffs.append((job, slots, next_slot))

    def _hand_on(self) -> None:
        """Record every slot of this beat as started (one durable write), then submit them."""
        handoffs, self._handoffs = self._handoffs, []
        if not handoffs:
            return
        refused = self._store.mark_started(
            (job.name, slot, idempotency_key(job.name, slot))
            for job, slots, _ in handoffs
            for slot in slots
        )
        for job, slots, next_slot in handoffs:
            if refused:
                for slot in slots:
                    if (reason := refused.get(idempotency_key(job.name, slot))) is not None:
                        self._refused(job, slot, reason)
                slots = [s for s in slots if idempotency_key(job.name, s) not in refused]
                if not slots:
                    continue
            try:
                self._firer.submit(job, slots, deadline=next_slot)
            except Exception:  # one job's trouble must not cost the others their slots
                self._log.exception(
                    "handing a slot on failed", job=job.name, slot=format_slot(slots[-1])
                )
        if "not_leader" in refused.values():
            self._coordinator.step_down()
            self._step_down()

    def _refused(self, job: Job, slot: datetime, reason: Refusal) -> None:
        """A slot the shared store would not let this replica call."""
        fields = {"job": job.name, "slot": format_slot(slot)}
        if reason == "paused":
            self._log.debug("paused; slot passes", **fields)
            return
        if reason == "not_leader":
            self._log.warning("not fired: another replica holds the lease", **fields)
            return
        key = idempotency_key(job.name, slot)
        outcome: Outcome
        if reason == "taken":
            outcome, error = "skipped_claimed", "claimed by another replica, which fired it"
            self._log.warning("skipped: slot claimed by another replica", **fields)
        else:
            outcome, error = "missed", "not fired: the slot could not be claimed (store away)"
            self._log.error("not fired: the slot could not be claimed", **fields)
        self._metrics.outcome(job.name, outcome)
        self._store.record_run(not_called(job.name, slot, key, outcome, error, self._clock.now()))

    def _record_missed(self, job: Job, decision: Decision, now: datetime) -> None:
        missed = decision.missed
        count = len(missed)
        self._metrics.outcome(job.name, "missed", count)
        self._store.advance(job.name, missed[-1])
        self._store.record_run(
            RunRecord(
                job=job.name,
                slot=missed[-1],
                key=f"{job.name}@missed",
                attempt=0,
                started=now,
                outcome="missed",
                count=count,
                error=(
                    f"{'at least ' if decision.missed_more else ''}{count} slot(s) from "
                    f"{format_slot(missed[0])} to {format_slot(missed[-1])} not fired "
                    f"(catchup={job.catchup}, misfire_grace={job.misfire_grace:g}s)"
                ),
            )
        )
        self._log.warning(
            "missed slots",
            job=job.name,
            slot=format_slot(missed[-1]),
            count=count,
            at_least=decision.missed_more,
            first=format_slot(missed[0]),
            catchup=job.catchup,
        )

    def _drop_stale(self) -> None:
        while self._heap:
            slot, _, name = self._heap[0]
            if name in self._jobs and self._planned.get(name) == slot:
                return
            heapq.heappop(self._heap)

    def _do_reload(self) -> None:
        if self._reload is None:
            return
        try:
            jobs = self._reload()
        except ValueError as error:
            self._log.error("reload rejected; keeping the current job table", error=str(error))
            return
        now = self._clock.now()
        new = {job.name: job for job in jobs}
        with self._lock:
            old, self._jobs = self._jobs, new
            for name in set(self._planned) - set(new):
                del self._planned[name]
                self._metrics.planned(name, None)
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(name for name in set(new) & set(old) if new[name] != old[name])
        for name in added + changed:
            with self._lock:
                self._planned.pop(name, None)
            job = new[name]
            if job.enabled and self._term is not None:  # a standby plans when it leads
                self._plan(job, job.schedule.next_after(now))
        self._log.info(
            "job table reloaded", added=added, removed=removed, changed=changed, jobs=len(new)
        )


def idempotency_key(job: str, slot: datetime) -> str:
    """`<job>@<slot epoch ms>`: the same on every retry, after a restart and on every replica."""
    return f"{job}@{round(slot.timestamp() * 1000)}"


def format_slot(instant: datetime) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-22T03:00:00.000Z (the X-Scheduled-For form)."""
    utc = instant.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
