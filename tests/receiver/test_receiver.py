"""The receiver helper (cronclock_receiver) as a specification: what it accepts and refuses,
what it replays, what it fences. Signatures come from the Standard Webhooks reference library
(the oracle), so the receiver is checked against the spec, not against cronclock's signer."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from cronclock_receiver import (
    Answer,
    Fire,
    IdempotencyStore,
    InProgress,
    Malformed,
    MemoryStore,
    Receiver,
    RedisStore,
    SQLiteStore,
    Unauthorized,
    verify,
)
from tests.support import RedisServer

SECRET = "whsec_" + base64.b64encode(b"receiver-test-key-32-bytes-long!").decode()
OTHER = "whsec_" + base64.b64encode(b"another-key-of-thirty-two-bytes!").decode()
SLOT = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
NOW = SLOT.timestamp() + 0.2
MOVED = {
    "Idempotency-Key": "data-refresh@1795316460000",
    "X-Scheduled-For": "2026-11-22T03:01:00.000Z",
}


def call(
    job: str = "data-refresh",
    *,
    attempt: int = 1,
    fencing: int | None = None,
    token: str | None = "tok",
    secret: str | None = None,
    body: bytes = b"",
    stamp: float = NOW,
    key: str | None = None,
    **extra: str,
) -> tuple[dict[str, str], bytes]:
    """Headers as cronclock sends them for one attempt of SLOT."""
    key = key or f"{job}@{round(SLOT.timestamp() * 1000)}"
    headers = {"X-Scheduler-Job": job, "X-Scheduled-For": "2026-11-22T03:00:00.000Z",
               "Idempotency-Key": key, "X-Scheduler-Attempt": str(attempt),
               "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}  # fmt: skip
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if fencing is not None:
        headers["X-Scheduler-Fencing-Token"] = str(fencing)
    if secret is not None:
        id = key.replace("%", "%25").replace(".", "%2E")
        at = datetime.fromtimestamp(int(stamp), UTC)
        headers |= {"webhook-id": id, "webhook-timestamp": str(int(stamp)),
                    "webhook-signature": Webhook(secret).sign(id, at, body.decode())}  # fmt: skip
    return headers | extra, body


class TestVerify:
    def test_a_call_with_the_right_token_is_a_fire(self) -> None:
        fire = verify(*call(attempt=2, fencing=7), token="tok")
        assert fire == Fire(job="data-refresh", slot=SLOT, attempt=2,
                            idempotency_key="data-refresh@1795316400000", fencing_token=7,
                            manual=False, trace_id="ab" * 16)  # fmt: skip

    def test_header_names_are_matched_in_any_case(self) -> None:
        headers, body = call()
        assert verify({k.lower(): v for k, v in headers.items()}, body, token="tok").attempt == 1

    def test_a_manual_trigger_is_marked_manual(self) -> None:
        fire = verify(*call(key="data-refresh@manual-3f1c"), token="tok")
        assert fire.manual and fire.fencing_token is None

    @pytest.mark.parametrize("token", [None, "wrong", "tok2", ""], ids=["none", "wrong", "longer", "empty"])  # fmt: skip
    def test_a_missing_or_wrong_bearer_token_is_unauthorized(self, token: str | None) -> None:
        with pytest.raises(Unauthorized, match="bearer token"):
            verify(*call(token=token), token="tok")

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"Idempotency-Key": "other@1795316400000"}, "does not belong to job"),
            ({"Idempotency-Key": "data-refresh@1795316401000"}, "does not name the slot"),
            ({"X-Scheduled-For": "yesterday"}, "not an RFC 3339 time"),
            ({"X-Scheduler-Attempt": "two"}, "not a whole number"),
            ({"X-Scheduler-Fencing-Token": "-1"}, "not a whole number"),
        ],
        ids=["key-of-another-job", "key-of-another-slot", "slot", "attempt", "fencing"],
    )
    def test_headers_that_are_not_cronclocks_are_malformed(
        self, change: dict[str, str], message: str
    ) -> None:
        headers, body = call()
        with pytest.raises(Malformed, match=message):
            verify(headers | change, body, token="tok")

    def test_a_call_without_the_slot_headers_is_malformed(self) -> None:
        with pytest.raises(Malformed, match="not a call from cronclock"):
            verify({"Authorization": "Bearer tok"}, b"", token="tok")

    def test_a_signed_call_verifies_with_body_and_empty_body(self) -> None:
        for body in (b'{"full":true,"note":"a.b"}', b""):
            fire = verify(
                *call(token=None, secret=SECRET, body=body), signing_secret=SECRET, now=NOW
            )
            assert fire.job == "data-refresh"

    def test_a_name_with_a_dot_is_signed_under_its_encoded_id(self) -> None:
        headers, body = call("reports.daily", token=None, secret=SECRET)
        assert headers["webhook-id"] == "reports%2Edaily@1795316400000"
        assert verify(headers, body, signing_secret=SECRET, now=NOW).job == "reports.daily"

    def test_either_secret_of_a_rotation_verifies(self) -> None:
        headers, body = call(token=None, secret=OTHER)
        assert verify(headers, body, signing_secret=f"{SECRET} {OTHER}", now=NOW)
        assert verify(headers, body, signing_secret=[OTHER], now=NOW)

    @pytest.mark.parametrize(
        ("tamper", "message"),
        [
            (lambda h, b: (h, b + b" "), "no webhook-signature matches"),
            (
                lambda h, b: (h | {"webhook-signature": "v1,AAAA"}, b),
                "no webhook-signature matches",
            ),
            (
                lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
                "not signed",
            ),
            (
                lambda h, b: (h | {"webhook-timestamp": str(int(NOW) + 1)}, b),
                "no webhook-signature matches",
            ),
            (lambda h, b: (h | MOVED, b), "webhook-id is not the call's Idempotency-Key"),
        ],
        ids=["altered-body", "forged-signature", "unsigned", "altered-timestamp", "moved-slot"],
    )
    def test_a_forged_or_altered_call_is_unauthorized(self, tamper: Any, message: str) -> None:
        headers, body = tamper(*call(token=None, secret=SECRET, body=b'{"a":1}'))
        with pytest.raises(Unauthorized, match=message):
            verify(headers, body, signing_secret=SECRET, now=NOW)

    def test_a_call_signed_with_another_secret_is_unauthorized(self) -> None:
        with pytest.raises(Unauthorized, match="no webhook-signature matches"):
            verify(*call(token=None, secret=OTHER), signing_secret=SECRET, now=NOW)

    @pytest.mark.parametrize("offset", [-301, 301], ids=["replayed-old", "from-the-future"])
    def test_a_timestamp_outside_the_tolerance_is_unauthorized(self, offset: int) -> None:
        headers, body = call(token=None, secret=SECRET, stamp=NOW + offset)
        with pytest.raises(Unauthorized, match="outside the tolerance of 300 s"):
            verify(headers, body, signing_secret=SECRET, now=NOW)
        assert verify(headers, body, signing_secret=SECRET, now=NOW, tolerance=400)

    def test_token_and_signature_are_both_checked_when_both_are_given(self) -> None:
        headers, body = call(token="wrong", secret=SECRET)
        with pytest.raises(Unauthorized, match="bearer"):
            verify(headers, body, token="tok", signing_secret=SECRET, now=NOW)

    def test_nothing_to_check_against_is_a_programming_error(self) -> None:
        with pytest.raises(ValueError, match="give token=, signing_secret= or both"):
            verify(*call())
        with pytest.raises(ValueError, match="signing_secret 2 of 2 is not base64"):
            Receiver(signing_secret=f"{SECRET} whsec_???")

    def test_a_receiver_never_shows_a_secret(self) -> None:
        shown = repr(Receiver(token="tok-value", signing_secret=SECRET))
        assert shown == "Receiver(bearer + signature, MemoryStore)"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IdempotencyStore]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "keys.db")
        yield sqlite
        sqlite.close()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield RedisStore(server.client())


class TestReceiver:
    def test_the_work_runs_once_per_key_and_a_retry_gets_the_first_answer(
        self, store: IdempotencyStore
    ) -> None:
        receiver = Receiver(token="tok", store=store)
        runs: list[Fire] = []

        def work(fire: Fire) -> Answer:
            runs.append(fire)
            return Answer.json({"run": len(runs)}, status=202)

        first = receiver.handle(*call(attempt=1), work)
        again = receiver.handle(*call(attempt=2), work)
        assert (first.status, first.body, first.replayed) == (202, b'{"run":1}', False)
        assert (again.status, again.body, again.replayed) == (202, b'{"run":1}', True)
        assert again.headers()["Idempotent-Replayed"] == "true"
        assert len(runs) == 1
        assert receiver.handle(*call(key="data-refresh@manual-1"), work).body == b'{"run":2}'

    def test_a_key_still_being_worked_on_is_409_in_progress(self, store: IdempotencyStore) -> None:
        receiver = Receiver(token="tok", store=store)
        inside, release = threading.Event(), threading.Event()
        answers: list[Answer] = []

        def slow(fire: Fire) -> str:
            inside.set()
            release.wait(10)
            return "done"

        first = threading.Thread(target=lambda: answers.append(receiver.handle(*call(), slow)))
        first.start()
        assert inside.wait(10)
        busy = receiver.handle(*call(attempt=2), slow)
        release.set()
        first.join(10)
        assert busy.status == 409 and b'"refused":"in_progress"' in busy.body
        assert answers[0].status == 200 and answers[0].body == b'"done"'

    @pytest.mark.parametrize("status", [503, 500, 429, 409, 408])
    def test_a_transient_answer_lets_the_key_go_so_the_retry_does_the_work(
        self, store: IdempotencyStore, status: int
    ) -> None:
        receiver = Receiver(token="tok", store=store)
        statuses = iter([status, 200])
        answers = [receiver.handle(*call(attempt=n), lambda fire: Answer(status=next(statuses)))
                   for n in (1, 2, 3)]  # fmt: skip
        assert [(a.status, a.replayed) for a in answers] == [
            (status, False),
            (200, False),
            (200, True),
        ]

    def test_a_permanent_answer_is_kept_like_a_success(self, store: IdempotencyStore) -> None:
        receiver = Receiver(token="tok", store=store)
        assert receiver.handle(*call(), lambda fire: Answer(status=422)).status == 422
        again = receiver.handle(*call(attempt=2), lambda fire: pytest.fail("ran twice"))
        assert (again.status, again.replayed) == (422, True)

    def test_an_exception_in_the_work_lets_the_key_go(self, store: IdempotencyStore) -> None:
        receiver = Receiver(token="tok", store=store)

        def broken(fire: Fire) -> None:
            raise RuntimeError("database down")

        with pytest.raises(RuntimeError):
            receiver.handle(*call(), broken)
        assert receiver.handle(*call(attempt=2), lambda fire: None).status == 204

    def test_a_fencing_token_older_than_the_highest_seen_for_its_job_is_refused(
        self, store: IdempotencyStore
    ) -> None:
        receiver = Receiver(token="tok", store=store)
        assert receiver.handle(*call(fencing=5), lambda fire: "new leader").status == 200
        stale = receiver.handle(*call("data-refresh", fencing=4, key="data-refresh@manual-x"),
                                lambda fire: pytest.fail("a stale leader's call ran"))  # fmt: skip
        assert stale.status == 409
        assert b"fencing token 4 is older than 5" in stale.body
        assert b'"refused":"stale_fencing_token"' in stale.body
        other_job = receiver.handle(*call("health-check", fencing=4), lambda fire: "ok")
        assert other_job.status == 200  # fencing is per job
        assert store.fence("data-refresh", 6) == 6

    def test_refusals_are_answers_with_a_reason(self, store: IdempotencyStore) -> None:
        receiver = Receiver(token="tok", store=store)
        denied = receiver.handle(*call(token="bad"), lambda fire: pytest.fail("ran"))
        assert (denied.status, denied.body) == (
            401, b'{"error":"missing or wrong bearer token","refused":"unauthorized"}')  # fmt: skip
        odd = receiver.handle({"Authorization": "Bearer tok"}, b"", lambda fire: pytest.fail("ran"))
        assert odd.status == 400 and b'"refused":"malformed"' in odd.body

    def test_a_replayed_old_signed_call_is_refused_before_its_key_is_looked_up(
        self, store: IdempotencyStore
    ) -> None:
        now = [NOW]
        receiver = Receiver(signing_secret=SECRET, store=store, clock=lambda: now[0])
        original = call(token=None, secret=SECRET, body=b"{}")
        assert receiver.handle(*original, lambda fire: "ran").status == 200
        now[0] += 3600  # an hour later someone sends the captured call again
        replay = receiver.handle(*original, lambda fire: pytest.fail("ran"))
        assert replay.status == 401 and b"outside the tolerance" in replay.body


class TestStores:
    def test_a_hold_lapses_after_pending_ttl_so_a_dead_worker_does_not_lock_a_key(self) -> None:
        now = [0.0]
        store = MemoryStore(pending_ttl=60, clock=lambda: now[0])
        assert store.start("k", "first") is None
        with pytest.raises(InProgress):
            store.start("k", "second")
        now[0] = 61
        assert store.start("k", "second") is None
        store.finish("k", "first", Answer(status=200))  # the lapsed holder answers too late
        store.finish("k", "second", Answer(status=201))
        replay = store.start("k", "third")
        assert replay is not None and replay.status == 201

    def test_sqlite_answers_survive_a_restart_and_are_shared_between_handles(
        self, tmp_path: Path
    ) -> None:
        one, two = SQLiteStore(tmp_path / "k.db"), SQLiteStore(tmp_path / "k.db")
        assert one.start("k", "a") is None
        with pytest.raises(InProgress):
            two.start("k", "b")
        one.finish("k", "a", Answer(status=202, body=b"\x00bytes", content_type="x/y"))
        one.close()
        replay = SQLiteStore(tmp_path / "k.db").start("k", "c")
        assert replay == Answer(status=202, body=b"\x00bytes", content_type="x/y", replayed=True)
        assert two.fence("job", 3) == 3 and two.fence("job", 2) == 3
        two.close()

    def test_memory_forgets_the_oldest_keys_first(self) -> None:
        store = MemoryStore(max_keys=2)
        for key in "abc":
            assert store.start(key, "x") is None
            store.finish(key, "x", Answer(status=200))
        assert store.start("a", "y") is None  # forgotten
        assert store.start("c", "y") is not None


def test_the_receiver_needs_only_the_standard_library(tmp_path: Path) -> None:
    """With FastAPI, Flask, Starlette, Redis and the daemon's own packages hidden, the helper
    imports and verifies a call; it loads nothing beyond the standard library."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    blocked = ["fastapi", "flask", "starlette", "redis", "services", "httpx", "pydantic"]
    (hidden / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    )
    script = (
        "import sys, cronclock_receiver as r\n"
        "h = {'Authorization': 'Bearer t', 'X-Scheduler-Job': 'j', 'Idempotency-Key': 'j@0',\n"
        "     'X-Scheduled-For': '1970-01-01T00:00:00.000Z'}\n"
        "print(r.Receiver(token='t').handle(h, b'', lambda fire: fire.job).body.decode())\n"
        "print(sorted(m for m, v in sys.modules.items() if v is not None\n"
        "             and m.split('.')[0] not in sys.stdlib_module_names\n"
        "             and m not in ('__main__', 'sitecustomize', '_distutils_hack')\n"
        "             and not m.startswith('__editable__')\n"
        "             and not m.startswith('cronclock_receiver')))\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False,
        env={"PYTHONPATH": f"{hidden}:{root / 'src'}", "PATH": os.environ["PATH"]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ['"j"', "[]"]
