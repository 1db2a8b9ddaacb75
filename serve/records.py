"""Stored predictions and explanations as the read routes see them: a tenant reads its own
records only, and no explanation stays pending forever."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import clinical
from serve.http import SAFE_REQUEST_ID

if TYPE_CHECKING:
    from serve.store import ExplanationRecord, ResultStore

# The explanation's route (explanation id == request id); its PNG is this plus ".png".
EXPLANATION_ROUTE = "/v1/explanations/{explanation_id}"


def explanation_url(explanation_id: str) -> str:
    return EXPLANATION_ROUTE.format(explanation_id=explanation_id)


def explanation_response(record: ExplanationRecord) -> JSONResponse:
    """An explanation's state: 202 while pending, its summary and PNG link once done."""
    body = {"id": record.id, "request_id": record.request_id, "state": record.state}
    if record.state == "pending":
        return JSONResponse(body, status_code=202, headers={"Retry-After": "1"})
    if record.state == "failed":
        body["error"] = {"code": "explanation_failed", "message": record.error}
        return JSONResponse(body, status_code=200)
    body.update(record.result or {})
    body["png_url"] = f"{explanation_url(record.id)}.png"
    return JSONResponse(body)


class Records:
    def __init__(self, store: ResultStore, explanation_timeout_s: float) -> None:
        self.store = store
        # Past this an explanation still pending lost the ingress replica that awaited it.
        self.pending_deadline_s = 2 * explanation_timeout_s + 30

    async def owned(self, request_id: str, tenant: str) -> dict | None:
        """The stored prediction if `tenant` owns it. Another tenant's record is answered
        exactly like a missing one (404): ids travel in URLs and logs, so they are not
        secrets, and a 403 would confirm that the id exists."""
        if not SAFE_REQUEST_ID.fullmatch(request_id):
            return None
        record = await self.store.get_record(request_id)
        if record is None or clinical.private(record).get("tenant") != tenant:
            return None
        return record

    async def stored(self, request_id: str, tenant: str) -> dict:
        """`owned`, or a 404."""
        record = await self.owned(request_id, tenant)
        if record is None:
            raise StarletteHTTPException(404, "unknown or expired request id")
        return record

    async def explanation(self, explanation_id: str, tenant: str) -> ExplanationRecord | None:
        """The stored explanation, None unless `tenant` owns its prediction."""
        if await self.owned(explanation_id, tenant) is None:
            return None
        return await self.live_explanation(explanation_id)

    async def live_explanation(self, explanation_id: str) -> ExplanationRecord | None:
        """The stored explanation of a prediction whose owner is already checked; one left
        pending past its deadline (its ingress replica died before recording the outcome)
        is failed here, so nothing stays pending forever."""
        record = await self.store.get_explanation(explanation_id)
        if (
            record
            and record.state == "pending"
            and time.time() - record.updated_at > self.pending_deadline_s
        ):
            await self.store.fail_explanation(explanation_id, "timed out")
            record = await self.store.get_explanation(explanation_id)
        return record

    async def overlay_png(self, request_id: str, record: dict) -> tuple[bytes | None, str, str]:
        """(overlay PNG or None, explanation state, why there is none) of a stored record the
        caller already owns."""
        if not record.get("explanation_url"):
            return None, "none", "No explanation was requested for this image."
        explanation = await self.live_explanation(request_id)
        if explanation is None:
            return None, "expired", "The explanation has expired."
        if explanation.state == "pending":
            return None, "pending", "The explanation was still being computed when this was made."
        if explanation.state == "failed":
            return None, "failed", "The explanation failed."
        return await self.store.get_explanation_png(request_id), "done", ""
