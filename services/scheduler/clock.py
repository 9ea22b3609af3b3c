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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from structlog.typing import FilteringBoundLogger

from schedule_grammar import Once, ScheduleError

from .config import Job
from .coordination import Solo
from .slots import CallResult, Clock, format_slot, idempotency_key
from .stores.protocols import (
    RUNTIME_PREFIX,
    Coordinator,
    Outcome,
    Refusal,
    RunRecord,
    StateStore,
    StoreUnavailable,
    is_runtime,
    not_called,
)
from .telemetry import Metrics, Throttle

if TYPE_CHECKING:
    from .notify import Notifier
    from .schedules import RuntimeSchedules
    from .stores.protocols import ScheduleRecord, ScheduleStatus

CATCHUP_ALL_CAP = 100  # `catchup = "all"` replays at most this many missed slots
_COUNT_CAP = 100_000  # missed slots counted beyond this are reported as "at least"
# The loop hands slots to dispatch this far ahead; dispatch builds the request, the state is
# written, and the call goes out at the slot's instant (bench/README.md shows why).
DEFAULT_LEAD_SECONDS = 0.05
# Many slots due at one instant are handed on earlier: by what handing one on costs (planning,
# the state write, building its request; measured at each beat, this until then) times their
# number, with a margin, so the last request is ready before the instant. At most MAX_LEAD.
HAND_ON_SECONDS_PER_SLOT = 0.0002
LEAD_MARGIN = 1.5
MAX_LEAD_SECONDS = 2.0
# Runtime schedules: definitions kept in memory at most (the rest are read when due), and how
# often the leader purges ended ones past their retention.
JOB_CACHE_SIZE = 10_000
PURGE_EVERY_SECONDS = 60.0
_LOAD_BATCH = 500


# A sleep looks at the wall clock this often: a step of more than STEP_TOLERANCE (an NTP
# correction, an operator's `date -s`) ends it, so a slot the step brought nearer is not
# overslept by up to a tick. NTP's slewing (at most 0.5 ms/s) stays far below it.
STEP_CHECK_SECONDS = 1.0
STEP_TOLERANCE_SECONDS = 0.05


class SystemClock:
    """The real clock; `wait` is interruptible by `wake` (signals, reloads, admin actions)
    and ends early when the wall clock steps."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._event = threading.Event()
        self._wall = wall
        self._mono = monotonic

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._wall(), UTC)

    def monotonic(self) -> float:
        return self._mono()

    def wait(self, timeout: float) -> bool:
        end = self._mono() + max(0.0, timeout)
        offset = self._wall() - self._mono()
        woken = False
        while (left := end - self._mono()) > 0:
            if self._event.wait(min(left, STEP_CHECK_SECONDS)):
                woken = True
                break
            if abs(self._wall() - self._mono() - offset) > STEP_TOLERANCE_SECONDS:
                woken = True  # the wall clock stepped: plan again from the new time
                break
        self._event.clear()
        return woken

    def wake(self) -> None:
        self._event.set()


class Firer(Protocol):
    """Where due slots go (the dispatcher)."""

    def submit(self, job: Job, slots: Sequence[datetime], *, deadline: datetime | None) -> None:
        """Fire `slots` of `job` in order; `deadline` is the job's next planned slot."""


