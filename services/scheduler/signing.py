"""Signed calls (Standard Webhooks): with SCHEDULER_SIGNING_SECRET set, every call also carries

    webhook-id         the Idempotency-Key, with '%' and '.' percent-encoded (the signed
                       content is "id.timestamp.body", so the spec keeps '.' out of the id):
                       the same on every retry, after a restart and on every replica
    webhook-timestamp  this attempt's Unix time in seconds
    webhook-signature  "v1,<base64 HMAC-SHA256 of id.timestamp.body>", one per secret,
                       space-separated (several secrets: a rotation in progress)

The application verifies with its own copy of the secret, without knowing cronclock's API
token, and learns that the body was not altered and that the call is recent (a replay of an
old one fails its timestamp tolerance). Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "whsec_"
MIN_KEY_BYTES = 16  # the spec recommends 24 to 64 random bytes; shorter is refused


def parse_secrets(text: str) -> list[bytes]:
    """The HMAC keys of one or more `whsec_<base64>` secrets, space-separated. The messages
    of the ValueError name a secret by its position only: a secret is never shown."""
    parts = text.split()
    if not parts:
        raise ValueError("empty; set one or more whsec_... secrets, space-separated")
    keys = []
    for number, part in enumerate(parts, 1):
        which = f"secret {number} of {len(parts)}" if len(parts) > 1 else "the secret"
        if not part.startswith(PREFIX):
            raise ValueError(f"{which} does not start with {PREFIX!r} (whsec_ and base64)")
        encoded = part.removeprefix(PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{which}: not base64 after {PREFIX!r}") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"{which}: {len(key)} bytes after decoding; use at least {MIN_KEY_BYTES} "
                "random bytes (e.g. whsec_$(openssl rand -base64 32))"
            )
        keys.append(key)
    return keys


def webhook_id(idempotency_key: str) -> str:
    """The Idempotency-Key with '%' and '.' percent-encoded: a job or schedule name may hold
    a '.', which the signed content uses as its separator."""
    return idempotency_key.replace("%", "%25").replace(".", "%2E")


class Signer:
    """Signs calls with every configured key. A verifier accepts a call that one of its keys
    signed, so a secret rotates without a gap: add the new one here, then give it to the
    application, then remove the old one. Its repr shows how many keys it holds, never one."""

    __slots__ = ("_keys",)

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("no signing keys")
        self._keys = tuple(keys)

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} key{'s' if len(self._keys) != 1 else ''})"

    @property
    def count(self) -> int:
        return len(self._keys)

    def headers(self, idempotency_key: str, body: bytes, timestamp: int) -> dict[str, str]:
        id = webhook_id(idempotency_key)
        content = b"%s.%d.%s" % (id.encode(), timestamp, body)
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
            for key in self._keys
        )
        return {
            "webhook-id": id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signatures,
        }
