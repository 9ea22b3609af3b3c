"""Runtime schedules through the admin API (TestClient, virtual time): every endpoint, every
validation, firing, endings, retention, on the memory, SQLite and Redis stores."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from services.scheduler.schedules import RuntimeSchedules, ScheduleSpec
from services.scheduler.stores.protocols import Put, StoreUnavailable
from services.scheduler.stores.redis import RedisSchedules, RedisStateStore
from services.scheduler.stores.sqlite import SqliteSchedules, SqliteStateStore
from tests.scheduler.test_admin import T0, World
from tests.support import RedisServer

LOG = structlog.get_logger()
SOON = T0 + timedelta(seconds=53)  # 10:01:00


def at(instant: datetime) -> str:
    return f"at {instant.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"


def body(**fields: Any) -> dict[str, Any]:
    return {"schedule": at(SOON), "endpoint": "/api/remind"} | fields


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def redis_world(server: RedisServer, **kwargs: Any) -> World:
    """A World on Redis state, holding the lease (claims check it)."""
    server.client().set("cc:leader", "me")
    store = RedisStateStore(server.client(), namespace="cc", lease_value="me", claim_ttl=300,
                            log=LOG)  # fmt: skip
    return World(store=store, schedule_store=RedisSchedules(server.client(), store,
                                                            namespace="cc", log=LOG), **kwargs)  # fmt: skip


def make_world(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **kwargs: Any) -> World:
    if kind == "memory":
        return World(**kwargs)
    if kind == "sqlite":
        store = SqliteStateStore(tmp_path / "state.db", log=LOG)
        return World(store=store, schedule_store=SqliteSchedules(store), **kwargs)
    return redis_world(request.getfixturevalue("redis_server"), **kwargs)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = make_world(request.param, request, tmp_path)
    yield w
    w.close()
    w.store.close()


def calls(world: World) -> list[Any]:
    """The calls of runtime schedules (the World's static jobs fire too)."""
    return [r for r in world.requests if r.headers["X-Scheduler-Job"].startswith("schedule/")]


def run_until(world: World, instant: datetime) -> None:
    """Let the loop fire everything due up to `instant` (once the calls before are over)."""
    assert eventually(lambda: not world.dispatcher.in_flight())
    world.clock.set(instant)
    world.scheduler.fire_due(world.clock.now())


def status(world: World, id: str) -> str:
    return str(world.client.get(f"/api/schedules/{id}").json()["status"])


class TestPut:
    def test_create_then_the_same_again_then_a_replacement(self, world: World) -> None:
        created = world.client.put("/api/schedules/r1", json=body(group="reminders"))
        assert created.status_code == 201
        view = created.json()
        assert view["change"] == "created" and view["status"] == "active"
        assert view["revision"] == 1 and view["group"] == "reminders"
        assert view["schedule"] == "at 2026-11-22T10:01+00:00" and view["timezone"] == "UTC"
        assert view["next_run"] == "2026-11-22T10:01:00.000Z"
        assert view["method"] == "POST" and view["endpoint"] == "/api/remind"

        again = world.client.put("/api/schedules/r1", json=body(group="reminders"))
        assert again.status_code == 200
        assert again.json()["change"] == "unchanged" and again.json()["revision"] == 1

        later = SOON + timedelta(minutes=5)
        replaced = world.client.put(
            "/api/schedules/r1", json=body(schedule=at(later), group="reminders")
        )
        assert replaced.status_code == 200
        assert replaced.json()["change"] == "replaced" and replaced.json()["revision"] == 2
        assert replaced.json()["next_run"] == "2026-11-22T10:06:00.000Z"
        assert replaced.json()["created"] == view["created"]

    def test_every_field_is_kept(self, world: World) -> None:
        full = body(
            schedule="daily 09:00",
            timezone="Asia/Makassar",
            method="put",
            headers={"X-User": "42"},
            body={"user": 42, "text": "hello"},
            timeout="10s",
            retries=2,
            overlap="queue",
            catchup="none",
            misfire_grace=60,
            group="digest",
            expires_at="2026-12-01T00:00:00+08:00",
        )
        view = world.client.put("/api/schedules/digest-42", json=full).json()
        assert view["schedule"] == "daily 09:00 in Asia/Makassar"
        assert view["timezone"] == "Asia/Makassar" and view["method"] == "PUT"
        assert view["headers"] == {"X-User": "42"}
        assert view["body"] == {"user": 42, "text": "hello"}
        assert (view["timeout"], view["retries"], view["overlap"]) == (10.0, 2, "queue")
        assert (view["catchup"], view["misfire_grace"]) == ("none", 60.0)
        assert view["expires_at"] == "2026-11-30T16:00:00.000Z"
        assert view["next_run"] == "2026-11-23T01:00:00.000Z"
        assert view["next_run_local"] == "2026-11-23T09:00:00+08:00"

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"schedule": None}, "schedule"),
            ({"schedule": "every fortnight"}, "schedule: "),
            ({"schedule": "daily 25:00"}, "schedule: "),
            ({"endpoint": "http://evil.example/x"}, "endpoint="),
            ({"endpoint": "//evil.example/x"}, "must be a path under API_URL"),
            ({"endpoint": "/api/../admin"}, "'..' segments"),
            ({"endpoint": "/api/x y"}, "must be a path under API_URL"),
            ({"endpoint": "/" + "a" * 3000}, "endpoint="),
            ({"method": "TRACE"}, "method='TRACE'"),
            ({"headers": {"Authorization": "Bearer x"}}, "cronclock sets Authorization itself"),
            ({"headers": {"Idempotency-Key": "x"}}, "cronclock sets Idempotency-Key itself"),
            ({"headers": {"bad name": "x"}}, "not a valid header name"),
            ({"headers": {"X-A": "a\r\nX-B: b"}}, "no line breaks, control"),
            ({"headers": {f"X-{n}": "v" for n in range(33)}}, "at most 32 headers"),
            ({"headers": {"X-Big": "v" * 9000}}, "at most 8192"),
            ({"body": {"text": "x" * 70_000}}, "at most 65536"),
            ({"timeout": 0}, "timeout=0"),
            ({"timeout": "forever"}, "not a duration"),
            ({"retries": 21}, "retries=21"),
            ({"timezone": "Mars/Olympus"}, "timezone"),
            ({"group": "no spaces"}, "group='no spaces'"),
            ({"expires_at": "2026-11-22T09:00:00Z"}, "expires_at=2026-11-22 09:00:00+00:00"),
            ({"expires_at": "2026-11-22T10:00:30Z"}, "no slot before expires_at"),
            ({"schedule": at(T0 - timedelta(minutes=10))}, "more than misfire_grace (5m)"),
            ({"colour": "blue"}, "colour='blue': unknown field"),
            # Issue 16: each of these was a crash at run time or a plain-text 500.
            ({"misfire_grace": float("inf")}, "not a finite duration"),
            ({"misfire_grace": 1e308}, "at most 30d"),
            ({"misfire_grace": "99999999999d"}, "at most 30d"),
            ({"timeout": 1e-300}, "at least 10ms"),
            ({"body": {"x": float("nan")}}, "NaN or Infinity"),
            ({"body": [float("-inf")]}, "NaN or Infinity"),
            (
                {"body": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
                "nested deeper than 32",
            ),
            ({"headers": {"X-A": "secret-\u00e9"}}, "visible ASCII"),
            ({"headers": {"Host": "admin.internal"}}, "hop-by-hop or framing"),
            ({"headers": {"Content-Length": "1"}}, "hop-by-hop or framing"),
            ({"retries": True}, "retries=True"),
            ({"timezone": ""}, "unknown time zone ''"),
            ({"timezone": "Berlin"}, "did you mean 'Europe/Berlin'"),
            ({"schedule": "*/5 * * * *"}, "did you mean 'cron */5 * * * *'"),
        ],
    )
    def test_invalid_bodies_are_422_naming_the_field(
        self, world: World, fields: dict[str, Any], message: str
    ) -> None:
        sent = {k: v for k, v in (body() | fields).items() if v is not None}
        response = world.client.put(  # json.dumps writes NaN and Infinity, as some clients do
            "/api/schedules/bad", content=json.dumps(sent).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert response.status_code == 422, response.text
        assert message in response.json()["error"]
        assert "secret" not in response.text
        assert world.client.get("/api/schedules/bad").status_code == 404

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"schedule": "every 1m", "endpoint": "/x", "body": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            b'{"schedule": "every 1m", "endpoint": "/x", "misfire_grace": Infinity}',
            b'{"schedule": "every 1m", "endpoint": "/x", "misfire_grace": 1e308}',
            b'{"schedule": "every 1m", "endpoint": "/x", "body": NaN}',
        ],
        ids=["deeply nested", "Infinity", "1e308", "NaN"],
    )
    def test_json_python_reads_but_cannot_use_is_a_json_422(self, world: World, raw: bytes) -> None:
        response = world.client.put(
            "/api/schedules/bad", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code in (413, 422), response.text
        assert response.headers["content-type"] == "application/json"
        assert "error" in response.json()

    def test_the_body_must_be_a_json_object(self, world: World) -> None:
        not_json = world.client.put("/api/schedules/x", content=b"{nope")
        assert not_json.status_code == 422 and "JSON" in not_json.json()["error"]
        array = world.client.put("/api/schedules/x", json=[1, 2])
        assert array.status_code == 422 and "JSON object" in array.json()["error"]

    def test_an_oversized_request_is_413_before_it_is_read(self, world: World) -> None:
        response = world.client.put(
            "/api/schedules/x", content=b"{" + b" " * 300_000 + b"}",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert response.status_code == 413

    def test_a_chunked_request_is_413_once_the_limit_is_read(self, world: World) -> None:
        sent = 0

        def chunks() -> Iterator[bytes]:
            nonlocal sent
            for _ in range(64):  # 4 MiB, with no Content-Length to check up front
                sent += 65536
                yield b" " * 65536

        response = world.client.put("/api/schedules/x", content=chunks(),
                                    headers={"Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 413 and "at most 262144" in response.json()["error"]

    @pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
    def test_no_page_loads_a_third_party_script(self, world: World, path: str) -> None:
        assert world.client.get(path).status_code == 404
        page = world.client.get("/")
        assert '<script src="http' not in page.text and "cdn." not in page.text

    @pytest.mark.parametrize("id", ["-starts-with-dash", "has/slash", "a" * 129, "sp ace", "a@b"])
    def test_a_bad_id_is_422(self, world: World, id: str) -> None:
        response = world.client.put(f"/api/schedules/{id}", json=body())
        assert response.status_code in (404, 422)  # a slash never reaches the route

    def test_a_time_just_past_within_its_grace_fires_at_once(self, world: World) -> None:
        view = world.client.put(
            "/api/schedules/now", json=body(schedule=at(T0 - timedelta(seconds=7)))
        ).json()
        assert view["next_run"] == "2026-11-22T10:00:00.000Z"
        run_until(world, T0)
        assert eventually(lambda: len(calls(world)) == 1)

    @pytest.mark.parametrize("kind", ["memory", "redis"])
    def test_the_limit_counts_active_schedules(
        self, kind: str, request: pytest.FixtureRequest
    ) -> None:
        world = (
            World(limit=2)
            if kind == "memory"
            else redis_world(request.getfixturevalue("redis_server"), limit=2)
        )
        for id in ("a", "b"):
            assert world.client.put(f"/api/schedules/{id}", json=body()).status_code == 201
        refused = world.client.put("/api/schedules/c", json=body())
        assert refused.status_code == 422
        assert "limit is 2" in refused.json()["error"]
        assert "SCHEDULER_MAX_RUNTIME_SCHEDULES" in refused.json()["error"]
        assert world.client.put("/api/schedules/a", json=body(retries=1)).status_code == 200
        world.client.delete("/api/schedules/b")
        assert world.client.put("/api/schedules/c", json=body()).status_code == 201
        world.close()

    def test_without_the_token_nothing_is_created(self, world: World) -> None:
        from fastapi.testclient import TestClient

        anonymous = TestClient(world.app)
        assert anonymous.put("/api/schedules/x", json=body()).status_code == 401
        assert anonymous.get("/api/schedules").status_code == 401
        assert anonymous.get("/api/schedules/x").status_code == 401
        assert anonymous.delete("/api/schedules/x").status_code == 401
        assert world.client.get("/api/schedules/x").status_code == 404


class TestBatch:
    """Issue 18: POST /api/schedules:batch creates or replaces up to 1,000, all or none."""

    def test_creates_replaces_and_unchanged_in_one_request_then_each_fires_once(
        self, world: World
    ) -> None:
        assert world.client.put("/api/schedules/b0", json=body()).status_code == 201
        assert world.client.put("/api/schedules/b1", json=body()).status_code == 201
        sent = [{"id": "b0", **body()}, {"id": "b1", **body(retries=1)},
                *({"id": f"b{n}", **body(group="bulk")} for n in range(2, 6))]  # fmt: skip
        answer = world.client.post("/api/schedules:batch", json={"schedules": sent})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert (result["created"], result["replaced"], result["unchanged"]) == (4, 1, 1)
        assert [item["id"] for item in result["schedules"]] == [f"b{n}" for n in range(6)]
        assert [item["change"] for item in result["schedules"]] == [
            "unchanged", "replaced", "created", "created", "created", "created"]  # fmt: skip
        assert result["schedules"][1]["revision"] == 2
        assert {item["first_slot"] for item in result["schedules"]} == {"2026-11-22T10:01:00.000Z"}
        groups = world.client.get("/api/schedules", params={"group": "bulk"}).json()
        assert [item["id"] for item in groups["schedules"]] == ["b2", "b3", "b4", "b5"]
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 6)
        run_until(world, SOON + timedelta(minutes=1))
        assert len(calls(world)) == 6
        keys = [r.headers["X-Scheduler-Job"] for r in calls(world)]
        assert sorted(keys) == [f"schedule/b{n}" for n in range(6)]

    def test_what_a_batch_stored_runs_as_it_was_parsed_to_validate_it(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Issue 18: the loop plans a stored batch from the parse that validated it (a stored
        definition is not parsed again), and that parse is the one a fresh read would give:
        revision, anchor and all (also for a replacement and an unchanged re-PUT)."""
        assert world.client.put("/api/schedules/p0", json=body()).status_code == 201
        sent = [{"id": "p0", **body()}, {"id": "p1", **body(retries=2, timezone="Asia/Makassar")},
                {"id": "p2", **body(group="g")}]  # fmt: skip
        parses: list[str] = []
        real = ScheduleSpec.model_validate_json

        def counted(data: Any, *args: Any, **kwargs: Any) -> ScheduleSpec:
            parses.append(data)
            return real(data, *args, **kwargs)

        monkeypatch.setattr(ScheduleSpec, "model_validate_json", counted)
        assert (
            world.client.post("/api/schedules:batch", json={"schedules": sent}).status_code == 200
        )
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 3)
        assert parses == []  # planned and answered from the validating parse
        fresh = RuntimeSchedules(world.schedules.store, timezone="UTC")
        records = world.schedules.store.get_schedules(["p0", "p1", "p2"])
        for id, record in records.items():
            kept, parsed = world.schedules.job(record), fresh.job(record)
            assert kept == parsed and kept.body == parsed.body, id
            assert (kept.revision, kept.anchor) == (record.revision, record.anchor)
        assert len(parses) == 3  # the fresh reader did parse

    @pytest.mark.parametrize(
        ("sent", "error"),
        [
            (
                [{"id": "ok", **body()}, {"id": "bad", **body(schedule="every fortnight")}],
                "schedules[1] (id 'bad'): schedule: invalid schedule 'every fortnight'",
            ),
            (
                [{"id": "ok", **body()}, {"id": "ok", **body()}],
                "schedules[1] (id 'ok'): this id appears twice in the batch",
            ),
            (
                [{"id": "no spaces", **body()}],
                "schedules[0] (id 'no spaces'): id 'no spaces': use 1-128 letters",
            ),
            (
                [{"id": "ok", **body(), "colour": "red"}],
                "schedules[0] (id 'ok'): colour='red': unknown field",
            ),
            ([body()], 'schedules[0]: expected an object with an "id"'),
            ([], "schedules: 0 given; send 1 to 1000"),
            ([{"id": f"s{n}", **body()} for n in range(1001)], "schedules: 1001 given"),
        ],
    )
    def test_one_bad_schedule_refuses_the_batch_and_stores_nothing(
        self, world: World, sent: list[dict[str, Any]], error: str
    ) -> None:
        answer = world.client.post("/api/schedules:batch", json={"schedules": sent})
        assert answer.status_code == 422 and error in answer.json()["error"], answer.text
        assert world.client.get("/api/schedules").json()["schedules"] == []

    @pytest.mark.parametrize("bad", [[], {"schedules": "x"}, {"schedules": [], "more": 1}, "x"])
    def test_a_body_that_is_not_a_batch_is_refused(self, world: World, bad: Any) -> None:
        answer = world.client.post("/api/schedules:batch", json=bad)
        assert answer.status_code == 422 and "expected" in answer.json()["error"]

    @pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
    def test_a_batch_over_the_limit_stores_none_of_it(
        self, kind: str, request: pytest.FixtureRequest, tmp_path: Path
    ) -> None:
        world = make_world(kind, request, tmp_path, limit=3)
        for id in ("a", "b"):
            assert world.client.put(f"/api/schedules/{id}", json=body()).status_code == 201
        sent = [{"id": "a", **body(retries=2)}, {"id": "c", **body()}, {"id": "d", **body()}]
        refused = world.client.post("/api/schedules:batch", json={"schedules": sent})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert "2 active runtime schedules exist and this batch adds 2; the limit is 3" in error
        assert "nothing of the batch was stored" in error
        listed = world.client.get("/api/schedules").json()["schedules"]
        assert [(item["id"], item["revision"]) for item in listed] == [("a", 1), ("b", 1)]
        fits = world.client.post("/api/schedules:batch", json={"schedules": sent[:2]})
        assert fits.status_code == 200 and fits.json()["created"] == 1
        world.close()
        world.store.close()

    def test_without_the_token_nothing_is_created(self, world: World) -> None:
        from fastapi.testclient import TestClient

        sent = {"schedules": [{"id": "x", **body()}]}
        assert TestClient(world.app).post("/api/schedules:batch", json=sent).status_code == 401
        assert world.client.get("/api/schedules").json()["schedules"] == []


class TestReadAndCancel:
    def test_list_filters_by_status_and_group_a_page_at_a_time(self, world: World) -> None:
        for n in range(7):
            group = "even" if n % 2 == 0 else "odd"
            world.client.put(f"/api/schedules/s{n}", json=body(group=group))
        world.client.delete("/api/schedules/s0")
        page = world.client.get("/api/schedules", params={"limit": 3}).json()
        assert [s["id"] for s in page["schedules"]] == ["s0", "s1", "s2"]
        assert page["next_after"] == "s2"
        rest = world.client.get("/api/schedules", params={"limit": 3, "after": "s2"}).json()
        assert [s["id"] for s in rest["schedules"]] == ["s3", "s4", "s5"]
        last = world.client.get("/api/schedules", params={"limit": 3, "after": "s5"}).json()
        assert [s["id"] for s in last["schedules"]] == ["s6"] and last["next_after"] is None
        even = world.client.get("/api/schedules", params={"group": "even"}).json()
        assert [s["id"] for s in even["schedules"]] == ["s0", "s2", "s4", "s6"]
        active_even = world.client.get(
            "/api/schedules", params={"group": "even", "status": "active"}
        ).json()
        assert [s["id"] for s in active_even["schedules"]] == ["s2", "s4", "s6"]
        cancelled = world.client.get("/api/schedules", params={"status": "cancelled"}).json()
        assert [s["id"] for s in cancelled["schedules"]] == ["s0"]
        bad = world.client.get("/api/schedules", params={"status": "done"})
        assert bad.status_code == 422 and "status" in bad.json()["error"]

    def test_a_cancelled_schedule_never_fires(self, world: World) -> None:
        world.client.put("/api/schedules/c1", json=body())
        cancelled = world.client.delete("/api/schedules/c1")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished"]
        assert cancelled.json()["next_run"] is None
        assert world.client.delete("/api/schedules/c1").status_code == 200  # again: fine
        run_until(world, SOON + timedelta(seconds=1))
        time.sleep(0.2)
        assert calls(world) == []
        assert status(world, "c1") == "cancelled"

    def test_cancel_unknown_is_404_and_ended_is_409(self, world: World) -> None:
        assert world.client.delete("/api/schedules/nope").status_code == 404
        world.client.put("/api/schedules/done", json=body())
        run_until(world, SOON)
        assert eventually(lambda: status(world, "done") == "executed")
        ended = world.client.delete("/api/schedules/done")
        assert ended.status_code == 409 and "executed" in ended.json()["error"]

    def test_a_cancelled_schedule_put_again_is_armed_again(self, world: World) -> None:
        world.client.put("/api/schedules/c2", json=body())
        world.client.delete("/api/schedules/c2")
        again = world.client.put("/api/schedules/c2", json=body())
        assert again.json()["change"] == "replaced" and again.json()["status"] == "active"
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 1)


class TestFiring:
    def test_a_one_time_schedule_fires_once_like_a_job_then_is_executed(self, world: World) -> None:
        world.client.put(
            "/api/schedules/pay-7", json=body(headers={"X-Payment": "7"}, body={"id": 7})
        )
        run_until(world, SOON - timedelta(seconds=1))
        assert calls(world) == []
        run_until(world, SOON)
        assert eventually(lambda: status(world, "pay-7") == "executed")
        run_until(world, SOON + timedelta(hours=1))
        time.sleep(0.1)
        assert len(calls(world)) == 1
        request = calls(world)[0]
        assert request.url == "http://app/api/remind" and request.method == "POST"
        assert request.headers["X-Scheduler-Job"] == "schedule/pay-7"
        assert request.headers["X-Scheduled-For"] == "2026-11-22T10:01:00.000Z"
        assert request.headers["Idempotency-Key"] == f"schedule/pay-7@{int(SOON.timestamp())}000"
        assert request.headers["X-Payment"] == "7" and request.content == b'{"id":7}'
        view = world.client.get("/api/schedules/pay-7").json()
        assert view["finished"] and view["next_run"] is None
        assert view["last_run"]["outcome"] == "success" and view["last_run"]["status"] == 200
        assert [run["outcome"] for run in view["runs"]] == ["success"]

    def test_missed_beyond_its_grace_it_expires_without_a_call(self, world: World) -> None:
        world.client.put("/api/schedules/late", json=body(misfire_grace=30))
        run_until(world, SOON + timedelta(seconds=31))
        assert eventually(lambda: status(world, "late") == "expired")
        assert calls(world) == []
        runs = world.client.get("/api/schedules/late").json()["runs"]
        assert [run["outcome"] for run in runs] == ["missed"]

    def test_a_recurring_schedule_fires_each_slot_until_it_expires(self, world: World) -> None:
        world.client.put(
            "/api/schedules/tick",
            json=body(schedule="every 1m", expires_at="2026-11-22T10:03:30Z"),
        )
        for minute in (1, 2, 3):
            run_until(world, T0.replace(second=0) + timedelta(minutes=minute))
            assert eventually(lambda minute=minute: len(calls(world)) == minute)
        run_until(world, T0 + timedelta(minutes=10))
        assert eventually(lambda: status(world, "tick") == "expired")
        assert len(calls(world)) == 3

    def test_a_replacement_keeps_the_history(self, world: World) -> None:
        world.client.put("/api/schedules/h", json=body(schedule="every 1m"))
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 1)
        world.client.put("/api/schedules/h", json=body(schedule="every 1m", retries=3))
        run_until(world, SOON + timedelta(minutes=1))
        assert eventually(lambda: len(calls(world)) == 2)
        view = world.client.get("/api/schedules/h").json()
        assert view["revision"] == 2 and len(view["runs"]) == 2
        keys = [request.headers["Idempotency-Key"] for request in calls(world)]
        assert len(set(keys)) == 2

    def test_metrics_count_runtime_schedules_by_group(self, world: World) -> None:
        world.client.put("/api/schedules/m1", json=body(group="mail"))
        world.client.put("/api/schedules/m2", json=body())
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 2)
        assert eventually(lambda: status(world, "m1") == status(world, "m2") == "executed")
        text = world.client.get("/metrics").text
        runs = {
            sample.labels["job"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "cronclock_job_runs_total"
        }
        assert runs == {"schedules/mail": 1.0, "schedules": 1.0}
        assert "schedule/m1" not in text

    def test_ended_schedules_are_purged_after_the_retention_active_ones_never(
        self, world: World
    ) -> None:
        world.client.put("/api/schedules/old", json=body())
        world.client.put("/api/schedules/forever", json=body(schedule="every 1h"))
        run_until(world, SOON)
        assert eventually(lambda: status(world, "old") == "executed")
        run_until(world, SOON + timedelta(days=6))
        assert world.client.get("/api/schedules/old").status_code == 200
        world.clock.advance(120)  # past the purge interval (monotonic)
        run_until(world, SOON + timedelta(days=7, minutes=1))
        assert world.client.get("/api/schedules/old").status_code == 404
        assert world.store.runs("schedule/old") == []
        assert status(world, "forever") == "active"


class TestPutsThatComeTogether:
    """Issue 18: single PUTs that arrive while others are stored are stored together (one
    transaction), each judged as if it came alone, in order."""

    @pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
    def test_each_is_judged_alone_and_in_order(
        self, kind: str, request: pytest.FixtureRequest, tmp_path: Path
    ) -> None:
        world = make_world(kind, request, tmp_path, limit=3)
        try:
            assert world.client.put("/api/schedules/old", json=body()).status_code == 201
            outcomes = world.schedules.put_each(
                [("a", body()), ("bad", body(schedule="every fortnight")), ("a", body()),
                 ("a", body(retries=2)), ("old", body()), ("b", body()), ("c", body())],
                world.clock.now(),
            )  # fmt: skip
            changes = [o[1] if isinstance(o, tuple) else type(o).__name__ for o in outcomes]
            assert changes == ["created", "ScheduleInvalid", "unchanged", "replaced",
                               "unchanged", "created", "LimitReached"]  # fmt: skip
            assert [o[0].revision for o in outcomes if isinstance(o, tuple)] == [1, 1, 2, 1, 1]
            assert "the limit is 3" in str(outcomes[6])
            listed = world.client.get("/api/schedules").json()["schedules"]
            assert [item["id"] for item in listed] == ["a", "b", "old"]
        finally:
            world.close()
            world.store.close()

    def test_puts_that_wait_for_a_running_one_are_stored_in_one_call(self) -> None:
        from services.scheduler.admin import Together

        groups: list[list[int]] = []
        release = threading.Event()

        def handle(items: list[int]) -> list[int]:
            groups.append(items)
            if len(groups) == 1:
                release.wait(5)
            return [item * 10 for item in items]

        async def main() -> list[int]:
            together = Together(handle)
            first = asyncio.ensure_future(together(1))
            await asyncio.sleep(0.05)  # the first is being handled
            rest = [asyncio.ensure_future(together(n)) for n in (2, 3, 4)]
            await asyncio.sleep(0.01)
            release.set()
            return [await first] + [await one for one in rest]

        assert asyncio.run(main()) == [10, 20, 30, 40]
        assert groups == [[1], [2, 3, 4]]

    def test_a_handler_that_raises_fails_its_group_and_the_next_goes_on(self) -> None:
        from services.scheduler.admin import Together

        def handle(items: list[int]) -> list[int]:
            if 0 in items:
                raise RuntimeError("boom")
            return items

        async def main() -> tuple[BaseException | None, int]:
            together = Together(handle)
            failed = await asyncio.gather(together(0), return_exceptions=True)
            return failed[0] if isinstance(failed[0], BaseException) else None, await together(5)

        error, answer = asyncio.run(main())
        assert isinstance(error, RuntimeError) and answer == 5


class TestPlanningWhatWasStored:
    """Issue 18: a schedule this process stored is planned from the record it stored (no read
    back, no second parse); a change announced without its record is read."""

    @staticmethod
    def counting_reads(world: World, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
        reads: list[list[str]] = []
        store = world.schedules.store
        original = store.get_schedules

        def get_schedules(ids: Any) -> dict[str, Any]:
            ids = list(ids)
            reads.append(ids)
            return original(ids)

        monkeypatch.setattr(store, "get_schedules", get_schedules)
        return reads

    def test_a_put_is_planned_from_its_stored_record(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reads = self.counting_reads(world, monkeypatch)
        parsed = []
        original = world.schedules._job
        monkeypatch.setattr(world.schedules, "_job",
                            lambda *a, **k: parsed.append(a[0]) or original(*a, **k))  # fmt: skip
        assert world.client.put("/api/schedules/p1", json=body()).status_code == 201
        reads.clear()
        world.scheduler.fire_due(world.clock.now())
        assert world.scheduler.planned_schedule("schedule/p1") == SOON
        assert reads == []
        assert parsed == ["p1"]  # parsed once, to validate it: the answer and the loop use that
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 1)

    def test_a_change_announced_without_its_record_is_read(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reads = self.counting_reads(world, monkeypatch)
        assert world.client.put("/api/schedules/p2", json=body()).status_code == 201
        world.scheduler.schedules_changed(["p2"])  # as another replica's change would come
        reads.clear()
        world.scheduler.fire_due(world.clock.now())
        assert reads == [["p2"]]
        assert world.scheduler.planned_schedule("schedule/p2") == SOON

    def test_an_older_record_handed_over_late_is_not_planned(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert world.client.put("/api/schedules/p3", json=body()).status_code == 201
        world.scheduler.fire_due(world.clock.now())
        old = world.schedules.store.get_schedules(["p3"])["p3"]
        later = SOON + timedelta(minutes=5)
        assert (
            world.client.put("/api/schedules/p3", json=body(schedule=at(later))).status_code == 200
        )
        world.scheduler.fire_due(world.clock.now())
        assert world.scheduler.planned_schedule("schedule/p3") == later
        world.scheduler.schedules_changed(["p3"], records={"p3": old})  # revision 1, after 2
        world.scheduler.fire_due(world.clock.now())
        assert world.scheduler.planned_schedule("schedule/p3") == later


def test_sqlite_keeps_schedules_and_a_new_process_plans_them(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path, log=LOG)
    first = World(store=store, schedule_store=SqliteSchedules(store))
    first.client.put("/api/schedules/p1", json=body())
    first.client.put("/api/schedules/p2", json=body(schedule="every 1m"))
    run_until(first, SOON)
    assert eventually(lambda: status(first, "p1") == "executed" and len(calls(first)) == 2)
    first.close()
    store.close()

    store = SqliteStateStore(path, log=LOG)
    second = World(store=store, schedule_store=SqliteSchedules(store), start=SOON + timedelta(
        seconds=30))  # fmt: skip
    assert status(second, "p1") == "executed"
    run_until(second, SOON + timedelta(minutes=1))
    assert eventually(lambda: len(calls(second)) == 1)
    assert calls(second)[0].headers["X-Scheduler-Job"] == "schedule/p2"
    second.close()
    store.close()


class TestRedis:
    def test_the_claim_refuses_a_cancelled_schedule_at_the_instant(
        self, redis_server: RedisServer
    ) -> None:
        world = redis_world(redis_server)
        world.client.put("/api/schedules/x", json=body())
        other = RedisSchedules(redis_server.client(), world.store, namespace="cc", log=LOG)  # type: ignore[arg-type]
        other.cancel_schedule("x", T0)  # another replica, not yet heard of here
        key = f"schedule/x@{int(SOON.timestamp())}000"
        assert world.store.mark_started([("schedule/x", SOON, key)]) == {key: "inactive"}
        run_until(world, SOON)
        time.sleep(0.2)
        assert calls(world) == []
        world.close()

    def test_runtime_jobs_stay_out_of_the_job_set_read_every_lease_cycle(
        self, redis_server: RedisServer
    ) -> None:
        world = redis_world(redis_server)
        world.client.put("/api/schedules/y", json=body(schedule="every 1m"))
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 1)
        assert isinstance(world.store, RedisStateStore)
        assert world.store.flush()
        client = redis_server.client()
        assert "schedule/y" not in client.smembers("cc:jobs")
        assert client.hget("cc:job:schedule/y", "last_slot")
        world.store.refresh()
        assert world.store.job_state("schedule/y").last_slot == SOON
        world.close()

    def test_changes_on_any_replica_reach_every_watcher(self, redis_server: RedisServer) -> None:
        state = RedisStateStore(redis_server.client(), namespace="cc", lease_value="a",
                                claim_ttl=300, log=LOG)  # fmt: skip
        a = RedisSchedules(redis_server.client(), state, namespace="cc", log=LOG,
                           block_seconds=0.1)  # fmt: skip
        b = RedisSchedules(redis_server.client(), state, namespace="cc", log=LOG)
        heard: list[list[str]] = []
        a.watch(heard.append)
        time.sleep(0.3)  # the watcher reads from now on
        b.put_schedules([Put(id="w1", spec="{}", group=None, anchor=T0, first=SOON)], now=T0,
                        limit=10)  # fmt: skip
        b.cancel_schedule("w1", T0)
        assert eventually(lambda: any("w1" in ids for ids in heard))
        a.close()
        state.close()


class TestTrouble:
    def test_a_store_away_at_planning_is_retried_and_the_loop_lives(self) -> None:
        world = World()
        world.client.put("/api/schedules/t1", json=body())
        store = world.schedules.store
        real = store.active_plan

        def away() -> Any:
            raise StoreUnavailable("cannot reach Redis at redis://r:6379/0: refused")

        store.active_plan = away  # type: ignore[method-assign]
        world.scheduler.start(world.clock.now())  # a new term while the store is away
        assert world.scheduler.seconds_until_next(world.clock.now()) <= 1.0  # retry soon
        store.active_plan = real  # type: ignore[method-assign]
        run_until(world, SOON)
        assert eventually(lambda: len(calls(world)) == 1)
        world.close()

    def test_a_stored_schedule_that_no_longer_validates_is_logged_and_skipped(
        self, world: World
    ) -> None:
        world.client.put("/api/schedules/ok", json=body())
        world.client.put("/api/schedules/broken", json=body())
        real = world.schedules.job

        def job(record: Any) -> Any:
            if record.id == "broken":
                raise ValueError("time zone 'Gone/Zone' is not known")
            return real(record)

        world.schedules.job = job  # type: ignore[method-assign]
        world.scheduler.start(world.clock.now())
        with capture_logs() as logs:
            run_until(world, SOON)
            assert eventually(lambda: len(calls(world)) == 1)
        assert calls(world)[0].headers["X-Scheduler-Job"] == "schedule/ok"
        unusable = [e for e in logs if e["event"] == "stored schedule unusable; not fired"]
        assert unusable[0]["job"] == "schedule/broken" and "Gone/Zone" in unusable[0]["error"]

    def test_a_state_file_that_refuses_writes_refuses_changes_with_503(
        self, tmp_path: Path
    ) -> None:
        store = SqliteStateStore(tmp_path / "state.db", log=LOG)
        world = World(store=store, schedule_store=SqliteSchedules(store))
        assert world.client.put("/api/schedules/kept", json=body()).status_code == 201
        assert store._db is not None
        with store._lock:
            store._db.execute("PRAGMA query_only = 1")  # every write now fails
        refused = world.client.put("/api/schedules/new", json=body())
        assert refused.status_code == 503 and "readonly" in refused.json()["error"]
        cancel = world.client.delete("/api/schedules/kept")
        assert cancel.status_code == 503
        with store._lock:
            store._db.execute("PRAGMA query_only = 0")
        assert world.client.get("/api/schedules/new").status_code == 404
        assert status(world, "kept") == "active"
        assert world.client.put("/api/schedules/new", json=body()).status_code == 201
        world.close()
        store.close()

    def test_redis_away_is_503_and_nothing_is_half_done(self, redis_server: RedisServer) -> None:
        world = redis_world(redis_server)
        assert world.client.put("/api/schedules/kept", json=body()).status_code == 201
        redis_server.stop()
        refused = world.client.put("/api/schedules/new", json=body())
        assert refused.status_code == 503 and "Redis" in refused.json()["error"]
        assert world.client.get("/api/schedules").status_code == 503
        redis_server.start()
        assert world.client.get("/api/schedules/new").status_code == 404
        world.close()


class TestStatusPage:
    def test_the_page_is_served_with_health_and_a_strict_policy(self) -> None:
        from fastapi.testclient import TestClient

        world = World()
        page = TestClient(world.app).get("/")  # no token needed: it shows health only
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert 'data-status="ok"' in page.text and '<table id="jobs">' in page.text
        assert "data-refresh" not in page.text  # jobs only with the token
        script = TestClient(world.app).get("/ui/status.js")
        assert script.status_code == 200 and "sessionStorage" in script.text
        assert script.headers["content-type"].startswith("text/javascript")
        assert TestClient(world.app).get("/ui/status.css").status_code == 200
        assert TestClient(world.app).get("/ui/secrets.txt").status_code == 404
        world.clock.advance(120)
        stale = TestClient(world.app).get("/").text
        assert 'data-status="unhealthy"' in stale and "the clock loop has not run for 120s" in stale
        world.close()

    def test_the_overview_has_jobs_with_their_runs_and_the_groups(self, world: World) -> None:
        from fastapi.testclient import TestClient

        assert TestClient(world.app).get("/api/overview").status_code == 401
        world.client.put("/api/schedules/g1", json=body(group="mail"))
        world.client.put("/api/schedules/g2", json=body(group="mail"))
        world.client.put("/api/schedules/u1", json=body())
        world.client.delete("/api/schedules/g2")
        run_until(world, T0.replace(minute=15, second=0))
        assert eventually(lambda: not world.dispatcher.in_flight())
        overview = world.client.get("/api/overview", params={"runs": 5}).json()
        assert overview["health"]["status"] == "ok"
        jobs = {job["name"]: job for job in overview["jobs"]}
        assert set(jobs) == {"data-refresh", "nightly", "both"}
        assert [run["outcome"] for run in jobs["data-refresh"]["runs"]] == ["success"]
        assert jobs["nightly"]["runs"] == [] and jobs["nightly"]["timezone"] == "Asia/Makassar"
        # g1 and u1 ran at 10:01 (executed), g2 was cancelled
        assert overview["groups"] == [
            {"group": None, "active": 0, "ended": 1},
            {"group": "mail", "active": 0, "ended": 2},
        ]
        world.client.put("/api/schedules/g3", json=body(group="mail", schedule="every 1h"))
        groups = world.client.get("/api/overview").json()["groups"]
        assert groups[1] == {"group": "mail", "active": 1, "ended": 2}


class TestAScheduleThatCannotBeEvaluated:
    def test_put_answers_422_naming_the_schedule_instead_of_freezing(self) -> None:
        # Issue 15.9: at this instant cronsim's walk cycles for this text (issue 17); the
        # request must answer, not hang the admin thread.
        world = World(start=datetime(2026, 4, 4, 13, 55, tzinfo=UTC))
        try:
            text = "cron */5 3 * * * in Pacific/Chatham"
            answer = world.client.put("/api/schedules/chatham",
                                      json={"schedule": text, "endpoint": "/api/x"})  # fmt: skip
            if answer.status_code == 422:
                error = answer.json()["error"]
                assert error.startswith(f"schedule: {text!r}:") and "no next fire found" in error
            else:  # the evaluator was fixed: then it is simply created
                assert answer.status_code == 201, answer.text
            assert world.client.get("/healthz").status_code in (200, 503)
        finally:
            world.close()
            world.store.close()
