"""HTTP ingress (FastAPI via @serve.ingress): routing, size limits, request ids, error mapping.

No `from __future__ import annotations` here: FastAPI must resolve the route annotations
(Request) at runtime inside a replica that unpickles this class by value.

The ingress never touches pixels: it chains DeploymentResponses (bytes -> Preprocessor ->
both Backbones -> Fusion), so the uint8 payload travels between the workers only. Images
travel in batches (a batch request's items, or the single-image requests that queued while
the pipeline was busy, serve/gather.py): every hop is paid once per batch.
"""

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orthovision.errors import BodyTimeout, InputError, InputTooLarge, UnsupportedFormat
from orthovision.model.pipeline import Prepared, PreparedBatch
from orthovision.schema import PRIVATE_KEY, ErrorResponse, Prediction
from serve import clinical
from serve.admission import Admission, Overloaded
from serve.auth import LOCAL_TENANT, Authenticator, AuthError
from serve.gather import Gatherer
from serve.metrics import metrics
from serve.runtime import config_from
from serve.store import StoreUnavailable, open_store

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="OrthoVision Serve",
    version="1",
    description="Second-opinion classification of bone radiographs (not a diagnosis).",
)

ERRORS = {
    400: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}
# The viewer is one static page; the browser revalidates it so a deploy shows at once.
VIEWER_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # No framing (clickjacking): frame-ancestors only works as a header, not in the page's
    # <meta> CSP; X-Frame-Options for older browsers.
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
RAW_TYPES = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")


