"""The service's DICOM outputs against Debian's DICOM validator (dciodvfy, dicom3tools):
no errors, and the same bytes on every fetch."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest
from support.images import make_dicom, radiograph

from orthovision.clinical.dicom_objects import secondary_capture, structured_report, to_bytes
from orthovision.imaging.decode import decode_radiograph

DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (.ci/run installs Debian's dicom3tools)"
)
RESULT = {
    "request_id": "0123456789abcdef",
    "model": {"name": "orthovision", "version": "0.1.0", "sha256": "0" * 64},
    "label": "fracture",
    "abstained": False,
    "probabilities": {
        "fracture": 0.7,
        "non-affected": 0.2,
        "tumor-benign": 0.05,
        "tumor-malignant": 0.05,
    },
    "validated_classes": ["fracture", "non-affected"],
}


def errors(tmp_path, data: bytes) -> list[str]:
    path = tmp_path / "out.dcm"
    path.write_bytes(data)
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("laterality", [None, "L"])
def test_sr_and_sc_validate_and_are_reproducible(tmp_path, laterality):
    extra = {"Laterality": laterality} if laterality else {}
    source = decode_radiograph(
        make_dicom(pixels=radiograph().astype(np.uint16) << 2, **extra)
    ).dicom_source
    overlay = np.zeros((224, 224, 3), np.uint8)

    def sr() -> bytes:
        return to_bytes(structured_report(RESULT, source, 1.7e9))

    def sc() -> bytes:
        return to_bytes(secondary_capture(overlay, RESULT, source, 1.7e9))

    first_sr, first_sc = sr(), sc()
    assert errors(tmp_path, first_sr) == []
    assert errors(tmp_path, first_sc) == []
    time.sleep(1.1)  # a clock-stamped attribute would now differ
    assert sr() == first_sr and sc() == first_sc


def test_study_sr_references_every_instance_and_validates(tmp_path):
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from orthovision.clinical.dicom_objects import study_report

    study_uid = generate_uid()
    sources = [
        decode_radiograph(
            make_dicom(
                pixels=radiograph(seed=i).astype(np.uint16) << 2,
                StudyInstanceUID=study_uid,
                ViewPosition=view,
            )
        ).dicom_source
        for i, view in enumerate(("AP", "LAT", "PA"))
    ]
    results = [
        {
            **RESULT,
            "request_id": f"r{i}",
            "probabilities": {**RESULT["probabilities"], "fracture": p},
        }
        for i, p in enumerate((0.2, 0.9, 0.4))
    ]
    study = {"result": {"rule": "max over views", "fracture_probability": 0.9}}
    study["result"]["driving_request_id"] = "r1"
    pairs = list(zip(results, sources, strict=True))
    data = to_bytes(study_report(study, pairs, 1.7e9, "t/seed"))
    assert errors(tmp_path, data) == []
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == sources[0]["PatientID"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {s["SOPInstanceUID"] for s in sources}
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert (
        float(items["Study probability of fracture"].MeasuredValueSequence[0].NumericValue) == 0.9
    )
    driving = items["Driving view"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert driving == sources[1]["SOPInstanceUID"]
    views = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
    assert len(views) == 3
    again = to_bytes(study_report(study, pairs, 1.7e9, "t/seed"))
    assert again == data
