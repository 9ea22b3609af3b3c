"""Property-based fuzz of the admin API from its own OpenAPI schema: no input makes it fail."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.scheduler.test_admin import TOKEN, World

world = World()
schema = schemathesis.openapi.from_asgi("/openapi.json", world.app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_api_fail(case: schemathesis.Case) -> None:
    # With the token (to reach every handler) and as schemathesis generates it (to probe auth).
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    # A schedule's text, time zone and times are checked beyond what JSON Schema can say
    # ("every fortnight" is a string): a schema-valid PUT body may rightly be 422.
    semantic = (case.method, case.path) in (("PUT", "/api/schedules/{id}"),
                                            ("POST", "/api/schedules:batch"))  # fmt: skip
    case.call_and_validate(excluded_checks=[positive_data_acceptance] if semantic else [])
