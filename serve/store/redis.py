"""`RedisStore`: the result store for multi-node clusters, and the Lua that keeps it atomic.

Bounded socket timeouts make a dead server surface as ``StoreUnavailable`` (HTTP 503)
instead of a hang. (This module is ``serve.store.redis``; ``import redis`` below is the
absolute, third-party package.)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

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

__all__ = ["REDIS_PASSWORD_ENV", "RedisStore"]

# serve/manifests/cluster.py puts the Kubernetes Secret under this name.
REDIS_PASSWORD_ENV = "ORTHOVISION_REDIS_PASSWORD"

# Lua keeps each state transition atomic across replicas (check + write in one step).
_LUA_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'request_id', ARGV[1], 'state', 'pending',
           'created_at', ARGV[2], 'updated_at', ARGV[2], 'attempts', 0)
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# ARGV[4..]: layer kind, PNG, kind, PNG... The images take the hash's remaining lifetime
# (in ms, so none outlives it or dies first by a rounded second).
_LUA_COMPLETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[1], 'updated_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'error')
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
if #ARGV > 3 then redis.call('HSET', KEYS[3], unpack(ARGV, 4)) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return 1
"""

_LUA_FAIL = """
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 0 end
if st == 'done' then return 2 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[1], 'updated_at', ARGV[2])
return 1
"""

