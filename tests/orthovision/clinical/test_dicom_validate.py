"""The service's DICOM outputs against Debian's DICOM validator (dciodvfy, dicom3tools):
no errors and no warnings (the synthetic sources are clean, so any warning is the service's),
and the same bytes on every fetch."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time

import numpy as np
import pydicom
import pytest
from support.data import SHARED, requires_shared
from support.images import make_dicom, radiograph

from orthovision.clinical.dicom_objects import (
    read_findings,
    secondary_capture,
    structured_report,
    to_bytes,
)
from orthovision.imaging.decode import decode_radiograph

DCIODVFY = shutil.which("dciodvfy")
pytestmark = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (.ci/run installs Debian's dicom3tools)"
)
SHARED_DICOMS = [
    "RG1_J2KI.dcm",
    "RG2_JLSL.dcm",
    "RG2_JPLL.dcm",
    "RG2_JPLY_fixed.dcm",
    "RG3_J2KR.dcm",
    "JPEG2KLossless_1s_1f_u_16_16.dcm",
]
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


def findings(tmp_path, data: bytes) -> list[str]:
    """dciodvfy's error and warning lines for one Part 10 file."""
    path = tmp_path / "out.dcm"
    path.write_bytes(data)
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, errors="replace")
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def errors(tmp_path, data: bytes) -> list[str]:
    return [line for line in findings(tmp_path, data) if line.startswith("Error")]


def what(line: str) -> str:
    """A finding without its severity and quoted value: the source's text, re-encoded as
    UTF-8 in the outputs, is the same finding."""
    return re.sub(r"= <.*?>", "", line.split(" - ", 1)[-1])


COMPLETE_STUDY = {"StudyDate": "20260101", "StudyTime": "101010", "StudyID": "7"}
UNKNOWN_LATERALITY = "is only permitted to be empty when actually unknown"


@pytest.mark.parametrize(
    ("laterality", "body_part", "expected_warnings"),
    [
        ("L", "HAND", 0),  # carried from the source
        (None, "PELVIS", 0),  # unpaired body part: Laterality absent
        (None, "HAND", 1),  # paired body part, laterality unknown: present and empty
    ],
)
def test_sr_and_sc_validate_and_are_reproducible(
    tmp_path, laterality, body_part, expected_warnings
):
    extra = {"Laterality": laterality, "BodyPartExamined": body_part}
    extra = {k: v for k, v in extra.items() if v} | COMPLETE_STUDY
    source = decode_radiograph(
        make_dicom(pixels=radiograph().astype(np.uint16) << 2, **extra)
    ).dicom_source
    overlay = np.zeros((224, 224, 3), np.uint8)

    def sr() -> bytes:
        return to_bytes(structured_report(RESULT, source, 1.7e9))

    def sc() -> bytes:
        return to_bytes(secondary_capture(overlay, RESULT, source, 1.7e9))

    first_sr, first_sc = sr(), sc()
    assert findings(tmp_path, first_sr) == []  # standard codes only: no scheme warnings
    sc_findings = findings(tmp_path, first_sc)
    assert len(sc_findings) == expected_warnings, sc_findings
    assert all(UNKNOWN_LATERALITY in line for line in sc_findings)
    sc_ds = pydicom.dcmread(io.BytesIO(first_sc))
    assert sc_ds.get("BodyPartExamined") == body_part
    time.sleep(1.1)  # a clock-stamped attribute would now differ
    assert sr() == first_sr and sc() == first_sc


@requires_shared
@pytest.mark.parametrize("name", SHARED_DICOMS)
def test_outputs_from_each_shared_dicom_add_no_error_or_warning(tmp_path, name):
    """Whatever dciodvfy says of the source itself (RG2_JPLY_fixed and friends carry their
    own warnings) may repeat in the outputs; nothing may be new."""
    data = (SHARED / "dicom" / name).read_bytes()
    source = decode_radiograph(data).dicom_source
    own = {what(line) for line in findings(tmp_path, data)}
    overlay = np.zeros((224, 224, 3), np.uint8)
    for made in (
        structured_report(RESULT, source, 1.7e9),
        secondary_capture(overlay, RESULT, source, 1.7e9),
    ):
        new = [line for line in findings(tmp_path, to_bytes(made)) if what(line) not in own]
        assert [line for line in new if line.startswith("Error")] == []
        # A source without Laterality (and a paired or unknown body part) leaves it unknown.
        assert [line for line in new if UNKNOWN_LATERALITY not in line] == []


def test_study_sr_references_every_instance_and_validates(tmp_path):
    from pydicom.uid import generate_uid

    from orthovision.clinical.dicom_objects import study_report

    study_uid = generate_uid()
    sources = [
        decode_radiograph(
            make_dicom(
                pixels=radiograph(seed=i).astype(np.uint16) << 2,
                StudyInstanceUID=study_uid,
                ViewPosition=view,
                **COMPLETE_STUDY,
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
    assert findings(tmp_path, data) == []
    sr = pydicom.dcmread(io.BytesIO(data))
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == sources[0]["PatientID"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {s["SOPInstanceUID"] for s in sources}
    assert read_findings(sr.ContentSequence)["probabilities"] == {"fracture": 0.9}
    study_p = next(i for i in sr.ContentSequence if i.ValueType == "NUM")
    driving = next(c for c in study_p.ContentSequence if c.ValueType == "IMAGE")
    assert driving.RelationshipType == "INFERRED FROM"
    assert driving.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[1]["SOPInstanceUID"]
    views = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
    assert [read_findings(v.ContentSequence)["probabilities"]["fracture"] for v in views] == [
        0.2,
        0.9,
        0.4,
    ]
    again = to_bytes(study_report(study, pairs, 1.7e9, "t/seed"))
    assert again == data
