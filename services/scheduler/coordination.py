"""Leadership: which replica plans and fires (DESIGN.md section 6).

`Solo` is one process that always leads (SQLite or memory state). With a redis:// state URL,
replicas contend for a lease in Redis (`stores/redis.py`). The holder plans; it claims every
slot in the same atomic step that checks it still holds the lease and records the slot started,
so no slot is fired twice even when two replicas both believe they lead. Calls carry the lease's
epoch as X-Scheduler-Fencing-Token. `open_state` picks the back-end SCHEDULER_STATE_URL names and
imports a back-end's client library only when it is used.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol

from structlog.typing import FilteringBoundLogger

from .config import Settings
from .schedules import MemorySchedules, ScheduleStore, SqliteSchedules
from .state import SqliteStateStore, StateStore, open_store

Role = Literal["solo", "leader", "standby"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Leadership:
    """Who leads, as this replica sees it."""

    role: Role
    identity: str  # this replica
    leader: str | None  # the leader's identity (this replica's when it leads), None if unknown
    epoch: int | None  # the leader's fencing epoch
    problem: str | None  # why coordination is unhealthy (Redis unreachable), None when fine


class Coordinator(Protocol):
    def term(self) -> int | None:
        """The epoch this replica leads in now, None when it may not plan or fire."""
        ...

    def leading(self) -> bool:
        """May this replica send a call now? False before its lease could expire."""
        ...

    def fencing_token(self) -> int | None:
        """X-Scheduler-Fencing-Token for calls (None: not coordinated, header not sent)."""
        ...

    def step_down(self) -> None:
        """The store refused a claim because another replica holds the lease."""

    def status(self) -> Leadership: ...

    def start(self, on_change: Callable[[], None]) -> None:
        """Begin (contending for the lease); `on_change` is called when leadership changes."""

    def stop(self) -> None:
        """Stop, releasing the lease if held."""


def replica_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Solo:
    """One process, no coordination: always the leader (SQLite or memory state)."""

    def __init__(self, identity: str | None = None) -> None:
        self.identity = identity or replica_identity()

    def term(self) -> int | None:
        return 0

    def leading(self) -> bool:
        return True

    def fencing_token(self) -> int | None:
        return None

    def step_down(self) -> None:
        return None

    def status(self) -> Leadership:
        return Leadership(
            role="solo", identity=self.identity, leader=self.identity, epoch=None, problem=None
        )

    def start(self, on_change: Callable[[], None]) -> None:
        return None

    def stop(self) -> None:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenState:
    """What SCHEDULER_STATE_URL selects: the stores, the coordinator, how to close them."""

    store: StateStore
    coordinator: Coordinator
    schedules: ScheduleStore
    close: Callable[[], None]


def is_redis(url: str) -> bool:
    return url.partition("://")[0].lower() in ("redis", "rediss")


def open_state(settings: Settings, log: FilteringBoundLogger) -> OpenState:
    """The state store, runtime schedules and coordinator SCHEDULER_STATE_URL selects."""
    if is_redis(settings.state_url):
        from .stores.redis import open_redis  # the extra cronclock[redis], checked by config

        return open_redis(settings, log)
    max_age = timedelta(seconds=settings.history_max_age)
    store = open_store(
        settings.state_url, max_runs=settings.history_max_runs, max_age=max_age, log=log
    )
    schedules: ScheduleStore = (
        SqliteSchedules(store) if isinstance(store, SqliteStateStore) else MemorySchedules(store)
    )
    return OpenState(store=store, coordinator=Solo(), schedules=schedules, close=store.close)
