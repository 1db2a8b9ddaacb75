"""The DICOM node against pynetdicom peers and a stand-in service (httpx MockTransport):
association rules, the in-flight bound, the outbox's retries and its persistence. The
round trip through the real service and a real PACS is in test_orthanc.py."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from support.images import make_dicom
from support.liveapp import free_port
from support.polling import wait_for

from orthovision.clinical.dicom_objects import to_bytes
from orthovision.clinical.dicomweb import related_boundary, split_related
from orthovision.config import DicomNodeConfig
from serve.dicom_node.forward import ServiceClient
from serve.dicom_node.node import OUT_OF_RESOURCES, DicomNode
from serve.dicom_node.queue import NodeQueue, Result

PEER, PACS = "MODALITY1", "HOSPITALPACS"


def fake_object(request_id: str, kind: str = "sr") -> bytes:
    """A minimal SR or SC Part 10 file (the stand-in service's answer)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage if kind == "sr" else SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR" if kind == "sr" else "OT"
    ds.ContentLabel = request_id.replace("-", "_").upper()[:16]  # tells the SRs apart
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return to_bytes(ds)


class FakeService:
    """STOW-RS + SR routes of the service, counting what it was sent."""

    def __init__(
        self, busy: bool = False, sc_pending: int = 0, refuse: bool = False, sr_busy: int = 0
    ) -> None:
        self.busy = busy
        self.sr_busy = sr_busy  # how many SR fetches answer 503 first
        self.refuse = refuse  # every instance refused, as the service refuses a bad image
        self.sc_pending = sc_pending  # how many times the SC answers 202 before it is made
        self.instances: list[bytes] = []
        self.keys: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers.get("x-api-key"))
        if self.busy:
            return httpx.Response(503, json={"error": {"code": "overloaded"}})
        if request.method == "POST":
            boundary = related_boundary(request.headers["content-type"])
            parts = split_related(request.content, boundary, 64)
            self.instances += [p.data for p in parts]
            results = [{"request_id": f"r{len(self.instances)}-{i}"} for i in range(len(parts))]
            if self.refuse:  # the service's shape: the request id and the error
                results = [
                    r | {"error": {"code": "undecodable", "message": "..."}} for r in results
                ]
            return httpx.Response(200, json={"stow": {}, "results": results})
        request_id, kind = re.search(
            r"/predictions/([^/]+)/dicom/(sr|sc)", request.url.path
        ).groups()
        if kind == "sr" and self.sr_busy > 0:
            self.sr_busy -= 1
            return httpx.Response(503, json={"error": {"code": "overloaded"}})
        if kind == "sc" and self.sc_pending > 0:
            self.sc_pending -= 1
            return httpx.Response(202, headers={"retry-after": "0"}, json={"error": {}})
        return httpx.Response(200, content=fake_object(request_id, kind))


