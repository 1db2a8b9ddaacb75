"""Result store: per-request records and asynchronous explanations.

Two backends behind one async interface:

* ``SQLiteStore``: embedded default for one machine. Several Ray replicas (processes) open
  the same file, so it runs in WAL mode with a busy timeout; blocking calls go to a thread.
* ``RedisStore``: for clusters (``redis.asyncio``), with bounded socket timeouts so a dead
  server surfaces as ``StoreUnavailable`` (HTTP 503) instead of a hang.

Records may relate to patients: this module stores exactly what it is given and never logs
or echoes record contents (nor the store URL, which may carry a password).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "DEFAULT_EXPLANATION_TTL_S",
    "ExplanationRecord",
    "ExplanationState",
    "RedisStore",
    "ResultStore",
    "SQLiteStore",
    "StoreUnavailable",
    "open_store",
]

ExplanationState = Literal["pending", "done", "failed"]

# Explanations carry a PNG each; without a retention bound the store only grows.
DEFAULT_EXPLANATION_TTL_S = 24 * 3600

_T = TypeVar("_T")


class StoreUnavailable(Exception):
    """The backing store cannot be reached (or is locked/loading); callers answer 503."""


@dataclass(frozen=True)
class ExplanationRecord:
    id: str
    request_id: str
    state: ExplanationState
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    updated_at: float
    attempts: int


class ResultStore(ABC):
    """Async store shared by all replicas.

    Contract shared by the backends:
    * ``ttl_s`` must be a positive number of seconds or ``None`` (never expires).
    * ``create_explanation`` raises ``ValueError`` if the id already exists (ids are unique).
    * ``complete_explanation`` / ``fail_explanation`` / ``mark_attempt`` raise ``KeyError``
      for an unknown (or expired) id.
    * "done" is terminal for ``fail_explanation``: a late sweeper never overwrites a result.
    * Unreachable backend: ``StoreUnavailable`` (``ping`` returns ``False`` instead).
    """

    async def put_record(self, request_id: str, record: dict, ttl_s: int | None = None) -> None:
        """Store the per-request JSON record (the prediction result)."""
        await self.put_records([(request_id, record)], ttl_s)

    @abstractmethod
    async def put_records(
        self, records: Sequence[tuple[str, dict]], ttl_s: int | None = None
    ) -> None:
        """Store several records in one round trip (one transaction or pipeline)."""

    @abstractmethod
    async def get_record(self, request_id: str) -> dict | None:
        """The record, or ``None`` if unknown or expired."""

    @abstractmethod
    async def create_explanation(self, explanation_id: str, request_id: str) -> None:
        """New explanation in state "pending"."""

    @abstractmethod
    async def complete_explanation(
        self, explanation_id: str, result: dict, overlay_png: bytes
    ) -> None:
        """State "done" with its JSON result and overlay PNG."""

    @abstractmethod
    async def fail_explanation(self, explanation_id: str, reason: str) -> None:
        """State "failed" with a reason (no-op if already "done")."""

    @abstractmethod
    async def get_explanation(self, explanation_id: str) -> ExplanationRecord | None:
        """The explanation, or ``None`` if unknown or expired."""

    @abstractmethod
    async def get_explanation_png(self, explanation_id: str) -> bytes | None:
        """The overlay PNG of a "done" explanation, else ``None``."""

    @abstractmethod
    async def mark_attempt(self, explanation_id: str) -> int:
        """Increment attempts (and refresh updated_at); return the new count."""

    @abstractmethod
    async def stale_pending(self, older_than_s: float) -> list[str]:
        """Ids of pending explanations not updated for ``older_than_s`` seconds."""

    @abstractmethod
    async def ping(self) -> bool:
        """True if the backend answers."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


def _check_ttl(ttl_s: int | None) -> None:
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError("ttl_s must be positive or None")


