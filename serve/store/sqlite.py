"""`SQLiteStore`: the embedded result store for one machine, and the checks on its directory.

Several Ray replicas (processes) open the same file, so it runs in WAL mode with a busy
timeout; blocking calls go to a worker thread so the event loop never waits on the disk.
Deleted rows are overwritten (secure_delete) and an erasure checkpoints the WAL, so what
retention or erasure removes does not linger in the file's free pages.
Over 400 lines: the schema and every statement of this backend stay together, so a reader
checks each query against the schema on one page.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from serve.store.base import (
    DEFAULT_EXPLANATION_TTL_S,
    Erased,
    ExplanationImage,
    ExplanationRecord,
    LayerKind,
    ResultStore,
    StoreUnavailable,
    StudyEntry,
    check_ttl,
    dumps,
)

__all__ = ["SQLiteStore", "UnsafeStoreDirectory", "private_directory"]

_T = TypeVar("_T")

# The overlay stays in its explanation's row; the layers are child rows that go with it
# (ON DELETE CASCADE), so expiry and purging never leave one without the other.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS records_expires ON records(expires_at);
CREATE TABLE IF NOT EXISTS explanations (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    result TEXT,
    error TEXT,
    png BLOB,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS explanations_expires ON explanations(expires_at);
CREATE TABLE IF NOT EXISTS explanation_layers (
    id TEXT NOT NULL REFERENCES explanations(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (id, kind)
);
-- One row per instance of a study (serve/studies.py); body: StudyEntry JSON.
CREATE TABLE IF NOT EXISTS study_entries (
    tenant TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    request_id TEXT NOT NULL,
    patient_ref TEXT,
    created_at REAL NOT NULL,
    body TEXT NOT NULL,
    expires_at REAL,
    PRIMARY KEY (tenant, study_uid, request_id)
);
CREATE INDEX IF NOT EXISTS study_entries_patient ON study_entries(tenant, patient_ref);
CREATE INDEX IF NOT EXISTS study_entries_expires ON study_entries(expires_at);
-- Files made by earlier versions: nothing queries explanations by state any more.
DROP INDEX IF EXISTS explanations_state;
"""

_LIVE = "(expires_at IS NULL OR expires_at > ?)"


class UnsafeStoreDirectory(RuntimeError):
    """The store's directory belongs to another user or others can write to it."""


