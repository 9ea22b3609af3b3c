"""FastAPI (and Starlette) integration: `@receiver.fastapi` under the route decorator.

    @app.post("/api/reports/run", status_code=202)
    @receiver.fastapi
    def run_report(fire: Fire, region: str = Query("eu")) -> dict:
        ...

The handler's first parameter receives the verified Fire; its other parameters are FastAPI's
as usual (query, path, dependencies). It may be `async def`. It returns an Answer, a Starlette
Response with a body, None (204) or anything FastAPI can encode as JSON (200).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from starlette.concurrency import run_in_threadpool

from ._receiver import as_answer
from ._stores import Answer

if TYPE_CHECKING:
    from ._receiver import Receiver

_REQUEST = "_cronclock_request"


def answer_of(result: Any) -> Answer:
    """A handler's result as an Answer (a Response keeps its status, body and type)."""
    if isinstance(result, Response):
        if not isinstance(result.body, bytes):  # a streaming response has no body to keep
            raise TypeError("a cronclock handler must answer with a body, not a stream")
        return Answer(status=result.status_code, body=result.body,
                      content_type=result.headers.get("content-type", "text/plain"))  # fmt: skip
    if result is None or isinstance(result, Answer):
        return as_answer(result)
    return Answer.json(jsonable_encoder(result))


def response(answer: Answer) -> Response:
    return Response(answer.body, status_code=answer.status, headers=answer.headers())


def endpoint(receiver: Receiver, handler: Callable[..., Any]) -> Callable[..., Any]:
    """The endpoint FastAPI routes to: verify and claim the call, run the handler, answer."""
    hints = typing.get_type_hints(handler, include_extras=True)  # resolved in its own module
    parameters = list(inspect.signature(handler).parameters.values())
    if not parameters:
        raise TypeError(f"{handler.__name__} must take the Fire as its first parameter")
    others = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
        for p in parameters[1:]
    ]
    others.append(inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    is_async = inspect.iscoroutinefunction(handler)

    @functools.wraps(handler)
    async def call(**kwargs: Any) -> Response:
        request: Request = kwargs.pop(_REQUEST)
        body = await request.body()
        begun = await run_in_threadpool(receiver.begin, request.headers, body)
        if isinstance(begun, Answer):
            return response(begun)
        try:
            if is_async:
                result = await handler(begun, **kwargs)
            else:
                result = await run_in_threadpool(handler, begun, **kwargs)
            answer = answer_of(result)
        except BaseException:
            await run_in_threadpool(receiver.abandon, begun)
            raise
        return response(await run_in_threadpool(receiver.finish, begun, answer))

    call.__signature__ = inspect.Signature(others, return_annotation=Response)  # type: ignore[attr-defined]
    del call.__wrapped__  # FastAPI must read the signature above, not the handler's
    return call
