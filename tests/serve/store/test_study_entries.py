"""Study entries in the result store: per tenant, by study and by patient, retained for their
TTL and erased with every record and explanation of the patient, on both backends."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from support.stores import Factory, RedisServer, needs_redis, run

from serve.store import Erased, RedisStore, ResultStore, SQLiteStore, StudyEntry

REF_A, REF_B = "a" * 64, "b" * 64
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def entry(rid: str, study: str = "1.2.3", ref: str | None = REF_A, tenant: str = "t1", **kw):
    return StudyEntry(tenant, study, rid, kw.pop("created_at", time.time()), patient_ref=ref, **kw)


async def patient_with_records(store: ResultStore) -> None:
    """Tenant t1's patient A: two studies, records and an explanation with layers; plus
    patient B of t1 and patient A's reference under tenant t2 (must survive the erasure)."""
    await store.put_records(
        [(r, {"label": "fracture"}) for r in ("gone-1", "gone-2", "gone-3", "rb", "rt")]
    )
    await store.create_explanation("gone-1", "gone-1")
    await store.complete_explanation("gone-1", {"ok": 1}, PNG, {"heatmap": PNG, "image": PNG})
    await store.put_study_entries(
        [
            entry("gone-1", "1.2.3", fracture_probability=0.1),
            entry("gone-2", "1.2.3", state="pending"),
            entry("gone-3", "1.2.4", fracture_probability=0.8),
            entry("rb", "1.2.5", ref=REF_B),
            entry("rt", "1.2.3", tenant="t2"),
        ],
        ttl_s=3600,
    )


