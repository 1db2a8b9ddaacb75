"""HTTP ingress (FastAPI via @serve.ingress): the routes. The plumbing under them is in
serve/http.py (errors, bodies, request ids), the road of images in serve/classify.py and the
stored records' reads in serve/records.py.

No `from __future__ import annotations` here: FastAPI must resolve the route annotations
(Request) at runtime inside a replica that unpickles this class by value. For the same
reason every module-level name the class uses is defined above it: a name defined below is
missing in the replica (NameError).
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from orthovision.clinical import dicomweb as dw
from orthovision.errors import InputError
from orthovision.model.pipeline import ItemOutcome
from orthovision.schema import Prediction
from serve import clinical, http
from serve.admission import Admission, Overloaded
from serve.auth import Authenticator
from serve.classify import Classifier, Deployments, Job
from serve.http import ERRORS, ApiError, error_response
from serve.metrics import metrics
from serve.records import EXPLANATION_ROUTE, Records, explanation_response
from serve.runtime import config_from
from serve.store import open_store

log = logging.getLogger("ray.serve")

api = FastAPI(
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
        self.cfg = config_from(config)
        s = self.cfg.serve
        self.deployments = Deployments(preprocessor, backbones, fusion, explainer)
        self.store = open_store(s.store_url)
        self.auth = Authenticator.from_config(s)
        self.admission = Admission(s.admission_max_inflight, s.admission_max_uploads_per_tenant)
        self.road = Classifier(self.deployments, self.store, s)
        self.records = Records(self.store, s.explanation_timeout_s)

    @contextlib.asynccontextmanager
    async def admitted(self, tenant: str, read: Callable[[], Awaitable[bytes]]):
        """Admission control (serve/admission.py): the body arrives under the tenant's upload
        budget, then the request takes a compute slot of its tenant's fair share; beyond
        either a JSON 503 with Retry-After at once. Yields what `read()` returned."""
        try:
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

    # ---- classification ------------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=Prediction,
        responses=ERRORS,
        summary="Classify one radiograph (raw body or multipart field `file`)",
    )
    async def predict(self, request: Request, explain: bool = False) -> Response:
        tenant = self.guard(request, "predict", *(("explain",) if explain else ()))
        async with self.admitted(tenant, lambda: self._image(request)) as data:
            return http.answer(await self.road.one(data, tenant, explain))

    @api.post(
        "/v1/predict/batch",
        responses=ERRORS,
        summary="Classify up to max_batch_items radiographs (multipart); results in order",
    )
    async def predict_batch(self, request: Request) -> Response:
        tenant = self.guard(request, "batch")
        if http.media_type(request) != "multipart/form-data":
            raise InputError("batch requests must be multipart/form-data with one file per part")
        async with self.admitted(tenant, lambda: self._body(request)) as body:
            parts = await http.form_files(request, body, self.cfg.serve.max_batch_items)
            if not parts:
                raise InputError("batch has no files")
            jobs = [Job(data, http.new_request_id(), tenant=tenant) for _name, data in parts]
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
        "/v1/predictions/{request_id}/report.pdf",
        summary="PDF report of a prediction (no patient identifiers)",
        responses={200: {"content": {"application/pdf": {}}}},
    )
    async def report_pdf(self, request: Request, request_id: str) -> Response:
        tenant = self.guard(request, "read")
        record = await self.records.stored(request_id, tenant)
        overlay, _state, note = await self.records.overlay_png(request_id, record)
        pdf = await asyncio.to_thread(clinical.pdf_report, record, overlay, note)
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
        source = clinical.dicom_source(record)
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
        client accepts only application/dicom+json, else `{"stow": ..., "results": [...]}`
        with one v1 result (or error) per instance, in order. SR/SC per instance at
        /v1/predictions/{request_id}/dicom/sr|sc."""
        tenant = self.guard(request, "dicomweb", *(("explain",) if explain else ()))
        boundary = dw.related_boundary(request.headers.get("content-type", ""))
        async with self.admitted(tenant, lambda: self._body(request)) as body:
            parts = dw.split_related(body, boundary, self.cfg.serve.max_batch_items)
            if not parts:
                raise InputError("STOW-RS request has no instances")
            ids = [http.new_request_id() for _ in parts]
            outcomes = await self._stow_outcomes(parts, ids, explain, tenant)
            refs = await asyncio.to_thread(lambda: [dw.sop_reference(p.data) for p in parts])
            stow = dw.stow_answer(refs, ids, outcomes, f"{DICOM_ROUTE}/sr")
            if dw.dataset_only(request.headers.get("accept", "")):
                return JSONResponse(
                    stow.response, status_code=stow.status, media_type=dw.DICOM_JSON
                )
            body = {"stow": stow.response, "results": stow.results}
            return JSONResponse(body, status_code=stow.status)

    async def _stow_outcomes(
        self, parts: list[dw.Part], ids: list[str], explain: bool, tenant: str
    ) -> list[dict | InputError]:
        """Each part's v1 result, or why it was refused: only instances are classified."""
        indices = dw.instance_indices(parts)
        jobs = [Job(parts[i].data, ids[i], explain, tenant) for i in indices]
        by_index: dict[int, ItemOutcome] = dict(
            zip(indices, await self.road.classify(jobs), strict=True)
        )
        refused = dw.not_an_instance()
        outcomes = (by_index.get(i, refused) for i in range(len(parts)))
        return [out if isinstance(out, InputError) else out.result for out in outcomes]

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