def due_by(heap: list[tuple[datetime, int, str]], when: datetime) -> int:
    """How many entries of `heap` fall at or before `when`, visiting only those."""
    count, stack = 0, [0] if heap and heap[0][0] <= when else []
    while stack:
        index = stack.pop()
        count += 1
        for child in (2 * index + 1, 2 * index + 2):
            if child < len(heap) and heap[child][0] <= when:
                stack.append(child)
    return count


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
    following = job.next_slot(first_due)
    while following is not None and following <= now and len(due) < _COUNT_CAP:
        due.append(following)
        following = job.next_slot(following)
    more = following is not None and following <= now
    while following is not None and following <= now:  # beyond the count cap: skip ahead
        following = job.next_slot(following)

    grace = timedelta(seconds=job.misfire_grace)
    latest = due[-1]
    if job.catchup == "all":  # the slots within the grace, oldest first, at most the cap
        recent = sum(1 for slot in due[-CATCHUP_ALL_CAP:] if now - slot <= grace)
        cut = len(due) - recent
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
        runtime: RuntimeSchedules | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._jobs = {job.name: job for job in jobs}
        self._runtime = runtime
        self._planned_runtime: dict[str, datetime] = {}  # runtime job name -> next slot
        self._cache: dict[str, Job] = {}  # runtime jobs read lately (at most JOB_CACHE_SIZE)
        self._changed: set[str] = set()  # schedule ids changed since the last beat
        self._stored: dict[str, ScheduleRecord] = {}  # ... with what this process stored
        self._ending: dict[str, int] = {}  # runtime job -> revision whose last call is out
        self._overdue: dict[str, datetime] = {}  # due while their store could not be read
        self._retry_plan = False  # planning the runtime schedules failed: again next beat
        self._next_purge = -float("inf")
        self._store_trouble = Throttle()
        self._coordinator = coordinator if coordinator is not None else Solo()
        self._term: int | None = None  # the leadership term this loop plans in, if any
        self._has_led = False
        self._firer = firer
        self._store = store
        self._clock = clock
        self._log = log
        self._tick = tick_seconds
        self._reload = reload
        self._base_lead = self._lead = timedelta(seconds=lead_seconds)
        self._per_slot = HAND_ON_SECONDS_PER_SLOT  # seconds to hand one slot on (measured)
        self._metrics = metrics if metrics is not None else Metrics()
        self._notifier = notifier  # missed slots are told (notify.py)
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

    def schedules_changed(
        self, ids: Iterable[str], records: Mapping[str, ScheduleRecord] | None = None
    ) -> None:
        """Runtime schedules were created, replaced or cancelled (here or on another
        replica): the loop plans them at its next beat. `records`: what this process has
        just committed for some of them, planned as they are (no read back); the others are
        read. No ids: changes may have been missed, so every schedule is planned afresh. A
        standby keeps nothing: a new term reads every schedule."""
        ids = list(ids)
        with self._lock:
            if self._term is None:
                return
            if ids:
                self._changed.update(ids)
                for id in ids:  # a change announced without its record must be read
                    if records is not None and id in records:
                        self._stored[id] = records[id]
                    else:
                        self._stored.pop(id, None)
            else:
                self._retry_plan = True
        self._clock.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def jobs(self) -> dict[str, Job]:
        with self._lock:
            return dict(self._jobs)

    def planned_schedule(self, name: str) -> datetime | None:
        """A runtime schedule's next planned slot, when this replica plans it."""
        with self._lock:
            return self._planned_runtime.get(name)

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
            try:
                upcoming = job.next_slot(max(now, last) if last else now)
            except ScheduleError:
                continue
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
        offset = self._clock.now().timestamp() - self._clock.monotonic()
        while not self._stopping.is_set():
            self.heartbeat = self._clock.monotonic()
            stepped = self._clock.now().timestamp() - self.heartbeat - offset
            if abs(stepped) >= 1.0:
                offset += stepped
                self._log.warning("wall clock stepped; planning from the new time",
                                  seconds=round(stepped, 3))  # fmt: skip
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
            self._planned_runtime, self._cache = {}, {}
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
            self._metrics.outcome(self._label(record.job), "interrupted")
            self._log.warning(
                "interrupted: the previous process stopped during this call; not called again",
                job=record.job,
                slot=format_slot(record.slot),
            )
        self._term = term
        for job in self._jobs.values():
            try:
                self._plan_first(job, now)
            except ScheduleError as error:
                self._unplannable(job, error)
        self._has_led = True
        self._plan_schedules(now)
        self._hand_on()

    def seconds_until_next(self, now: datetime) -> float:
        """How long the loop may sleep: until the earliest slot, at most a tick."""
        self._drop_stale()
        if self._overdue or self._retry_plan:
            return min(self._tick, 1.0)
        if not self._heap:
            return self._tick
        self._lead = self._lead_for(self._heap[0][0])
        return max(0.0, min(self._tick, (self._heap[0][0] - self._lead - now).total_seconds()))

    def _lead_for(self, earliest: datetime) -> timedelta:
        """The base lead, or more when more slots fall due with the earliest than it covers."""
        if not self._base_lead:
            return self._base_lead
        count = due_by(self._heap, earliest + self._base_lead)
        needed = min(MAX_LEAD_SECONDS, count * self._per_slot * LEAD_MARGIN)
        return max(self._base_lead, timedelta(seconds=needed))

    def fire_due(self, now: datetime) -> None:
        """Hand every slot due by `now` (plus the lead) to the firer; plan each job's next."""
        begun = self._clock.monotonic()
        self._apply_changes(now)
        due_runtime, self._overdue = self._overdue, {}
        while self._heap and self._heap[0][0] <= now + self._lead:
            slot, _, name = heapq.heappop(self._heap)
            if is_runtime(name):
                if self._planned_runtime.get(name) == slot:
                    due_runtime.setdefault(name, slot)
                continue
            job = self._jobs.get(name)
            if job is None or self._planned.get(name) != slot:
                continue  # removed or replanned by a reload
            try:
                self._handle(job, slot, now)
            except ScheduleError as error:
                self._unplannable(job, error)
            except Exception:
                # The slot was popped: plan the job's next one, or it would silently stop.
                self._log.exception(
                    "handling a slot failed; the job continues", job=name, slot=format_slot(slot)
                )
                if self._planned.get(name) == slot:
                    self._replan(job, max(slot, now))
        if due_runtime:
            self._fire_schedules(due_runtime, now)
        handed = self._hand_on()
        if handed >= 100:  # enough to measure what one costs
            self._per_slot = (self._clock.monotonic() - begun) / handed
        if self._runtime is not None and self._clock.monotonic() >= self._next_purge:
            self._next_purge = self._clock.monotonic() + PURGE_EVERY_SECONDS
            self._purge(now)

    # -- internals ------------------------------------------------------------------------

    def _replan(self, job: Job, after: datetime) -> None:
        try:
            self._plan(job, job.next_slot(after))
        except ScheduleError as error:
            self._unplannable(job, error)

    def _unplannable(self, job: Job, error: ScheduleError) -> None:
        """A schedule whose next fire cannot be computed: the job is not planned (until a
        reload or a new definition), loudly, and the other jobs go on."""
        with self._lock:
            self._planned.pop(job.name, None)
            self._planned_runtime.pop(job.name, None)
        self._metrics.planned(job.name, None)
        self._log.error("job not planned: its schedule cannot be evaluated; fix the "
                        "schedule and reload", job=job.name, error=str(error))  # fmt: skip

    def _plan_first(self, job: Job, now: datetime) -> None:
        if not job.enabled:
            return
        run_on_start = job.run_on_start and not self._has_led  # once per process, not per term
        if run_on_start:
            # A slot of its own, at the start instant, so its Idempotency-Key is unique.
            start_slot = now.replace(microsecond=now.microsecond // 1000 * 1000)
            self._log.info("run on start", job=job.name, slot=format_slot(start_slot))
            self._fire(job, [start_slot], job.next_slot(now))
        state = self._store.job_state(job.name)
        last = state.last_slot
        if last is None or run_on_start:
            self._plan(job, job.next_slot(now))
            return
        if state.uncertain:
            self._plan_uncertain(job, last, now)
            return
        # Continue after the last handled slot. A wall clock now behind it plans the slot
        # after it anyway: a slot already fired is never fired again.
        first_due = job.next_slot(last)
        if first_due is not None and first_due <= now:
            self._handle(job, first_due, now, restart=True)
        else:
            self._plan(job, first_due)

    def _plan_uncertain(self, job: Job, last: datetime, now: datetime) -> None:
        """The shared store lost its data and `last` is only what this replica knew: the
        previous leader may have fired later slots, so none is caught up (as at a first
        start); the slots since `last` are recorded as not fired here, with the reason."""
        first_due = job.next_slot(last)
        if first_due is not None and first_due <= now:
            decision = decide(job, first_due, now)
            self._record_missed(
                job, decision.missed + decision.fire, decision.missed_more, now,
                why=" by this replica: the shared state was lost (Redis reset); the previous "
                "leader may have fired them",
                event="not caught up: the shared state was lost",
            )  # fmt: skip
        self._plan(job, job.next_slot(max(now, last)))

    def _plan(self, job: Job, slot: datetime | None) -> None:
        if job.schedule_id is not None:
            self._plan_schedule(job.name, slot)
            return
        self._metrics.planned(job.name, slot)
        with self._lock:
            if slot is None:
                self._planned.pop(job.name, None)
                self._log.info("no more slots", job=job.name)
                return
            self._planned[job.name] = slot
        heapq.heappush(self._heap, (slot, next(self._counter), job.name))

    def _plan_schedule(self, name: str, slot: datetime | None) -> None:
        with self._lock:
            if slot is None:
                self._planned_runtime.pop(name, None)
                self._cache.pop(name, None)
                return
            self._planned_runtime[name] = slot
        heapq.heappush(self._heap, (slot, next(self._counter), name))

    def _handle(
        self, job: Job, first_due: datetime, now: datetime, *, restart: bool = False
    ) -> None:
        decision = decide(job, first_due, now, restart=restart)
        if self._store.job_state(job.name).paused:
            self._log.debug("paused; slot passes", job=job.name, slot=format_slot(first_due))
            self._store.advance(job.name, (decision.fire or decision.missed)[-1])
        else:
            if decision.missed:
                self._record_missed(job, decision.missed, decision.missed_more, now)
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
        if job.schedule_id is not None and decision.next_slot is None:
            if decision.fire:  # ends when its last call is over (call_finished)
                with self._lock:
                    self._ending[job.name] = job.revision
            else:
                self._finish(job, "expired", now)

    def _fire(self, job: Job, slots: list[datetime], next_slot: datetime | None) -> None:
        self._handoffs.append((job, slots, next_slot))

    def _hand_on(self) -> int:
        """Record every slot of this beat as started (one durable write), then submit them;
        how many were handed on."""
        handoffs, self._handoffs = self._unhanded(self._handoffs), []
        if not handoffs:
            return 0
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
        return sum(len(slots) for _, slots, _ in handoffs)

    def _unhanded(
        self, handoffs: list[tuple[Job, list[datetime], datetime | None]]
    ) -> list[tuple[Job, list[datetime], datetime | None]]:
        """The hand-offs without any slot at or before its job's last handled slot: whatever
        path planned it (a reload, a clock step, a new term), a slot is handed on once."""
        kept = []
        for job, slots, next_slot in handoffs:
            last = self._store.job_state(job.name).last_slot
            fresh = []
            for slot in slots:
                if last is not None and slot <= last:
                    self._log.error(
                        "not handed on again: the slot was already handled (at most once "
                        "per slot)", job=job.name, slot=format_slot(slot),
                        last_handled=format_slot(last),
                    )  # fmt: skip
                    continue
                fresh.append(slot)
                last = slot
            if fresh:
                kept.append((job, fresh, next_slot))
        return kept

    def _refused(self, job: Job, slot: datetime, reason: Refusal) -> None:
        """A slot the shared store would not let this replica call."""
        fields = {"job": job.name, "slot": format_slot(slot)}
        if job.schedule_id is not None:
            with self._lock:
                self._ending.pop(job.name, None)
        if reason == "inactive":
            self._log.info("not fired: the schedule was cancelled or has ended", **fields)
            return
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
            outcome = "missed"
            problem = self._store.problem() or "the state store cannot be reached"
            error = (f"not fired: its start could not be recorded ({problem}); a slot is "
                     "called only once its start is stored")  # fmt: skip
            self._log.error("not fired: the slot's start could not be recorded", **fields,
                            error=problem)  # fmt: skip
        self._metrics.outcome(job.label, outcome)
        self._store.record_run(not_called(job.name, slot, key, outcome, error, self._clock.now()))

    def _record_missed(
        self,
        job: Job,
        missed: list[datetime],
        more: bool,
        now: datetime,
        *,
        why: str = "",
        event: str = "missed slots",
    ) -> None:
        """One `missed` record (and log line) for slots not fired; the job moves past them.
        `more`: there were more than were counted. `why`: after "not fired", the reason
        (by default the catch-up policy)."""
        count = len(missed)
        why = why or f" (catchup={job.catchup}, misfire_grace={job.misfire_grace:g}s)"
        self._metrics.outcome(job.label, "missed", count)
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
                    f"{'at least ' if more else ''}{count} slot(s) from "
                    f"{format_slot(missed[0])} to {format_slot(missed[-1])} not fired{why}"
                ),
            )
        )
        self._log.warning(
            event,
            job=job.name,
            slot=format_slot(missed[-1]),
            count=count,
            at_least=more,
            first=format_slot(missed[0]),
            catchup=job.catchup,
        )
        if self._notifier is not None:
            from .notify import missed as missed_event

            self._notifier.notify(missed_event(job.name, missed[0], missed[-1], count, why, now))

    def _drop_stale(self) -> None:
        while self._heap:
            slot, _, name = self._heap[0]
            if is_runtime(name):
                if self._planned_runtime.get(name) == slot:
                    return
            elif name in self._jobs and self._planned.get(name) == slot:
                return
            heapq.heappop(self._heap)

    def _label(self, name: str) -> str:
        job = self._jobs.get(name) or self._cache.get(name)
        if job is not None:
            return job.label
        return "schedules" if is_runtime(name) else name

    # -- runtime schedules ----------------------------------------------------------------

    def _plan_schedules(self, now: datetime) -> None:
        """Plan every active runtime schedule (a new term). Most need no definition: a
        schedule that has not reached its first slot is planned at it; the others (due,
        fired before, ended) are read in batches."""
        if self._runtime is None:
            return
        with self._lock:
            self._changed.clear()  # everything is read now; later changes come after
            self._stored.clear()
            self._planned_runtime.clear()  # (their heap entries are stale now)
            self._cache.clear()
        try:
            entries = list(self._runtime.store.active_plan())
            read: list[str] = []
            for id, _anchor, first in entries:
                name = RUNTIME_PREFIX + id
                last = self._store.job_state(name).last_slot
                if first is not None and first > now and (last is None or last < first):
                    self._plan_schedule(name, first)
                else:
                    read.append(name)
            for start in range(0, len(read), _LOAD_BATCH):
                jobs = self._schedule_jobs(read[start : start + _LOAD_BATCH])
                for job in jobs.values():
                    try:
                        self._plan_runtime(job, now, restart=True)
                    except ScheduleError as error:
                        self._unplannable(job, error)
        except StoreUnavailable as error:
            if self._store_trouble.ready():
                self._log.error("runtime schedules not planned: store unavailable; retrying",
                                error=str(error))  # fmt: skip
            self._retry_plan = True
            return
        self._retry_plan = False
        if entries:
            self._log.info("runtime schedules planned", active=len(entries), read=len(read))

    def _plan_runtime(self, job: Job, now: datetime, *, restart: bool) -> None:
        """Plan a runtime schedule after its last handled slot or the moment it was armed,
        whichever is later; one with no slot left ends."""
        state = self._store.job_state(job.name)
        start = job.anchor
        if start is None or (state.last_slot is not None and state.last_slot > start):
            start = state.last_slot
        first_due = job.next_slot(start) if start is not None else job.next_slot(now)
        if first_due is None:
            self._plan_schedule(job.name, None)
            self._finish(job, ended_as(job, called=state.last_run is not None), now)
        elif first_due <= now:
            self._remember(job)
            self._handle(job, first_due, now, restart=restart)
        else:
            self._remember(job)
            self._plan_schedule(job.name, first_due)

    def _apply_changes(self, now: datetime) -> None:
        if self._runtime is None:
            return
        if self._retry_plan:
            self._plan_schedules(now)
        with self._lock:
            if not self._changed:
                return
            ids, self._changed = self._changed, set()
            given, self._stored = self._stored, {}
            records = {
                id: record
                for id, record in given.items()
                if (cached := self._cache.get(RUNTIME_PREFIX + id)) is None
                or cached.revision < record.revision  # not older than what is planned
            }
        try:
            if missing := ids - records.keys():
                records |= self._runtime.store.get_schedules(missing)
        except StoreUnavailable as error:
            with self._lock:
                self._changed |= ids
                self._stored = records | self._stored
            if self._store_trouble.ready():
                self._log.error("schedule changes not read; retrying", error=str(error))
            return
        for id in sorted(ids):
            name = RUNTIME_PREFIX + id
            record = records.get(id)
            with self._lock:
                cached = self._cache.get(name)
                ending = self._ending.get(name)
                if record is None or record.status != "active":
                    self._planned_runtime.pop(name, None)  # its heap entry is now stale
                    self._cache.pop(name, None)
                    continue
                if record.revision == ending or (
                    cached is not None
                    and cached.revision == record.revision
                    and name in self._planned_runtime
                ):
                    continue  # already planned as it is (a change this replica made)
            try:
                job = self._runtime.job(record)
                self._plan_runtime(job, now, restart=False)
            except Exception:
                self._log.exception("planning a runtime schedule failed", job=name)

    def _schedule_jobs(self, names: list[str]) -> dict[str, Job]:
        """The jobs of active runtime schedules, from memory or read in one batch."""
        assert self._runtime is not None
        found = {name: self._cache[name] for name in names if name in self._cache}
        missing = [name.removeprefix(RUNTIME_PREFIX) for name in names if name not in found]
        if missing:
            for job in self._runtime.jobs(missing).values():
                found[job.name] = job
                self._remember(job)
        return found

    def _remember(self, job: Job) -> None:
        with self._lock:
            self._cache[job.name] = job
            while len(self._cache) > JOB_CACHE_SIZE:
                del self._cache[next(iter(self._cache))]

    def _fire_schedules(self, due: dict[str, datetime], now: datetime) -> None:
        try:
            jobs = self._schedule_jobs(list(due))
        except StoreUnavailable as error:
            self._log.error("runtime schedules due but not readable; retrying",
                            error=str(error), due=len(due))  # fmt: skip
            self._overdue = due  # again at the next beat
            return
        for name, slot in due.items():
            job = jobs.get(name)
            if job is None:  # cancelled or ended since it was planned
                self._plan_schedule(name, None)
                continue
            try:
                self._handle(job, slot, now)
            except ScheduleError as error:
                self._unplannable(job, error)
            except Exception:
                self._log.exception(
                    "handling a slot failed; the schedule continues", job=name,
                    slot=format_slot(slot),
                )  # fmt: skip
                if self._planned_runtime.get(name) == slot:
                    self._replan(job, max(slot, now))

    def call_finished(self, job: Job, result: CallResult | None, deadline: datetime | None) -> None:
        """A batch of calls is over (from the dispatcher's threads): a runtime schedule
        whose last slot it was ends (see `ended_as`)."""
        if job.schedule_id is None or deadline is not None:
            return
        with self._lock:
            self._ending.pop(job.name, None)
        called = result is not None and result.outcome not in ("missed", "skipped_overlap")
        self._finish(job, ended_as(job, called=called), self._clock.now())

    def _finish(self, job: Job, status: ScheduleStatus, now: datetime) -> None:
        assert self._runtime is not None
        try:
            ended = self._runtime.finish(job, status, now)
        except StoreUnavailable as error:
            self._log.error("schedule end not recorded; it is settled when next planned",
                            job=job.name, status=status, error=str(error))  # fmt: skip
            return
        if ended:
            self._log.info(f"schedule {status}", job=job.name, revision=job.revision)

    def _purge(self, now: datetime) -> None:
        assert self._runtime is not None
        try:
            purged = self._runtime.purge(now)
        except StoreUnavailable:
            return
        if purged:
            self._log.info("ended runtime schedules purged", count=len(purged),
                           retention_seconds=self._runtime.retention.total_seconds())  # fmt: skip
            self._next_purge = -float("inf")  # there may be more: again at the next beat

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
                # From the last handled slot, never from `now` alone: the slot handed on a
                # lead ahead (or before a backward clock step) is not planned again.
                last = self._store.job_state(name).last_slot
                self._replan(job, max(now, last) if last else now)
        self._log.info(
            "job table reloaded", added=added, removed=removed, changed=changed, jobs=len(new)
        )


def ended_as(job: Job, *, called: bool) -> ScheduleStatus:
    """How a runtime schedule with no slot left ends: a one-time schedule whose slot was
    called is `executed`; one missed, and a recurring one past its expires_at, `expired`."""
    return "executed" if called and isinstance(job.schedule, Once) else "expired"
