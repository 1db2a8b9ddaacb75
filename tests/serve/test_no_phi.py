"""No patient identifier in any log line, metric label or error message (docs/DESIGN.md).

Sends every shared DICOM (and the malformed one, and synthetic files carrying fake
identifiers) through the live app, then reads every Ray log file of the session, the
node's metrics endpoint and every response body.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
import pytest
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, SHARED, requires_shared
from support.images import make_dicom

pytestmark = [pytest.mark.serve, requires_shared]


def identifiers(paths: list[Path]) -> set[str]:
    values = {FAKE_PATIENT_NAME, FAKE_PATIENT_ID, "Leaky", "PID-0042"}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword in ("PatientName", "PatientID", "AccessionNumber"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:  # shorter strings match innocently everywhere
                values.add(value)
                values.update(part for part in value.split("^") if len(part) >= 4)
    return values


def test_no_patient_identifier_in_logs_metrics_or_errors(live_app):
    import ray

    dicoms = sorted((SHARED / "dicom").glob("*.dcm")) + sorted(
        (SHARED / "bad-inputs" / "malformed-dicom").glob("*.dcm")
    )
    secrets = identifiers(dicoms)
    c = live_app.client
    bodies = []
    for path in dicoms:
        for query in ("", "?explain=true"):
            bodies.append(c.post(f"/v1/predict{query}", content=path.read_bytes()).text)
    bodies.append(c.post("/v1/predict", content=make_dicom(modality="CT")).text)
    bodies.append(c.post("/v1/predict", content=make_dicom(with_pixels=False)).text)
    bodies.append(
        c.post(
            "/v1/predict/batch",
            files=[("files", (p.name, p.read_bytes(), "application/dicom")) for p in dicoms],
        ).text
    )
    time.sleep(8)  # explanations finish, metrics flush, log files are written

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session_dir / "logs").rglob("*") if p.is_file()]
    assert logs, "no Ray log files found"
    metrics_text = httpx.get(f"http://127.0.0.1:{live_app.metrics_port}/metrics", timeout=10).text

    leaks = []
    for secret in secrets:
        for body in bodies:
            if secret in body:
                leaks.append(f"response body contains {secret!r}")
        if secret in metrics_text:
            leaks.append(f"metrics contain {secret!r}")
        for log in logs:
            if secret.encode() in log.read_bytes():
                leaks.append(f"{log.name} contains {secret!r}")
    assert not leaks, leaks[:10]
    assert len(secrets) >= 4 and len(logs) >= 5
