"""HTTP plumbing under the routes of serve/ingress.py: error mapping, the request counter,
bounded body reading, request ids and the JSON answers of item outcomes.

Errors are always `{"error": {"code", "message"}}` (docs/DESIGN.md: HTTP contract): 4xx for
anything a client sent, 503 with Retry-After for what is full or down, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orthovision.errors import BodyTimeout, InputError, InputTooLarge
from orthovision.schema import ErrorResponse
from serve.admission import Overloaded
from serve.auth import AuthError
from serve.metrics import metrics
from serve.store import StoreUnavailable

if TYPE_CHECKING:
    from orthovision.model.pipeline import ItemOutcome

log = logging.getLogger("ray.serve")

# OpenAPI error responses of the routes that take an upload.
ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 503)}
# What a 503 for a failed or lost replica asks the client to wait: Serve replaces a dead
# replica in seconds when its node is up (docs/OPERATIONS.md: node lost).
REPLICA_RETRY_AFTER_S = 2
# Request ids are uuid4 hex (new_request_id); anything else is not looked up.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9-]{8,64}")


def new_request_id() -> str:
    """A fresh id per request: a store key and URL segment. (Not Ray Serve's X-Request-ID: a
    client may set that one, and ids must never collide across clients' records.)"""
    return uuid.uuid4().hex


def error_response(
    status: int, code: str, message: str, retry_after_s: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else {}
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
    """An error answer raised by a helper, so the route need not thread it back."""

    def __init__(
        self, status: int, code: str, message: str, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s = retry_after_s


def answer(outcome: ItemOutcome) -> JSONResponse:
    """One image's answer: its v1 result, or its input error with the error's status."""
    if isinstance(outcome, InputError):
        return error_response(outcome.http_status, outcome.code, outcome.message)
    return JSONResponse(outcome.result)


def batch_body(names: Sequence[str], ids: Sequence[str], outcomes: Sequence[ItemOutcome]) -> dict:
    """The /v1/predict/batch answer: one entry per file, in order, counted."""
    items = []
    for index, (name, rid, out) in enumerate(zip(names, ids, outcomes, strict=True)):
        entry = {"index": index, "filename": name}
        if isinstance(out, InputError):
            entry.update({"request_id": rid, "error": out.to_dict()})
        else:
            entry.update(out.result)
        items.append(entry)
    failed = sum("error" in i for i in items)
    return {"count": len(items), "failed": failed, "items": items}


# ---- exception handlers ------------------------------------------------------------------
async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.retry_after_s)


async def _auth_error(_req: Request, exc: AuthError) -> JSONResponse:
    return error_response(exc.http_status, exc.code, exc.message, exc.retry_after_s)


async def _input_error(_req: Request, exc: InputError) -> JSONResponse:
    metrics().rejected.inc(tags={"reason": exc.code})
    return error_response(exc.http_status, exc.code, exc.message)


async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
    return error_response(422, "invalid_request", f"invalid request parameters: {fields}")


async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _admission_full(_req: Request, _exc: Overloaded) -> JSONResponse:
    return error_response(503, "overloaded", "the service is at capacity; retry later", 1)


async def _overloaded(_req: Request, _exc: BackPressureError) -> JSONResponse:
    return error_response(503, "overloaded", "the service is at capacity; retry later", 2)


async def _store_down(_req: Request, _exc: StoreUnavailable) -> JSONResponse:
    return error_response(503, "store_unavailable", "result store unavailable; retry later", 5)


async def _replica_failure(_req: Request, exc: RayError | RayServeException) -> JSONResponse:
    # A replica died or timed out mid-request: the client's input was fine, so retry later.
    log.warning("downstream replica failure: %s", type(exc).__name__)
    return error_response(
        503, "unavailable", "a model replica failed; retry later", REPLICA_RETRY_AFTER_S
    )


HANDLERS = {
    ApiError: _api_error,
    AuthError: _auth_error,
    InputError: _input_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    Overloaded: _admission_full,
    BackPressureError: _overloaded,
    StoreUnavailable: _store_down,
    RayError: _replica_failure,
    RayServeException: _replica_failure,  # a dead upstream of a chained call; not a full queue
}


def install(api: FastAPI) -> None:
    """Every error as JSON, and every request counted, on the ingress's app."""
    for kind, handler in HANDLERS.items():
        api.add_exception_handler(kind, handler)
    api.add_middleware(CountRequests)


class CountRequests:
    """orthovision_requests_total by tenant, route template and status (bounded labels).

    Plain ASGI: Starlette's BaseHTTPMiddleware costs a task group and two streams per
    request, which shows at this service's request rates."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            tenant = scope.get("state", {}).get("tenant", "anonymous")
            metrics().requests.inc(tags={"tenant": tenant, "route": route, "status": str(status)})


# ---- bodies ------------------------------------------------------------------------------
def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it passes max_bytes (declared or streamed) or takes
    longer than timeout_s to arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InputTooLarge(f"request body of {declared} bytes exceeds {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise InputTooLarge(f"request body exceeds {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {timeout_s:.0f} s") from None
    return b"".join(chunks)


async def form_files(request: Request, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each file field of a multipart/form-data body already read under
    the limits (replayed to Starlette's parser, which bounds the count of parts)."""
    from starlette.requests import Request as StarletteRequest

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    replay = StarletteRequest(request.scope, receive)
    try:
        form = await replay.form(max_files=limit, max_fields=limit + 8)
    except (StarletteHTTPException, ValueError, KeyError) as exc:
        detail = getattr(exc, "detail", "malformed multipart body")
        raise InputError(f"multipart body rejected: {detail}") from None
    files = []
    for _key, value in form.multi_items():
        if hasattr(value, "read"):
            files.append((value.filename or "", await value.read()))
    await form.close()
    return files


async def single_image(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The one image of /v1/predict: the raw body, or the multipart field's file."""
    ctype = media_type(request)
    body = await read_body(request, max_bytes, timeout_s)
    if ctype == "multipart/form-data":
        parts = await form_files(request, body, limit=1)
        if not parts:
            raise InputError("multipart body has no file field")
        return parts[0][1]
    if not body:
        raise InputError("empty request body: send the image bytes or a multipart field `file`")
    return body
