"""The road of images behind the routes (docs/DESIGN.md: the road of one request).

The ingress never touches pixels: it chains DeploymentResponses (bytes -> Preprocessor ->
both Backbones -> Fusion), so the uint8 payload travels between the workers only. Images
travel in batches (a batch request's items, or the single-image requests that queued while
the pipeline was busy, serve/gather.py): every hop is paid once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from orthovision.errors import InputError
from orthovision.model.pipeline import Classified, ItemOutcome, Prepared, PreparedBatch
from serve import clinical, studies
from serve.auth import LOCAL_TENANT
from serve.gather import Gatherer
from serve.http import REPLICA_RETRY_AFTER_S, ApiError, new_request_id
from serve.metrics import metrics
from serve.records import explanation_url

if TYPE_CHECKING:
    from orthovision.config import ServeConfig
    from serve.patients import PatientKeys
    from serve.store import ResultStore, StudyEntry

log = logging.getLogger("ray.serve")
# A preprocessed batch, or the Preprocessor's response that brings it (Ray resolves it).
Batch = PreparedBatch | DeploymentResponse


@dataclass(frozen=True)
class Job:
    """One image to classify, under the request id its result is stored and answered with."""

    data: bytes
    request_id: str
    explain: bool = False
    # The authenticated tenant: stored as the record's owner; only it can read the record.
    tenant: str = LOCAL_TENANT
    # The study the client named (X-Study-Instance-UID, or a STOW-RS instance's header read
    # on arrival) and that instance's patient reference; a DICOM input's own UID wins.
    study_uid: str | None = None
    patient_ref: str | None = None
    # Keep a display rendering of a DICOM input (the viewer's image.png).
    display: bool = False
    # Resolved with the item's error as soon as preprocessing rejects it, so a bad input is
    # answered without waiting for its batch's forward passes (None: no early answer).
    early: asyncio.Future | None = field(default=None, compare=False, repr=False)
    # time.monotonic() by which the job is answered, retries included (None: the batch's
    # call to Classifier.classify sets one, request_timeout_s from then).
    deadline: float | None = field(default=None, compare=False, repr=False)


def replica_failed(exc: Exception) -> bool:
    """A replica died or went unreachable under a call (Ray's errors, or Serve's own for a
    dead upstream of a chained call), as opposed to a full queue (BackPressureError), which
    a retry would only make fuller."""
    return isinstance(exc, RayError | RayServeException) and not isinstance(exc, BackPressureError)


class ReplicaUnavailable(ApiError):
    """No replica answered within the request's deadline (a lost node, replicas starting
    again): 503 with Retry-After. The client's input was fine; a retry gets its result."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "unavailable",
            "no model replica answered in time; retry later",
            REPLICA_RETRY_AFTER_S,
        )


