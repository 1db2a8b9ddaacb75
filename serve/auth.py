"""API-key authentication, per-tenant scopes, rate limits and daily quotas.

Keys are never stored in clear: config holds sha256 hashes, and keys given through the
environment (a Kubernetes Secret mounted as env) are hashed on load and dropped.
Limits are per ingress replica (token buckets in memory); with N ingress replicas a
tenant's effective rate is up to N times its configured rate.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import threading
import time
from dataclasses import dataclass, field

from orthovision.config import SecurityConfig, ServeConfig, TenantConfig

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


class AuthError(Exception):
    http_status = 401
    code = "unauthorized"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class Forbidden(AuthError):
    http_status = 403
    code = "forbidden"


class RateLimited(AuthError):
    http_status = 429
    code = "rate_limited"


class QuotaExceeded(AuthError):
    http_status = 429
    code = "quota_exceeded"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_pairs(value: str | None) -> dict[str, str]:
    """`tenant=key[,tenant=key...]` (a Secret's value) -> {tenant: key}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        tenant_id, sep, key = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("API keys must look like tenant=key[,tenant=key...]")
        pairs[tenant_id.strip()] = key.strip()
    return pairs


def tenants_from_env(value: str | None, defaults: TenantConfig | None = None) -> list[TenantConfig]:
    """`tenant=key[,tenant=key...]` (the Secret's value) -> tenants with hashed keys."""
    tenants = []
    for tenant_id, key in key_pairs(value).items():
        base = defaults.model_dump() if defaults else {}
        base.update(id=tenant_id, key_sha256=hash_key(key))
        tenants.append(TenantConfig.model_validate(base))
    return tenants


def check_binding(serve_cfg: ServeConfig) -> None:
    """No authentication is allowed only on a loopback address."""
    if serve_cfg.security.auth == "none" and not is_loopback(serve_cfg.host):
        raise RuntimeError(
            f"refusing to start: authentication is off but the service binds {serve_cfg.host}; "
            "running without API keys is allowed only on localhost (set security.auth)"
        )


def check_startup(serve_cfg: ServeConfig, tenants: list[TenantConfig]) -> None:
    """Refuse unsafe deployments before any request is served."""
    security = serve_cfg.security
    check_binding(serve_cfg)
    if security.auth == "api-key" and not tenants:
        raise RuntimeError(
            f"refusing to start: security.auth is api-key but no tenants are configured "
            f"(config security.tenants or the {security.api_keys_env} environment variable)"
        )


@dataclass
class _Bucket:
    rate_per_s: float
    burst: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


# The one tenant of a service with auth off (loopback only): owner of every record.
LOCAL_TENANT = "local"
# Wrong keys from one client: a burst of 10, then one every 5 s (brute force gets 429).
BAD_KEY_BURST, BAD_KEY_RATE_PER_S = 10.0, 0.2
_MAX_TRACKED_CLIENTS = 10_000


class Authenticator:
    def __init__(self, security: SecurityConfig, tenants: list[TenantConfig]) -> None:
        self.enabled = security.auth == "api-key"
        self.header = security.header.lower()
        self._by_hash = {t.key_sha256: t for t in tenants}
        self._buckets = {t.id: _Bucket(t.rate_per_s, t.burst, t.burst) for t in tenants}
        self._day: dict[str, tuple[int, int]] = {}  # tenant -> (utc day, count)
        self._bad_keys: dict[str, _Bucket] = {}  # client address -> wrong-key budget
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, serve_cfg: ServeConfig) -> Authenticator:
        security = serve_cfg.security
        tenants = list(security.tenants) + tenants_from_env(
            os.environ.get(security.api_keys_env), security.default_tenant
        )
        check_startup(serve_cfg, tenants)
        return cls(security, tenants)

    @property
    def tenant_ids(self) -> list[str]:
        """Every tenant that can authenticate (the local one alone with auth off)."""
        return sorted(self._buckets) if self.enabled else [LOCAL_TENANT]

    def _count_bad_key(self, client: str) -> None:
        with self._lock:
            if len(self._bad_keys) > _MAX_TRACKED_CLIENTS:
                self._bad_keys.clear()  # bounded memory; a flood restarts everyone's budget
            bucket = self._bad_keys.setdefault(
                client, _Bucket(BAD_KEY_RATE_PER_S, BAD_KEY_BURST, BAD_KEY_BURST)
            )
            wait_s = bucket.take()
        if wait_s > 0:
            raise RateLimited("too many invalid API keys", retry_after_s=max(1, math.ceil(wait_s)))

    def authenticate(self, api_key: str | None, *scopes: str, client: str | None = None) -> str:
        """The tenant id for a key allowed every one of `scopes`; raises AuthError
        (401/403/429). `client` (the peer address) budgets wrong keys: past a burst they
        get 429 with Retry-After, so keys cannot be guessed at line rate."""
        if not self.enabled:
            return LOCAL_TENANT
        if not api_key:
            raise AuthError(f"missing API key (header {self.header})")
        digest = hash_key(api_key)
        tenant = next((t for h, t in self._by_hash.items() if hmac.compare_digest(h, digest)), None)
        if tenant is None:
            self._count_bad_key(client or "unknown")
            raise AuthError("invalid API key")
        missing = [s for s in scopes if s not in tenant.scopes]
        if missing:
            raise Forbidden(f"this API key may not use {missing[0]!r}")
        with self._lock:
            wait_s = self._buckets[tenant.id].take()
            if wait_s > 0:
                raise RateLimited("rate limit exceeded", retry_after_s=max(1, math.ceil(wait_s)))
            if tenant.daily_quota is not None:
                day = int(time.time() // 86400)
                seen_day, count = self._day.get(tenant.id, (day, 0))
                count = count if seen_day == day else 0
                if count >= tenant.daily_quota:
                    retry = int(86400 - time.time() % 86400) + 1
                    raise QuotaExceeded("daily quota exhausted", retry_after_s=retry)
                self._day[tenant.id] = (day, count + 1)
        return tenant.id
