"""Result store: both backends, same behaviour (serve/store/).

The Redis cases run against a real ``redis-server`` started on a free port (conftest.py,
support/stores.py); without the binary they are skipped. Long because every behaviour runs
against both backends.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from support.stores import REDIS_BIN, Factory, RedisServer, needs_redis, run

from serve.store import (
    ExplanationRecord,
    RedisStore,
    ResultStore,
    SQLiteStore,
    StoreUnavailable,
    open_store,
)

# Bytes a text round-trip would break: NUL, high bytes, CR/LF.
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


# --------------------------------------------------------------------------- both backends


def test_record_round_trip(make_store: Factory) -> None:
    record = {
        "request_id": "r1",
        "label": "fracture",
        "probabilities": {"fracture": 0.91, "non-affected": 0.05},
        "abstained": False,
        "note": "ünïcødé",
        "nested": [1, 2.5, None, {"a": True}],
    }

    async def scenario(store: ResultStore) -> None:
        assert await store.get_record("r1") is None
        await store.put_record("r1", record)
        assert await store.get_record("r1") == record
        await store.put_record("r1", {"v": 2})  # overwrite
        assert await store.get_record("r1") == {"v": 2}
        with pytest.raises(ValueError):
            await store.put_record("r2", {"x": 1}, ttl_s=0)
        with pytest.raises(ValueError):  # NaN is not JSON; refused rather than served broken
            await store.put_record("r3", {"p": float("nan")})

    run(make_store, scenario)


def test_put_records_writes_all_or_nothing(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await store.put_records([(f"b{i}", {"i": i}) for i in range(5)], ttl_s=60)
        assert [await store.get_record(f"b{i}") for i in range(5)] == [{"i": i} for i in range(5)]
        with pytest.raises(ValueError):  # one unserialisable record: none of the batch lands
            await store.put_records([("c1", {"i": 1}), ("c2", {"p": float("nan")})])
        assert await store.get_record("c1") is None
        await store.put_records([])  # nothing to write is not an error

    run(make_store, scenario)


def test_ttl_expiry(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await store.put_record("short", {"a": 1}, ttl_s=1)
        await store.put_record("forever", {"b": 2})
        await store.create_explanation("e-short", "short")
        assert await store.get_record("short") == {"a": 1}
        assert (await store.get_explanation("e-short")) is not None
        await asyncio.sleep(1.15)
        assert await store.get_record("short") is None
        assert await store.get_record("forever") == {"b": 2}
        assert await store.get_explanation("e-short") is None
        with pytest.raises(KeyError):
            await store.complete_explanation("e-short", {}, PNG)
        await store.put_record("short", {"a": 3}, ttl_s=60)  # id reusable after expiry
        assert await store.get_record("short") == {"a": 3}

    run(make_store, scenario, explanation_ttl_s=1)


def test_explanation_pending_to_done(make_store: Factory) -> None:
    result = {"label": "tumor-benign", "branches": {"resnet18": [0.1, 0.2, 0.6, 0.1]}}

    async def scenario(store: ResultStore) -> None:
        t0 = time.time()
        await store.create_explanation("e1", "r1")
        e = await store.get_explanation("e1")
        assert isinstance(e, ExplanationRecord)
        assert (e.id, e.request_id, e.state) == ("e1", "r1", "pending")
        assert (e.result, e.error, e.attempts) == (None, None, 0)
        assert t0 - 1 <= e.created_at <= time.time() + 1
        assert e.updated_at == e.created_at
        assert await store.get_explanation_png("e1") is None

        await asyncio.sleep(0.01)
        await store.complete_explanation("e1", result, PNG)
        d = await store.get_explanation("e1")
        assert d is not None
        assert (d.state, d.result, d.error) == ("done", result, None)
        assert d.created_at == e.created_at and d.updated_at > e.updated_at
        png = await store.get_explanation_png("e1")
        assert isinstance(png, bytes) and png == PNG

        await store.fail_explanation("e1", "late sweeper")  # done is terminal
        d2 = await store.get_explanation("e1")
        assert d2 is not None and d2.state == "done" and d2.error is None

    run(make_store, scenario)


def test_explanation_pending_to_failed(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await store.create_explanation("e1", "r1")
        await store.fail_explanation("e1", "explainer crashed 3 times")
        e = await store.get_explanation("e1")
        assert e is not None
        assert (e.state, e.error, e.result) == ("failed", "explainer crashed 3 times", None)
        assert await store.get_explanation_png("e1") is None

    run(make_store, scenario)


def test_unknown_ids(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        assert await store.get_record("nope") is None
        assert await store.get_explanation("nope") is None
        assert await store.get_explanation_png("nope") is None
        with pytest.raises(KeyError):
            await store.complete_explanation("nope", {}, PNG)
        with pytest.raises(KeyError):
            await store.fail_explanation("nope", "x")
        with pytest.raises(KeyError):
            await store.mark_attempt("nope")
        await store.create_explanation("e1", "r1")
        with pytest.raises(ValueError):  # ids are unique; a collision is a caller bug
            await store.create_explanation("e1", "r2")
        e = await store.get_explanation("e1")
        assert e is not None and e.request_id == "r1"

    run(make_store, scenario)


def test_attempts_counting(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await store.create_explanation("e1", "r1")
        assert [await store.mark_attempt("e1") for _ in range(3)] == [1, 2, 3]
        e = await store.get_explanation("e1")
        assert e is not None and e.attempts == 3 and e.state == "pending"
        # Concurrent increments are atomic: no lost updates.
        counts = await asyncio.gather(*(store.mark_attempt("e1") for _ in range(20)))
        assert sorted(counts) == list(range(4, 24))

    run(make_store, scenario)


def test_explanation_layers_live_with_it(make_store: Factory) -> None:
    """Overlay and layers: written with "done", served by kind, replaced and expired as one."""
    heat, grey = PNG[::-1], PNG + b"grey"

    async def scenario(store: ResultStore) -> None:
        await store.create_explanation("e1", "r1")
        assert await store.get_explanation_png("e1", "heatmap") is None  # pending: nothing
        await store.complete_explanation("e1", {"ok": 1}, PNG, {"heatmap": heat, "image": grey})
        assert await store.get_explanation_png("e1") == PNG
        assert await store.get_explanation_png("e1", "overlay") == PNG
        assert await store.get_explanation_png("e1", "heatmap") == heat
        assert await store.get_explanation_png("e1", "image") == grey
        await store.complete_explanation("e1", {"ok": 2}, PNG, {"image": heat})  # a rerun
        assert await store.get_explanation_png("e1", "heatmap") is None
        assert await store.get_explanation_png("e1", "image") == heat

        await store.create_explanation("e2", "r2")
        await store.complete_explanation("e2", {"ok": 1}, PNG)  # no layers
        assert await store.get_explanation_png("e2", "image") is None
        await store.create_explanation("e3", "r3")
        await store.complete_explanation("e3", {}, PNG, {"heatmap": heat})
        await asyncio.sleep(1.15)
        for kind in ("overlay", "heatmap"):
            assert await store.get_explanation_png("e3", kind) is None  # type: ignore[arg-type]
        await store.create_explanation("e3", "r3")  # the id is reusable: no stale layer
        await store.complete_explanation("e3", {}, PNG)
        assert await store.get_explanation_png("e3", "heatmap") is None

    run(make_store, scenario, explanation_ttl_s=1)


def test_concurrent_tasks(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        n = 40
        await asyncio.gather(
            *(store.put_record(f"r{i}", {"i": i}) for i in range(n)),
            *(store.create_explanation(f"e{i}", f"r{i}") for i in range(n)),
        )
        await asyncio.gather(
            *(store.complete_explanation(f"e{i}", {"i": i}, PNG) for i in range(0, n, 2)),
            *(store.fail_explanation(f"e{i}", "x") for i in range(1, n, 2)),
        )
        records = await asyncio.gather(*(store.get_record(f"r{i}") for i in range(n)))
        assert records == [{"i": i} for i in range(n)]
        expls = await asyncio.gather(*(store.get_explanation(f"e{i}") for i in range(n)))
        assert [e.state if e else None for e in expls] == ["done", "failed"] * (n // 2)

    run(make_store, scenario)


def test_ping(make_store: Factory) -> None:
    assert run(make_store, lambda store: store.ping()) is True


# --------------------------------------------------------------------------- SQLite


def test_sqlite_two_instances_share_file(tmp_path: Path) -> None:
    """Two replicas (separate connections) on one file see each other's writes."""
    db = tmp_path / "shared.db"

    async def main() -> None:
        a, b = SQLiteStore(db), SQLiteStore(db)
        try:
            await a.put_record("r1", {"from": "a"})
            assert await b.get_record("r1") == {"from": "a"}
            await b.create_explanation("e1", "r1")
            assert await a.mark_attempt("e1") == 1
            await a.complete_explanation("e1", {"ok": True}, PNG)
            e = await b.get_explanation("e1")
            assert e is not None and e.state == "done" and e.attempts == 1
            assert await b.get_explanation_png("e1") == PNG
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    with sqlite3.connect(db) as conn:  # WAL is persistent in the file: readers never block
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_concurrent_threads(tmp_path: Path) -> None:
    """Threads with their own store (replicas) and threads sharing one store do not error."""
    db = tmp_path / "conc.db"
    shared = SQLiteStore(db)
    asyncio.run(shared.create_explanation("counter", "r"))
    errors: list[BaseException] = []
    per_thread = 25

    def worker(t: int, own: bool) -> None:
        async def main() -> None:
            store = SQLiteStore(db) if own else shared
            try:
                for i in range(per_thread):
                    await store.put_record(f"t{t}-{i}", {"t": t, "i": i}, ttl_s=60)
                    await store.create_explanation(f"t{t}-e{i}", f"t{t}-{i}")
                    await store.mark_attempt("counter")
            finally:
                if own:
                    await store.close()

        try:
            asyncio.run(main())
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t, t % 2 == 0)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []

    async def check() -> None:
        e = await shared.get_explanation("counter")
        assert e is not None and e.attempts == 6 * per_thread
        assert await shared.get_record("t5-24") == {"t": 5, "i": 24}
        e24 = await shared.get_explanation("t5-e24")
        assert e24 is not None and e24.state == "pending"
        await shared.close()

    asyncio.run(check())


