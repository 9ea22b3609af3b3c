"""Signed calls (Standard Webhooks), checked with the spec's reference library as the oracle:
`standardwebhooks` verifies what cronclock signs, with a body and without, across a rotation,
and refuses an old timestamp, an altered body and a wrong secret."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import structlog
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from schedule_grammar import parse
from services.scheduler.config import ConfigError, Job, load_config
from services.scheduler.dispatch import Dispatcher
from services.scheduler.signing import Signer, parse_secrets, webhook_id
from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.telemetry import NullReporter
from tests.support import VirtualClock

ONE = "whsec_" + base64.b64encode(b"k" * 32).decode()
TWO = "whsec_" + base64.b64encode(b"z" * 24).decode()


def now() -> int:
    """The time at run time: the suite may run long after this module was imported."""
    return int(time.time())


def verify(secret: str, body: bytes, headers: dict[str, str]) -> None:
    Webhook(secret).verify(body, headers, json_parse=False)


class TestSecrets:
    def test_one_or_more_secrets_space_separated(self) -> None:
        assert parse_secrets(f"  {ONE}\n {TWO} ") == [b"k" * 32, b"z" * 24]
        assert parse_secrets(ONE.rstrip("=")) == [b"k" * 32]  # unpadded base64 too

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "empty; set one or more whsec_"),
            ("s3cr3t-value-xyz", "the secret does not start with 'whsec_'"),
            (f"{ONE} whsec_%%%%", "secret 2 of 2: not base64 after 'whsec_'"),
            ("whsec_" + base64.b64encode(b"short").decode(), "5 bytes after decoding"),
        ],
    )
    def test_a_bad_secret_is_named_by_position_never_shown(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message) as raised:
            parse_secrets(text)
        assert "s3cr3t" not in str(raised.value) and "%%%%" not in str(raised.value)

    def test_a_signer_never_shows_its_keys(self) -> None:
        assert repr(Signer(parse_secrets(f"{ONE} {TWO}"))) == "Signer(2 keys)"


class TestSignatures:
    @pytest.mark.parametrize("body", [b'{"full":true}', b""])
    def test_the_reference_library_verifies_them(self, body: bytes) -> None:
        stamp = now()
        headers = Signer(parse_secrets(ONE)).headers("sync@1795316400000", body, stamp)
        assert headers["webhook-id"] == "sync@1795316400000"
        assert headers["webhook-timestamp"] == str(stamp)
        verify(ONE, body, headers)

    def test_during_a_rotation_either_secret_verifies(self) -> None:
        headers = Signer(parse_secrets(f"{TWO} {ONE}")).headers("j@1", b"{}", now())
        assert len(headers["webhook-signature"].split(" ")) == 2
        verify(ONE, b"{}", headers)
        verify(TWO, b"{}", headers)

    def test_an_old_timestamp_an_altered_body_and_another_secret_are_refused(self) -> None:
        signer = Signer(parse_secrets(ONE))
        with pytest.raises(WebhookVerificationError, match="too old"):
            verify(ONE, b"{}", signer.headers("j@1", b"{}", now() - 600))  # a replay
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            verify(ONE, b'{"a":1}', signer.headers("j@1", b"{}", now()))
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            verify(TWO, b"{}", signer.headers("j@1", b"{}", now()))

    def test_the_id_keeps_dots_out_and_stays_the_key_for_every_attempt(self) -> None:
        assert webhook_id("schedule/order.42@1795316400000") == "schedule/order%2E42@1795316400000"
        assert webhook_id("a%2E.b@1") == "a%252E%2Eb@1"  # no two keys share an id
        headers = Signer(parse_secrets(ONE)).headers("schedule/order.42@1", b"", now())
        verify(ONE, b"", headers)


class TestConfiguration:
    def test_from_the_variable_or_a_file(self, tmp_path: Path) -> None:
        assert load_config({"SCHEDULER_API_TOKEN": "t"}).signer is None
        signer = load_config({"SCHEDULER_API_TOKEN": "t", "SCHEDULER_SIGNING_SECRET": ONE}).signer
        assert signer is not None and signer.count == 1
        path = tmp_path / "secret"
        path.write_text(f"{ONE}\n{TWO}\n")
        env = {"SCHEDULER_API_TOKEN": "t", "SCHEDULER_SIGNING_SECRET_FILE": str(path)}
        signer = load_config(env).signer
        assert signer is not None and signer.count == 2

    def test_check_says_calls_are_signed(self, capsys: pytest.CaptureFixture[str]) -> None:
        from services.scheduler.__main__ import main

        env = {"SCHEDULER_API_TOKEN": "t", "SCHEDULER_SIGNING_SECRET": f"{ONE} {TWO}"}
        assert main(["check"], env) == 0
        out = capsys.readouterr().out
        assert "auth: bearer token set, calls signed (2 secrets)" in out and ONE not in out

    def test_errors_name_the_variable_and_hide_the_secret(self, tmp_path: Path) -> None:
        env = {"SCHEDULER_API_TOKEN": "t", "SCHEDULER_SIGNING_SECRET": "hunter2-not-whsec"}
        with pytest.raises(ConfigError, match="SCHEDULER_SIGNING_SECRET: the secret does not") as e:
            load_config(env)
        assert "hunter2" not in str(e.value)
        path = tmp_path / "secret"
        path.write_text(ONE)
        env |= {"SCHEDULER_SIGNING_SECRET_FILE": str(path)}
        with pytest.raises(ConfigError, match="both SCHEDULER_SIGNING_SECRET and"):
            load_config(env)
        missing = {"SCHEDULER_API_TOKEN": "t", "SCHEDULER_SIGNING_SECRET_FILE": str(tmp_path / "x")}
        with pytest.raises(ConfigError, match=r"SCHEDULER_SIGNING_SECRET_FILE='.*x': cannot read"):
            load_config(missing)


def test_every_attempt_is_signed_over_the_bytes_sent_with_its_own_time() -> None:
    """The httpx path (retries, manual triggers): each attempt signed at its own time."""
    seen: list[httpx.Request] = []
    answers = iter([503, 200])

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(answers), headers={"Retry-After": "0"})

    start = now()
    times = iter([start, start + 7])
    job = Job(name="sync", schedule=parse("every 1m"), endpoint="/api/sync", method="POST",
              body={"full": True}, retries=1)  # fmt: skip
    slot = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
    dispatcher = Dispatcher(
        api_url="http://app", token=None, store=MemoryStateStore(), clock=VirtualClock(slot),
        log=structlog.get_logger(), reporter=NullReporter(), max_concurrency=1,
        client=httpx.Client(transport=httpx.MockTransport(answer)), sleep=lambda _: False,
        pause=lambda _: None, signer=Signer(parse_secrets(ONE)),
        wall=lambda: float(next(times)),
    )  # fmt: skip
    result = dispatcher.call(job, slot, key="sync@1", deadline=None)
    assert result.outcome == "success" and len(seen) == 2
    stamps = [request.headers["webhook-timestamp"] for request in seen]
    assert stamps == [str(start), str(start + 7)]
    assert {request.headers["webhook-id"] for request in seen} == {"sync@1"}
    for request in seen:
        assert request.content == b'{"full":true}'
        verify(ONE, request.content, dict(request.headers))
    dispatcher.shutdown(1)
