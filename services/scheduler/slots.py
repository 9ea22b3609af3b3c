"""What the loop, the dispatcher and the admin API share (no imports of theirs, so no circle):
a slot's names, the outcome of a call, and time."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .stores.protocols import Outcome


def idempotency_key(job: str, slot: datetime) -> str:
    """`<job>@<slot epoch ms>`: the same on every retry, after a restart and on every replica."""
    return f"{job}@{round(slot.timestamp() * 1000)}"


def manual_key(job: str) -> str:
    """`<job>@manual-<uuid4>`: a manual trigger is its own slot."""
    return f"{job}@manual-{uuid.uuid4()}"


@functools.lru_cache(maxsize=1024)  # the jobs due at one instant share one slot
def format_slot(instant: datetime) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-22T03:00:00.000Z (the X-Scheduled-For form)."""
    utc = instant.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallResult:
    """The final outcome of one slot (after retries)."""

    job: str
    slot: datetime
    key: str
    outcome: Outcome
    attempts: int
    status: int | None
    error: str | None
    duration: float


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
