"""The store fixtures: every behaviour runs against both backends (SQLite, and Redis when
redis-server is installed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stores import REDIS_BIN, Factory, RedisServer, needs_redis

from serve.store import RedisStore, SQLiteStore


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_BIN is None:
        pytest.skip("redis-server not installed (.ci/run installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=needs_redis)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A factory, called inside the test's event loop (redis.asyncio binds to its loop)."""
    if request.param == "sqlite":
        db = tmp_path / "store.db"
        return lambda **kw: SQLiteStore(db, **kw)
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    return lambda **kw: RedisStore(server.url, **kw)
