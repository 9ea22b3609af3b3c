"""What a call from cronclock says and whether to believe it: the bearer token (constant time),
the Standard Webhooks signature and its timestamp tolerance, the slot headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

TOLERANCE_SECONDS = 300  # the spec's: a signed call older (or newer) than this is a replay
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


class Refused(Exception):
    """A call the receiver does not accept; `status` and `reason` are what to answer.
    `kind` names the cause for machines: unauthorized, malformed, stale_fencing_token,
    in_progress."""

    status = 400
    kind = "malformed"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthorized(Refused):
    """No or a wrong bearer token, a forged signature, a timestamp outside the tolerance."""

    status = 401
    kind = "unauthorized"


class Malformed(Refused):
    """A header cronclock always sends is missing or does not parse."""


class StaleFencingToken(Refused):
    """The call's fencing token is lower than the highest seen for its job: it comes from a
    replica that has lost its leadership since."""

    status = 409
    kind = "stale_fencing_token"


class InProgress(Refused):
    """The call's Idempotency-Key is being worked on by an earlier call (a retry after a
    timeout, while the first attempt still runs). cronclock records a 409 as busy."""

    status = 409
    kind = "in_progress"


@dataclass(frozen=True, slots=True, kw_only=True)
class Fire:
    """One verified call: which job, which slot, which attempt.

    `slot` is the slot's nominal time (for a manual trigger: when it was triggered);
    `idempotency_key` is the same on every retry of the slot and after a failover;
    `fencing_token` is the leader's epoch when replicas coordinate (else None);
    `trace_id` is the W3C trace id of the slot (the same on each retry), when sent.
    """

    job: str
    slot: datetime
    attempt: int
    idempotency_key: str
    fencing_token: int | None
    manual: bool
    trace_id: str | None = None
    claim: str = field(default="", repr=False, compare=False)  # the store's hold on the key


def parse_secrets(secrets: str | Iterable[str]) -> list[bytes]:
    """HMAC keys from Standard Webhooks secrets (`whsec_<base64>`, space-separated or a list:
    several during a rotation). Errors name a secret by its position, never its value."""
    parts = secrets.split() if isinstance(secrets, str) else list(secrets)
    if not parts:
        raise ValueError("signing_secret is empty; give one or more whsec_... secrets")
    keys = []
    for number, part in enumerate(parts, 1):
        encoded = part.removeprefix("whsec_")
        try:
            keys.append(base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True))
        except (binascii.Error, ValueError):
            raise ValueError(f"signing_secret {number} of {len(parts)} is not base64") from None
    return keys


def webhook_id(idempotency_key: str) -> str:
    """The webhook-id cronclock derives from an Idempotency-Key ('%' and '.' encoded)."""
    return idempotency_key.replace("%", "%25").replace(".", "%2E")


def check_bearer(headers: Mapping[str, str], token: str) -> None:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token")


def check_signature(
    headers: Mapping[str, str], body: bytes, keys: list[bytes], now: float, tolerance: float
) -> None:
    id, stamp = headers.get("webhook-id"), headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature")
    if id is None or signatures is None or not stamp:
        raise Unauthorized("the call is not signed (no webhook-id, -timestamp or -signature)")
    if not stamp.isdigit():
        raise Unauthorized(f"webhook-timestamp {stamp!r} is not Unix seconds")
    if abs(now - int(stamp)) > tolerance:
        raise Unauthorized(
            f"webhook-timestamp {stamp} is {now - int(stamp):+.0f} s from now, outside the "
            f"tolerance of {tolerance:g} s (a replayed or delayed call, or a clock off)"
        )
    content = b"%s.%s.%s" % (id.encode(), stamp.encode(), body)
    expected = [base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()) for key in keys]
    for entry in signatures.split():
        version, _, signature = entry.partition(",")
        if version == "v1" and any(
            hmac.compare_digest(signature.encode(), each) for each in expected
        ):
            return
    raise Unauthorized("no webhook-signature matches the signing secret (forged or altered)")


def read_fire(headers: Mapping[str, str]) -> Fire:
    """The Fire the slot headers describe; Malformed when one is missing or inconsistent."""
    key = headers.get("idempotency-key")
    job = headers.get("x-scheduler-job")
    if not key or not job:
        raise Malformed("not a call from cronclock: no Idempotency-Key or X-Scheduler-Job")
    owner, _, rest = key.rpartition("@")
    if owner != job or not rest:
        raise Malformed(f"Idempotency-Key {key!r} does not belong to job {job!r}")
    slot_text = headers.get("x-scheduled-for", "")
    try:
        slot = datetime.fromisoformat(slot_text).astimezone(UTC)
    except ValueError:
        raise Malformed(f"X-Scheduled-For {slot_text!r} is not an RFC 3339 time") from None
    manual = rest.startswith("manual-")
    if not manual and (not rest.isdigit() or int(rest) != round(slot.timestamp() * 1000)):
        raise Malformed(f"Idempotency-Key {key!r} does not name the slot {slot_text}")
    attempt_text = headers.get("x-scheduler-attempt", "1")
    fencing_text = headers.get("x-scheduler-fencing-token")
    if not attempt_text.isdigit() or (fencing_text is not None and not fencing_text.isdigit()):
        raise Malformed(
            f"X-Scheduler-Attempt {attempt_text!r} or X-Scheduler-Fencing-Token "
            f"{fencing_text!r} is not a whole number"
        )
    trace = _TRACEPARENT.fullmatch(headers.get("traceparent", ""))
    return Fire(
        job=job,
        slot=slot,
        attempt=int(attempt_text),
        idempotency_key=key,
        fencing_token=None if fencing_text is None else int(fencing_text),
        manual=manual,
        trace_id=trace.group(1) if trace else None,
    )


def verify(
    headers: Mapping[str, str],
    body: bytes,
    *,
    token: str | None = None,
    signing_secret: str | Iterable[str] | None = None,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> Fire:
    """Check one call and say what it is.

    `headers` as received (any case), `body` the raw bytes. With `token`, the bearer token
    must match (compared in constant time); with `signing_secret`, the Standard Webhooks
    signature must match one secret and the timestamp be within `tolerance` seconds of `now`
    (default: the time now),
    and the signed webhook-id must be the call's Idempotency-Key, so the slot and job it names
    are covered by the signature too. Raises Unauthorized or Malformed (both Refused).
    """
    if token is None and signing_secret is None:
        raise ValueError("verify: give token=, signing_secret= or both")
    keys = None if signing_secret is None else parse_secrets(signing_secret)
    return check(headers, body, token, keys, time.time() if now is None else now, tolerance)


def check(
    headers: Mapping[str, str],
    body: bytes,
    token: str | None,
    keys: list[bytes] | None,
    now: float,
    tolerance: float,
) -> Fire:
    """verify, with the secrets parsed once (a Receiver's)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    if token is not None:
        check_bearer(lowered, token)
    fire = read_fire(lowered)
    if keys is not None:
        check_signature(lowered, body, keys, now, tolerance)
        if lowered["webhook-id"] != webhook_id(fire.idempotency_key):
            raise Unauthorized("webhook-id is not the call's Idempotency-Key")
    return fire
