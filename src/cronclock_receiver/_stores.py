"""Where a receiver keeps the first answer of each Idempotency-Key and the highest fencing
token of each job: in memory (one process), in SQLite (the processes of one host), in Redis
(every host). All three hold a key while its work runs, so a concurrent retry gets 409, and
let that hold lapse after `pending_ttl` (a worker that died mid-work does not lock the key
for ever)."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ._verify import InProgress

KEEP_SECONDS = 24 * 3600  # how long a first answer is replayed
PENDING_SECONDS = 600  # how long a key is held for work that never finished
_RETRY_STATUSES = frozenset({408, 409, 425, 429})  # "try again": not a key's final answer


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What to answer a call: a status, a body and its type. `replayed` marks the first
    answer of a key sent again (the response then carries `Idempotent-Replayed: true`)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    replayed: bool = False

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Answer:
        return cls(status=status, body=json.dumps(value, separators=(",", ":")).encode())

    @property
    def final(self) -> bool:
        """Whether this answer is the key's for good: a transient one (5xx, 408, 409, 425,
        429) is not kept, so the retry cronclock sends after it does the work."""
        return self.status < 500 and self.status not in _RETRY_STATUSES

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.replayed:
            headers["Idempotent-Replayed"] = "true"
        return headers


class IdempotencyStore(Protocol):
    """A receiver's memory of keys and fencing tokens. `claim` is the caller's own random
    hold on a key: only the holder finishes or releases it."""

    def start(self, key: str, claim: str) -> Answer | None:
        """None when the key is now held for `claim`; the first answer (replayed) when the
        key was answered before; raises InProgress while another claim holds it."""

    def finish(self, key: str, claim: str, answer: Answer) -> None:
        """Keep `answer` as the key's first answer (when `claim` still holds it)."""

    def release(self, key: str, claim: str) -> None:
        """Let the key go without an answer (the work failed: the retry does it again)."""

    def fence(self, job: str, token: int) -> int:
        """Record `token` for `job` when it is the highest yet; the highest after."""


def _in_progress(key: str) -> InProgress:
    return InProgress(f"Idempotency-Key {key!r} is still being worked on by an earlier call")


def _encode(answer: Answer) -> str:
    body = base64.b64encode(answer.body).decode()
    return json.dumps({"status": answer.status, "type": answer.content_type, "body": body})


def _decode(text: str | bytes) -> Answer:
    value = json.loads(text)
    return Answer(status=value["status"], content_type=value["type"],
                  body=base64.b64decode(value["body"]), replayed=True)  # fmt: skip


class MemoryStore:
    """One process's memory: the right store for a single-process application (with several
    worker processes, use SQLiteStore or RedisStore so they share it). Keeps at most
    `max_keys` answers, forgetting the oldest first."""

    def __init__(
        self,
        *,
        keep: float = KEEP_SECONDS,
        pending_ttl: float = PENDING_SECONDS,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keep, self._pending_ttl, self._max_keys, self._clock = (
            keep, pending_ttl, max_keys, clock)  # fmt: skip
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, tuple[float, str, Answer | None]] = OrderedDict()
        self._fences: dict[str, int] = {}

    def start(self, key: str, claim: str) -> Answer | None:
        now = self._clock()
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[0] > now:
                if held[2] is None:
                    raise _in_progress(key)
                return replace(held[2], replayed=True)
            self._keys[key] = (now + self._pending_ttl, claim, None)
            self._keys.move_to_end(key)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        return None

    def finish(self, key: str, claim: str, answer: Answer) -> None:
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[1] == claim:
                self._keys[key] = (self._clock() + self._keep, claim, answer)

    def release(self, key: str, claim: str) -> None:
        with self._lock:
            held = self._keys.get(key)
            if held is not None and held[1] == claim and held[2] is None:
                del self._keys[key]

    def fence(self, job: str, token: int) -> int:
        with self._lock:
            highest = self._fences[job] = max(token, self._fences.get(job, token))
        return highest


