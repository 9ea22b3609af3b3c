"""Notifications: SCHEDULER_NOTIFY_URL hears when a job starts failing, recovers, is paused
by its failure policy, or misses slots.

One message per event, never per slot or attempt, and at most one per job and kind of event
every NOTIFY_EVERY_SECONDS (the next one says how many were held back). Messages go out from
a thread of their own, so firing never waits for them; each is tried a few times, and a
notification that cannot be delivered is logged, never fatal.

Formats: `json` (the default), a Standard Webhooks-style envelope `{"type", "timestamp",
"data", "text"}`, signed like the calls when SCHEDULER_SIGNING_SECRET is set; `slack`, the
`{"text"}` body of a Slack incoming webhook. `SCHEDULER_NOTIFY_FORMAT` sets it for every URL;
a URL written `slack+https://…` is posted as Slack whatever the default.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from . import __version__
from .slots import format_slot

if TYPE_CHECKING:  # config imports this module: nothing heavy at import time
    from structlog.typing import FilteringBoundLogger

    from .signing import Signer

Format = Literal["json", "slack"]
Kind = Literal["failing", "recovered", "auto_paused", "missed"]

NOTIFY_EVERY_SECONDS = 300.0  # per job and kind of event
NOTIFY_ATTEMPTS = 3  # per URL: the first and two retries, 1 s and 2 s apart
NOTIFY_TIMEOUT_SECONDS = 10.0
NOTIFY_QUEUE = 1000  # messages waiting; beyond, new ones are dropped (and that is logged)
MAX_TARGETS = 10
SLACK_HOST = "hooks.slack.com"


@dataclass(frozen=True, slots=True)
class Target:
    url: str = field(repr=False)  # may carry a secret (a Slack webhook's path)
    format: Format

    @property
    def shown(self) -> str:
        """scheme://host/… : fit for logs (the path of a webhook URL is its secret)."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"

    def __repr__(self) -> str:
        return f"Target({self.shown!r}, {self.format!r})"


def parse_targets(text: str, default: Format = "json") -> tuple[Target, ...]:
    """SCHEDULER_NOTIFY_URL: URLs separated by commas or spaces; ValueError names the entry
    by position and host, never its path."""
    entries = [entry for entry in text.replace(",", " ").split() if entry]
    if not entries:
        raise ValueError("empty; give one or more http(s) URLs, or unset it")
    if len(entries) > MAX_TARGETS:
        raise ValueError(f"at most {MAX_TARGETS} URLs, got {len(entries)}")
    targets = []
    for position, entry in enumerate(entries, 1):
        form: Format = default
        if entry.lower().startswith("slack+"):
            form, entry = "slack", entry[len("slack+") :]
        try:
            parts = urllib.parse.urlsplit(entry)
            parts.port  # noqa: B018 - raises for a port that is not 0-65535
        except ValueError:
            raise ValueError(f"URL {position}: not a URL with a valid port") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"URL {position}: expected http(s)://host/path (optionally slack+https://…), "
                f"got scheme {parts.scheme or 'none'!r}"
            )
        if not all(c.isprintable() and not c.isspace() for c in entry):
            raise ValueError(f"URL {position}: has a control character")
        if parts.hostname == SLACK_HOST:
            form = "slack"  # Slack refuses anything else
        targets.append(Target(entry, form))
    return tuple(targets)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    kind: Kind
    job: str
    text: str  # one line for people (Slack, chat, the log)
    at: datetime
    data: dict[str, Any]


def failing(job: str, slot: datetime, status: int | None, error: str | None,
            at: datetime) -> Event:  # fmt: skip
    what = error or (f"HTTP {status}" if status is not None else "failed")
    return Event(kind="failing", job=job, at=at,
                 text=f"cronclock: {job} is failing: the slot {format_slot(slot)} failed "
                      f"({what})",
                 data={"slot": format_slot(slot), "status": status, "error": error})  # fmt: skip


def recovered(job: str, slot: datetime, failures: int, at: datetime) -> Event:
    plural = "" if failures == 1 else "s"
    return Event(kind="recovered", job=job, at=at,
                 text=f"cronclock: {job} recovered: the slot {format_slot(slot)} succeeded "
                      f"after {failures} failed slot{plural}",
                 data={"slot": format_slot(slot), "failed_slots": failures})  # fmt: skip


def auto_paused(job: str, reason: str, failures: int, at: datetime) -> Event:
    return Event(kind="auto_paused", job=job, at=at,
                 text=f"cronclock: {job} {reason}; it fires no more until "
                      f"`cronclock resume {job}`",
                 data={"reason": reason, "consecutive_failures": failures})  # fmt: skip