def error_response(
    status: int,
    code: str,
    message: str,
    retry_after_s: int | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else {}
    if request_id:
        headers["X-Request-ID"] = request_id
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(AuthError)
async def _auth_error(_req: Request, exc: AuthError) -> JSONResponse:
    return error_response(exc.http_status, exc.code, exc.message, exc.retry_after_s)


@api.exception_handler(InputError)
async def _input_error(_req: Request, exc: InputError) -> JSONResponse:
    metrics().rejected.inc(tags={"reason": exc.code})
    return error_response(exc.http_status, exc.code, exc.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
    return error_response(422, "invalid_request", f"invalid request parameters: {fields}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


@dataclass(frozen=True)
class Job:
    """One image to classify, under the request id its result is stored and answered with."""

    data: bytes
    request_id: str
    explain: bool = False
    # The authenticated tenant: stored as the record's owner; only it can read the record.
    tenant: str = LOCAL_TENANT
    # Resolved with the item's error as soon as preprocessing rejects it, so a bad input is
    # answered without waiting for its batch's forward passes (None: no early answer).
    early: asyncio.Future | None = field(default=None, compare=False, repr=False)


@api.exception_handler(Overloaded)
async def _admission_full(_req: Request, _exc: Overloaded) -> JSONResponse:
    return error_response(503, "overloaded", "the service is at capacity; retry later", 1)


@api.exception_handler(BackPressureError)
async def _overloaded(_req: Request, _exc: BackPressureError) -> JSONResponse:
    return error_response(503, "overloaded", "the service is at capacity; retry later", 2)


@api.exception_handler(StoreUnavailable)
async def _store_down(_req: Request, _exc: StoreUnavailable) -> JSONResponse:
    return error_response(503, "store_unavailable", "result store unavailable; retry later", 5)


SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9-]{8,64}")


def current_request_id() -> str:
    """A fresh id per request: a store key and URL segment. (Not Ray Serve's X-Request-ID: a
    client may set that one, and ids must never collide across clients' records.)"""
    return uuid.uuid4().hex


async def first_answer(full: Awaitable[dict], early: asyncio.Future) -> dict:
    """The early answer (an input error) if it comes first, else the full result; the batch
    goes on either way (its other items, the stored record)."""
    task = asyncio.ensure_future(full)
    done, _ = await asyncio.wait({task, early}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        early.cancel()
        return task.result()
    # Nobody awaits the full result now: retrieve it when it comes, so an error is not
    # reported as "never retrieved".
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return early.result()


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


api.add_middleware(CountRequests)


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
        self.preprocessor, self.backbones = preprocessor, backbones
        self.fusion, self.explainer = fusion, explainer
        self.store = open_store(self.cfg.serve.store_url)
        self.auth = Authenticator.from_config(self.cfg.serve)
        self.admission = Admission(
            self.cfg.serve.admission_max_inflight,
            self.cfg.serve.admission_max_uploads_per_tenant,
        )
        self._explanations: set[asyncio.Task] = set()
        # Single-image requests that wait together share one trip through the pipeline: a
        # Ray call costs more CPU than preprocessing a small JPEG, so hops are paid per batch.
        self.gatherer = Gatherer(
            self._classify,
            self.cfg.serve.batch.max_batch_size,
            self.cfg.serve.ingress_batches,
            isolate=(RayError,),
        )

    @contextlib.asynccontextmanager
    async def admitted(self, tenant: str, read):
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

    # ---- the road of images ----------------------------------------------------------
    async def _classify(self, jobs: Sequence[Job]) -> list[dict]:
        """One result per job, in order (an item's input error is its result). Chunks of
        batch.max_batch_size images run concurrently: one is preprocessed while another is
        in the backbones."""
        size = self.cfg.serve.batch.max_batch_size
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        outs = await asyncio.gather(*(self._classify_chunk(chunk) for chunk in chunks))
        return [result for out in outs for result in out]

    async def _classify_chunk(self, jobs: Sequence[Job]) -> list[dict]:
        started = time.perf_counter()
        prepared = self.preprocessor.remote([job.data for job in jobs])
        logits = [handle.remote(prepared) for handle in self.backbones.values()]
        fused = self.fusion.remote([job.request_id for job in jobs], prepared, *logits)
        if any(job.early is not None for job in jobs):
            # The batch's own outcome per item (zero-copy from the object store): rejected
            # items are answered now, while the others are in the backbones.
            batch = await prepared
            for job, item in zip(jobs, batch.items, strict=True):
                if isinstance(item, InputError) and job.early and not job.early.done():
                    job.early.set_result(item.to_result())
        results = await fused
        m = metrics()
        m.stage_latency.observe(time.perf_counter() - started, tags={"stage": "total"})
        records = []
        for index, (job, result) in enumerate(zip(jobs, results, strict=True)):
            if "error" in result:
                continue
            m.observe_result(job.tenant, result)
            hidden = result.pop(PRIVATE_KEY, None)  # stored, never answered (DICOM source)
            if job.explain:
                await self.store.create_explanation(job.request_id, job.request_id)
                result["explanation_url"] = f"/v1/explanations/{job.request_id}"
                self._queue_explanation(job.request_id, prepared, index, result)
            owned = {**(hidden or {}), "tenant": job.tenant}
            records.append((job.request_id, {**result, PRIVATE_KEY: owned}))
        if records:
            await self.store.put_records(records, ttl_s=self.cfg.serve.record_ttl_s)
        return results

    def _queue_explanation(self, explanation_id: str, prepared, index: int, result: dict) -> None:
        top = max(result["probabilities"], key=result["probabilities"].get)
        target = list(result["probabilities"]).index(top)
        task = asyncio.create_task(self._run_explanation(explanation_id, prepared, index, target))
        self._explanations.add(task)
        task.add_done_callback(self._explanations.discard)

    async def _run_explanation(
        self, explanation_id: str, prepared, index: int, target: int
    ) -> None:
        """Await the Explainer so a crash or timeout is recorded: never pending forever."""
        m = metrics()
        m.explanation_queue.set(len(self._explanations))
        for attempt in (1, 2):  # one retry covers an Explainer replica that died mid-way
            try:
                await asyncio.wait_for(
                    self.explainer.remote(explanation_id, prepared, index, target),
                    self.cfg.serve.explanation_timeout_s,
                )
                break
            except Exception as exc:  # any failure of a remote call: record it, never hang
                log.warning("explanation attempt %d failed: %s", attempt, type(exc).__name__)
                if attempt == 2:
                    await self.store.fail_explanation(explanation_id, type(exc).__name__)
                    m.explanations.inc(tags={"outcome": "failed"})
        m.explanation_queue.set(len(self._explanations) - 1)

    def _json(self, result: dict) -> JSONResponse:
        if "error" in result:
            err = result["error"]
            return error_response(result["status"], err["code"], err["message"])
        return JSONResponse(result)

    # ---- routes ----------------------------------------------------------------------
    @api.post(
        "/v1/predict",
        response_model=Prediction,
        responses=ERRORS,
        summary="Classify one radiograph (raw body or multipart field `file`)",
    )
    async def predict(self, request: Request, explain: bool = False) -> Response:
        tenant = self.guard(request, "predict", *(("explain",) if explain else ()))
        async with self.admitted(tenant, lambda: self._single_image(request)) as data:
            early = asyncio.get_running_loop().create_future()
            job = Job(data, current_request_id(), explain, tenant, early)
            return self._json(await first_answer(self.gatherer.submit(job), early))

    async def _body(self, request: Request) -> bytes:
        return await read_body(
            request, self.cfg.serve.max_body_bytes, self.cfg.serve.body_timeout_s
        )

    async def _single_image(self, request: Request) -> bytes:
        ctype = media_type(request)
        body = await self._body(request)
        if ctype == "multipart/form-data":
            parts = await self._parts(request, body, limit=1)
            if not parts:
                raise InputError("multipart body has no file field")
            return parts[0][1]
        if not body:
            raise InputError("empty request body: send the image bytes or a multipart field `file`")
        return body

    async def _parts(self, request: Request, body: bytes, limit: int) -> list[tuple[str, bytes]]:
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

    @api.post(
        "/v1/predict/batch",
        responses=ERRORS,
        summary="Classify up to max_batch_items radiographs (multipart); results in order",
    )
    async def predict_batch(self, request: Request) -> Response:
        tenant = self.guard(request, "batch")
        if media_type(request) != "multipart/form-data":
            raise InputError("batch requests must be multipart/form-data with one file per part")
        async with self.admitted(tenant, lambda: self._body(request)) as body:
            limit = self.cfg.serve.max_batch_items
            parts = await self._parts(request, body, limit)
            if not parts:
                raise InputError("batch has no files")
            jobs = [Job(data, current_request_id(), tenant=tenant) for _name, data in parts]
            outcomes = await self._classify(jobs)
            items = []
            for index, ((name, _), job, out) in enumerate(zip(parts, jobs, outcomes, strict=True)):
                rid = job.request_id
                entry = {"index": index, "filename": name}
                entry.update({"request_id": rid, "error": out["error"]} if "error" in out else out)
                items.append(entry)
            failed = sum("error" in i for i in items)
            return JSONResponse({"count": len(items), "failed": failed, "items": items})

    @api.get(
        "/v1/explanations/{explanation_id}.png", responses={200: {"content": {"image/png": {}}}}
    )
    async def explanation_png(
        self,
        request: Request,
        explanation_id: str,
        kind: Literal["overlay", "heatmap", "image"] = "overlay",
    ) -> Response:
        """`overlay` (default): heat map blended over the model input; `heatmap`: the heat
        map alone, transparent where cold; `image`: the 224x224 model input it belongs to."""
        tenant = self.guard(request, "read")
        record = await self._explanation_record(explanation_id, tenant)
        if record is None:
            return error_response(404, "not_found", "unknown explanation id")
        if record.state != "done":
            return self._explanation_state(record)
        if kind == "overlay":
            png = await self.store.get_explanation_png(explanation_id)
        else:
            layers = await self.store.get_record(clinical.layers_key(explanation_id))
            png = clinical.layer_png(layers, kind)
            if png is None:
                return error_response(404, "not_found", f"no {kind} layer for this explanation")
        return Response(png, media_type="image/png")

    @api.get("/v1/explanations/{explanation_id}")
    async def explanation(self, request: Request, explanation_id: str) -> Response:
        tenant = self.guard(request, "read")
        record = await self._explanation_record(explanation_id, tenant)
        if record is None:
            return error_response(404, "not_found", "unknown explanation id")
        return self._explanation_state(record)

    async def _explanation_record(self, explanation_id: str, tenant: str):
        """The stored explanation, None unless `tenant` owns its prediction (explanation id
        == request id)."""
        if await self._owned_record(explanation_id, tenant) is None:
            return None
        return await self._live_explanation(explanation_id)

    async def _live_explanation(self, explanation_id: str):
        """The stored explanation of a prediction whose owner is already checked; one left
        pending past its deadline (its ingress replica died before recording the outcome)
        is failed here, so nothing stays pending forever."""
        record = await self.store.get_explanation(explanation_id)
        deadline_s = 2 * self.cfg.serve.explanation_timeout_s + 30
        if record and record.state == "pending" and time.time() - record.updated_at > deadline_s:
            await self.store.fail_explanation(explanation_id, "timed out")
            record = await self.store.get_explanation(explanation_id)
        return record

    def _explanation_state(self, record) -> JSONResponse:
        body = {"id": record.id, "request_id": record.request_id, "state": record.state}
        if record.state == "pending":
            return JSONResponse(body, status_code=202, headers={"Retry-After": "1"})
        if record.state == "failed":
            body["error"] = {"code": "explanation_failed", "message": record.error}
            return JSONResponse(body, status_code=200)
        body.update(record.result or {})
        body["png_url"] = f"/v1/explanations/{record.id}.png"
        return JSONResponse(body)

    @api.get("/v1/model", summary="The model card")
    async def model(self, request: Request) -> dict:
        self.guard(request, "read")
        return await self.fusion.model_card.remote()

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

    async def _owned_record(self, request_id: str, tenant: str) -> dict | None:
        """The stored prediction if `tenant` owns it. Another tenant's record is answered
        exactly like a missing one (404): ids travel in URLs and logs, so they are not
        secrets, and a 403 would confirm that the id exists."""
        if not SAFE_REQUEST_ID.fullmatch(request_id):
            return None
        record = await self.store.get_record(request_id)
        if record is None or clinical.private(record).get("tenant") != tenant:
            return None
        return record

    async def _stored_record(self, request_id: str, tenant: str) -> dict:
        record = await self._owned_record(request_id, tenant)
        if record is None:
            raise StarletteHTTPException(404, "unknown or expired request id")
        return record

    @api.get("/v1/predictions/{request_id}", summary="A stored prediction result")
    async def prediction(self, request: Request, request_id: str) -> Response:
        tenant = self.guard(request, "read")
        return JSONResponse(clinical.public(await self._stored_record(request_id, tenant)))

    async def _overlay_png(self, request_id: str, record: dict) -> tuple[bytes | None, str, str]:
        """(overlay PNG or None, explanation state, why there is none) of a stored record the
        caller already owns; explanation id == request id."""
        if not record.get("explanation_url"):
            return None, "none", "No explanation was requested for this image."
        explanation = await self._live_explanation(request_id)
        if explanation is None:
            return None, "expired", "The explanation has expired."
        if explanation.state == "pending":
            return None, "pending", "The explanation was still being computed when this was made."
        if explanation.state == "failed":
            return None, "failed", "The explanation failed."
        return await self.store.get_explanation_png(request_id), "done", ""

    @api.get(
        "/v1/predictions/{request_id}/report.pdf",
        summary="PDF report of a prediction (no patient identifiers)",
        responses={200: {"content": {"application/pdf": {}}}},
    )
    async def report_pdf(self, request: Request, request_id: str) -> Response:
        from orthovision.clinical.pdf import build_pdf_report

        tenant = self.guard(request, "read")
        record = await self._stored_record(request_id, tenant)
        overlay, _state, note = await self._overlay_png(request_id, record)
        private = clinical.private(record)
        created = dt.datetime.fromtimestamp(private.get("created_at", time.time()), dt.timezone.utc)
        source = private.get("dicom_source") or {}
        pdf = await asyncio.to_thread(
            build_pdf_report,
            clinical.public(record),
            overlay,
            note,
            created,
            {"SOPInstanceUID": source["SOPInstanceUID"]} if source.get("SOPInstanceUID") else None,
        )
        return Response(
            pdf,
            media_type="application/pdf",
            headers={"Content-Disposition": f'inline; filename="orthovision-{request_id}.pdf"'},
        )

    def _dicom_source(self, record: dict) -> dict | None:
        return clinical.private(record).get("dicom_source")

    @api.get(
        "/v1/predictions/{request_id}/dicom/sr",
        summary="DICOM Comprehensive SR of a DICOM input's result",
        responses={200: {"content": {"application/dicom": {}}}},
    )
    async def dicom_sr(self, request: Request, request_id: str) -> Response:
        from orthovision.clinical.dicom_objects import structured_report, to_bytes

        tenant = self.guard(request, "read")
        record = await self._stored_record(request_id, tenant)
        source = self._dicom_source(record)
        if source is None:
            return error_response(404, "not_dicom", "DICOM outputs exist for DICOM inputs only")
        created_at = clinical.private(record).get("created_at", time.time())
        return await self._dicom_response(
            lambda: to_bytes(structured_report(clinical.public(record), source, created_at))
        )

    async def _dicom_response(self, build) -> Response:
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

    @api.get(
        "/v1/predictions/{request_id}/dicom/sc",
        summary="DICOM Secondary Capture of the heat-map overlay (made on request: 202 first)",
        responses={200: {"content": {"application/dicom": {}}}},
    )
    async def dicom_sc(self, request: Request, request_id: str) -> Response:
        from orthovision.clinical.dicom_objects import secondary_capture, to_bytes

        tenant = self.guard(request, "read")
        record = await self._stored_record(request_id, tenant)
        source = self._dicom_source(record)
        if source is None:
            return error_response(404, "not_dicom", "DICOM outputs exist for DICOM inputs only")
        overlay, state, note = await self._overlay_png(request_id, record)
        if overlay is None and state == "none":
            # A PACS asks for the SC: make the explanation now, from the stored model input.
            state, note = await self._explain_on_request(request_id, record)
        if overlay is None:
            if state == "pending":
                return error_response(202, "pending", note, retry_after_s=1)
            return error_response(404, "no_explanation", note)
        created_at = clinical.private(record).get("created_at", time.time())

        def build() -> bytes:
            rgb = clinical.png_to_rgb(overlay)
            return to_bytes(secondary_capture(rgb, clinical.public(record), source, created_at))

        return await self._dicom_response(build)

    async def _explain_on_request(self, request_id: str, record: dict) -> tuple[str, str]:
        """Queue the explanation of a stored DICOM prediction that was made without one
        (its model input is kept in the private record); ("pending", why) or ("none", why)."""
        stored = clinical.private(record).get("model_input_png")
        if not stored:
            return "none", "No explanation was requested and the model input was not kept."
        pixels = clinical.decode_model_input(stored)
        result = clinical.public(record)
        item = Prepared(pixels, result.get("input", {}), result.get("quality", {}))
        batch = PreparedBatch.of([item], pixels.shape[-1])
        try:
            await self.store.create_explanation(request_id, request_id)
        except ValueError:  # a concurrent request for the same SC queued it first
            return "pending", "The explanation is being computed; retry shortly."
        record["explanation_url"] = f"/v1/explanations/{request_id}"
        await self.store.put_records([(request_id, record)], ttl_s=self.cfg.serve.record_ttl_s)
        self._queue_explanation(request_id, batch, 0, result)
        return "pending", "The explanation was requested with this call; retry shortly."

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
        from orthovision.clinical import dicomweb as dw

        tenant = self.guard(request, "dicomweb", *(("explain",) if explain else ()))
        boundary = dw.related_boundary(request.headers.get("content-type", ""))
        async with self.admitted(tenant, lambda: self._body(request)) as body:
            parts = dw.split_related(body, boundary, self.cfg.serve.max_batch_items)
            if not parts:
                raise InputError("STOW-RS request has no instances")
            ids = [current_request_id() for _ in parts]
            # Typed application/dicom *and* a Part 10 signature: a JPEG sent under the DICOM
            # type is refused, not classified as an instance it is not.
            dicom = [
                i
                for i, p in enumerate(parts)
                if p.content_type == "application/dicom" and dw.is_part10(p.data)
            ]
            classified = await self._classify(
                [Job(parts[i].data, ids[i], explain, tenant) for i in dicom]
            )
            by_index = dict(zip(dicom, classified, strict=True))
            not_dicom = UnsupportedFormat(
                "STOW-RS parts must be application/dicom DICOM Part 10 instances"
            ).to_result()
            outcomes = [by_index.get(i, not_dicom) for i in range(len(parts))]
            refs = await asyncio.to_thread(lambda: [dw.sop_reference(p.data) for p in parts])
            stored, failed, results = [], [], []
            for index, (rid, out, (sop_class, sop_uid)) in enumerate(
                zip(ids, outcomes, refs, strict=True)
            ):
                entry = {"index": index, "request_id": rid, "sop_instance_uid": sop_uid}
                if "error" in out:
                    reason = dw.OUT_OF_RESOURCES if out["status"] >= 500 else dw.CANNOT_UNDERSTAND
                    failed.append(dw.FailedInstance(sop_class, sop_uid, reason))
                    entry["error"] = out["error"]
                else:
                    stored.append(dw.StoredInstance(sop_class, sop_uid))
                    entry.update(out)
                    entry["sr_url"] = f"/v1/predictions/{rid}/dicom/sr"
                results.append(entry)
            status = dw.stow_status(len(stored), len(failed))
            response = dw.stow_response(stored, failed)
            accept = request.headers.get("accept", "")
            if dw.DICOM_JSON in accept and "application/json" not in accept:
                return JSONResponse(response, status_code=status, media_type=dw.DICOM_JSON)
            return JSONResponse({"stow": response, "results": results}, status_code=status)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> Response:
        """Ready when every backbone answers with its model loaded and the store responds."""
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(h.info.remote() for h in self.backbones.values())), 5
            )
            store_ok = await asyncio.wait_for(self.store.ping(), 5)
        except Exception as exc:  # not ready, whatever the cause; readiness must not raise
            return error_response(503, "not_ready", f"not ready: {type(exc).__name__}", 2)
        if not all(i.get("loaded") for i in infos) or not store_ok:
            return error_response(503, "not_ready", "models or store not ready", 2)
        return JSONResponse({"status": "ready", "backbones": infos})


@api.exception_handler(RayError)
async def _replica_failure(_req: Request, exc: RayError) -> JSONResponse:
    # A replica died or timed out mid-request: the client's input was fine, so retry later.
    log.warning("downstream replica failure: %s", type(exc).__name__)
    return error_response(503, "unavailable", "a model replica failed; retry later", 2)
