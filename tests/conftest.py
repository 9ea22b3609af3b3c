"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (free port, temporary directory, nothing shared)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not on PATH (apt-get install redis-server); Redis tests need it"
        )
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, binary).start()
    yield server
    server.stop()