async def first_answer(full: Awaitable[ItemOutcome], early: asyncio.Future) -> ItemOutcome:
    """The early answer (an input error) if it comes first, else the full outcome; the
    batch goes on either way (its other items, the stored record)."""
    task = asyncio.ensure_future(full)
    try:
        done, _ = await asyncio.wait({task, early}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the client went away: so does its place in the queue
        task.cancel()
        raise
    if task in done:
        early.cancel()
        return task.result()
    # Nobody awaits the full result now: retrieve it when it comes, so an error is not
    # reported as "never retrieved".
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return early.result()


@dataclass(frozen=True)
class Deployments:
    """Handles of the deployments behind the ingress."""

    preprocessor: DeploymentHandle
    backbones: dict[str, DeploymentHandle]
    fusion: DeploymentHandle
    explainer: DeploymentHandle


class Classifier:
    """Classifies jobs through the deployments, stores each answer with its owner (and its
    study entry) and queues the explanations asked for."""

    def __init__(
        self,
        deployments: Deployments,
        store: ResultStore,
        cfg: ServeConfig,
        patients: PatientKeys,
    ) -> None:
        self.deployments, self.store, self.cfg, self.patients = deployments, store, cfg, patients
        self._explanations: set[asyncio.Task] = set()
        # Single-image requests that wait together share one trip through the pipeline: a
        # Ray call costs more CPU than preprocessing a small JPEG, so hops are paid per batch.
        self.gatherer = Gatherer(
            self.classify, cfg.batch.max_batch_size, cfg.ingress_batches, isolate=replica_failed
        )

    async def one(
        self,
        data: bytes,
        tenant: str,
        explain: bool,
        study_uid: str | None = None,
        display: bool = False,
    ) -> ItemOutcome:
        """One image, gathered with whatever waits beside it; a rejected input is answered
        as soon as its preprocessing fails."""
        early = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + self.cfg.request_timeout_s
        job = Job(
            data,
            new_request_id(),
            explain,
            tenant,
            study_uid,
            display=display,
            early=early,
            deadline=deadline,
        )
        return await first_answer(self.gatherer.submit(job), early)

    async def classify(self, jobs: Sequence[Job]) -> list[ItemOutcome]:
        """One outcome per job, in order. Chunks of batch.max_batch_size images run
        concurrently: one is preprocessed while another is in the backbones. Every chunk
        ends by the jobs' deadline (else 503 ReplicaUnavailable)."""
        size = self.cfg.batch.max_batch_size
        deadline = min(
            (job.deadline for job in jobs if job.deadline is not None),
            default=time.monotonic() + self.cfg.request_timeout_s,
        )
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        outs = await asyncio.gather(*(self._classify_chunk(chunk, deadline) for chunk in chunks))
        return [outcome for out in outs for outcome in out]

    async def _classify_chunk(self, jobs: Sequence[Job], deadline: float) -> list[ItemOutcome]:
        started = time.perf_counter()
        try:
            prepared, outcomes = await self._through_deployments(jobs, deadline)
        except Exception as exc:
            if not replica_failed(exc):
                raise
            # A replica died or went unreachable under this batch (a lost node, a crash):
            # once more, within the same deadline. Serve routes it to a live replica, or
            # holds it until one is up (a restarted node) and the deadline answers 503.
            log.warning("batch failed on a replica (%s); retrying once", type(exc).__name__)
            metrics().replica_failures.inc(tags={"outcome": "retried"})
            prepared, outcomes = await self._through_deployments(jobs, deadline)
        metrics().stage_latency.observe(time.perf_counter() - started, tags={"stage": "total"})
        return await self._keep(jobs, prepared, outcomes)

    async def _through_deployments(
        self, jobs: Sequence[Job], deadline: float
    ) -> tuple[Batch, list[ItemOutcome]]:
        """Preprocessor -> both Backbones -> Fusion, bounded by `deadline` (time.monotonic);
        every call still running when it fails or runs out of time is cancelled, so no
        replica slot outlives its request."""
        d = self.deployments
        calls: list[DeploymentResponse] = []
        try:
            if (remaining := deadline - time.monotonic()) <= 0:
                raise TimeoutError  # the first attempt spent it all: no call is made
            async with asyncio.timeout(remaining):
                prepared = d.preprocessor.remote([j.data for j in jobs], [j.display for j in jobs])
                branches = [handle.remote(prepared) for handle in d.backbones.values()]
                calls += [prepared, *branches]
                if any(job.early is not None for job in jobs):
                    # The batch's own outcome per item (zero-copy from the object store):
                    # rejected items are answered now, while the others are in the backbones.
                    batch = await prepared
                    for job, item in zip(jobs, batch.items, strict=True):
                        if isinstance(item, InputError) and job.early and not job.early.done():
                            job.early.set_result(item)
                # The logits (a few floats per image) come here before Fusion is called, so
                # Fusion's call depends on no backbone: a backbone lost mid-call fails this
                # await, and the retry above, instead of a Fusion call that Ray 2.60's router
                # re-routes without end (100 warnings a second) while its upstream is
                # unreachable.
                logits = await asyncio.gather(*branches)
                fused = d.fusion.remote([job.request_id for job in jobs], prepared, *logits)
                calls.append(fused)
                return prepared, await fused
        except BaseException as exc:
            for call in calls:
                call.cancel()  # best effort; a finished call is left as it is
            if isinstance(exc, TimeoutError):
                metrics().replica_failures.inc(tags={"outcome": "unavailable"})
                raise ReplicaUnavailable() from None
            raise

    async def _keep(
        self, jobs: Sequence[Job], prepared: Batch, outcomes: Sequence[ItemOutcome]
    ) -> list[ItemOutcome]:
        """Store each answer with its owner (and its explanation's link, the explanation
        queued) and each instance of a study; the outcomes as answered."""
        answers: list[ItemOutcome] = []
        records = []
        for index, (job, out) in enumerate(zip(jobs, outcomes, strict=True)):
            if isinstance(out, Classified):
                metrics().observe_result(job.tenant, out.result)
                if job.explain:
                    out = await self._with_explanation(job.request_id, out, prepared, index)
                private = self.patients.seal(job.tenant, out.private(job.tenant))
                records.append((job.request_id, clinical.stored_record(out.result, private)))
            answers.append(out)
        if records:
            await self.store.put_records(records, ttl_s=self.cfg.record_retention_s)
        entries = [e for e in map(self._study_entry, jobs, answers) if e is not None]
        if entries:
            await self.store.put_study_entries(entries, ttl_s=self.cfg.study_retention_s)
        return answers

    def _study_entry(self, job: Job, out: ItemOutcome) -> StudyEntry | None:
        """The instance's study entry; None when it names no study (a plain upload, or a
        DICOM input refused before its header was read)."""
        if isinstance(out, InputError):
            if job.study_uid is None:
                return None
            return studies.instance_entry(
                job.tenant, job.request_id, out, job.study_uid, time.time(), None, job.patient_ref
            )
        source = out.dicom_source or {}
        study_uid = source.get("StudyInstanceUID") or job.study_uid
        if study_uid is None:
            return None
        ref = self.patients.ref(
            job.tenant, source.get("PatientID"), source.get("IssuerOfPatientID")
        )
        return studies.instance_entry(
            job.tenant, job.request_id, out.result, study_uid, out.created_at, source, ref
        )

    async def register_pending(self, jobs: Sequence[Job]) -> None:
        """Record the instances of named studies as pending before they are classified, so
        a study read meanwhile says it is not complete."""
        now = time.time()
        entries = [
            studies.pending_entry(job.tenant, job.request_id, job.study_uid, now, job.patient_ref)
            for job in jobs
            if job.study_uid is not None
        ]
        if entries:
            await self.store.put_study_entries(entries, ttl_s=self.cfg.study_retention_s)

    async def _with_explanation(
        self, request_id: str, out: Classified, prepared: Batch, index: int
    ) -> Classified:
        await self.store.create_explanation(request_id, request_id)
        out = replace(out, result={**out.result, "explanation_url": explanation_url(request_id)})
        self._queue_explanation(request_id, prepared, index, out.result)
        return out

    async def explain_stored(self, request_id: str, record: dict) -> tuple[str, str]:
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
        record["explanation_url"] = explanation_url(request_id)
        await self.store.put_records([(request_id, record)], ttl_s=self.cfg.record_retention_s)
        self._queue_explanation(request_id, batch, 0, result)
        return "pending", "The explanation was requested with this call; retry shortly."

    def _queue_explanation(
        self, explanation_id: str, prepared: Batch, index: int, result: dict
    ) -> None:
        """Explain item `index` of `prepared` for its top class, in the background."""
        top = max(result["probabilities"], key=result["probabilities"].get)
        target = list(result["probabilities"]).index(top)
        task = asyncio.create_task(self._run_explanation(explanation_id, prepared, index, target))
        self._explanations.add(task)
        task.add_done_callback(self._explanations.discard)

    async def _run_explanation(
        self, explanation_id: str, prepared: Batch, index: int, target: int
    ) -> None:
        """Await the Explainer so a crash or timeout is recorded: never pending forever."""
        m = metrics()
        m.explanation_queue.set(len(self._explanations))
        for attempt in (1, 2):  # one retry covers an Explainer replica that died mid-way
            call = self.deployments.explainer.remote(explanation_id, prepared, index, target)
            try:
                await asyncio.wait_for(call, self.cfg.explanation_timeout_s)
                break
            except Exception as exc:  # any failure of a remote call: record it, never hang
                call.cancel()  # a timed-out call must not hold the Explainer's one slot
                log.warning("explanation attempt %d failed: %s", attempt, type(exc).__name__)
                if attempt == 2:
                    await self.store.fail_explanation(explanation_id, type(exc).__name__)
                    m.explanations.inc(tags={"outcome": "failed"})
        m.explanation_queue.set(len(self._explanations) - 1)
