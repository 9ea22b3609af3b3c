"""Issue 16's rule, as a property over every setting and job field: `check` exit 0 means a
call goes out and is recorded; otherwise exit 2 with one line, no traceback, no secret.

The configuration is real (a TOML jobs file and an environment), and so is the call: `fire`
sends it to an HTTP server on loopback. tests/integration/test_bad_input.py runs a sample of
the same pools through the daemon as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.scheduler.__main__ import main
from tests.fuzz_inputs import (
    JOB_FIELDS,
    OMIT,
    SECRET,
    SETTINGS,
    environment,
    jobs_toml,
    refused,
)
from tests.scheduler.test_admin import World
from tests.support import Target


@st.composite
def configurations(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], frozenset[str]]:
    """Good values everywhere, except in `broken` (none, one or two fields or settings)."""
    names = sorted(JOB_FIELDS) + sorted(SETTINGS)
    count = draw(st.sampled_from([0, 0, 1, 1, 2]))
    broken = frozenset(draw(st.permutations(names))[:count])

    def pick(pools: dict[str, tuple[list[Any], list[Any]]]) -> dict[str, Any]:
        return {name: draw(st.sampled_from(pools[name][name in broken])) for name in pools}

    return pick(JOB_FIELDS), pick(SETTINGS), broken


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def run(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, env)
    return code, out.getvalue(), err.getvalue()


def assert_one_clear_line(code: int, out: str, err: str) -> None:
    assert code == 2, (code, out, err)
    assert err.startswith("cronclock: config error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and SECRET not in err, err


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(configuration=configurations())
def test_check_accepts_only_what_fires(
    target: Target, configuration: tuple[dict[str, Any], dict[str, Any], frozenset[str]]
) -> None:
    fields, chosen, broken = configuration
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobs.toml"
        path.write_text(jobs_toml(fields))
        env = environment(chosen, target=target.url, tmp=tmp, jobs_file=str(path))
        code, out, err = run(["check"], env)
        why = ", ".join(sorted(broken)) or refused(fields, chosen)
        if why:
            event("refused by check")
            assert code == 2, f"check accepted a bad {why}: {out}"
            assert_one_clear_line(code, out, err)
            return
        event("accepted by check, then fired")
        assert code == 0, err
        assert SECRET not in out
        before = len(target.calls())
        code, out, err = run(["fire", "x"], env)
        assert code == 0, (out, err)  # the target answers 200 at once
        assert out.startswith("x: success (HTTP 200)")
        assert "crashed" not in err and "Traceback" not in err
        assert SECRET not in out and SECRET not in err
        assert target.wait_for(lambda calls: len(calls) == before + 1, timeout=5)
        assert target.calls()[before].header("X-Scheduler-Job") == "x"


# The fields of a job that a runtime schedule has too (PUT /api/schedules/{id}).
CALL_FIELDS = {
    k: v for k, v in JOB_FIELDS.items() if k not in ("enabled", "spread", "run_on_start")
}


@st.composite
def put_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], frozenset[str]]:
    count = draw(st.sampled_from([0, 0, 1, 1, 2]))
    broken = frozenset(draw(st.permutations(sorted(CALL_FIELDS)))[:count])
    chosen = {
        name: draw(st.sampled_from(pools[name in broken])) for name, pools in CALL_FIELDS.items()
    }
    return {k: v for k, v in chosen.items() if v is not OMIT}, broken


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(put=put_bodies())
def test_a_put_body_is_stored_and_fires_or_is_a_json_422(
    world: World, put: tuple[dict[str, Any], frozenset[str]]
) -> None:
    body, broken = put
    id = f"fuzz-{uuid.uuid4().hex[:12]}"
    response = world.client.put(  # json.dumps writes NaN and Infinity, as some clients do
        f"/api/schedules/{id}", content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert response.headers["content-type"] == "application/json"
    assert SECRET not in response.text
    if broken:
        event("refused with 422")
        assert response.status_code == 422, f"a bad {', '.join(broken)} was stored: {response.text}"
        assert response.json()["error"]
        return
    event("stored, then fired")
    assert response.status_code == 201, response.text
    record = world.schedules.store.get_schedule(id)
    assert record is not None
    job = world.schedules.job(record)
    sent = len(world.requests)
    slot = world.clock.now()  # due now: the call goes out at once
    result = world.dispatcher.call(job, slot, key=f"{job.name}@1", deadline=None)
    assert result.outcome == "success", result.error
    assert len(world.requests) == sent + 1
