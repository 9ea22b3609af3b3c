"""Receive cronclock's calls in a Python application: verify the bearer token or the Standard
Webhooks signature, answer each Idempotency-Key once, refuse a stale fencing token.

    from cronclock_receiver import Receiver
    receiver = Receiver(token=os.environ["SCHEDULER_API_TOKEN"])

    @app.post("/api/sync/trigger")   # FastAPI; receiver.flask for Flask,
    @receiver.fastapi                # receiver.handle(headers, body, work) for anything else
    def sync(fire: Fire) -> dict:
        return {"synced": fire.slot.isoformat()}

Standard library only; FastAPI, Flask and Redis are used only when their integration is.
"""

from ._receiver import Receiver, as_answer
from ._stores import Answer, IdempotencyStore, MemoryStore, RedisStore, SQLiteStore
from ._verify import (
    Fire,
    InProgress,
    Malformed,
    Refused,
    StaleFencingToken,
    Unauthorized,
    verify,
)

__all__ = [
    "Answer",
    "Fire",
    "IdempotencyStore",
    "InProgress",
    "Malformed",
    "MemoryStore",
    "Receiver",
    "RedisStore",
    "Refused",
    "SQLiteStore",
    "StaleFencingToken",
    "Unauthorized",
    "as_answer",
    "verify",
]
