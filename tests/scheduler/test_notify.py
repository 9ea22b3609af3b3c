"""Notifications (notify.py): SCHEDULER_NOTIFY_URL parsing, one message per event with a rate
limit, retries, formats (JSON envelope, signed like calls; Slack), and the events the failure
policies and the loop produce. The daemon against a loopback receiver is in
tests/integration/test_policies.py."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from schedule_grammar import parse
from services.scheduler.config import ConfigError, Job, load_config
from services.scheduler.notify import Notifier, Target, failing, missed, parse_targets, recovered
from services.scheduler.policies import FailurePolicy
from services.scheduler.signing import Signer, parse_secrets
from services.scheduler.slots import CallResult
from services.scheduler.stores.memory import MemoryStateStore
from services.scheduler.stores.protocols import RunRecord
from services.scheduler.telemetry import Metrics

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LOG = structlog.get_logger()


class TestTargets:
    def test_urls_split_on_commas_and_spaces_and_slack_is_chosen_per_url(self) -> None:
        targets = parse_targets(
            "https://ops.example.com/hook, slack+https://chat.example.com/in "
            "https://hooks.slack.com/services/T0/B0/XYZ"
        )
        assert [(t.url, t.format) for t in targets] == [
            ("https://ops.example.com/hook", "json"),
            ("https://chat.example.com/in", "slack"),
            ("https://hooks.slack.com/services/T0/B0/XYZ", "slack"),  # Slack takes only its own
        ]
        assert parse_targets("http://a/x", "slack")[0].format == "slack"

    def test_the_path_of_a_url_is_never_shown(self) -> None:
        target = Target("https://hooks.slack.com/services/T0/B0/SECRET", "slack")
        assert "SECRET" not in repr(target) and "SECRET" not in target.shown
        assert target.shown == "https://hooks.slack.com/…"

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("ftp://host/SECRET", "URL 1: expected http(s)://host/path"),
            ("https://ok/x http:///SECRET", "URL 2: expected http(s)://host/path"),
            ("https://host:99999/SECRET", "URL 1: not a URL with a valid port"),
            (" , ", "empty"),
            (" ".join(f"http://h/{i}" for i in range(11)), "at most 10 URLs, got 11"),
        ],
    )
    def test_bad_values_are_config_errors_that_do_not_quote_the_secret(
        self, value: str, message: str
    ) -> None:
        with pytest.raises(ConfigError) as caught:
            load_config({"SCHEDULER_API_TOKEN": "t", "SCHEDULER_NOTIFY_URL": value})
        text = str(caught.value)
        assert text.startswith("SCHEDULER_NOTIFY_URL: ") and message in text
        assert "SECRET" not in text

    def test_the_format_setting_is_checked(self) -> None:
        config = load_config({"SCHEDULER_API_TOKEN": "t", "SCHEDULER_NOTIFY_URL": "http://a/b",
                              "SCHEDULER_NOTIFY_FORMAT": "Slack"})  # fmt: skip
        assert config.notify == (Target("http://a/b", "slack"),)
        with pytest.raises(ConfigError, match="SCHEDULER_NOTIFY_FORMAT"):
            load_config({"SCHEDULER_API_TOKEN": "t", "SCHEDULER_NOTIFY_FORMAT": "teams"})


class Poster:
    """The receiving end: answers in turn (the last repeats), records what it got."""

    def __init__(self, *statuses: int | Exception) -> None:
        self.statuses = list(statuses) or [200]
        self.got: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.done = threading.Event()

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        answer = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self.got.append((url, json.loads(body), headers))
        self.done.set()
        if isinstance(answer, Exception):
            raise answer
        return answer


def notifier(poster: Poster, *targets: Target, **kwargs: Any) -> Notifier:
    clock = kwargs.pop("clock", {"now": 0.0})
    return Notifier(targets or (Target("http://hook/x", "json"),), log=LOG, replica="host:1",
                    post=poster, sleep=lambda seconds: False,
                    monotonic=lambda: clock["now"], **kwargs)  # fmt: skip


class TestDelivery:
    def test_one_message_per_job_and_kind_per_interval_and_the_next_says_how_many_were_held(
        self,
    ) -> None:
        clock = {"now": 0.0}
        poster = Poster()
        n = notifier(poster, clock=clock)
        for _ in range(3):
            n.notify(failing("j", T, 500, "HTTP 500", T))
        n.notify(failing("other", T, 500, "HTTP 500", T))  # another job: its own
        n.notify(recovered("j", T, 3, T))  # another kind: its own
        clock["now"] = 301.0
        n.notify(failing("j", T, 500, "HTTP 500", T))
        n.close()
        kinds = [(body["type"], body["data"]["job"]) for _, body, _ in poster.got]
        assert kinds == [("job.failing", "j"), ("job.failing", "other"), ("job.recovered", "j"),
                         ("job.failing", "j")]  # fmt: skip
        last = poster.got[-1][1]
        assert last["data"]["held_back"] == 2 and "(and 2 more like it held back)" in last["text"]

    def test_the_json_envelope(self) -> None:
        poster = Poster()
        n = notifier(poster)
        n.notify(
            failing("nightly", T, 503, 'HTTP 503: {"error": "down"}', T + timedelta(seconds=1))
        )
        n.close()
        ((url, body, headers),) = poster.got
        assert url == "http://hook/x" and headers["Content-Type"] == "application/json"
        assert body == {
            "type": "job.failing",
            "timestamp": "2026-11-22T03:00:01.000Z",
            "data": {"job": "nightly", "replica": "host:1", "slot": "2026-11-22T03:00:00.000Z",
                     "status": 503, "error": 'HTTP 503: {"error": "down"}'},
            "text": 'cronclock: nightly is failing: the slot 2026-11-22T03:00:00.000Z failed '
                    '(HTTP 503: {"error": "down"})',
        }  # fmt: skip

    def test_slack_gets_its_text_body(self) -> None:
        poster = Poster()
        n = notifier(poster, Target("https://hooks.slack.com/services/a/b/c", "slack"))
        n.notify(missed("j", T, T + timedelta(minutes=2), 3, " (catchup=none)", T))
        n.close()
        assert poster.got[0][1] == {
            "text": "cronclock: j missed 3 slots (2026-11-22T03:00:00.000Z to "
            "2026-11-22T03:02:00.000Z) (catchup=none)"
        }

    def test_signed_like_the_calls_and_verified_by_the_reference_library(self) -> None:
        standardwebhooks = pytest.importorskip("standardwebhooks")
        secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        poster = Poster()
        n = notifier(poster, signer=Signer(parse_secrets(secret)))
        n.notify(recovered("j", T, 2, datetime.now(UTC)))
        n.close()
        ((_, body, headers),) = poster.got
        raw = json.dumps(body, separators=(",", ":")).encode()
        verified = standardwebhooks.Webhook(secret).verify(raw, headers)
        assert verified["type"] == "job.recovered"

    def test_transient_answers_are_retried_a_refusal_is_not_and_neither_raises(self) -> None:
        poster = Poster(503, ConnectionError("refused"), 200)
        n = notifier(poster)
        with capture_logs() as logs:
            n.notify(failing("a", T, 500, None, T))
            n.close()
        assert len(poster.got) == 3
        assert [line["event"] for line in logs] == ["notification sent"]
        assert logs[0]["attempt"] == 3

        refused = Poster(400)
        n = notifier(refused)
        with capture_logs() as logs:
            n.notify(failing("a", T, 500, None, T))
            n.close()
        assert len(refused.got) == 1
        assert logs[-1]["event"] == "notification not delivered" and logs[-1]["error"] == "HTTP 400"

        down = Poster(ConnectionError("refused"))
        n = notifier(down)
        with capture_logs() as logs:
            n.notify(failing("a", T, 500, None, T))
            n.close()
        assert len(down.got) == 3  # NOTIFY_ATTEMPTS
        assert "ConnectionError: refused" in logs[-1]["error"]


# -- which events the failure policy tells -------------------------------------------------


class Collect:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def notify(self, event: Any) -> None:
        self.events.append(event)


def result(outcome: str, status: int | None) -> CallResult:
    return CallResult(job="j", slot=T, key="j@1", outcome=outcome, attempts=1,  # type: ignore[arg-type]
                      status=status, error=None, duration=0.1)  # fmt: skip


def test_failing_once_per_run_recovered_with_the_count_and_auto_paused() -> None:
    store = MemoryStateStore()
    told = Collect()
    policy = FailurePolicy(store, log=LOG, metrics=Metrics(), notifier=told,  # type: ignore[arg-type]
                           now=lambda: T)  # fmt: skip
    job = Job(name="j", schedule=parse("every 1m"), endpoint="/j", pause_after_failures=3)
    for n, (outcome, status) in enumerate([("failed", 500), ("failed", 500), ("success", 200),
                                           ("busy", 409), ("failed", 500), ("failed", 500),
                                           ("failed", 500)]):  # fmt: skip
        before = store.job_state("j").failures
        store.record_run(RunRecord(job="j", slot=T + timedelta(minutes=n), key=f"j@{n}",
                                   attempt=1, started=T, outcome=outcome,  # type: ignore[arg-type]
                                   status=status))  # fmt: skip
        policy.settled(job, result(outcome, status), before)
    assert [(e.kind, e.data) for e in told.events] == [
        ("failing", {"slot": "2026-11-22T03:00:00.000Z", "status": 500, "error": None}),
        ("recovered", {"slot": "2026-11-22T03:00:00.000Z", "failed_slots": 2}),
        ("failing", {"slot": "2026-11-22T03:00:00.000Z", "status": 500, "error": None}),
        ("auto_paused", {"reason": "auto-paused after 3 consecutive failures",
                         "consecutive_failures": 3}),
    ]  # fmt: skip


def test_missed_slots_are_one_message_however_many_slots() -> None:
    from services.scheduler.clock import Scheduler
    from tests.support import RecordingFirer, VirtualClock

    clock = VirtualClock(T)
    told = Collect()
    store = MemoryStateStore()
    scheduler = Scheduler(jobs=[Job(name="j", schedule=parse("every 1m"), endpoint="/j")],
                          firer=RecordingFirer(), store=store, clock=clock, log=LOG,
                          tick_seconds=30, notifier=told)  # type: ignore[arg-type]  # fmt: skip
    scheduler.start(clock.now())
    clock.advance(61)
    scheduler.fire_due(clock.now())
    clock.set(clock.now() + timedelta(minutes=10))  # the wall clock jumps: 9 slots missed
    scheduler.fire_due(clock.now())
    ((event,),) = [[e for e in told.events if e.kind == "missed"]]
    assert event.data["count"] == 9 and event.job == "j"
    assert "missed 9 slots" in event.text and "catchup=latest" in event.text
