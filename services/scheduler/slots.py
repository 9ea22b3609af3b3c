"""A slot's names, shared by the loop, the dispatcher and the admin API (no imports of theirs)."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime


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