def test_entries_by_study_and_patient_per_tenant(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await patient_with_records(store)
        study = await store.get_study("t1", "1.2.3")
        assert [(e.request_id, e.state) for e in study] == [
            ("gone-1", "done"),
            ("gone-2", "pending"),
        ]
        assert study[0].fracture_probability == 0.1 and study[0].tenant == "t1"
        assert [e.request_id for e in await store.get_study("t2", "1.2.3")] == ["rt"]
        assert await store.get_study("t3", "1.2.3") == []
        patient = await store.get_patient_entries("t1", REF_A)
        assert [e.request_id for e in patient] == ["gone-1", "gone-2", "gone-3"]
        assert await store.get_patient_entries("t2", REF_B) == []
        # pending -> done replaces the entry (same tenant, study, request id)
        await store.put_study_entries([entry("gone-2", "1.2.3", label="fracture")], ttl_s=3600)
        assert [e.state for e in await store.get_study("t1", "1.2.3")] == ["done", "done"]

    run(make_store, scenario)


def test_erasure_removes_everything_of_the_patient_and_nothing_else(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await patient_with_records(store)
        erased = await store.erase_patient("t1", REF_A)
        assert erased == Erased(records=3, explanations=1, study_entries=3)
        for rid in ("gone-1", "gone-2", "gone-3"):
            assert await store.get_record(rid) is None
        assert await store.get_explanation("gone-1") is None
        assert await store.get_explanation_png("gone-1", "heatmap") is None
        assert await store.get_patient_entries("t1", REF_A) == []
        assert await store.get_study("t1", "1.2.4") == []
        # Another patient, and the same reference under another tenant, stay.
        assert [e.request_id for e in await store.get_patient_entries("t1", REF_B)] == ["rb"]
        assert [e.request_id for e in await store.get_study("t2", "1.2.3")] == ["rt"]
        assert await store.get_record("rb") is not None and await store.get_record("rt")
        assert await store.erase_patient("t1", REF_A) == Erased()  # idempotent

    run(make_store, scenario)


def test_study_entries_expire_with_their_retention(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        await store.put_study_entries([entry("gone-1"), entry("gone-2", "1.2.9")], ttl_s=1)
        await asyncio.sleep(0.6)
        await store.put_study_entries([entry("gone-3")], ttl_s=1)  # the study's clock restarts
        await asyncio.sleep(0.6)
        assert [e.request_id for e in await store.get_study("t1", "1.2.3")] == ["gone-1", "gone-3"]
        assert await store.get_study("t1", "1.2.9") == []
        await asyncio.sleep(0.6)
        assert await store.get_study("t1", "1.2.3") == []
        assert await store.get_patient_entries("t1", REF_A) == []

    run(make_store, scenario)


def test_sqlite_sweeper_deletes_expired_rows_from_the_file(tmp_path: Path) -> None:
    db = tmp_path / "store.db"

    async def main() -> None:
        store = SQLiteStore(db, explanation_ttl_s=1, purge_interval_s=3600)
        await store.put_records([("gone-1", {"a": 1})], ttl_s=1)
        await store.create_explanation("gone-1", "gone-1")
        await store.put_study_entries([entry("gone-1")], ttl_s=1)
        await asyncio.sleep(1.1)
        assert await store.sweep() == 3
        await store.close()

    asyncio.run(main())
    with sqlite3.connect(db) as conn:
        for table in ("records", "explanations", "study_entries"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,)


def test_sqlite_erasure_leaves_nothing_in_the_file(tmp_path: Path) -> None:
    db = tmp_path / "store.db"

    async def main() -> None:
        store = SQLiteStore(db)
        await patient_with_records(store)
        await store.erase_patient("t1", REF_A)
        await store.close()

    asyncio.run(main())
    with sqlite3.connect(db) as conn:
        ids = {row[0] for row in conn.execute("SELECT id FROM records")}
        assert ids == {"rb", "rt"}
        assert conn.execute("SELECT COUNT(*) FROM explanations").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM explanation_layers").fetchone() == (0,)
        refs = conn.execute("SELECT tenant, patient_ref FROM study_entries").fetchall()
        assert sorted(refs) == [("t1", REF_B), ("t2", REF_A)]
    # secure_delete and the WAL checkpoint: no byte of the erased rows is left in the files.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert b"gone-" not in raw


@needs_redis
def test_redis_erasure_leaves_no_key_of_the_patient(redis_server: RedisServer) -> None:
    redis_server.flush()

    async def scenario(store: ResultStore) -> None:
        await patient_with_records(store)
        await store.erase_patient("t1", REF_A)

    run(lambda: RedisStore(redis_server.url), scenario)
    with redis_server.client() as client:
        keys = sorted(k.decode() for k in client.scan_iter("*"))
        assert keys == [
            "ov:patient:t1:" + REF_B,
            "ov:patient:t2:" + REF_A,
            "ov:rec:rb",
            "ov:rec:rt",
            "ov:study:t1:1.2.5",
            "ov:study:t2:1.2.3",
        ]
        values = b"".join(client.dump(k) or b"" for k in client.scan_iter("*"))
        assert b"gone-" not in values
        assert all(0 < client.ttl(k) <= 3600 for k in client.scan_iter("ov:study:*"))


@pytest.mark.parametrize("ttl_s", [0, -1])
def test_bad_ttl_is_refused(make_store: Factory, ttl_s: int) -> None:
    async def scenario(store: ResultStore) -> None:
        with pytest.raises(ValueError):
            await store.put_study_entries([entry("r1")], ttl_s=ttl_s)

    run(make_store, scenario)


def test_retention_days_become_the_stores_ttls() -> None:
    from orthovision.config import ServeConfig

    default = ServeConfig()
    assert default.record_retention_s == default.record_ttl_s  # the older knob still rules
    assert (default.explanation_retention_s, default.study_retention_s) == (86400, 90 * 86400)
    s = ServeConfig(retention={"records_days": 2, "explanations_days": 0.5, "studies_days": 30})
    assert (s.record_retention_s, s.explanation_retention_s) == (2 * 86400, 43200)
    assert s.study_retention_s == 30 * 86400
    with pytest.raises(ValueError):
        ServeConfig(retention={"studies_days": 0})
