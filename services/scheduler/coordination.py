"""Leadership: which replica plans and fires (DESIGN.md section 6), the back-end-neutral part.

`Solo` is one process that always leads (SQLite or memory state). With a shared state URL
(redis://), replicas contend for a lease kept by that back-end (`stores/redis.py`). The holder
plans; it claims every slot in the same atomic step that checks it still holds the lease and
records the slot started, so no slot is fired twice even when two replicas both believe they
lead. Calls carry the lease's epoch as X-Scheduler-Fencing-Token. What every coordinator
implements is `stores.protocols.Coordinator`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .stores.protocols import Leadership


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
