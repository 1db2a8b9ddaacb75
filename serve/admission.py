"""Admission control per ingress replica, fair between tenants.

Two bounds, both answered at once with a JSON 503 + Retry-After (never a queue):
- uploads in progress per tenant (`admission_max_uploads_per_tenant`): a tenant's slow or
  stalled uploads cost only its own budget;
- compute slots (`admission_max_inflight`), taken only once the body has arrived, shared
  fairly: with n tenants active, each may hold limit // n, and a lone tenant never takes
  the last slot, so a newcomer is always admitted.

Under overload most requests are rejected, so a rejection must cost next to nothing:
`would_admit` is asked before the body is read (a refused upload is never received or
parsed) and every decision is O(1) (running totals, no scan over tenants).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """This ingress replica (or this tenant's share of it) is at its admission limit."""


class Admission:
    def __init__(self, max_inflight: int, max_uploads_per_tenant: int) -> None:
        self.max_inflight = max_inflight
        self.max_uploads = max_uploads_per_tenant
        self.inflight: Counter[str] = Counter()  # only tenants holding slots (see _held)
        self.uploads: Counter[str] = Counter()
        self.total = 0  # sum(self.inflight.values()), kept as it changes

    def share(self, tenant: str) -> int:
        """The slots `tenant` may hold now."""
        active = len(self.inflight) + (tenant not in self.inflight)
        cap = max(1, self.max_inflight // active)
        if active == 1 and self.max_inflight > 1:
            cap = self.max_inflight - 1  # keep one for whoever comes next
        return cap

    def would_admit(self, tenant: str) -> bool:
        """Whether `tenant` could take a slot now: the check before its body is read."""
        return self.total < self.max_inflight and self.inflight[tenant] < self.share(tenant)

    @contextlib.asynccontextmanager
    async def upload(self, tenant: str) -> AsyncIterator[None]:
        if self.uploads[tenant] >= self.max_uploads:
            raise Overloaded()
        async with self._held(self.uploads, tenant):
            yield

    def acquire(self, tenant: str) -> None:
        """Take a slot for `tenant` or raise Overloaded; pair with release()."""
        if not self.would_admit(tenant):
            raise Overloaded()
        self.total += 1
        self.inflight[tenant] += 1

    def release(self, tenant: str) -> None:
        self.total -= 1
        self.inflight[tenant] -= 1
        if self.inflight[tenant] <= 0:
            del self.inflight[tenant]  # bounded: only tenants with work in progress are kept

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _held(counts: Counter[str], tenant: str) -> AsyncIterator[None]:
        counts[tenant] += 1
        try:
            yield
        finally:
            counts[tenant] -= 1
            if counts[tenant] <= 0:
                del counts[tenant]  # bounded: only tenants with work in progress are kept
