"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import PostgresServer, RedisServer, find_initdb, free_port


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


def _postgres() -> PostgresServer:
    initdb = find_initdb()
    if initdb is None:
        pytest.skip("initdb is not on PATH (apt-get install postgresql); PostgreSQL tests need it")
    return PostgresServer(initdb).start()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session's tests that do not stop it; each of them gets a
    database of its own (`postgres_url`), so no state is shared."""
    server = _postgres()
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database in the session's cluster, for this test alone."""
    name = f"t{abs(hash(request.node.nodeid)) % 10**12}_{free_port()}"
    return postgres_cluster.create_database(name)


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own: for tests that stop, restart or kill it."""
    server = _postgres()
    yield server
    server.remove()
