"""Leadership: which replica plans and fires (DESIGN.md section 6), the back-end-neutral part.

`Solo` is one process that always leads (SQLite or memory state). With a shared state URL
(redis://), replicas contend for a lease kept by that back-end (`stores/redis.py`). The holder
plans; it claims every slot in the same atomic step that checks it still holds the lease and
records the slot started, so no slot is fired twice even when two replicas both believe they
lead. Calls carry the lease's epoch as X-Scheduler-Fencing-Token. What every coordinator
implements is `stores.protocols.Coordinator`.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from .stores.protocols import Leadership
from .telemetry import Throttle


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


def store_timeout(lease_ttl_seconds: float) -> float:
    """Socket, statement and lock timeouts of a shared store: a stuck server answers well
    inside the lease, so a leader that cannot renew stops firing on time."""
    return max(0.25, min(2.0, lease_ttl_seconds / 5))


def lease_value(identity: str) -> str:
    """What the lease holds: who leads, and a random token only this process knows."""
    return f"{identity} {secrets.token_hex(12)}"


class LeaseRow(Protocol):
    """Where a back-end keeps the one lease (a Redis key, a PostgreSQL row): each operation is
    atomic in that server, and the epoch only ever grows."""

    kind: str  # "Redis", "PostgreSQL": for messages
    errors: tuple[type[Exception], ...]  # what the client raises when the server is away

    def acquire(self, value: str, ttl: float, floor: int) -> tuple[bool, str, int]:
        """Take the lease for `value` if nobody holds it, with a new epoch above `floor`:
        (taken, the holder's value, its epoch). A holder equal to `value` (our own acquisition
        whose reply was lost) is not taken again but counts as ours."""
        ...

    def renew(self, value: str, ttl: float) -> bool:
        """Extend the lease to `ttl` from now if `value` still holds it."""
        ...

    def release(self, value: str) -> bool:
        """Give the lease up if `value` holds it."""
        ...


class Lease:
    """The leader lease, whatever server keeps it: acquired when free, renewed every ttl/3,
    released on stop, with a fencing epoch.

    A leader counts its lease from the moment it *sent* the last successful renewal, and stops
    firing `margin` before that lease could expire in the server, so it is silent before any
    other replica can acquire it.
    """

    def __init__(
        self,
        row: LeaseRow,
        *,
        ttl: float,
        log: FilteringBoundLogger,
        identity: str | None = None,
        value: str | None = None,
        where: str,
        after_cycle: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity or replica_identity()
        self.value = value or lease_value(self.identity)
        self._row = row
        self._ttl = ttl
        self._margin = ttl / 5
        self._log = log
        self._where = where
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._epoch: int | None = None  # the term this replica holds, if any
        self._last_epoch: int | None = None  # fencing token of calls of the latest term
        self._floor = 0  # the highest epoch seen: a server that lost its data never goes below
        self._valid_until = -math.inf
        self._leader: str | None = None
        self._problem: str | None = None
        self._complaints = Throttle(monotonic=monotonic)  # server trouble: once a minute
        self._stopping = threading.Event()
        self._poke = threading.Event()
        self._on_change: Callable[[], None] = lambda: None
        self._announced: int | None = None  # the term last reported through on_change
        self._after_cycle = after_cycle or (lambda: None)  # every ttl/3 at most
        self._last_after = -math.inf
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    # -- Coordinator ------------------------------------------------------------------------

    def term(self) -> int | None:
        with self._lock:
            return self._epoch if self._monotonic() < self._valid_until else None

    def leading(self) -> bool:
        return self.term() is not None

    def fencing_token(self) -> int | None:
        return self._last_epoch

    def step_down(self) -> None:
        with self._lock:
            held, self._epoch, self._valid_until = self._epoch, None, -math.inf
        if held is not None:
            self._log.warning("lease lost: another replica holds it; stepping down", epoch=held)
        self._poke.set()

    def status(self) -> Leadership:
        with self._lock:
            leading = self._epoch is not None and self._monotonic() < self._valid_until
            return Leadership(
                role="leader" if leading else "standby",
                identity=self.identity,
                leader=self.identity if leading else self._leader,
                epoch=self._epoch if leading else (self._floor or None),
                problem=self._problem,
            )

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._cycle()  # the first attempt before the loop plans: a lone replica leads at once
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._poke.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            held, self._epoch, self._valid_until = self._epoch, None, -math.inf
        if held is None:
            return
        try:
            released = self._row.release(self.value)
        except self._row.errors as error:
            self._log.warning("lease not released; it expires by itself", error=str(error))
            return
        if released:
            self._log.info("lease released", epoch=held)

    # -- the lease thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            pause = self._cycle()
            self._poke.wait(pause)
            self._poke.clear()

    def _cycle(self) -> float:
        """Renew or acquire once; how long to wait before the next attempt."""
        sent, kind = self._monotonic(), self._row.kind
        try:
            if self._epoch is not None:
                self._renew_once(sent)
            if self._epoch is None:
                self._acquire_once(sent)
        except self._row.errors as error:
            self._unreachable(error)
            if self._epoch is not None and self._monotonic() >= self._valid_until:
                self._log.error(
                    f"lease could not be renewed in time; firing stopped until {kind} answers",
                    epoch=self._epoch,
                    error=self._problem,
                )
                with self._lock:
                    self._epoch = None
        else:
            if self._problem is not None:
                self._log.info(f"{kind} reachable again", **{kind.lower(): self._where})
                self._problem = None
            if sent - self._last_after >= self._ttl / 3 * 0.9:  # standbys poll faster
                self._last_after = sent
                self._after_cycle()
        term = self.term()
        if term != self._announced:
            self._announced = term
            self._on_change()
        if term is None:
            return min(1.0, self._ttl / 3)
        # Renew every ttl/3; after a failed renewal retry often, and wake when the lease runs
        # out, so firing stops on time.
        pause = self._ttl / 3 if self._problem is None else min(1.0, self._ttl / 10)
        return max(0.01, min(pause, self._valid_until - self._monotonic()))

    def _renew_once(self, sent: float) -> None:
        renewed = self._row.renew(self.value, self._ttl)
        with self._lock:
            if renewed:
                self._valid_until = sent + self._ttl - self._margin
                return
            held, self._epoch, self._valid_until = self._epoch, None, -math.inf
        self._log.warning("lease lost: it expired or another replica took it", epoch=held)

    def _acquire_once(self, sent: float) -> None:
        got, holder, epoch = self._row.acquire(self.value, self._ttl, self._floor)
        if not got and holder == self.value:
            got = True  # our own acquisition whose reply was lost, resent by the client
        leader = holder.rpartition(" ")[0] or None
        with self._lock:
            self._floor = max(self._floor, epoch)
            changed = leader != self._leader
            self._leader = leader
            if got:
                self._epoch = self._last_epoch = epoch
                self._valid_until = sent + self._ttl - self._margin
        if got:
            self._log.info(
                "leader: lease acquired", epoch=epoch, replica=self.identity, ttl_seconds=self._ttl
            )
        elif changed:
            self._log.info("standby: another replica leads", leader=leader, epoch=epoch)

    def _unreachable(self, error: Exception) -> None:
        kind = self._row.kind
        self._problem = f"cannot reach {kind} at {self._where}: {error}"
        if self._complaints.ready():
            self._log.error(
                f"cannot reach {kind}; a leader keeps firing only while its lease is certain",
                error=str(error),
                **{kind.lower(): self._where},
                leading=self.leading(),
            )