_LUA_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
return n
"""

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# An erasure that keeps racing new instances of its patient gives up after this many tries.
_ERASE_ATTEMPTS = 8


class RedisStore(ResultStore):
    """Redis-backed store for multi-node clusters.

    Keys: ``ov:rec:<id>`` (JSON string), ``ov:expl:<id>`` (hash), and the explanation's
    images ``ov:expl:<id>:png`` (the overlay) and ``ov:expl:<id>:layers`` (hash kind -> PNG),
    which expire with it. Studies: ``ov:study:<tenant>:<uid>`` (hash request id -> entry
    JSON) and ``ov:patient:<tenant>:<ref>`` (set of study uids), each with its TTL.
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
        check_ttl(explanation_ttl_s)
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

    def _layers(self, explanation_id: str) -> str:
        return f"{self.PREFIX}:expl:{explanation_id}:layers"

    def _study(self, tenant: str, study_uid: str) -> str:
        return f"{self.PREFIX}:study:{tenant}:{study_uid}"

    def _patient(self, tenant: str, patient_ref: str) -> str:
        return f"{self.PREFIX}:patient:{tenant}:{patient_ref}"

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
        check_ttl(ttl_s)
        with self._guard():
            async with self._r.pipeline(transaction=False) as pipe:
                for request_id, record in records:
                    pipe.set(self._rec(request_id), dumps(record), ex=ttl_s)
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
                keys=[self._expl(explanation_id)], args=[request_id, now, ttl]
            )
        if not created:
            raise ValueError("explanation id already exists")

    async def complete_explanation(
        self,
        explanation_id: str,
        result: dict,
        overlay_png: bytes,
        layers: Mapping[LayerKind, bytes] | None = None,
    ) -> None:
        body = dumps(result)
        flat: list[str | bytes] = []
        for kind, png in (layers or {}).items():
            flat += [kind, bytes(png)]
        keys = [self._expl(explanation_id), self._png(explanation_id), self._layers(explanation_id)]
        with self._guard():
            ok = await self._complete(
                keys=keys, args=[body, bytes(overlay_png), repr(time.time()), *flat]
            )
        if not ok:
            raise KeyError(explanation_id)

    async def fail_explanation(self, explanation_id: str, reason: str) -> None:
        with self._guard():
            status = await self._fail(
                keys=[self._expl(explanation_id)], args=[reason, repr(time.time())]
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

    async def get_explanation_png(
        self, explanation_id: str, kind: ExplanationImage = "overlay"
    ) -> bytes | None:
        # Both keys are written only by the "done" transition: their presence means done.
        with self._guard():
            if kind == "overlay":
                return await self._r.get(self._png(explanation_id))
            return await self._r.hget(self._layers(explanation_id), kind)

    async def mark_attempt(self, explanation_id: str) -> int:
        with self._guard():
            n = await self._attempt(keys=[self._expl(explanation_id)], args=[repr(time.time())])
        if n < 0:
            raise KeyError(explanation_id)
        return int(n)

    async def put_study_entries(
        self, entries: Sequence[StudyEntry], ttl_s: int | None = None
    ) -> None:
        check_ttl(ttl_s)
        keys: set[str] = set()
        with self._guard():
            async with self._r.pipeline(transaction=True) as pipe:
                for e in entries:
                    study = self._study(e.tenant, e.study_uid)
                    pipe.hset(study, e.request_id, e.to_json())
                    keys.add(study)
                    if e.patient_ref:
                        patient = self._patient(e.tenant, e.patient_ref)
                        pipe.sadd(patient, e.study_uid)
                        keys.add(patient)
                for key in sorted(keys) if ttl_s else ():
                    pipe.expire(key, ttl_s)
                await pipe.execute()

    async def get_study(self, tenant: str, study_uid: str) -> list[StudyEntry]:
        with self._guard():
            fields = await self._r.hgetall(self._study(tenant, study_uid))
        return _ordered(fields.values())

    async def get_patient_entries(self, tenant: str, patient_ref: str) -> list[StudyEntry]:
        with self._guard():
            studies = await self._r.smembers(self._patient(tenant, patient_ref))
            async with self._r.pipeline(transaction=False) as pipe:
                for uid in sorted(studies):
                    pipe.hvals(self._study(tenant, uid.decode()))
                bodies = [body for values in await pipe.execute() for body in values]
        return [e for e in _ordered(bodies) if e.patient_ref == patient_ref]

    async def erase_patient(self, tenant: str, patient_ref: str) -> Erased:
        """Read the patient's entries under WATCH, delete in one MULTI; a concurrent write
        to the patient or one of its studies restarts it (nothing written meanwhile stays)."""
        patient = self._patient(tenant, patient_ref)
        with self._guard():
            async with self._r.pipeline(transaction=True) as pipe:
                for _ in range(_ERASE_ATTEMPTS):
                    try:
                        return await self._erase_once(pipe, tenant, patient_ref, patient)
                    except WatchError:
                        continue
        raise StoreUnavailable("redis: erasure kept racing concurrent writes")

    async def _erase_once(self, pipe, tenant: str, patient_ref: str, patient: str) -> Erased:
        await pipe.watch(patient)
        studies = [self._study(tenant, uid.decode()) for uid in await pipe.smembers(patient)]
        if studies:
            await pipe.watch(*studies)
        doomed: dict[str, list[str]] = {}
        for study in studies:
            for rid, body in (await pipe.hgetall(study)).items():
                if StudyEntry.from_json(body).patient_ref == patient_ref:
                    doomed.setdefault(study, []).append(rid.decode())
        rids = [rid for ids in doomed.values() for rid in ids]
        pipe.multi()
        for study, ids in doomed.items():
            pipe.hdel(study, *ids)
        for rid in rids:
            pipe.delete(self._rec(rid))
            pipe.delete(self._expl(rid))
            pipe.delete(self._png(rid), self._layers(rid))
        pipe.delete(patient)
        out = await pipe.execute()
        per_id = out[len(doomed) : len(doomed) + 3 * len(rids)]
        return Erased(
            records=sum(per_id[0::3]),
            explanations=sum(per_id[1::3]),
            study_entries=sum(out[: len(doomed)]),
        )

    async def ping(self) -> bool:
        try:
            with self._guard():
                return bool(await self._r.ping())
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self._r.aclose()


def _ordered(bodies) -> list[StudyEntry]:
    """Entries oldest first (ties by request id: a stable order for equal clocks)."""
    entries = [StudyEntry.from_json(body) for body in bodies]
    return sorted(entries, key=lambda e: (e.created_at, e.request_id))