def _dumps(obj: dict) -> str:
    # allow_nan=False: what we store is served back as JSON, and NaN is not JSON.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------- SQLite

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
CREATE INDEX IF NOT EXISTS explanations_state ON explanations(state, updated_at);
CREATE INDEX IF NOT EXISTS explanations_expires ON explanations(expires_at);
"""

_LIVE = "(expires_at IS NULL OR expires_at > ?)"


REDIS_PASSWORD_ENV = "ORTHOVISION_REDIS_PASSWORD"


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
        _check_ttl(explanation_ttl_s)
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
        # Cheap: indexed range delete, at most once per interval per store instance.
        if now - self._last_purge < self._purge_interval_s:
            return
        self._last_purge = now
        conn.execute("DELETE FROM records WHERE expires_at <= ?", (now,))
        conn.execute("DELETE FROM explanations WHERE expires_at <= ?", (now,))

    def _expl_expiry(self, now: float) -> float | None:
        return None if self._explanation_ttl_s is None else now + self._explanation_ttl_s

    async def put_records(
        self, records: Sequence[tuple[str, dict]], ttl_s: int | None = None
    ) -> None:
        _check_ttl(ttl_s)
        bodies = [(request_id, _dumps(record)) for request_id, record in records]

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
        self, explanation_id: str, result: dict, overlay_png: bytes
    ) -> None:
        body = _dumps(result)
        png = bytes(overlay_png)

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            cur = conn.execute(
                "UPDATE explanations SET state = 'done', result = ?, png = ?, error = NULL,"
                f" updated_at = ? WHERE id = ? AND {_LIVE}",
                (body, png, now, explanation_id, now),
            )
            if cur.rowcount == 0:
                raise KeyError(explanation_id)

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

    async def get_explanation_png(self, explanation_id: str) -> bytes | None:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                f"SELECT png FROM explanations WHERE id = ? AND state = 'done' AND {_LIVE}",
                (explanation_id, time.time()),
            ).fetchone()
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

    async def stale_pending(self, older_than_s: float) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            rows = conn.execute(
                "SELECT id FROM explanations WHERE state = 'pending' AND updated_at <= ?"
                f" AND {_LIVE} ORDER BY updated_at",
                (now - older_than_s, now),
            ).fetchall()
            return [r[0] for r in rows]

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


def _exists(conn: sqlite3.Connection, explanation_id: str, now: float) -> bool:
    row = conn.execute(
        f"SELECT 1 FROM explanations WHERE id = ? AND {_LIVE}", (explanation_id, now)
    ).fetchone()
    return row is not None


# --------------------------------------------------------------------------- Redis

# Lua keeps each state transition atomic across replicas (check + write in one step).
_LUA_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'request_id', ARGV[2], 'state', 'pending',
           'created_at', ARGV[3], 'updated_at', ARGV[3], 'attempts', 0)
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

_LUA_COMPLETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[2], 'updated_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'error')
redis.call('SET', KEYS[2], ARGV[3])
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

_LUA_FAIL = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 0 end
if st == 'done' then return 2 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[2], 'updated_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_LUA_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
if redis.call('HGET', KEYS[1], 'state') == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return n
"""

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisStore(ResultStore):
    """Redis-backed store for multi-node clusters.

    Keys: ``ov:rec:<id>`` (JSON string), ``ov:expl:<id>`` (hash), ``ov:expl:<id>:png``,
    and the sorted set ``ov:expl:pending`` (pending ids scored by updated_at).
    """

    PREFIX = "ov"

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 0.75,
        retries: int = 1,
        explanation_ttl_s: int | None = DEFAULT_EXPLANATION_TTL_S,
    ) -> None:
        _check_ttl(explanation_ttl_s)
        self._explanation_ttl_s = explanation_ttl_s
        # Bounded timeouts and one quick retry: a stale pooled connection (server restart)
        # reconnects transparently, while a dead server fails within ~2 s instead of hanging.
        # The password comes from the environment (a Kubernetes Secret) unless the URL has
        # one: a URL travels in config files and must not carry it.
        password = None if urlsplit(url).password else os.environ.get(REDIS_PASSWORD_ENV)
        self._r = aioredis.Redis.from_url(
            url,
            password=password or None,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries),
            decode_responses=False,  # PNG bytes share the client with JSON
        )
        self._create = self._r.register_script(_LUA_CREATE)
        self._complete = self._r.register_script(_LUA_COMPLETE)
        self._fail = self._r.register_script(_LUA_FAIL)
        self._attempt = self._r.register_script(_LUA_ATTEMPT)

    def _rec(self, request_id: str) -> str:
        return f"{self.PREFIX}:rec:{request_id}"

    def _expl(self, explanation_id: str) -> str:
        return f"{self.PREFIX}:expl:{explanation_id}"

    def _png(self, explanation_id: str) -> str:
        return f"{self.PREFIX}:expl:{explanation_id}:png"

    @property
    def _pending(self) -> str:
        return f"{self.PREFIX}:expl:pending"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except _REDIS_DOWN as e:
            # Type only: redis error texts can include the address, never record contents,
            # but keep the message uniform for the 503 body.
            raise StoreUnavailable(f"redis: {type(e).__name__}") from e

    async def put_records(
        self, records: Sequence[tuple[str, dict]], ttl_s: int | None = None
    ) -> None:
        _check_ttl(ttl_s)
        with self._guard():
            async with self._r.pipeline(transaction=False) as pipe:
                for request_id, record in records:
                    pipe.set(self._rec(request_id), _dumps(record), ex=ttl_s)
                await pipe.execute()

    async def get_record(self, request_id: str) -> dict | None:
        with self._guard():
            body = await self._r.get(self._rec(request_id))
        return None if body is None else json.loads(body)

    async def create_explanation(self, explanation_id: str, request_id: str) -> None:
        now = repr(time.time())
        ttl = self._explanation_ttl_s or 0
        with self._guard():
            created = await self._create(
                keys=[self._expl(explanation_id), self._pending],
                args=[explanation_id, request_id, now, ttl],
            )
        if not created:
            raise ValueError("explanation id already exists")

    async def complete_explanation(
        self, explanation_id: str, result: dict, overlay_png: bytes
    ) -> None:
        body = _dumps(result)
        with self._guard():
            ok = await self._complete(
                keys=[self._expl(explanation_id), self._png(explanation_id), self._pending],
                args=[explanation_id, body, bytes(overlay_png), repr(time.time())],
            )
        if not ok:
            raise KeyError(explanation_id)

    async def fail_explanation(self, explanation_id: str, reason: str) -> None:
        with self._guard():
            status = await self._fail(
                keys=[self._expl(explanation_id), self._pending],
                args=[explanation_id, reason, repr(time.time())],
            )
        if status == 0:
            raise KeyError(explanation_id)

    async def get_explanation(self, explanation_id: str) -> ExplanationRecord | None:
        with self._guard():
            h = await self._r.hgetall(self._expl(explanation_id))
        if not h:
            return None
        result = h.get(b"result")
        error = h.get(b"error")
        return ExplanationRecord(
            id=explanation_id,
            request_id=h[b"request_id"].decode(),
            state=h[b"state"].decode(),  # type: ignore[arg-type]
            result=None if result is None else json.loads(result),
            error=None if error is None else error.decode(),
            created_at=float(h[b"created_at"]),
            updated_at=float(h[b"updated_at"]),
            attempts=int(h[b"attempts"]),
        )

    async def get_explanation_png(self, explanation_id: str) -> bytes | None:
        with self._guard():
            return await self._r.get(self._png(explanation_id))

    async def mark_attempt(self, explanation_id: str) -> int:
        with self._guard():
            n = await self._attempt(
                keys=[self._expl(explanation_id), self._pending],
                args=[explanation_id, repr(time.time())],
            )
        if n < 0:
            raise KeyError(explanation_id)
        return int(n)

    async def stale_pending(self, older_than_s: float) -> list[str]:
        cutoff = time.time() - older_than_s
        with self._guard():
            raw = await self._r.zrangebyscore(self._pending, "-inf", cutoff)
            if not raw:
                return []
            ids = [r.decode() for r in raw]
            async with self._r.pipeline(transaction=False) as pipe:
                for eid in ids:
                    pipe.exists(self._expl(eid))
                alive = await pipe.execute()
            # Hashes that expired by TTL leave their id behind in the set: drop those.
            gone = [eid for eid, a in zip(ids, alive, strict=True) if not a]
            if gone:
                await self._r.zrem(self._pending, *gone)
        return [eid for eid, a in zip(ids, alive, strict=True) if a]

    async def ping(self) -> bool:
        try:
            with self._guard():
                return bool(await self._r.ping())
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self._r.aclose()


# --------------------------------------------------------------------------- factory


def open_store(url: str) -> ResultStore:
    """``sqlite:///abs/path.db``, ``sqlite:relative.db`` or ``redis://host:port/db``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        parts = urlsplit(url)
        if parts.netloc:  # "sqlite://name.db": ambiguous host vs path, refuse it
            raise ValueError("sqlite URL must be sqlite:///abs/path.db or sqlite:relative.db")
        if not parts.path:
            raise ValueError("sqlite URL has no path")
        return SQLiteStore(parts.path)
    if scheme in ("redis", "rediss"):
        return RedisStore(url)
    # Never echo the URL: it may carry a password.
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use sqlite: or redis://")
