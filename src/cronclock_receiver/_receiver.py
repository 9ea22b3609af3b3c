"""The receiving side of a call, in three steps: begin (verify, fence, take the key or find
its first answer), the application's work, finish (keep a final answer, or let the key go)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from ._stores import Answer, IdempotencyStore, MemoryStore
from ._verify import TOLERANCE_SECONDS, Fire, Refused, StaleFencingToken, check, parse_secrets

log = logging.getLogger("cronclock_receiver")


def as_answer(result: Any) -> Answer:
    """What a handler returned, as an Answer: an Answer as it is, None as 204, else JSON 200."""
    if isinstance(result, Answer):
        return result
    if result is None:
        return Answer(status=204, content_type="text/plain")
    return Answer.json(result)


def refusal(error: Refused) -> Answer:
    return Answer.json({"error": error.reason, "refused": error.kind}, status=error.status)


class Receiver:
    """Verifies cronclock's calls and answers each Idempotency-Key once.

    `token`: the bearer token cronclock sends (SCHEDULER_API_TOKEN); `signing_secret`: the
    Standard Webhooks secret(s) (SCHEDULER_SIGNING_SECRET), space-separated or a list; give
    either or both (`allow_unauthenticated=True` accepts calls without either: local
    development only, like the daemon's LOCAL_DEV_MODE). `store` remembers first answers and
    fencing tokens (default: this process's memory). `tolerance`: how old a signed call may
    be, in seconds.

        receiver = Receiver(signing_secret=os.environ["SCHEDULER_SIGNING_SECRET"])
        answer = receiver.handle(headers, body, lambda fire: do_the_work(fire.slot))

    A call is refused (an Answer with the status to send) when its token or signature is
    wrong (401), its headers are not cronclock's (400), its fencing token is lower than the
    highest seen for its job (409: a replica that lost its leadership) or its key is still
    being worked on (409: cronclock records busy). A repeated key gets its first final answer
    again, with `Idempotent-Replayed: true`, and the work is not done twice; a transient
    answer (5xx, 408, 409, 425, 429) or an exception lets the key go, so the retry works.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        signing_secret: str | Iterable[str] | None = None,
        store: IdempotencyStore | None = None,
        tolerance: float = TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
        allow_unauthenticated: bool = False,
    ) -> None:
        if token is None and signing_secret is None and not allow_unauthenticated:
            raise ValueError(
                "Receiver: give token=, signing_secret= or both "
                "(allow_unauthenticated=True only for local development)"
            )
        self._token = token
        self._keys = None if signing_secret is None else parse_secrets(signing_secret)
        self._store = MemoryStore() if store is None else store
        self._tolerance, self._clock = tolerance, clock

    def __repr__(self) -> str:  # never a secret
        checks = [name for name, on in (("bearer", self._token), ("signature", self._keys)) if on]
        return f"Receiver({' + '.join(checks) or 'unauthenticated'}, {type(self._store).__name__})"

    def verify(self, headers: Mapping[str, str], body: bytes) -> Fire:
        """The call's Fire, or Refused (Unauthorized, Malformed)."""
        return check(headers, body, self._token, self._keys, self._clock(), self._tolerance)

    def begin(self, headers: Mapping[str, str], body: bytes) -> Fire | Answer:
        """A Fire whose work is now this call's to do, or the Answer to send at once (a
        refusal, or the key's first answer replayed)."""
        try:
            fire = self.verify(headers, body)
            if fire.fencing_token is not None:
                highest = self._store.fence(fire.job, fire.fencing_token)
                if fire.fencing_token < highest:
                    raise StaleFencingToken(
                        f"fencing token {fire.fencing_token} is older than {highest}, the "
                        f"highest seen for {fire.job!r}: a replica that lost its leadership"
                    )
            claim = secrets.token_hex(8)
            first = self._store.start(fire.idempotency_key, claim)
        except Refused as error:
            log.warning("refused a call (%s): %s", error.status, error.reason)
            return refusal(error)
        if first is not None:
            log.info("replayed the first answer of %s", fire.idempotency_key)
            return first
        return replace(fire, claim=claim)

    def finish(self, fire: Fire, answer: Answer) -> Answer:
        """Keep `answer` as the key's first answer when it is final; else let the key go."""
        if answer.final:
            self._store.finish(fire.idempotency_key, fire.claim, answer)
        else:
            self._store.release(fire.idempotency_key, fire.claim)
        return answer

    def abandon(self, fire: Fire) -> None:
        """The work failed with an exception: let the key go (the retry does the work)."""
        self._store.release(fire.idempotency_key, fire.claim)

    def handle(
        self, headers: Mapping[str, str], body: bytes, work: Callable[[Fire], Any]
    ) -> Answer:
        """begin, `work(fire)` (its result through as_answer), finish: for any framework."""
        begun = self.begin(headers, body)
        if isinstance(begun, Answer):
            return begun
        try:
            answer = as_answer(work(begun))
        except BaseException:
            self.abandon(begun)
            raise
        return self.finish(begun, answer)

    def fastapi(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """A FastAPI endpoint from `handler(fire, ...)`: see cronclock_receiver.fastapi."""
        from .fastapi import endpoint

        return endpoint(self, handler)

    def flask(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """A Flask view from `handler(fire, **view_args)`: see cronclock_receiver.flask."""
        from .flask import view

        return view(self, handler)
