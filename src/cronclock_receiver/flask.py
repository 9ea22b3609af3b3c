"""Flask integration: `@receiver.flask` under the route decorator.

    @app.post("/api/reports/run")
    @receiver.flask
    def run_report(fire: Fire) -> Answer:
        return Answer.json({"report": "started"}, status=202)

The view's first parameter receives the verified Fire, then Flask's view arguments. It
returns an Answer, a Flask Response, None (204) or something JSON-able (200).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Response, request

from ._receiver import as_answer
from ._stores import Answer

if TYPE_CHECKING:
    from ._receiver import Receiver


def answer_of(result: Any) -> Answer:
    """A view's result as an Answer (a Response keeps its status, body and type)."""
    if isinstance(result, Response):
        return Answer(status=result.status_code, body=result.get_data(),
                      content_type=result.content_type or "text/plain")  # fmt: skip
    return as_answer(result)


def view(receiver: Receiver, handler: Callable[..., Any]) -> Callable[..., Response]:
    """The view Flask routes to: verify and claim the call, run the handler, answer."""

    @functools.wraps(handler)
    def call(**view_args: Any) -> Response:
        answer = receiver.handle(
            dict(request.headers.items()),
            request.get_data(),
            lambda fire: answer_of(handler(fire, **view_args)),
        )
        return Response(answer.body, status=answer.status, headers=answer.headers())

    return call