def private_directory(path: Path) -> None:
    """Create `path` 0700, or accept an existing one only if this user owns it and nobody
    else can write to it (a directory someone else made first under /tmp could be read or
    swapped by them)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise UnsafeStoreDirectory(
            f"refusing to store results in {path}: owned by uid {st.st_uid}, not this user"
        )
    if st.st_mode & 0o022:
        raise UnsafeStoreDirectory(
            f"refusing to store results in {path}: group or others can write to it"
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)  # ours: close it to others too


class SQLiteStore(ResultStore):
    """SQLite file shared by the replicas of one machine."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 5.0,
        explanation_ttl_s: int | None = DEFAULT_EXPLANATION_TTL_S,
        purge_interval_s: float = 60.0,
    ) -> None:
        check_ttl(explanation_ttl_s)
        self.path = str(path)
        if self.path != ":memory:":
            private_directory(Path(self.path).parent)
            # The file holds patient attributes: owner only (SQLite gives its -wal and -shm
            # files the database file's mode).
            Path(self.path).touch(mode=0o600, exist_ok=True)
            os.chmod(self.path, 0o600)
        self._explanation_ttl_s = explanation_ttl_s
        self._purge_interval_s = purge_interval_s
        self._last_purge = 0.0
        # One connection per store, used from worker threads: the lock serialises it.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path,
            timeout=busy_timeout_s,
            isolation_level=None,  # autocommit; explicit BEGIN IMMEDIATE where needed
            check_same_thread=False,
        )
        with self._locked() as conn:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across process crashes in WAL mode; fsync per commit is not
            # worth it for a cache of re-computable results.
            conn.execute("PRAGMA synchronous = NORMAL")
            # Per connection, off by default: the layers' ON DELETE CASCADE needs it.
            conn.execute("PRAGMA foreign_keys = ON")
            # Deleted content is zeroed, not left in free pages (retention, erasure).
            conn.execute("PRAGMA secure_delete = ON")
            conn.executescript(_SCHEMA)

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise StoreUnavailable("store is closed")
            try:
                yield self._conn
            except sqlite3.OperationalError as e:
                # Locked past the busy timeout, disk full, unreadable file: all "try later".
                raise StoreUnavailable(f"sqlite: {type(e).__name__}") from e

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            with self._locked() as conn:
                return fn(conn)

        return await asyncio.to_thread(call)

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        # Cheap: indexed range deletes, at most once per interval per store instance.
        if now - self._last_purge >= self._purge_interval_s:
            _purge(conn, now)
            self._last_purge = now

    def _expl_expiry(self, now: float) -> float | None:
        return None if self._explanation_ttl_s is None else now + self._explanation_ttl_s

    async def put_records(
        self, records: Sequence[tuple[str, dict]], ttl_s: int | None = None
    ) -> None:
        check_ttl(ttl_s)
        bodies = [(request_id, dumps(record)) for request_id, record in records]

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            expires = None if ttl_s is None else now + ttl_s
            with _transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO records (id, body, expires_at) VALUES (?, ?, ?)",
                    [(request_id, body, expires) for request_id, body in bodies],
                )
            self._maybe_purge(conn, now)

        await self._run(op)

    async def get_record(self, request_id: str) -> dict | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                f"SELECT body FROM records WHERE id = ? AND {_LIVE}", (request_id, time.time())
            ).fetchone()
            return None if row is None else row[0]

        body = await self._run(op)
        return None if body is None else json.loads(body)

    async def create_explanation(self, explanation_id: str, request_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            try:
                with _transaction(conn):
                    # An expired row with the same id must not block the new one.
                    conn.execute(
                        "DELETE FROM explanations WHERE id = ? AND expires_at <= ?",
                        (explanation_id, now),
                    )
                    conn.execute(
                        "INSERT INTO explanations (id, request_id, state, created_at,"
                        " updated_at, attempts, expires_at) VALUES (?, ?, 'pending', ?, ?, 0, ?)",
                        (explanation_id, request_id, now, now, self._expl_expiry(now)),
                    )
            except sqlite3.IntegrityError:
                raise ValueError("explanation id already exists") from None
            self._maybe_purge(conn, now)

        await self._run(op)

    async def complete_explanation(
        self,
        explanation_id: str,
        result: dict,
        overlay_png: bytes,
        layers: Mapping[LayerKind, bytes] | None = None,
    ) -> None:
        body = dumps(result)
        png = bytes(overlay_png)
        layer_rows = [(explanation_id, kind, bytes(p)) for kind, p in (layers or {}).items()]

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            with _transaction(conn):
                cur = conn.execute(
                    "UPDATE explanations SET state = 'done', result = ?, png = ?, error = NULL,"
                    f" updated_at = ? WHERE id = ? AND {_LIVE}",
                    (body, png, now, explanation_id, now),
                )
                if cur.rowcount == 0:
                    raise KeyError(explanation_id)
                conn.execute("DELETE FROM explanation_layers WHERE id = ?", (explanation_id,))
                conn.executemany(
                    "INSERT INTO explanation_layers (id, kind, png) VALUES (?, ?, ?)", layer_rows
                )

        await self._run(op)

    async def fail_explanation(self, explanation_id: str, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            cur = conn.execute(
                "UPDATE explanations SET state = 'failed', error = ?, updated_at = ?"
                f" WHERE id = ? AND state != 'done' AND {_LIVE}",
                (reason, now, explanation_id, now),
            )
            if cur.rowcount == 0 and not _exists(conn, explanation_id, now):
                raise KeyError(explanation_id)

        await self._run(op)

    async def get_explanation(self, explanation_id: str) -> ExplanationRecord | None:
        def op(conn: sqlite3.Connection) -> tuple | None:
            return conn.execute(
                "SELECT id, request_id, state, result, error, created_at, updated_at, attempts"
                f" FROM explanations WHERE id = ? AND {_LIVE}",
                (explanation_id, time.time()),
            ).fetchone()

        row = await self._run(op)
        if row is None:
            return None
        eid, request_id, state, result, error, created_at, updated_at, attempts = row
        return ExplanationRecord(
            id=eid,
            request_id=request_id,
            state=state,
            result=None if result is None else json.loads(result),
            error=error,
            created_at=float(created_at),
            updated_at=float(updated_at),
            attempts=int(attempts),
        )

    async def get_explanation_png(
        self, explanation_id: str, kind: ExplanationImage = "overlay"
    ) -> bytes | None:
        done = f"SELECT png FROM explanations WHERE id = ? AND state = 'done' AND {_LIVE}"
        if kind == "overlay":
            query, args = done, (explanation_id, time.time())
        else:
            query = (
                "SELECT png FROM explanation_layers WHERE id = ? AND kind = ? AND EXISTS"
                f" (SELECT 1 FROM explanations WHERE id = ? AND state = 'done' AND {_LIVE})"
            )
            args = (explanation_id, kind, explanation_id, time.time())

        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(query, args).fetchone()
            return None if row is None or row[0] is None else bytes(row[0])

        return await self._run(op)

    async def mark_attempt(self, explanation_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            now = time.time()
            # One statement: atomic across replicas without an explicit transaction.
            row = conn.execute(
                "UPDATE explanations SET attempts = attempts + 1, updated_at = ?"
                f" WHERE id = ? AND {_LIVE} RETURNING attempts",
                (now, explanation_id, now),
            ).fetchone()
            if row is None:
                raise KeyError(explanation_id)
            return int(row[0])

        return await self._run(op)

    async def put_study_entries(
        self, entries: Sequence[StudyEntry], ttl_s: int | None = None
    ) -> None:
        check_ttl(ttl_s)
        rows = [
            (e.tenant, e.study_uid, e.request_id, e.patient_ref, e.created_at, e.to_json())
            for e in entries
        ]
        studies = sorted({(e.tenant, e.study_uid) for e in entries})

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            expires = None if ttl_s is None else now + ttl_s
            with _transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO study_entries (tenant, study_uid, request_id,"
                    " patient_ref, created_at, body, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*row, expires) for row in rows],
                )
                # The study lives as one: its retention restarts with each new instance.
                conn.executemany(
                    "UPDATE study_entries SET expires_at = ? WHERE tenant = ? AND study_uid = ?",
                    [(expires, *study) for study in studies],
                )
            self._maybe_purge(conn, now)

        await self._run(op)

    async def get_study(self, tenant: str, study_uid: str) -> list[StudyEntry]:
        return await self._entries("tenant = ? AND study_uid = ?", (tenant, study_uid))

    async def get_patient_entries(self, tenant: str, patient_ref: str) -> list[StudyEntry]:
        return await self._entries("tenant = ? AND patient_ref = ?", (tenant, patient_ref))

    async def _entries(self, where: str, args: tuple) -> list[StudyEntry]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                f"SELECT body FROM study_entries WHERE {where} AND {_LIVE}"
                " ORDER BY created_at, request_id",
                (*args, time.time()),
            ).fetchall()
            return [row[0] for row in rows]

        return [StudyEntry.from_json(body) for body in await self._run(op)]

    async def erase_patient(self, tenant: str, patient_ref: str) -> Erased:
        def op(conn: sqlite3.Connection) -> Erased:
            with _transaction(conn):
                ids = [
                    (row[0],)
                    for row in conn.execute(
                        "SELECT request_id FROM study_entries WHERE tenant = ? AND patient_ref = ?",
                        (tenant, patient_ref),
                    )
                ]
                records = conn.executemany("DELETE FROM records WHERE id = ?", ids).rowcount
                explanations = conn.executemany(
                    "DELETE FROM explanations WHERE id = ?", ids
                ).rowcount
                entries = conn.execute(
                    "DELETE FROM study_entries WHERE tenant = ? AND patient_ref = ?",
                    (tenant, patient_ref),
                ).rowcount
            # Old page images of the erased rows live on in the WAL until a checkpoint.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return Erased(max(records, 0), max(explanations, 0), entries)

        return await self._run(op)

    async def sweep(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            now = time.time()
            self._last_purge = now
            return _purge(conn, now)

        return await self._run(op)

    async def ping(self) -> bool:
        try:
            await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
        except (StoreUnavailable, sqlite3.Error):
            return False
        return True

    async def close(self) -> None:
        def op() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(op)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _purge(conn: sqlite3.Connection, now: float) -> int:
    """Delete every row past its expiry (a layer goes with its explanation); the count."""
    return sum(
        conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,)).rowcount
        for table in ("records", "explanations", "study_entries")
    )


def _exists(conn: sqlite3.Connection, explanation_id: str, now: float) -> bool:
    row = conn.execute(
        f"SELECT 1 FROM explanations WHERE id = ? AND {_LIVE}", (explanation_id, now)
    ).fetchone()
    return row is not None
