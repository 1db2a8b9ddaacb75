"""Result store: per-request records, asynchronous explanations and study entries, shared by
all replicas.

Two backends behind one async interface (`base.ResultStore`): `SQLiteStore` (one machine,
the default) and `RedisStore` (clusters). `open_store` picks one from the configured URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from serve.store.base import (
    DEFAULT_EXPLANATION_TTL_S,
    Erased,
    ExplanationImage,
    ExplanationRecord,
    ExplanationState,
    LayerKind,
    ResultStore,
    StoreUnavailable,
    StudyEntry,
)
from serve.store.redis import REDIS_PASSWORD_ENV, RedisStore
from serve.store.sqlite import SQLiteStore, UnsafeStoreDirectory

__all__ = [
    "DEFAULT_EXPLANATION_TTL_S",
    "REDIS_PASSWORD_ENV",
    "Erased",
    "ExplanationImage",
    "ExplanationRecord",
    "ExplanationState",
    "LayerKind",
    "RedisStore",
    "ResultStore",
    "SQLiteStore",
    "StoreUnavailable",
    "StudyEntry",
    "UnsafeStoreDirectory",
    "open_store",
]


def open_store(url: str, explanation_ttl_s: int = DEFAULT_EXPLANATION_TTL_S) -> ResultStore:
    """``sqlite:///abs/path.db``, ``sqlite:relative.db`` or ``redis://host:port/db``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        parts = urlsplit(url)
        if parts.netloc:  # "sqlite://name.db": ambiguous host vs path, refuse it
            raise ValueError("sqlite URL must be sqlite:///abs/path.db or sqlite:relative.db")
        if not parts.path:
            raise ValueError("sqlite URL has no path")
        return SQLiteStore(parts.path, explanation_ttl_s=explanation_ttl_s)
    if scheme in ("redis", "rediss"):
        return RedisStore(url, explanation_ttl_s=explanation_ttl_s)
    # Never echo the URL: it may carry a password.
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use sqlite: or redis://")
