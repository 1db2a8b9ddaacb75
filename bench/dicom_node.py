"""Ingestion over DICOM C-STORE (the DICOM node) beside STOW-RS, same instances, same service.

    python -m bench.dicom_node [--instances 200] [--max-in-flight 32]

Starts `orthovision serve` (the local preset, port 8000) as a child process, then:

- STOW-RS: the instances in requests of `batch_size` (the node's own batch), `workers`
  requests in flight (the node's worker count), then each instance's SR fetched, as the node
  does; time from the first request to the last SR.
- C-STORE: one association from a modality AE sends every instance to an in-process node,
  which forwards them to the same service and sends each SR to an in-process storage SCP
  (the PACS); time from the first C-STORE to the last SR received. A C-STORE refused with
  0xA700 (the node's inbox full) is resent after 50 ms, as a PACS router retries. The
  node's inbox is sampled every 20 ms: its maximum must not exceed `--max-in-flight`.

The instances: 224x224 radiographs of ../shared/data/fracture-xray wrapped as CR DICOM with
their JPEG as JPEG Baseline pixel data (synthetic without ../shared), four per study. Run
on an idle machine. The last stdout line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, ComputedRadiographyImageStorage

from bench.__main__ import machine_info
from bench.images import jpeg224
from bench.procs import Server, port_is_free
from orthovision.clinical.dicom_objects import to_bytes
from orthovision.clinical.dicomweb import related_body, related_content_type
from orthovision.config import DicomNodeConfig, OrthoVisionConfig
from serve.dicom_node.forward import ServiceClient
from serve.dicom_node.node import OUT_OF_RESOURCES, DicomNode

URL = "http://127.0.0.1:8000"
MODALITY, PACS = "BENCHMODALITY", "BENCHPACS"


def cr_instance(jpeg: bytes, study_uid: str, number: int) -> bytes:
    """A CR instance whose pixel data is the JPEG itself (JPEG Baseline transfer syntax)."""
    import cv2
    import numpy as np

    grey = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    # One component, as the header says (the shared JPEGs are grey pixels in three channels).
    jpeg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid])
    ds.PatientID = f"BENCH-{study_uid[-6:]}"
    ds.Modality, ds.BodyPartExamined, ds.InstanceNumber = "CR", "HAND", number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].is_undefined_length = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return to_bytes(ds)


def instances(count: int) -> tuple[list[bytes], str]:
    images = jpeg224(count)
    samples = [images.samples[i % len(images.samples)].data for i in range(count)]
    studies = [generate_uid() for _ in range(0, count, 4)]
    made = [cr_instance(jpeg, studies[i // 4], i % 4 + 1) for i, jpeg in enumerate(samples)]
    return made, images.source


# ---- STOW-RS ------------------------------------------------------------------------------
def stow_run(data: list[bytes], batch: int, workers: int) -> dict:
    client = httpx.Client(base_url=URL, timeout=300)

    def one(chunk: list[bytes]) -> int:
        boundary = uuid.uuid4().hex
        while True:
            r = client.post(
                "/dicomweb/studies",
                content=related_body(chunk, boundary),
                headers={"content-type": related_content_type(boundary)},
            )
            if r.status_code not in (429, 503):
                break
            time.sleep(float(r.headers.get("retry-after", 1)))
        ids = [e["request_id"] for e in r.json()["results"] if "error" not in e]
        return sum(client.get(f"/v1/predictions/{i}/dicom/sr").status_code == 200 for i in ids)

    chunks = [data[i : i + batch] for i in range(0, len(data), batch)]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        srs = sum(pool.map(one, chunks))
    wall = time.perf_counter() - started
    client.close()
    return {"instances": len(data), "srs": srs, "wall_s": round(wall, 2)}


# ---- C-STORE through the node ---------------------------------------------------------------
class Sink:
    """The PACS: a storage SCP counting the SRs it receives."""

    def __init__(self) -> None:
        self.count = 0
        self.done = threading.Event()
        self.expected = 0
        ae = AE(ae_title=PACS)
        ae.add_supported_context(ComprehensiveSRStorage)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, _event: evt.Event) -> int:
        self.count += 1
        if self.count >= self.expected:
            self.done.set()
        return 0x0000


def drained(sink: Sink, node: DicomNode, deadline_s: float) -> bool:
    """True when every SR arrived; False when the node has nothing left to do without it
    (refused instances get none) or the deadline passed."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if sink.done.wait(1.0):
            return True
        depths = node.queue.depths()
        if depths.inbox == depths.outbox == 0:
            return sink.done.wait(2.0)
    return False


