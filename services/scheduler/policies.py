"""Failure policies: what the daemon does on its own when a job keeps failing.

- `pause_after_failures = N`: after N slots in a row whose final outcome (after retries) is
  `failed`, the job pauses itself, with the reason recorded where the pause is (the state
  store), so every replica and every restart sees it; `resume` clears it. The count goes on
  (so the success that ends the run is told as a recovery after all its failures): a resumed
  job that keeps failing pauses again after N more, at 2N, 3N, ...
- `on_gone = "disable"` (the default): a 410 Gone from the application pauses the job at
  once, as Standard Webhooks asks of senders ("the endpoint is gone, stop calling it").
- `max_silence`: a job without a success for that long is *stale*: /healthz lists it, a
  gauge shows it. The daemon itself is fine, so health stays 200.

The count lives in the job's state (`JobState.failures`, kept by `apply_outcome` from the run
records that settle a slot), not here: it survives restarts and failover. `busy`, skipped and
missed slots neither count nor reset it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from structlog.typing import FilteringBoundLogger

from . import notify
from .config import Job, format_seconds
from .slots import CallResult, format_slot
from .stores.protocols import JobState, StateStore, StoreUnavailable
from .telemetry import Metrics

GONE = 410


GONE_REASON = 'disabled: the application answered 410 Gone (on_gone = "disable")'


def failures_reason(count: int) -> str:
    return f"auto-paused after {count} consecutive failures"


class FailurePolicy:
    """Applies a job's failure policies after each slot's final outcome (the dispatcher
    calls `settled` on the thread that recorded it; the count was updated there), and tells
    the notifier when a job starts failing, recovers or is paused."""

    def __init__(
        self,
        store: StateStore,
        *,
        log: FilteringBoundLogger,
        metrics: Metrics,
        notifier: notify.Notifier | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._log = log
        self._metrics = metrics
        self._notifier = notifier
        self._now = now

    def settled(self, job: Job, result: CallResult, failures_before: int) -> None:
        """`failures_before`: the job's consecutive failures before this slot."""
        if self._notifier is not None:
            self._tell(job, result, failures_before)
        if result.outcome != "failed":
            return
        state = self._store.job_state(job.name)
        if state.paused:
            return  # paused meanwhile (by an operator, or by the slot before)
        if result.status == GONE and job.on_gone == "disable":
            self._pause(job, result, GONE_REASON, "gone", state)
        elif (n := job.pause_after_failures) and state.failures and state.failures % n == 0:
            self._pause(job, result, failures_reason(state.failures), "failures", state)

    def _pause(self, job: Job, result: CallResult, reason: str, kind: str, state: JobState) -> None:
        fields = {"job": job.name, "slot": format_slot(result.slot), "reason": reason,
                  "consecutive_failures": state.failures}  # fmt: skip
        try:
            self._store.set_paused(job.name, True, reason)
        except StoreUnavailable as error:
            # Not paused: the next failure tries again (the count stays in the job's state).
            self._log.error("not paused: the state store cannot be reached", **fields,
                            error=str(error))  # fmt: skip
            return
        self._metrics.auto_paused(job.label, kind)
        self._log.warning(
            "job disabled" if kind == "gone" else "job auto-paused", **fields,
            resume=f"cronclock resume {job.name}",
        )  # fmt: skip
        if self._notifier is not None:
            self._notifier.notify(notify.auto_paused(job.name, reason, state.failures,
                                                     self._at(result)))  # fmt: skip

    def _tell(self, job: Job, result: CallResult, before: int) -> None:
        assert self._notifier is not None
        if result.outcome == "failed" and before == 0:
            self._notifier.notify(notify.failing(job.name, result.slot, result.status,
                                                 result.error, self._at(result)))  # fmt: skip
        elif result.outcome == "success" and before > 0:
            self._notifier.notify(notify.recovered(job.name, result.slot, before,
                                                   self._at(result)))  # fmt: skip

    def _at(self, result: CallResult) -> datetime:
        return self._now() if self._now is not None else result.slot


def paused_by(state: JobState) -> str | None:
    """Who paused the job (the `by` label of cronclock_job_paused): operator, failures (its
    pause_after_failures), gone (a 410); None when it is not paused."""
    if not state.paused:
        return None
    if state.pause_reason is None:
        return "operator"
    return "gone" if state.pause_reason == GONE_REASON else "failures"


@dataclass(frozen=True, slots=True, kw_only=True)
class Silence:
    """A job's dead-man check at one instant."""

    stale: bool
    silent_seconds: float | None  # since its last success (or since `since`, if none)


def silence(job: Job, state: JobState, now: datetime, since: datetime) -> Silence:
    """Whether `job` is stale at `now`: enabled, max_silence set, not paused by an operator,
    and no success for longer than max_silence (a job that never succeeded counts from
    `since`, when this process started)."""
    if job.max_silence is None or not job.enabled:
        return Silence(stale=False, silent_seconds=None)
    last = state.last_success or since
    silent = max(0.0, (now - last).total_seconds())
    operator_paused = state.paused and state.pause_reason is None
    stale = not operator_paused and silent > job.max_silence
    return Silence(stale=stale, silent_seconds=silent)


def stale_text(job: Job, quiet: Silence) -> str:
    assert job.max_silence is not None and quiet.silent_seconds is not None
    return (
        f"no success for {_roughly(quiet.silent_seconds)} "
        f"(max_silence {format_seconds(job.max_silence)})"
    )


def _roughly(seconds: float) -> str:
    """7260.4 -> '2h1m', 61 -> '1m1s': a span for people, to the second."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"