class Pacs:
    """A storage SCP standing in for the hospital's PACS (what it received, in order)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[Dataset] = []
        self.server = None

    def start(self) -> Pacs:
        ae = AE(ae_title=PACS)
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.dataset)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def node_config(tmp_path: Path, pacs_port: int, **kw) -> DicomNodeConfig:
    base = {
        "enabled": True,
        "port": 0,
        "peers": [{"ae_title": PEER, "tenant": "hospital-a"}],
        "send_results_to": {"ae_title": PACS, "host": "127.0.0.1", "port": pacs_port},
        "queue_path": str(tmp_path / "queue" / "node.sqlite3"),
        "retry_base_s": 0.1,
        "retry_max_s": 0.5,
    }
    return DicomNodeConfig.model_validate(base | kw)


def start_node(cfg: DicomNodeConfig, service: FakeService) -> DicomNode:
    client = ServiceClient(
        "http://service", {"hospital-a": "key-a"}, transport=httpx.MockTransport(service)
    )
    node = DicomNode(cfg, client, max_instance_bytes=8 << 20)
    node.start(serve_metrics=False)
    return node


def associate(port: int, ae_title: str = PEER):
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="ORTHOVISION")


def send(port: int, instances: list[bytes]) -> list[int]:
    assoc = associate(port)
    assert assoc.is_established
    statuses = [assoc.send_c_store(dcmread(io.BytesIO(data))).Status for data in instances]
    assoc.release()
    return statuses


@pytest.fixture
def pacs():
    server = Pacs(free_port()).start()
    yield server
    server.stop()


def test_instances_go_through_the_service_and_srs_come_back(tmp_path, pacs):
    service = FakeService()
    node = start_node(node_config(tmp_path, pacs.port), service)
    try:
        instances = [make_dicom() for _ in range(3)]
        assert send(node.port, instances) == [0x0000] * 3
        assert wait_for(lambda: len(pacs.received) == 3)
    finally:
        node.stop()
    # The service saw the very bytes the modality sent (the SOP instance UIDs), with the key.
    sent_uids = {dcmread(io.BytesIO(d)).SOPInstanceUID for d in instances}
    assert {dcmread(io.BytesIO(d)).SOPInstanceUID for d in service.instances} == sent_uids
    assert set(service.keys) == {"key-a"}
    assert all(ds.Modality == "SR" for ds in pacs.received)


def test_with_send_sc_the_secondary_capture_follows_once_it_is_made(tmp_path, pacs):
    service = FakeService(sc_pending=2)  # the explanation takes a while: 202, 202, then 200
    node = start_node(node_config(tmp_path, pacs.port, send_sc=True), service)
    try:
        assert send(node.port, [make_dicom()]) == [0x0000]
        assert wait_for(lambda: len(pacs.received) == 2)
    finally:
        node.stop()
    assert sorted(ds.Modality for ds in pacs.received) == ["OT", "SR"]
    assert service.sc_pending == 0


def test_a_failed_result_fetch_is_retried_without_classifying_again(tmp_path, pacs):
    service = FakeService(sr_busy=3)  # classified, then the SR cannot be fetched for a while
    node = start_node(node_config(tmp_path, pacs.port), service)
    try:
        instances = [make_dicom() for _ in range(2)]
        assert send(node.port, instances) == [0x0000] * 2
        assert wait_for(lambda: len(pacs.received) == 2)
    finally:
        node.stop()
    assert len(service.instances) == 2  # one STOW-RS entry per instance: no second record
    assert service.sr_busy == 0


def test_an_instance_the_service_refuses_gets_no_result_and_leaves_the_inbox(tmp_path, pacs):
    node = start_node(node_config(tmp_path, pacs.port), FakeService(refuse=True))
    try:
        assert send(node.port, [make_dicom(), make_dicom()]) == [0x0000] * 2
        sample = node.metrics.registry.get_sample_value
        rejected = {"outcome": "rejected"}
        assert wait_for(lambda: sample("orthovision_dicom_instances_total", rejected) == 2)
        assert node.queue.depths().inbox == node.queue.depths().outbox == 0
        assert pacs.received == []
    finally:
        node.stop()


def test_an_unknown_calling_ae_is_rejected(tmp_path, pacs):
    node = start_node(node_config(tmp_path, pacs.port), FakeService())
    try:
        assoc = associate(node.port, "STRANGER")
        assert assoc.is_rejected and not assoc.is_established
        sample = node.metrics.registry.get_sample_value
        assert sample("orthovision_dicom_associations_total", {"outcome": "unknown_caller"}) == 1
    finally:
        node.stop()


def test_a_peer_over_its_association_budget_is_refused_until_one_closes(tmp_path, pacs):
    node = start_node(node_config(tmp_path, pacs.port, max_associations_per_peer=1), FakeService())
    try:
        first = associate(node.port)
        assert first.is_established
        second = associate(node.port)
        assert second.is_rejected
        first.release()
        assert wait_for(
            lambda: (third := associate(node.port)).is_established and not third.release()
        )
    finally:
        node.stop()


def test_a_full_inbox_answers_out_of_resources_and_keeps_what_it_took(tmp_path, pacs):
    service = FakeService(busy=True)  # nothing leaves the inbox
    node = start_node(node_config(tmp_path, pacs.port, max_in_flight=2), service)
    try:
        statuses = send(node.port, [make_dicom() for _ in range(4)])
        assert statuses == [0x0000, 0x0000, OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        assert node.queue.depths().inbox == 2
        service.busy = False  # the service recovers: the two held instances go through
        assert wait_for(lambda: len(pacs.received) == 2)
        assert node.queue.depths().inbox == 0
    finally:
        node.stop()


def test_results_wait_in_the_outbox_until_the_destination_is_up(tmp_path):
    port = free_port()  # nobody listens there yet
    node = start_node(node_config(tmp_path, port), FakeService())
    pacs = Pacs(port)
    try:
        assert send(node.port, [make_dicom() for _ in range(3)]) == [0x0000] * 3
        assert wait_for(lambda: node.queue.depths().outbox == 3)
        time.sleep(1.0)  # several failed rounds
        assert node.queue.depths().outbox == 3
        pacs.start()
        assert wait_for(lambda: len(pacs.received) == 3)
        assert wait_for(lambda: node.queue.depths().outbox == 0)
    finally:
        node.stop()
        pacs.stop()


def test_the_queue_survives_a_restart_and_holds_its_bound(tmp_path):
    path = tmp_path / "q" / "node.sqlite3"
    queue = NodeQueue(path, max_in_flight=2)
    assert queue.receive("hospital-a", b"one") and queue.receive("hospital-a", b"two")
    assert not queue.receive("hospital-a", b"three")
    (first, _) = queue.claim_instances(8)
    assert queue.claim_instances(8) == []  # leased to the first caller
    queue.classified(first.id, [Result("sr", PACS, "127.0.0.1", 104, b"SR", "hospital-a")])
    queue.close()

    again = NodeQueue(path, max_in_flight=2)  # a new process: leases are void
    assert again.depths().inbox == 1 and again.depths().outbox == 1
    assert [r.data for r in again.claim_instances(8)] == [b"two"]
    (result,) = again.due_results(8)
    assert (result.data, result.destination) == (b"SR", (PACS, "127.0.0.1", 104))
    again.sent(result.id)
    assert again.depths().outbox == 0
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"


def test_each_tenant_gets_its_own_destination():
    cfg = DicomNodeConfig.model_validate(
        {
            "peers": [
                {"ae_title": "A", "tenant": "hospital-a"},
                {
                    "ae_title": "B",
                    "tenant": "hospital-b",
                    "send_results_to": {"ae_title": "PACSB", "host": "b", "port": 11112},
                },
            ],
            "send_results_to": {"ae_title": "PACS", "host": "a", "port": 104},
        }
    )
    assert cfg.destination("hospital-a").ae_title == "PACS"
    assert cfg.destination("hospital-b").ae_title == "PACSB"
    assert cfg.tenant_of("B ") == "hospital-b" and cfg.tenant_of("C") is None
    with pytest.raises(ValueError):
        DicomNodeConfig.model_validate({"ae_title": "A" * 17})


def test_outcome_counts_are_exported(tmp_path, pacs):
    node = start_node(node_config(tmp_path, pacs.port), FakeService())
    try:
        send(node.port, [make_dicom()])
        assert wait_for(lambda: len(pacs.received) == 1)
        sample = node.metrics.registry.get_sample_value
        assert sample("orthovision_dicom_instances_total", {"outcome": "stored"}) == 1
        assert wait_for(lambda: sample("orthovision_dicom_results_total", {"outcome": "sent"}) == 1)
        assert sample("orthovision_dicom_outbox_results") == 0
    finally:
        node.stop()
