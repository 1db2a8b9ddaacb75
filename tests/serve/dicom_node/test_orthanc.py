"""The DICOM node between a real PACS (Debian's Orthanc) and the live service: Orthanc
pushes a study by C-STORE, the SRs come back into Orthanc referencing it; results due while
Orthanc is down are all delivered from the outbox once it is back, across a node restart."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from support.images import make_dicom, radiograph
from support.liveapp import KEY
from support.orthanc import ORTHANC_AET, Orthanc, orthanc_binary
from support.polling import wait_for

from orthovision.config import DicomNodeConfig
from serve.dicom_node.forward import ServiceClient
from serve.dicom_node.node import DicomNode

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(
        orthanc_binary() is None, reason="Debian's orthanc is not installed (.ci/run installs it)"
    ),
]


def study(n: int, seed: int) -> tuple[str, list[bytes]]:
    uid = generate_uid()
    series = generate_uid()
    return uid, [
        make_dicom(
            pixels=radiograph(seed + i).astype(np.uint16) << 2,
            StudyInstanceUID=uid,
            SeriesInstanceUID=series,
            InstanceNumber=i + 1,
        )
        for i in range(n)
    ]


def referenced_instances(sr: bytes) -> set[str]:
    ds = dcmread(io.BytesIO(sr))
    return {
        sop.ReferencedSOPInstanceUID
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def sop_uid(data: bytes) -> str:
    return dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID


def start_node(live_app, tmp_path, orthanc: Orthanc, caller: str = ORTHANC_AET) -> DicomNode:
    """A node for the live app whose one peer is `caller` and whose results go to Orthanc
    (whose ports are chosen before it starts)."""
    cfg = DicomNodeConfig(
        enabled=True,
        port=0,
        peers=[{"ae_title": caller, "tenant": "hospital-a"}],
        send_results_to={"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port},
        queue_path=str(tmp_path / "node" / "queue.sqlite3"),
        retry_base_s=0.2,
        retry_max_s=1.0,
    )
    node = DicomNode(cfg, ServiceClient(live_app.url, {"hospital-a": KEY}), 8 << 20)
    node.start(serve_metrics=False)
    return node


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc", modalities={})
    yield server
    server.stop()


def test_orthanc_pushes_a_study_and_gets_an_sr_per_instance_back(live_app, tmp_path, orthanc):
    node = start_node(live_app, tmp_path, orthanc)
    try:
        orthanc.modalities = {"ov": ["ORTHOVISION", "127.0.0.1", node.port]}
        orthanc.start()
        study_uid, instances = study(3, seed=40)
        ids = [orthanc.upload(data) for data in instances]
        assert orthanc.push("ov", ids).status_code == 200  # three C-STOREs, all accepted
        assert wait_for(lambda: len(orthanc.instances_of_modality("SR")) == 3, 90)
    finally:
        node.stop()
    srs = orthanc.instances_of_modality("SR")
    sent = {sop_uid(d) for d in instances}
    # Each SR is filed in the pushed study and references exactly one of its instances.
    assert {dcmread(io.BytesIO(sr)).StudyInstanceUID for sr in srs} == {study_uid}
    refs = [referenced_instances(sr) for sr in srs]
    assert all(len(r) == 1 for r in refs)
    assert set().union(*refs) == sent


def test_results_due_while_orthanc_is_down_are_all_delivered_after_restart(
    live_app, tmp_path, orthanc
):
    # Orthanc is down while the results are due (it starts only at the end).
    node = start_node(live_app, tmp_path, orthanc)
    _, instances = study(3, seed=50)
    ae = AE(ae_title=ORTHANC_AET)  # the hospital's router, pushing as the PACS's AE
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ORTHOVISION")
    assert assoc.is_established
    statuses = [assoc.send_c_store(dcmread(io.BytesIO(d))).Status for d in instances]
    assoc.release()
    assert statuses == [0x0000] * 3
    try:
        assert wait_for(lambda: node.queue.depths().outbox == 3, 90)
        time.sleep(2.0)  # several refused rounds
        assert node.queue.depths().outbox == 3
    finally:
        node.stop()  # and the node restarts too: the outbox is on disk
    node = start_node(live_app, tmp_path, orthanc)
    try:
        orthanc.start()
        assert wait_for(lambda: node.queue.depths().outbox == 0, 90)
    finally:
        node.stop()
    delivered = set().union(
        *(referenced_instances(sr) for sr in orthanc.instances_of_modality("SR"))
    )
    assert delivered == {sop_uid(d) for d in instances}


def test_orthanc_as_an_unknown_caller_is_refused(live_app, tmp_path, orthanc):
    node = start_node(live_app, tmp_path, orthanc, caller="OTHERPACS")
    try:
        orthanc.modalities = {"ov": ["ORTHOVISION", "127.0.0.1", node.port]}
        orthanc.start()
        _, instances = study(1, seed=60)
        pushed = orthanc.push("ov", [orthanc.upload(instances[0])])
        assert pushed.status_code >= 400  # Orthanc reports the refused association
        sample = node.metrics.registry.get_sample_value
        assert sample("orthovision_dicom_associations_total", {"outcome": "unknown_caller"}) >= 1
        assert node.queue.depths().inbox == 0
    finally:
        node.stop()
