"""Stored predictions, explanations, studies and patient timelines as the routes see them: a
tenant reads (and erases) its own only, and nothing stays pending forever."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orthovision.clinical.figure import Figure, report_figure
from serve import clinical, studies
from serve.http import SAFE_REQUEST_ID, ApiError
from serve.patients import PATIENT_REF
from serve.store import Erased

if TYPE_CHECKING:
    from serve.patients import PatientKeys
    from serve.store import ExplanationRecord, ResultStore, StudyEntry

log = logging.getLogger("ray.serve")
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
    def __init__(
        self, store: ResultStore, explanation_timeout_s: float, patients: PatientKeys
    ) -> None:
        self.store, self.patients = store, patients
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

    async def report_figure(self, request_id: str, record: dict) -> tuple[Figure | None, str]:
        """(the report's heat-map figure or None, why there is none): on the kept display
        rendering of a DICOM input when there is one, else on the unpadded model input."""
        overlay, _state, note = await self.overlay_png(request_id, record)
        if overlay is None:
            return None, note
        explanation = await self.store.get_explanation(request_id)
        box = ((explanation and explanation.result) or {}).get("input_box")
        heatmap = await self.store.get_explanation_png(request_id, "heatmap")
        figure = await asyncio.to_thread(
            report_figure, overlay, box, heatmap, clinical.display_png(record)
        )
        return figure, ""

    # ---- studies and patients ----------------------------------------------------------
    def _settled(self, entries: list[StudyEntry]) -> list[StudyEntry]:
        return studies.settled(entries, time.time(), self.pending_deadline_s)

    async def study(self, study_uid: str, tenant: str) -> dict:
        """The tenant's study with each instance and the study result, or a 404 (another
        tenant's study answers exactly like an unknown one)."""
        studies.check_study_uid(study_uid, "StudyInstanceUID")
        entries = await self.store.get_study(tenant, study_uid)
        if not entries:
            raise StarletteHTTPException(404, "unknown or expired study")
        return studies.study_body(study_uid, self._settled(entries))

    async def study_instances(
        self, study_uid: str, tenant: str
    ) -> tuple[dict, list[tuple[dict, dict]]]:
        """The study and its classified DICOM instances still retained, as (record, opened
        DICOM source) pairs: what a study SR references; a 404 when there is none."""
        study = await self.study(study_uid, tenant)
        pairs = []
        for instance in (i for i in study["instances"] if i["state"] == "done"):
            record = await self.owned(instance["request_id"], tenant)
            source = record and self.patients.open(tenant, clinical.private(record))
            if source:  # None: expired, or not a DICOM input
                pairs.append((record, source))
        if not pairs:
            raise ApiError(
                404, "not_dicom", "no classified DICOM instance of this study is retained"
            )
        return study, pairs

    async def studies_of(self, study_uids: list[str], tenant: str) -> list[dict]:
        """The tenant's studies among `study_uids` (each once, in order; "" skipped)."""
        bodies = []
        for uid in dict.fromkeys(u for u in study_uids if u):
            entries = await self.store.get_study(tenant, uid)
            if entries:
                bodies.append(studies.study_body(uid, self._settled(entries)))
        return bodies

    async def timeline(self, patient_ref: str | None, tenant: str) -> dict:
        """The tenant's timeline of a patient reference, or a 404."""
        entries = []
        if patient_ref and PATIENT_REF.fullmatch(patient_ref):
            entries = await self.store.get_patient_entries(tenant, patient_ref)
        if not entries:
            raise StarletteHTTPException(404, "unknown patient or no study retained")
        return studies.timeline(patient_ref, self._settled(entries))

    async def priors(self, record: dict, tenant: str) -> list[str]:
        """The report's lines on the patient's prior studies of the same body part; empty
        when the record's input names no study or no patient (PNG/JPEG, no patient key)."""
        uid = (clinical.dicom_source(record) or {}).get("StudyInstanceUID")
        entries = await self.store.get_study(tenant, uid) if uid else []
        ref = next((e.patient_ref for e in entries if e.patient_ref), None)
        if ref is None:
            return []
        entries = await self.store.get_patient_entries(tenant, ref)
        return studies.prior_lines(uid, studies.timeline(ref, self._settled(entries)))

    async def erase(self, patient_ref: str | None, tenant: str) -> dict:
        """Erase the tenant's patient: every study entry, record and explanation."""
        erased = Erased()
        if patient_ref and PATIENT_REF.fullmatch(patient_ref):
            erased = await self.store.erase_patient(tenant, patient_ref)
        removed = asdict(erased)
        return {"patient_ref": patient_ref, "removed": removed, "total": sum(removed.values())}


async def sweep_forever(store: ResultStore, interval_s: float) -> None:
    """Delete what outlived its retention every `interval_s` (docs/STUDIES.md: retention),
    even when no write comes to trigger the store's own purge; Redis expires by itself."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await store.sweep()
        except Exception as exc:  # a sweep that fails is retried next interval, never fatal
            log.warning("retention sweep failed: %s", type(exc).__name__)
