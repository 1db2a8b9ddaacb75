"""HTTP ingress (FastAPI via @serve.ingress): the routes. The plumbing under them is in
serve/http.py (errors, bodies, request ids), the road of images in serve/classify.py and the
stored records' reads in serve/records.py, studies and timelines in serve/studies.py.
Over 400 lines because it is the whole route table (each handler a few lines that call
those modules): one file to read to know the HTTP surface.

No `from __future__ import annotations` here: FastAPI must resolve the route annotations
(Request) at runtime inside a replica that unpickles this class by value. For the same
reason every module-level name the class uses is defined above it: a name defined below is
missing in the replica (NameError).
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

from fastapi import Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle

from orthovision.clinical import dicomweb as dw
from orthovision.errors import InputError
from orthovision.model.pipeline import ItemOutcome
from orthovision.schema import Prediction
from serve import clinical, http, patients, studies
from serve.admission import Admission, Overloaded
from serve.auth import Authenticator
from serve.classify import Classifier, Deployments, Job
from serve.http import ERRORS, ApiError, error_response
from serve.metrics import metrics
from serve.patients import PatientKeys
from serve.records import EXPLANATION_ROUTE, Records, explanation_response, sweep_forever
from serve.runtime import config_from, replica_setup
from serve.store import open_store

log = logging.getLogger("ray.serve")

# /docs and /redoc from assets the service serves itself (fastapi-offline ships Swagger UI
# and ReDoc): a hospital network without internet still gets the interactive docs.
api = FastAPIOffline(
    title="OrthoVision Serve",
    version="1",
    description="Second-opinion classification of bone radiographs (not a diagnosis).",
)
http.install(api)

# The viewer is one static page; the browser revalidates it so a deploy shows at once.
VIEWER_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # No framing (clickjacking): frame-ancestors only works as a header, not in the page's
    # <meta> CSP; X-Frame-Options for older browsers.
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
# The DICOM objects filed beside a DICOM input's source: .../sr and .../sc.
DICOM_ROUTE = "/v1/predictions/{request_id}/dicom"
DICOM_FILE = {200: {"content": {"application/dicom": {}}}}
# The viewer's opt-in: a browser cannot show DICOM, so the service keeps a display rendering.
DisplayQuery = Annotated[
    bool,
    Query(description="keep a DICOM input's display rendering for .../{request_id}/image.png"),
]
STUDY_ROUTE = "/v1/studies/{study_instance_uid}"
STUDY_HEADER = "X-Study-Instance-UID"
# The patient id headers: hashed into the tenant's patient reference, never kept or logged.
PatientIdHeader = Annotated[
    str | None, Header(alias="X-Patient-ID", description="PatientID (hashed, never stored)")
]
IssuerHeader = Annotated[
    str | None, Header(alias="X-Issuer-Of-Patient-ID", description="IssuerOfPatientID")
]
STUDY_DESCRIPTION = (
    "Every instance of the study sent by this tenant (request id, label, fracture "
    "probability, abstained and why) and the study result: the fracture probability of the "
    "most suspicious view (`rule: max over views`, over instances that were not abstained), "
    "the instance that drives it, abstentions and failures counted apart, and `complete` "
    "(no instance pending). Another tenant's study answers 404, as an unknown one does."
)
TIMELINE_DESCRIPTION = (
    "The patient's studies, newest first, each with its date, body part and study result, "
    "and what changed since the prior study of the same body part. The patient reference "
    "is HMAC-SHA256 of (IssuerOfPatientID, PatientID) under this tenant's secret."
)
ERASE_DESCRIPTION = (
    "Erase every record, explanation and study entry of this patient for this tenant; "
    "answers how many of each were removed. Needs the `predict` scope."
)


async def dicom_file(build: Callable[[], bytes]) -> Response:
    """Run a DICOM builder off the loop. Its failures may quote the source's header values
    (patient identifiers): log and answer the exception type only."""
    try:
        body = await asyncio.to_thread(build)
    except Exception as exc:  # any builder failure; the message is never forwarded
        log.warning("DICOM output failed: %s", type(exc).__name__)
        return error_response(
            422, "dicom_output_failed", "the source's DICOM attributes cannot be reused"
        )
    return Response(body, media_type="application/dicom")


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        preprocessor: DeploymentHandle,
        backbones: dict[str, DeploymentHandle],
        fusion: DeploymentHandle,
        explainer: DeploymentHandle,
        config: dict,
    ) -> None:
        replica_setup()
        self.cfg = config_from(config)
        s = self.cfg.serve
        self.deployments = Deployments(preprocessor, backbones, fusion, explainer)
        self.store = open_store(s.store_url, s.explanation_retention_s)
        self.auth = Authenticator.from_config(s)
        self.patients = PatientKeys.from_env(s.security, self.auth.tenant_ids)
        self.admission = Admission(s.admission_max_inflight, s.admission_max_uploads_per_tenant)
        self.road = Classifier(self.deployments, self.store, s, self.patients)
        self.records = Records(self.store, s.explanation_timeout_s, self.patients)
        with contextlib.suppress(RuntimeError):  # no running loop: built outside a replica
            self.sweeper = asyncio.get_running_loop().create_task(
                sweep_forever(self.store, s.retention.sweep_interval_s)
            )

    @contextlib.asynccontextmanager
    async def admitted(self, tenant: str, read: Callable[[], Awaitable[bytes]]):
        """Admission control (serve/admission.py): a request that could not get a compute
        slot now is refused before its body is read; the body arrives under the tenant's
        upload budget, then the request takes a slot of its tenant's fair share; beyond
        either a JSON 503 with Retry-After at once. Yields what `read()` returned."""
        try:
            if not self.admission.would_admit(tenant):
                raise Overloaded()
            async with self.admission.upload(tenant):
                body = await read()
            async with self.admission.slot(tenant):
                yield body
        except Overloaded:
            metrics().rejected.inc(tags={"reason": "overloaded"})
            raise

    def guard(self, request: Request, *scopes: str) -> str:
        """Authenticate (the key must allow every scope) and rate-limit once; the tenant id
        (a bounded label) or an AuthError."""
        client = request.client.host if request.client else None
        request.state.tenant = self.auth.authenticate(
            request.headers.get(self.auth.header), *scopes, client=client
        )
        return request.state.tenant

    async def _body(self, request: Request) -> bytes:
        s = self.cfg.serve
        return await http.read_body(request, s.max_body_bytes, s.body_timeout_s)

    async def _image(self, request: Request) -> bytes:
        s = self.cfg.serve
        return await http.single_image(request, s.max_body_bytes, s.body_timeout_s)

    @staticmethod
    def named_study(request: Request) -> str | None:
        """The study an upload names (X-Study-Instance-UID), checked; a 400 says why."""
        value = request.headers.get(STUDY_HEADER)
        return None if value is None else studies.check_study_uid(value.strip(), STUDY_HEADER)

    def header_ref(self, tenant: str, patient_id: str | None, issuer: str | None) -> str:
        """The tenant's reference of the patient the headers name (the id is not kept)."""
        pid = patients.header_id(patient_id, "X-Patient-ID", required=True)
        ref = self.patients.ref(
            tenant, pid, patients.header_id(issuer, "X-Issuer-Of-Patient-ID", required=False)
        )
        if ref is None:
            raise ApiError(404, "no_patient_key", "this tenant has no patient key configured")
        return ref

    # ---- classification ------------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=Prediction,
        responses=ERRORS,
        summary="Classify one radiograph (raw body or multipart field `file`)",
        description="A non-DICOM upload may name its study with `X-Study-Instance-UID` (a "
        "DICOM UID); a DICOM input's own StudyInstanceUID wins. Studies: /v1/studies/{uid}.",
    )
    async def predict(
        self, request: Request, explain: bool = False, display: DisplayQuery = False
    ) -> Response:
        tenant = self.guard(request, "predict", *(("explain",) if explain else ()))
        study = self.named_study(request)
        async with self.admitted(tenant, lambda: self._image(request)) as data:
            return http.answer(await self.road.one(data, tenant, explain, study, display))

    @api.post(
        "/v1/predict/batch",
        responses=ERRORS,
        summary="Classify up to max_batch_items radiographs (multipart); results in order",
        description="`X-Study-Instance-UID` names the study of every non-DICOM file.",
    )
    async def predict_batch(self, request: Request) -> Response:
        tenant = self.guard(request, "batch")
        study = self.named_study(request)
        if http.media_type(request) != "multipart/form-data":
            raise InputError("batch requests must be multipart/form-data with one file per part")
        async with self.admitted(tenant, lambda: self._body(request)) as body:
            parts = await http.form_files(request, body, self.cfg.serve.max_batch_items)
            if not parts:
                raise InputError("batch has no files")
            jobs = [Job(data, http.new_request_id(), False, tenant, study) for _, data in parts]
            outcomes = await self.road.classify(jobs)
            names, ids = [name for name, _ in parts], [job.request_id for job in jobs]
            return JSONResponse(http.batch_body(names, ids, outcomes))

    # ---- explanations and stored results -----------------------------------------------
    @api.get(f"{EXPLANATION_ROUTE}.png", responses={200: {"content": {"image/png": {}}}})
    async def explanation_png(
        self,
        request: Request,
        explanation_id: str,
        kind: Literal["overlay", "heatmap", "image"] = "overlay",
    ) -> Response:
        """`overlay` (default): heat map blended over the model input; `heatmap`: the heat
        map alone, transparent where cold; `image`: the 224x224 model input it belongs to."""
        tenant = self.guard(request, "read")
        record = await self.records.explanation(explanation_id, tenant)
        if record is None:
            return error_response(404, "not_found", "unknown explanation id")
        if record.state != "done":
            return explanation_response(record)
        png = await self.store.get_explanation_png(explanation_id, kind)
        if png is None and kind != "overlay":
            return error_response(404, "not_found", f"no {kind} layer for this explanation")
        return Response(png, media_type="image/png")

    @api.get(EXPLANATION_ROUTE)
    async def explanation(self, request: Request, explanation_id: str) -> Response:
        tenant = self.guard(request, "read")
        record = await self.records.explanation(explanation_id, tenant)
        if record is None:
            return error_response(404, "not_found", "unknown explanation id")
        return explanation_response(record)

    @api.get("/v1/model", summary="The model card")
    async def model(self, request: Request) -> dict:
        self.guard(request, "read")
        return await self.deployments.fusion.model_card.remote()

    # ---- clinician and integration surface: viewer, report, DICOM out, STOW-RS ---------
    @api.get("/", include_in_schema=False)
    async def viewer(self) -> Response:
        """The viewer page (no key needed for the page; its API calls carry one)."""
        return HTMLResponse(clinical.viewer_file("index.html"), headers=VIEWER_HEADERS)

    @api.get("/viewer/{asset}", include_in_schema=False)
    async def viewer_asset(self, asset: str) -> Response:
        media_type = clinical.VIEWER_ASSETS.get(asset)
        if media_type is None:
            return error_response(404, "not_found", "unknown viewer asset")
        return Response(clinical.viewer_file(asset), media_type=media_type, headers=VIEWER_HEADERS)

    @api.get("/v1/predictions/{request_id}", summary="A stored prediction result")
    async def prediction(self, request: Request, request_id: str) -> Response:
        tenant = self.guard(request, "read")
        return JSONResponse(clinical.public(await self.records.stored(request_id, tenant)))

    @api.get(
        "/v1/predictions/{request_id}/image.png",
        summary="A DICOM input's display rendering (asked for with display=true)",
        description="The decoded, windowed source, long side <= 2048 px, pixels only (no "
        "text drawn in). PNG and JPEG inputs have none: the client holds the file.",
        responses={200: {"content": {"image/png": {}}}},
    )
    async def display_image(self, request: Request, request_id: str) -> Response:
        tenant = self.guard(request, "read")
        png = clinical.display_png(await self.records.stored(request_id, tenant))
        if png is None:
            return error_response(404, "no_display", "no display rendering was kept for this")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @api.get(
        "/v1/predictions/{request_id}/report.pdf",
        summary="PDF report of a prediction (no patient identifiers)",
        responses={200: {"content": {"application/pdf": {}}}},
    )
    async def report_pdf(self, request: Request, request_id: str) -> Response:
        tenant = self.guard(request, "read")
        record = await self.records.stored(request_id, tenant)
        figure, note = await self.records.report_figure(request_id, record)
        priors = await self.records.priors(record, tenant)
        pdf = await asyncio.to_thread(clinical.pdf_report, record, figure, note, priors)
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="orthovision-{request_id}.pdf"'},
        )

    @api.get(
        f"{DICOM_ROUTE}/sr",
        summary="DICOM Comprehensive SR of a DICOM input's result",
        responses=DICOM_FILE,
    )
    async def dicom_sr(self, request: Request, request_id: str) -> Response:
        record, source = await self._dicom_input(request, request_id)
        return await dicom_file(lambda: clinical.sr_bytes(record, source))

    @api.get(
        f"{DICOM_ROUTE}/sc",
        summary="DICOM Secondary Capture of the heat-map overlay (made on request: 202 first)",
        responses=DICOM_FILE,
    )
    async def dicom_sc(self, request: Request, request_id: str) -> Response:
        record, source = await self._dicom_input(request, request_id)
        overlay, state, note = await self.records.overlay_png(request_id, record)
        if overlay is None and state == "none":
            # A PACS asks for the SC: make the explanation now, from the stored model input.
            state, note = await self.road.explain_stored(request_id, record)
        if overlay is None:
            if state == "pending":
                return error_response(202, "pending", note, retry_after_s=1)
            return error_response(404, "no_explanation", note)
        return await dicom_file(lambda: clinical.sc_bytes(record, source, overlay))

    async def _dicom_input(self, request: Request, request_id: str) -> tuple[dict, dict]:
        """The caller's stored record of a DICOM input and that input's source attributes
        (the DICOM routes' common start); a 404 for any other record."""
        tenant = self.guard(request, "read")
        record = await self.records.stored(request_id, tenant)
        source = self.patients.open(tenant, clinical.private(record))  # sealed at rest
        if source is None:
            raise ApiError(404, "not_dicom", "DICOM outputs exist for DICOM inputs only")
        return record, source

    @api.post(
        "/dicomweb/studies",
        responses=ERRORS,
        summary='DICOMweb STOW-RS (multipart/related; type="application/dicom"): classify each',
    )
    async def stow(self, request: Request, explain: bool = False) -> Response:
        """PS3.18 10.5 store: each instance is classified (not archived). The answer is the
        STOW-RS response data set (ReferencedSOPSequence / FailedSOPSequence) alone when the
        client accepts only application/dicom+json, else `{"stow": ..., "results": [...],
        "studies": [...]}` with one v1 result (or error) per instance, in order, and the
        result of each study the instances belong to (as GET /v1/studies/{uid}). SR/SC per
        instance at /v1/predictions/{request_id}/dicom/sr|sc."""
        tenant = self.guard(request, "dicomweb", *(("explain",) if explain else ()))
        boundary = dw.related_boundary(request.headers.get("content-type", ""))
        async with self.admitted(tenant, lambda: self._body(request)) as body:
            parts = dw.split_related(body, boundary, self.cfg.serve.max_batch_items)
            if not parts:
                raise InputError("STOW-RS request has no instances")
            ids = [http.new_request_id() for _ in parts]
            heads = await asyncio.to_thread(lambda: [dw.instance_header(p.data) for p in parts])
            outcomes = await self._stow_outcomes(parts, ids, heads, explain, tenant)
            refs = [(h.sop_class_uid, h.sop_instance_uid) for h in heads]
            stow = dw.stow_answer(refs, ids, outcomes, f"{DICOM_ROUTE}/sr")
            if dw.dataset_only(request.headers.get("accept", "")):
                return JSONResponse(
                    stow.response, status_code=stow.status, media_type=dw.DICOM_JSON
                )
            found = await self.records.studies_of([h.study_uid for h in heads], tenant)
            body = {"stow": stow.response, "results": stow.results, "studies": found}
            return JSONResponse(body, status_code=stow.status)

    async def _stow_outcomes(
        self,
        parts: list[dw.Part],
        ids: list[str],
        heads: list[dw.InstanceHeader],
        explain: bool,
        tenant: str,
    ) -> list[dict | InputError]:
        """Each part's v1 result, or why it was refused: only instances are classified.
        Each instance is registered as pending in its study first (complete: false)."""
        indices = dw.instance_indices(parts)
        jobs = [self._stow_job(parts[i].data, ids[i], heads[i], explain, tenant) for i in indices]
        await self.road.register_pending(jobs)
        by_index: dict[int, ItemOutcome] = dict(
            zip(indices, await self.road.classify(jobs), strict=True)
        )
        refused = dw.not_an_instance()
        outcomes = (by_index.get(i, refused) for i in range(len(parts)))
        return [out if isinstance(out, InputError) else out.result for out in outcomes]

    def _stow_job(
        self, data: bytes, request_id: str, head: dw.InstanceHeader, explain: bool, tenant: str
    ) -> Job:
        """An instance's job in the study its header names (the patient id hashed now)."""
        ref = self.patients.ref(tenant, head.patient_id, head.issuer)
        return Job(data, request_id, explain, tenant, head.study_uid or None, ref)

    # ---- studies and patient timelines (docs/STUDIES.md) ------------------------------
    @api.get(
        STUDY_ROUTE, summary="A study's instances and study result", description=STUDY_DESCRIPTION
    )
    async def study(self, request: Request, study_instance_uid: str) -> Response:
        tenant = self.guard(request, "read")
        return JSONResponse(await self.records.study(study_instance_uid, tenant))

    @api.get(
        f"{STUDY_ROUTE}/dicom/sr",
        summary="DICOM Comprehensive SR of a study: its result and every classified instance",
        responses=DICOM_FILE,
    )
    async def study_sr(self, request: Request, study_instance_uid: str) -> Response:
        tenant = self.guard(request, "read")
        study, instances = await self.records.study_instances(study_instance_uid, tenant)
        return await dicom_file(lambda: clinical.study_sr_bytes(tenant, study, instances))

    @api.get(
        "/v1/patients/timeline",
        summary="A patient's timeline, by the X-Patient-ID header",
        description=TIMELINE_DESCRIPTION,
    )
    async def timeline_by_id(
        self, request: Request, patient_id: PatientIdHeader = None, issuer: IssuerHeader = None
    ) -> Response:
        tenant = self.guard(request, "read")
        ref = self.header_ref(tenant, patient_id, issuer)
        return JSONResponse(await self.records.timeline(ref, tenant))

    @api.get(
        "/v1/patients/{patient_ref}/timeline",
        summary="A patient's timeline, by patient reference",
        description=TIMELINE_DESCRIPTION,
    )
    async def timeline(self, request: Request, patient_ref: str) -> Response:
        tenant = self.guard(request, "read")
        return JSONResponse(await self.records.timeline(patient_ref, tenant))

    @api.delete(
        "/v1/patients", summary="Erase a patient, by X-Patient-ID", description=ERASE_DESCRIPTION
    )
    async def erase_by_id(
        self, request: Request, patient_id: PatientIdHeader = None, issuer: IssuerHeader = None
    ) -> Response:
        tenant = self.guard(request, "predict")
        ref = self.header_ref(tenant, patient_id, issuer)
        return JSONResponse(await self.records.erase(ref, tenant))

    @api.delete(
        "/v1/patients/{patient_ref}",
        summary="Erase a patient, by patient reference",
        description=ERASE_DESCRIPTION,
    )
    async def erase(self, request: Request, patient_ref: str) -> Response:
        tenant = self.guard(request, "predict")
        return JSONResponse(await self.records.erase(patient_ref, tenant))

    # ---- probes ----------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> Response:
        """Ready when every backbone answers with its model loaded and the store responds."""
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(h.info.remote() for h in self.deployments.backbones.values())), 5
            )
            store_ok = await asyncio.wait_for(self.store.ping(), 5)
        except Exception as exc:  # not ready, whatever the cause; readiness must not raise
            return error_response(503, "not_ready", f"not ready: {type(exc).__name__}", 2)
        if not all(i.get("loaded") for i in infos) or not store_ok:
            return error_response(503, "not_ready", "models or store not ready", 2)
        return JSONResponse({"status": "ready", "backbones": infos})
