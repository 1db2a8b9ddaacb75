"""The node's inbox and outbox: one SQLite file, so nothing accepted is lost to a restart.

A C-STORE is answered Success only once its instance is written to the inbox (the PACS
then forgets it); the inbox holds at most `max_in_flight` instances (beyond: 0xA700). An
instance leaves the inbox in the same transaction that puts its results (SR, SC) in the
outbox, and a result leaves the outbox only when its destination confirmed the C-STORE.
The file holds patient data (the instances and the SR/SC): a private directory (0700) and
secure_delete, as the result store.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serve.store.sqlite import private_directory

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    data BLOB NOT NULL,
    received_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    request_id TEXT  -- set once the service classified it: only its results are still due
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('sr', 'sc')),
    ae_title TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(due_at);
"""


@dataclass(frozen=True)
class Received:
    id: int
    tenant: str
    data: bytes
    attempts: int
    request_id: str | None = None  # the service's id once it classified the instance


@dataclass(frozen=True)
class Result:
    """A DICOM object (SR or SC) due at a destination."""

    kind: str  # "sr" | "sc"
    ae_title: str
    host: str
    port: int
    data: bytes
    tenant: str = ""
    id: int = 0
    attempts: int = 0

    @property
    def destination(self) -> tuple[str, str, int]:
        return self.ae_title, self.host, self.port


@dataclass(frozen=True)
class Depths:
    inbox: int
    outbox: int
    oldest_outbox_age_s: float  # 0 when empty


class NodeQueue:
    """Thread-safe (one connection behind a lock): the SCP's association threads, the
    forwarding worker and the sender share it."""

    def __init__(self, path: str | Path, max_in_flight: int) -> None:
        path = Path(path)
        private_directory(path.parent)
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        # Leases and back-offs of a process that stopped: everything held is due again.
        self._db.execute("UPDATE inbox SET due_at = received_at")
        self._db.execute("UPDATE outbox SET due_at = created_at")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- inbox -------------------------------------------------------------------------
    def receive(self, tenant: str, data: bytes) -> bool:
        """Keep one received instance; False when `max_in_flight` are already held."""
        now = time.time()
        with self._tx() as db:
            (held,) = db.execute("SELECT COUNT(*) FROM inbox").fetchone()
            if held >= self.max_in_flight:
                return False
            db.execute(
                "INSERT INTO inbox (tenant, data, received_at, due_at) VALUES (?, ?, ?, ?)",
                (tenant, data, now, now),
            )
        return True

    def claim_instances(self, limit: int, lease_s: float = 600.0) -> list[Received]:
        """Up to `limit` due instances of one tenant (the oldest's), oldest first, leased to
        the caller for `lease_s` (so parallel workers never take the same instance)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT tenant FROM inbox WHERE due_at <= ? ORDER BY id LIMIT 1", (now,)
            ).fetchone()
            if row is None:
                return []
            rows = db.execute(
                "SELECT id, tenant, data, attempts, request_id FROM inbox "
                "WHERE tenant = ? AND due_at <= ? "
                "ORDER BY id LIMIT ?",
                (row[0], now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE inbox SET due_at = ? WHERE id = ?", [(now + lease_s, r[0]) for r in rows]
            )
        return [Received(*row) for row in rows]

    def classified(self, instance_id: int, results: Sequence[Result]) -> None:
        """The instance is done: its results (maybe none) move to the outbox, atomically."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO outbox (tenant, kind, ae_title, host, port, data, created_at, "
                "due_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.tenant, r.kind, r.ae_title, r.host, r.port, r.data, now, now) for r in results],
            )
            db.execute("DELETE FROM inbox WHERE id = ?", (instance_id,))

    def remember_request(self, instance_id: int, request_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE inbox SET request_id = ? WHERE id = ?", (request_id, instance_id))

    def retry_instance(self, instance_id: int, delay_s: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE inbox SET attempts = attempts + 1, due_at = ? WHERE id = ?",
                (time.time() + delay_s, instance_id),
            )

    # ---- outbox ------------------------------------------------------------------------
    def due_results(self, limit: int) -> list[Result]:
        """Up to `limit` results due now, oldest first, all for the oldest's destination."""
        now = time.time()
        with self._lock:
            first = self._db.execute(
                "SELECT ae_title, host, port FROM outbox WHERE due_at <= ? ORDER BY id LIMIT 1",
                (now,),
            ).fetchone()
            if first is None:
                return []
            rows = self._db.execute(
                "SELECT kind, ae_title, host, port, data, tenant, id, attempts FROM outbox "
                "WHERE ae_title = ? AND host = ? AND port = ? AND due_at <= ? ORDER BY id "
                "LIMIT ?",
                (*first, now, limit),
            ).fetchall()
        return [Result(*row) for row in rows]

    def sent(self, result_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (result_id,))

    def retry_result(self, result_id: int, delay_s: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, due_at = ? WHERE id = ?",
                (time.time() + delay_s, result_id),
            )

    def depths(self) -> Depths:
        with self._lock:
            (inbox,) = self._db.execute("SELECT COUNT(*) FROM inbox").fetchone()
            outbox, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox"
            ).fetchone()
        return Depths(inbox, outbox, 0.0 if oldest is None else time.time() - oldest)