def missed(job: str, first: datetime, last: datetime, count: int, why: str,
           at: datetime) -> Event:  # fmt: skip
    span = format_slot(last) if count == 1 else f"{format_slot(first)} to {format_slot(last)}"
    plural = "" if count == 1 else "s"
    data = {"first": format_slot(first), "last": format_slot(last), "count": count}
    return Event(kind="missed", job=job, at=at, data=data,
                 text=f"cronclock: {job} missed {count} slot{plural} ({span}){why}")  # fmt: skip


class Notifier:
    """Delivers events to the targets from a thread of its own (started on the first event)."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        log: FilteringBoundLogger,
        replica: str,
        signer: Signer | None = None,
        post: Callable[[str, bytes, dict[str, str]], int] | None = None,
        sleep: Callable[[float], bool] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        every: float = NOTIFY_EVERY_SECONDS,
    ) -> None:
        self.targets = tuple(targets)
        self._log = log
        self._replica = replica
        self._signer = signer
        self._post = post or self._http_post
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._monotonic = monotonic
        self._every = every
        self._queue: queue.Queue[Event | None] = queue.Queue(NOTIFY_QUEUE)
        self._lock = threading.Lock()
        self._last: dict[tuple[str, Kind], float] = {}
        self._held: dict[tuple[str, Kind], int] = {}
        self._dropped_logged = -float("inf")  # a full queue is logged once a minute
        self._client: Any = None
        self._thread: threading.Thread | None = None

    # -- from the firing threads: never blocks -------------------------------------------

    def notify(self, event: Event) -> None:
        key = (event.job, event.kind)
        with self._lock:
            now = self._monotonic()
            last = self._last.get(key)
            if last is not None and now - last < self._every:
                self._held[key] = self._held.get(key, 0) + 1
                return
            self._last[key] = now
            held = self._held.pop(key, 0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver_forever, name="notify",
                                                daemon=True)  # fmt: skip
                self._thread.start()
        if held:
            event = Event(kind=event.kind, job=event.job, at=event.at, data=event.data,
                          text=f"{event.text} (and {held} more like it held back)")  # fmt: skip
            event.data["held_back"] = held
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            if self._monotonic() - self._dropped_logged >= 60:
                self._dropped_logged = self._monotonic()
                self._log.warning("notification dropped: too many waiting", job=event.job,
                                  notice=event.kind, waiting=NOTIFY_QUEUE)  # fmt: skip

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is waiting, for at most `timeout` seconds, then stop."""
        if self._thread is None:
            return
        deadline = self._monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)  # after what is waiting
        self._thread.join(max(0.0, deadline - self._monotonic()))
        self._stopping.set()  # a delivery still retrying gives up now
        self._thread.join(1.0)
        if self._client is not None:
            self._client.close()

    # -- the delivery thread ---------------------------------------------------------------

    def _deliver_forever(self) -> None:
        while (event := self._queue.get()) is not None:
            for target in self.targets:
                try:
                    self._deliver(target, event)
                except Exception:  # a notification must never cost the daemon
                    self._log.exception("notification failed", target=target.shown,
                                        notice=event.kind, job=event.job)  # fmt: skip

    def _deliver(self, target: Target, event: Event) -> None:
        body, headers = self.render(target, event)
        error = ""
        for attempt in range(1, NOTIFY_ATTEMPTS + 1):
            try:
                status = self._post(target.url, body, headers)
            except Exception as failure:  # connection refused, timeout, TLS
                error = f"{type(failure).__name__}: {failure}"
            else:
                if 200 <= status < 300:
                    self._log.info("notification sent", target=target.shown, notice=event.kind,
                                   job=event.job, attempt=attempt)  # fmt: skip
                    return
                error = f"HTTP {status}"
                if 400 <= status < 500 and status not in (408, 425, 429):
                    break  # the receiver refuses it: trying again will not help
            if attempt < NOTIFY_ATTEMPTS and self._sleep(float(2 ** (attempt - 1))):
                break  # shutting down
        self._log.warning("notification not delivered", target=target.shown, notice=event.kind,
                          job=event.job, error=error)  # fmt: skip

    def render(self, target: Target, event: Event) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json", "User-Agent": f"cronclock/{__version__}"}
        if target.format == "slack":
            return json.dumps({"text": event.text}).encode(), headers
        stamp = event.at.astimezone(UTC)
        envelope = {
            "type": f"job.{event.kind}",
            "timestamp": format_slot(stamp),
            "data": {"job": event.job, "replica": self._replica, **event.data},
            "text": event.text,
        }
        body = json.dumps(envelope, separators=(",", ":")).encode()
        if self._signer is not None:
            key = f"notify@{uuid.uuid4()}"
            headers |= self._signer.headers(key, body, int(stamp.timestamp()))
        return body, headers

    def _http_post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=NOTIFY_TIMEOUT_SECONDS, follow_redirects=False)
        return int(self._client.post(url, content=body, headers=headers).status_code)