def node_run(data: list[bytes], cfg: OrthoVisionConfig, max_in_flight: int, tmp: Path) -> dict:
    sink = Sink()
    sink.expected = len(data)
    node_cfg = DicomNodeConfig(
        enabled=True,
        port=0,
        peers=[{"ae_title": MODALITY, "tenant": "default"}],
        send_results_to={"ae_title": PACS, "host": "127.0.0.1", "port": sink.port},
        queue_path=str(tmp / "node" / "queue.sqlite3"),
        max_in_flight=max_in_flight,
    )
    node = DicomNode(node_cfg, ServiceClient(URL, {}), cfg.decode.max_bytes)
    node.start(serve_metrics=False)
    peak, sampling = [0], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            peak[0] = max(peak[0], node.queue.depths().inbox)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(ComputedRadiographyImageStorage, JPEGBaseline8Bit)
    datasets = [dcmread(io.BytesIO(d)) for d in data]
    refused = 0
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node_cfg.ae_title)
    for ds in datasets:
        while assoc.send_c_store(ds).Status == OUT_OF_RESOURCES:
            refused += 1
            time.sleep(0.05)
    assoc.release()
    sent_s = time.perf_counter() - started
    finished = drained(sink, node, deadline_s=600)
    wall = time.perf_counter() - started
    sampling.set()
    sampler.join()
    node.stop()
    sink.server.shutdown()
    return {
        "instances": len(data),
        "srs": sink.count,
        "complete": finished,
        "wall_s": round(wall, 2),
        "all_c_stores_answered_s": round(sent_s, 2),
        "refused_0xA700": refused,
        "max_inbox": peak[0],
        "max_in_flight": max_in_flight,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--max-in-flight", type=int, default=32)
    args = p.parse_args()
    if not port_is_free(8000):
        raise SystemExit("port 8000 is in use: stop the running service first")
    from serve.manifests.presets import preset

    cfg = preset("local")
    node_defaults = DicomNodeConfig()
    data, source = instances(args.instances)
    print(f"{len(data)} instances ({source}), {sum(map(len, data)) / len(data) / 1024:.1f} KiB")
    with tempfile.TemporaryDirectory(prefix="orthovision-dicom-bench-") as tmp:
        cmd = [sys.executable, "-m", "serve.commands", "serve"]
        server = Server("orthovision-serve", cmd, URL + "/readyz", Path(tmp) / "serve.log")
        server.start(ready_timeout_s=300)
        try:
            stow_run(data[:16], node_defaults.batch_size, node_defaults.workers)  # warm-up
            stow = stow_run(data, node_defaults.batch_size, node_defaults.workers)
            print(f"STOW-RS: {stow['wall_s']} s, {len(data) / stow['wall_s']:.2f} instances/s")
            node = node_run(data, cfg, args.max_in_flight, Path(tmp))
            print(
                f"C-STORE via the node: {node['wall_s']} s, "
                f"{len(data) / node['wall_s']:.2f} instances/s; max inbox {node['max_inbox']} "
                f"of {args.max_in_flight}, {node['refused_0xA700']} C-STOREs refused (0xA700)"
            )
        finally:
            server.stop()
    result = {
        "machine": machine_info("cpu"),
        "source": source,
        "stow_rs": stow,
        "c_store": node,
        "c_store_over_stow_rs": round(stow["wall_s"] / node["wall_s"], 2),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
