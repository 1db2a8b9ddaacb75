"""The DICOM node: a pynetdicom SCP (C-ECHO, C-STORE of CR/DX) in front of the service.

    PACS --C-STORE--> SCP (peer AE -> tenant; limits) -> inbox (SQLite, bounded)
         forward workers: inbox -> STOW-RS with the tenant's key -> SR (+SC) -> outbox
         sender: outbox -> C-STORE to the tenant's destination, retried with back-off

Success to a C-STORE means the instance is on disk in the inbox; a full inbox answers
0xA700 (Out of Resources) at once instead of queueing without bound. Association limits:
unknown calling AE titles are rejected (permanent, "calling AE title not recognised"), and
a peer over its association budget is rejected as transient "local limit exceeded".
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from pydicom import uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    Verification,
)

from orthovision.client.bulk import backoff_s
from orthovision.config import DicomNodeConfig
from serve.dicom_node.forward import Classified, ServiceBusy, ServiceClient
from serve.dicom_node.queue import NodeQueue, Received, Result
from serve.dicom_node.send import Delivery, deliver

log = logging.getLogger("orthovision.dicom_node")

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
# The projection radiography syntaxes the service decodes. Deflate is not offered: its
# inflation would happen before any of the service's bounds apply.
TRANSFER_SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
)
OUT_OF_RESOURCES = 0xA700
SUCCESS = 0x0000
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_PEER_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation, local limit exceeded
REJECT_GRACE_S = 0.1
IDLE_POLL_S = 0.2


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    instances: Counter  # outcome: stored, refused_full, refused_size, classified, rejected
    results: Counter  # outcome: sent, retried
    associations: Counter  # outcome: accepted, unknown_caller, peer_limit


class _QueueDepths:
    """Scrape-time gauges read from the queue itself (never stale, never drifting)."""

    def __init__(self, queue: NodeQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        d = self.queue.depths()
        yield GaugeMetricFamily(
            "orthovision_dicom_inbox_instances",
            "Instances received by C-STORE and not yet classified",
            value=d.inbox,
        )
        yield GaugeMetricFamily(
            "orthovision_dicom_outbox_results",
            "SR/SC objects waiting for their destination to confirm",
            value=d.outbox,
        )
        yield GaugeMetricFamily(
            "orthovision_dicom_outbox_oldest_age_seconds",
            "Age of the oldest undelivered result (0 when the outbox is empty)",
            value=d.oldest_outbox_age_s,
        )


def node_metrics(queue: NodeQueue) -> Metrics:
    registry = CollectorRegistry()
    registry.register(_QueueDepths(queue))
    return Metrics(
        registry,
        Counter(
            "orthovision_dicom_instances",
            "Instances by outcome",
            ["outcome"],
            registry=registry,
        ),
        Counter("orthovision_dicom_results", "Results by outcome", ["outcome"], registry=registry),
        Counter(
            "orthovision_dicom_associations",
            "Association requests by outcome",
            ["outcome"],
            registry=registry,
        ),
    )


class DicomNode:
    def __init__(
        self,
        cfg: DicomNodeConfig,
        client: ServiceClient,
        max_instance_bytes: int,
        sc_wait_s: float = 120.0,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.max_instance_bytes = max_instance_bytes
        self.sc_wait_s = sc_wait_s
        self.queue = NodeQueue(cfg.queue_path, cfg.max_in_flight)
        self.metrics = node_metrics(self.queue)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._per_peer: Tally[str] = Tally()
        self._rng = random.Random()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._metrics_server = None
        self.port = cfg.port

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, serve_metrics: bool = True) -> None:
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = self.cfg.max_pdu_bytes
        ae.require_calling_aet = [p.ae_title for p in self.cfg.peers]
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.start_server(
            (self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers
        )
        self.port = self._server.server_address[1]
        if serve_metrics:
            self._metrics_server, _ = start_http_server(
                self.cfg.metrics_port, addr=self.cfg.host, registry=self.metrics.registry
            )
        loops: list[Callable[[], None]] = [self._forward_loop] * self.cfg.workers
        loops.append(self._send_loop)
        self._threads = [threading.Thread(target=f, daemon=True, name="dicom-node") for f in loops]
        for t in self._threads:
            t.start()
        log.info("DICOM node %s listening on %s:%d", self.cfg.ae_title, self.cfg.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        for t in self._threads:
            t.join(timeout=30)
        self.client.close()
        self.queue.close()

    # ---- the SCP -----------------------------------------------------------------------
    def _on_requested(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        if self.cfg.tenant_of(calling) is None:
            # pynetdicom rejects it next (require_calling_aet: permanent, "calling AE title
            # not recognised"); counted here.
            self.metrics.associations.labels("unknown_caller").inc()
            return
        with self._lock:
            over = self._per_peer[calling] >= self.cfg.max_associations_per_peer
            if not over:
                self._per_peer[calling] += 1
        if over:
            self.metrics.associations.labels("peer_limit").inc()
            event.assoc.acse.send_reject(*REJECT_PEER_LIMIT)
            time.sleep(REJECT_GRACE_S)  # the peer reads the A-ASSOCIATE-RJ before the close
            return
        event.assoc.orthovision_peer = calling  # counted: released in _on_closed
        self.metrics.associations.labels("accepted").inc()

    def _on_closed(self, event: evt.Event) -> None:
        peer = getattr(event.assoc, "orthovision_peer", None)
        if peer is not None:
            with self._lock:
                self._per_peer[peer] -= 1
            event.assoc.orthovision_peer = None

    def _on_store(self, event: evt.Event) -> int:
        tenant = self.cfg.tenant_of(event.assoc.requestor.ae_title)
        data = event.encoded_dataset(include_meta=True)
        if tenant is None or len(data) > self.max_instance_bytes:
            self.metrics.instances.labels("refused_size").inc()
            return OUT_OF_RESOURCES
        if not self.queue.receive(tenant, data):
            self.metrics.instances.labels("refused_full").inc()
            return OUT_OF_RESOURCES
        self.metrics.instances.labels("stored").inc()
        self._wake.set()
        return SUCCESS

    # ---- forward: inbox -> service -> outbox ---------------------------------------------
    def _idle(self) -> None:
        """Until new work is stored or the next poll (retries fall due within IDLE_POLL_S)."""
        self._wake.wait(IDLE_POLL_S)
        self._wake.clear()

    def _backoff(self, attempts: int) -> float:
        return backoff_s(attempts + 1, self.cfg.retry_base_s, self.cfg.retry_max_s, self._rng)

    def _forward_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.queue.claim_instances(self.cfg.batch_size)
            if not batch:
                self._idle()
                continue
            try:
                self._forward(batch)
            except ServiceBusy as busy:
                log.warning("service busy, %d instances kept: %s", len(batch), busy.reason)
                for item in batch:
                    self.queue.retry_instance(
                        item.id, busy.retry_after_s or self._backoff(item.attempts)
                    )
            except Exception as exc:  # never lose the loop; the instances stay in the inbox
                log.error("forwarding failed (%s); instances kept", type(exc).__name__)
                for item in batch:
                    self.queue.retry_instance(item.id, self._backoff(item.attempts))

    def _forward(self, batch: list[Received]) -> None:
        """Classify what has not been yet (one STOW-RS request), then fetch each instance's
        results. The request id is kept with the instance as soon as the service answers,
        so a retry after a failed fetch never classifies (and records) the instance twice."""
        tenant = batch[0].tenant
        new = [item for item in batch if item.request_id is None]
        outcomes = {item.id: Classified(item.request_id) for item in batch if item.request_id}
        if new:
            stowed = self.client.stow(tenant, [item.data for item in new], self.cfg.send_sc)
            for item, outcome in zip(new, stowed, strict=True):
                outcomes[item.id] = outcome
                if outcome.request_id is not None:
                    self.metrics.instances.labels("classified").inc()
                    self.queue.remember_request(item.id, outcome.request_id)
        for item in batch:
            outcome = outcomes[item.id]
            if outcome.request_id is None and outcome.transient:
                self.queue.retry_instance(item.id, self._backoff(item.attempts))
                continue
            self.queue.classified(item.id, self._results(tenant, outcome))
            self._wake.set()

    def _results(self, tenant: str, outcome: Classified) -> list[Result]:
        """The DICOM objects to send back for one instance (none when it was refused)."""
        if outcome.request_id is None:
            self.metrics.instances.labels("rejected").inc()
            log.info("instance refused by the service: %s", outcome.error)
            return []
        dest = self.cfg.destination(tenant)
        if dest is None:
            return []
        kinds = ("sr", "sc") if self.cfg.send_sc else ("sr",)
        results = []
        for kind in kinds:
            wait = self.sc_wait_s if kind == "sc" else 0.0
            data = self.client.dicom_object(tenant, outcome.request_id, kind, wait)
            if data is None:
                log.warning("the service made no %s for a classified instance", kind.upper())
                continue
            results.append(Result(kind, dest.ae_title, dest.host, dest.port, data, tenant))
        return results

    # ---- send: outbox -> destination -----------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            due = self.queue.due_results(32)
            if not due:
                self._idle()
                continue
            try:
                delivery = deliver(self.cfg.ae_title, due)
            except Exception as exc:  # a bad object or a network fault: retry, never stop
                delivery = Delivery([], due, f"sending failed ({type(exc).__name__})")
            for result in delivery.sent:
                self.queue.sent(result.id)
                self.metrics.results.labels("sent").inc()
            for result in delivery.failed:
                self.queue.retry_result(result.id, self._backoff(result.attempts))
                self.metrics.results.labels("retried").inc()
            if delivery.reason:
                log.warning("results kept for retry: %s", delivery.reason)
