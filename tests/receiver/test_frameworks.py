"""The FastAPI and Flask integrations of the receiver helper, in process: what a decorated
handler receives and may return, its other parameters, replay and refusal as responses."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import flask
import pytest
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from cronclock_receiver import Answer, Fire, Receiver
from tests.receiver.test_receiver import call


class Region(Enum):
    EU = "eu"
    US = "us"


class Report(BaseModel):
    job: str
    region: Region


def fastapi_app(receiver: Receiver, runs: list[Fire]) -> TestClient:
    app = FastAPI()

    @app.post("/sync")
    @receiver.fastapi
    def sync(fire: Fire, region: Annotated[Region, Query()] = Region.EU) -> Report:
        runs.append(fire)
        return Report(job=fire.job, region=region)

    @app.post("/async")
    @receiver.fastapi
    async def later(fire: Fire) -> Answer:
        runs.append(fire)
        return Answer.json({"attempt": fire.attempt}, status=202)

    @app.post("/text")
    @receiver.fastapi
    def text(fire: Fire) -> PlainTextResponse:
        runs.append(fire)
        return PlainTextResponse("ok", status_code=201)

    @app.post("/stream")
    @receiver.fastapi
    def stream(fire: Fire) -> StreamingResponse:
        return StreamingResponse(iter([b"x"]))

    @app.post("/failing")
    @receiver.fastapi
    def failing(fire: Fire) -> JSONResponse:
        runs.append(fire)
        return JSONResponse({"error": "down"}, status_code=503)

    return TestClient(app, raise_server_exceptions=False)


class TestFastAPI:
    def test_the_handler_gets_the_fire_and_its_own_parameters(self) -> None:
        runs: list[Fire] = []
        client = fastapi_app(Receiver(token="tok"), runs)
        headers, _ = call()
        first = client.post("/sync?region=us", headers=headers)
        assert first.status_code == 200 and first.json() == {"job": "data-refresh", "region": "us"}
        again = client.post("/sync?region=us", headers=call(attempt=2)[0])
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        assert [fire.attempt for fire in runs] == [1]
        assert client.post("/sync?region=mars", headers=headers).status_code == 422  # FastAPI's

    def test_an_async_handler_and_a_response_are_kept_and_replayed(self) -> None:
        runs: list[Fire] = []
        client = fastapi_app(Receiver(token="tok"), runs)
        answers = [client.post("/async", headers=call(attempt=n)[0]) for n in (1, 2)]
        assert [(a.status_code, a.json()) for a in answers] == [(202, {"attempt": 1})] * 2
        texts = [client.post("/text", headers=call(attempt=n, key="data-refresh@manual-t")[0])
                 for n in (1, 2)]  # fmt: skip
        assert [(t.status_code, t.text) for t in texts] == [(201, "ok")] * 2
        assert texts[1].headers["content-type"].startswith("text/plain")
        assert len(runs) == 2

    def test_a_transient_answer_is_not_kept_and_a_refusal_is_an_answer(self) -> None:
        runs: list[Fire] = []
        client = fastapi_app(Receiver(token="tok"), runs)
        assert [client.post("/failing", headers=call(attempt=n)[0]).status_code
                for n in (1, 2)] == [503, 503]  # fmt: skip
        assert len(runs) == 2
        denied = client.post("/sync", headers=call(token="nope")[0])
        assert denied.status_code == 401 and denied.json()["refused"] == "unauthorized"

    def test_a_streamed_answer_cannot_be_kept_and_is_an_error(self) -> None:
        client = fastapi_app(Receiver(token="tok"), [])
        assert client.post("/stream", headers=call()[0]).status_code == 500
        assert client.post("/stream", headers=call(attempt=2)[0]).status_code == 500  # released

    def test_a_handler_without_a_fire_parameter_is_refused_when_decorated(self) -> None:
        with pytest.raises(TypeError, match="must take the Fire"):
            Receiver(token="tok").fastapi(lambda: None)


def flask_app(receiver: Receiver, runs: list[Fire]) -> Any:
    app = flask.Flask("test")

    @app.post("/jobs/<name>")
    @receiver.flask
    def job(fire: Fire, name: str) -> dict[str, Any]:
        runs.append(fire)
        return {"name": name, "attempt": fire.attempt}

    @app.post("/response")
    @receiver.flask
    def response(fire: Fire) -> flask.Response:
        runs.append(fire)
        return flask.Response("made", status=201, mimetype="text/plain")

    @app.post("/nothing")
    @receiver.flask
    def nothing(fire: Fire) -> None:
        runs.append(fire)

    return app.test_client()


class TestFlask:
    def test_the_view_gets_the_fire_and_its_view_arguments_and_a_retry_is_replayed(self) -> None:
        runs: list[Fire] = []
        client = flask_app(Receiver(token="tok"), runs)
        first = client.post("/jobs/reports", headers=call(attempt=1)[0])
        again = client.post("/jobs/reports", headers=call(attempt=2)[0])
        assert first.status_code == again.status_code == 200
        assert first.json == again.json == {"name": "reports", "attempt": 1}
        assert again.headers["Idempotent-Replayed"] == "true"
        assert len(runs) == 1

    def test_a_flask_response_or_nothing_is_kept_as_it_was(self) -> None:
        runs: list[Fire] = []
        client = flask_app(Receiver(token="tok"), runs)
        made = [client.post("/response", headers=call(attempt=n)[0]) for n in (1, 2)]
        assert [(m.status_code, m.data, m.mimetype) for m in made] == [
            (201, b"made", "text/plain")
        ] * 2
        empty = client.post("/nothing", headers=call(key="data-refresh@manual-n")[0])
        assert empty.status_code == 204 and empty.data == b""
        assert len(runs) == 2

    def test_a_refusal_is_an_answer_with_its_reason(self) -> None:
        client = flask_app(Receiver(token="tok"), [])
        denied = client.post("/jobs/x", headers=call(token="nope")[0])
        assert denied.status_code == 401 and denied.json["refused"] == "unauthorized"
