"""Property-based fuzz of the admin API from its own OpenAPI schema: no input makes it fail."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from tests.scheduler.test_admin import TOKEN, World

world = World()
schema = schemathesis.openapi.from_asgi("/openapi.json", world.app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_api_fail(case: schemathesis.Case) -> None:
    # With the token (to reach every handler) and as schemathesis generates it (to probe auth).
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    case.call_and_validate()