class SQLiteStore:
    """A SQLite file shared by the processes of one host (e.g. gunicorn's workers): each
    decision is one IMMEDIATE transaction, so two processes never both take a key."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS cronclock_keys (
            key TEXT PRIMARY KEY, claim TEXT NOT NULL, answer TEXT, expires REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS cronclock_fences (job TEXT PRIMARY KEY, token INTEGER NOT NULL);
    """

    def __init__(
        self,
        path: str | Path,
        *,
        keep: float = KEEP_SECONDS,
        pending_ttl: float = PENDING_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keep, self._pending_ttl, self._clock = keep, pending_ttl, clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(self._SCHEMA)
        self._starts = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def start(self, key: str, claim: str) -> Answer | None:
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT answer FROM cronclock_keys WHERE key = ? AND expires > ?", (key, now)
                ).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO cronclock_keys VALUES (?, ?, NULL, ?)",
                        (key, claim, now + self._pending_ttl),
                    )
                    self._starts += 1
                    if self._starts % 100 == 0:  # forget what expired, now and then
                        self._db.execute("DELETE FROM cronclock_keys WHERE expires <= ?", (now,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if row is None:
            return None
        if row[0] is None:
            raise _in_progress(key)
        return _decode(row[0])

    def finish(self, key: str, claim: str, answer: Answer) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE cronclock_keys SET answer = ?, expires = ? WHERE key = ? AND claim = ?",
                (_encode(answer), self._clock() + self._keep, key, claim),
            )

    def release(self, key: str, claim: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM cronclock_keys WHERE key = ? AND claim = ? AND answer IS NULL",
                (key, claim),
            )

    def fence(self, job: str, token: int) -> int:
        with self._lock:
            row = self._db.execute(
                "INSERT INTO cronclock_fences VALUES (?, ?) ON CONFLICT (job) DO UPDATE "
                "SET token = max(token, excluded.token) RETURNING token",
                (job, token),
            ).fetchone()
        return int(row[0])


class RedisStore:
    """Redis shared by every host of the application. `client` is a `redis.Redis` (the
    receiver imports no Redis client of its own); keys live under `prefix`."""

    # Finish or release only while our own claim holds the key (it may have lapsed and been
    # taken by a later call).
    _FINISH = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
            return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
        end
        return 0
    """
    _FENCE = """
        local highest = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
        if tonumber(ARGV[1]) >= highest then highest = tonumber(ARGV[1]) end
        redis.call('SET', KEYS[1], highest)
        return highest
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "cronclock-receiver:",
        keep: float = KEEP_SECONDS,
        pending_ttl: float = PENDING_SECONDS,
    ) -> None:
        self._redis, self._prefix = client, prefix
        self._keep_ms, self._pending_ms = round(keep * 1000), round(pending_ttl * 1000)
        self._finish = client.register_script(self._FINISH)
        self._fence = client.register_script(self._FENCE)

    def start(self, key: str, claim: str) -> Answer | None:
        name, held = self._prefix + "key:" + key, "pending:" + claim
        for _ in range(3):  # a hold that lapses between SET and GET: take it again
            if self._redis.set(name, held, nx=True, px=self._pending_ms):
                return None
            value = self._redis.get(name)
            if value is None:
                continue
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.startswith("pending:"):
                raise _in_progress(key)
            return _decode(text)
        raise _in_progress(key)

    def finish(self, key: str, claim: str, answer: Answer) -> None:
        self._finish(keys=[self._prefix + "key:" + key],
                     args=["pending:" + claim, _encode(answer), self._keep_ms])  # fmt: skip

    def release(self, key: str, claim: str) -> None:
        self._finish(keys=[self._prefix + "key:" + key], args=["pending:" + claim, "", 0])

    def fence(self, job: str, token: int) -> int:
        return int(self._fence(keys=[self._prefix + "fence:" + job], args=[token]))
