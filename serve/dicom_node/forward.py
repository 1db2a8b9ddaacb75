"""The node's way into the service: STOW-RS with the tenant's API key, then the SR (and SC).

Through HTTP on purpose: every instance a PACS pushes takes exactly the road of an HTTP
upload (auth, quotas, admission, decode, quality, scope/OOD, store, study grouping), and
the node scales and restarts apart from the Ray cluster. Only what the service says is
kept; its error text never reaches a log (codes only: docs/DESIGN.md, no patient data).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from orthovision.client.bulk import retry_after_s
from orthovision.clinical.dicomweb import related_body, related_content_type

# The service's own codes for "not now" (admission, shedding, a replica lost): try again.
TRANSIENT_CODES = frozenset(
    {"overloaded", "unavailable", "store_unavailable", "not_ready", "body_timeout"}
)


class ServiceBusy(Exception):
    """The service could not take the request now (429, 503, a network error, a bad key):
    keep the instances and retry after `retry_after_s` (None: the node's back-off)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Classified:
    """One instance's outcome: its request id, or the service's error code for it."""

    request_id: str | None
    error: str | None = None

    @property
    def transient(self) -> bool:
        return self.error in TRANSIENT_CODES


class ServiceClient:
    def __init__(
        self,
        base_url: str,
        api_keys: Mapping[str, str],
        header: str = "X-API-Key",
        timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._keys = dict(api_keys)
        self._header = header
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def _auth(self, tenant: str) -> dict[str, str]:
        key = self._keys.get(tenant)
        return {self._header: key} if key else {}

    def _send(self, tenant: str, method: str, url: str, **kw) -> httpx.Response:
        headers = self._auth(tenant) | kw.pop("headers", {})
        try:
            r = self._http.request(method, url, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise ServiceBusy(f"service unreachable ({type(exc).__name__})") from None
        if r.status_code in (429, 503):
            raise ServiceBusy(f"service answered {r.status_code}", retry_after_s(r))
        if r.status_code in (401, 403):
            raise ServiceBusy(f"service refused the node's key for tenant {tenant}")
        return r

    def stow(self, tenant: str, instances: Sequence[bytes], explain: bool) -> list[Classified]:
        """Classify the instances (one STOW-RS request); one outcome each, in order."""
        boundary = uuid.uuid4().hex
        r = self._send(
            tenant,
            "POST",
            "/dicomweb/studies",
            params={"explain": "true"} if explain else None,
            content=related_body(instances, boundary),
            headers={"content-type": related_content_type(boundary), "accept": "application/json"},
        )
        if r.status_code in (200, 202, 409):
            return [_outcome(entry) for entry in r.json()["results"]]
        # The whole request refused (413 too large, 400 ...): say so for each instance.
        code = _error_code(r)
        return [Classified(None, code) for _ in instances]

    def dicom_object(
        self, tenant: str, request_id: str, kind: str, wait_s: float = 120.0
    ) -> bytes | None:
        """The SR or SC of a classified instance; None if the service has none for it.
        The SC is made on request: 202 answers are waited out up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            r = self._send(tenant, "GET", f"/v1/predictions/{request_id}/dicom/{kind}")
            if r.status_code == 200:
                return r.content
            if r.status_code != 202 or time.monotonic() > deadline:
                return None
            time.sleep(min(2.0, retry_after_s(r) or 1.0))


def _outcome(entry: dict) -> Classified:
    # A refused instance has a request id too (its failure is recorded): no SR for it.
    if "error" in entry:
        return Classified(None, entry["error"].get("code"))
    return Classified(entry["request_id"])


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"