def test_sqlite_closed_store_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "c.db")
        await store.close()
        await store.close()  # idempotent
        assert await store.ping() is False
        with pytest.raises(StoreUnavailable):
            await store.get_record("r")

    asyncio.run(main())


# --------------------------------------------------------------------------- Redis


@needs_redis
def test_redis_done_explanation_survives_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    try:

        async def main() -> None:
            store = RedisStore(server.url)
            try:
                await store.create_explanation("e1", "r1")
                await store.complete_explanation("e1", {"label": "fracture"}, PNG)
                await store.put_record("r1", {"label": "fracture"}, ttl_s=3600)
                server.stop()
                server.start()
                # Same client: its pooled connection is dead and must reconnect by itself.
                e = await store.get_explanation("e1")
                assert e is not None and e.state == "done" and e.result == {"label": "fracture"}
                assert await store.get_explanation_png("e1") == PNG
                assert await store.get_record("r1") == {"label": "fracture"}
            finally:
                await store.close()

        asyncio.run(main())
    finally:
        server.stop()


@needs_redis
def test_redis_down_raises_store_unavailable_quickly(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()

    async def main() -> None:
        store = RedisStore(server.url)
        try:
            assert await store.ping() is True
            server.stop()
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: store.get_record("r"),
                lambda: store.put_record("r", {"a": 1}),
                lambda: store.create_explanation("e", "r"),
                lambda: store.get_explanation("e"),
                lambda: store.get_explanation_png("e", "heatmap"),
            ]
            for call in calls:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - t0 < 2.0
            assert await store.ping() is False
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_redis_unresponsive_server_times_out() -> None:
    """A peer that accepts TCP but never answers must not hang a request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accept(): the kernel completes handshakes, nobody replies
        port = listener.getsockname()[1]

        async def main() -> None:
            store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
            try:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await store.get_record("r")
                assert time.monotonic() - t0 < 2.0
            finally:
                await store.close()

        asyncio.run(main())


# --------------------------------------------------------------------------- open_store


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        abs_db = tmp_path / "sub" / "abs.db"
        s1 = open_store(f"sqlite://{abs_db}")
        assert isinstance(s1, SQLiteStore) and Path(s1.path) == abs_db
        await s1.close()
        assert abs_db.exists()

        monkeypatch.chdir(tmp_path)
        s2 = open_store("sqlite:rel.db")
        assert isinstance(s2, SQLiteStore) and s2.path == "rel.db"
        await s2.close()
        assert (tmp_path / "rel.db").exists()

        s3 = open_store("redis://127.0.0.1:6390/2")  # lazy: no connection is made here
        assert isinstance(s3, RedisStore)
        await s3.close()

    asyncio.run(main())

    for bad in ("http://example.org/x", "postgres://user:s3cret@db/x", "store.db", "sqlite://x.db"):
        with pytest.raises(ValueError) as err:
            open_store(bad)
        assert "s3cret" not in str(err.value)


def test_sqlite_store_is_private_to_its_user(tmp_path):
    import stat

    from serve.store import SQLiteStore

    path = tmp_path / "fresh" / "store.sqlite3"
    store = SQLiteStore(path)
    asyncio.run(store.put_records([("r1", {"label": "fracture"})]))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for f in path.parent.iterdir():  # the database and its -wal / -shm
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    asyncio.run(store.close())


def test_sqlite_store_refuses_a_directory_others_can_write(tmp_path):
    from serve.store import SQLiteStore, UnsafeStoreDirectory

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeStoreDirectory):
        SQLiteStore(shared / "store.sqlite3")


def test_sqlite_store_refuses_a_directory_of_another_user(tmp_path, monkeypatch):
    import os

    from serve.store import SQLiteStore, UnsafeStoreDirectory

    monkeypatch.setattr(os, "getuid", lambda: 12345)  # as if another user had made it
    with pytest.raises(UnsafeStoreDirectory):
        SQLiteStore(tmp_path / "theirs" / "store.sqlite3")


def test_redis_store_takes_its_password_from_the_environment(tmp_path, monkeypatch):
    """As in Kubernetes: requirepass from a Secret, the URL without it."""
    from serve.store import REDIS_PASSWORD_ENV, RedisStore, StoreUnavailable

    if REDIS_BIN is None:
        pytest.skip("redis-server not installed (.ci/run installs it)")
    server = RedisServer(tmp_path, password="s3cret-from-secret")
    server.start()
    try:
        monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
        anonymous = RedisStore(server.url)
        with pytest.raises((StoreUnavailable, redis.exceptions.AuthenticationError)):
            asyncio.run(anonymous.put_records([("r1", {"label": "fracture"})]))
        monkeypatch.setenv(REDIS_PASSWORD_ENV, "s3cret-from-secret")
        store = RedisStore(server.url)

        async def roundtrip() -> dict | None:
            await store.put_records([("r1", {"label": "fracture"})])
            return await store.get_record("r1")

        assert asyncio.run(roundtrip()) == {"label": "fracture"}
    finally:
        server.stop()
