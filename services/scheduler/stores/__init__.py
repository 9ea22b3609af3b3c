"""State back-ends, one module per back-end, each with its job state, run history, runtime
schedules and (where it has one) leadership:

    memory.py     memory://          one process, lost on restart (tests, demos)
    sqlite.py     sqlite:///path     one process, the embedded default
    redis.py      redis://, rediss:// several replicas (the extra cronclock[redis])
    postgres.py   postgresql://      several replicas (the extra cronclock[postgres])

`protocols.py` holds what they implement. `open_store` picks one by SCHEDULER_STATE_URL's
scheme and imports a back-end's client library only when that back-end is used.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from ..config import Settings
    from .protocols import OpenState


def scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def open_store(settings: Settings, log: FilteringBoundLogger) -> OpenState:
    """The state store, runtime schedules and coordinator SCHEDULER_STATE_URL selects."""
    from ..coordination import Solo
    from .protocols import OpenState

    url = settings.state_url
    if scheme(url) in ("redis", "rediss"):
        from .redis import open_redis  # the extra cronclock[redis], checked by config

        return open_redis(settings, log)
    if scheme(url) in ("postgresql", "postgres"):
        from .postgres import open_postgres  # the extra cronclock[postgres], checked by config

        return open_postgres(settings, log)
    max_runs, max_age = settings.history_max_runs, timedelta(seconds=settings.history_max_age)
    if scheme(url) == "memory":
        from .memory import MemorySchedules, MemoryStateStore

        memory = MemoryStateStore(max_runs=max_runs, max_age=max_age)
        schedules = MemorySchedules(memory)
        return OpenState(store=memory, coordinator=Solo(), schedules=schedules, close=memory.close)
    if scheme(url) == "sqlite":
        from ..config import sqlite_path
        from .sqlite import SqliteSchedules, SqliteStateStore

        sqlite = SqliteStateStore(sqlite_path(url), log=log, max_runs=max_runs, max_age=max_age)
        return OpenState(
            store=sqlite, coordinator=Solo(), schedules=SqliteSchedules(sqlite), close=sqlite.close
        )
    raise ValueError(f"state store {scheme(url)!r} is not available in this build")
