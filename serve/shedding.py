"""Load shedding in Serve's HTTP proxy: the cheapest place to say no.

Under overload most image requests are refused, and each refusal used to cost a Ray call
from the proxy to the ingress replica and back (about 17 ms of CPU on the 2-core dev box:
at c=32 with clients retrying at once, refusals took two thirds of the goodput). This ASGI
middleware runs inside the proxy, before the body is read and before any Ray call, and
answers the same JSON 503 + Retry-After as the ingress.

It bounds the image-carrying POSTs in flight through this proxy with the ingress's own
`Admission` (fair shares, O(1)); the tenant bucket is a hash of the API key header, not a
verified identity (the ingress authenticates), so one busy client cannot crowd out the
others here either. The bound (`serve.proxy_max_inflight`) defaults to the ingress's, so
nearly every refusal happens here; the ingress's own check, by authenticated tenant,
remains the backstop (several keys of one tenant, several proxies in front of one ingress).

Serve loads it through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH = "serve.shedding:middlewares"
(set by `orthovision serve` and in the KubeRay pod environment), configured by the
ORTHOVISION_PROXY_* variables below.
"""

from __future__ import annotations

import hashlib
import json
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.admission import Admission, Overloaded

CALLBACK = "serve.shedding:middlewares"
MAX_INFLIGHT_ENV = "ORTHOVISION_PROXY_MAX_INFLIGHT"
KEY_HEADER_ENV = "ORTHOVISION_PROXY_KEY_HEADER"
# Routes that carry images (their bodies are what costs); everything else passes.
SHED_PREFIXES = ("/v1/predict", "/dicomweb/")
RETRY_AFTER_S = 1
_BODY = json.dumps(
    {"error": {"code": "overloaded", "message": "the service is at capacity; retry later"}}
).encode()


class ShedAtProxy:
    def __init__(self, app: ASGIApp, max_inflight: int, key_header: str = "x-api-key") -> None:
        self.app = app
        self.admission = Admission(max_inflight, max_uploads_per_tenant=max_inflight)
        self.key_header = key_header.lower().encode()
        self.shed = 0  # refusals so far (tests and debugging)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _sheddable(scope):
            await self.app(scope, receive, send)
            return
        tenant = self._bucket(scope)
        try:
            self.admission.acquire(tenant)
        except Overloaded:
            self.shed += 1
            await _overloaded(send)
            return
        held = True

        async def send_and_release(message: Message) -> None:
            # The slot is free once the answer's last byte is handed over: a client that
            # sends its next request on reading it must not find its old one still counted.
            nonlocal held
            if held and message["type"] == "http.response.body" and not message.get("more_body"):
                held = False
                self.admission.release(tenant)
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if held:
                self.admission.release(tenant)

    def _bucket(self, scope: Scope) -> str:
        for name, value in scope.get("headers", ()):
            if name == self.key_header:
                return hashlib.blake2b(value, digest_size=8).hexdigest()
        return "anonymous"


def _sheddable(scope: Scope) -> bool:
    return (
        scope["type"] == "http"
        and scope.get("method") == "POST"
        and scope.get("path", "").startswith(SHED_PREFIXES)
    )


async def _overloaded(send: Send) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_BODY)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _BODY})


def middlewares() -> list[Middleware]:
    """Serve's proxy callback: the shedding middleware, or none when the bound is 0/unset."""
    max_inflight = int(os.environ.get(MAX_INFLIGHT_ENV, "0") or 0)
    if max_inflight <= 0:
        return []
    header = os.environ.get(KEY_HEADER_ENV, "X-API-Key")
    return [Middleware(ShedAtProxy, max_inflight=max_inflight, key_header=header)]


def proxy_environment(max_inflight: int, key_header: str) -> dict[str, str]:
    """The environment that makes Serve's proxy load this module's middleware."""
    return {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK,
        MAX_INFLIGHT_ENV: str(max_inflight),
        KEY_HEADER_ENV: key_header,
    }
