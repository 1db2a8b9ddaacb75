"""STOW-RS body parsing and response (no Ray), and the private DICOM source of a decode."""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom
import pytest
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME
from support.images import make_dicom

from orthovision.clinical.dicom_objects import (
    derived_uid,
    read_findings,
    structured_report,
    to_bytes,
)
from orthovision.clinical.dicomweb import (
    FailedInstance,
    Part,
    StoredInstance,
    dataset_only,
    instance_indices,
    not_an_instance,
    related_boundary,
    sop_reference,
    split_related,
    stow_answer,
    stow_response,
    stow_status,
)
from orthovision.errors import InputError, InputTooLarge, QualityRejected, UnsupportedFormat
from orthovision.imaging.decode import decode_radiograph


@pytest.mark.parametrize(
    ("ctype", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary="a b"', "a b"),
        ("Multipart/Related; boundary=xyz; type=application/dicom", "xyz"),
        ("multipart/related; boundary=xyz", "xyz"),  # type defaults to application/dicom
    ],
)
def test_related_boundary(ctype, boundary):
    assert related_boundary(ctype) == boundary


@pytest.mark.parametrize(
    ("ctype", "error"),
    [
        ("application/dicom", UnsupportedFormat),
        ('multipart/related; type="application/dicom+json"; boundary=x', UnsupportedFormat),
        ('multipart/related; type="application/dicom"', InputError),
        ("multipart/related; boundary=" + "x" * 71, InputError),
    ],
)
def test_related_boundary_refused(ctype, error):
    with pytest.raises(error):
        related_boundary(ctype)


def test_split_related_parts_padding_and_bounds():
    body = (
        b"preamble\r\n--b  \r\nContent-Type: application/dicom\r\n\r\nONE\r\n--b\r\n"
        b"\r\nTWO\r\nwith lines\r\n--b\r\nContent-Type: text/plain; x=1\r\n\r\n3\r\n--b--\r\n"
    )
    parts = split_related(body, "b", max_parts=3)
    assert [(p.content_type, p.data) for p in parts] == [
        ("application/dicom", b"ONE"),
        ("application/dicom", b"TWO\r\nwith lines"),
        ("text/plain", b"3"),
    ]
    with pytest.raises(InputTooLarge):
        split_related(body, "b", max_parts=2)
    with pytest.raises(InputError):
        split_related(body.replace(b"--b--", b"--c--"), "b", max_parts=3)  # no closing line
    assert split_related(b"--b--\r\n", "b", max_parts=3) == []


def test_stow_response_json_and_status():
    out = stow_response(
        [StoredInstance("1.2.3", "1.2.3.4")], [FailedInstance("", "1.2.3.5", 0xC000)]
    )
    ds = pydicom.Dataset.from_json(out)
    assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert ds.FailedSOPSequence[0].FailureReason == 0xC000
    assert [stow_status(2, 0), stow_status(1, 1), stow_status(0, 2)] == [200, 202, 409]


def test_stow_answer_links_stored_and_lists_failed_in_order():
    dicom = make_dicom()
    parts = [
        Part("application/dicom", dicom),
        Part("image/jpeg", dicom),
        Part("application/dicom", b"x"),
    ]
    assert instance_indices(parts) == [0]
    outcomes = [{"request_id": "r0", "label": None}, not_an_instance(), QualityRejected("dark")]
    refs = [("1.2.3", "1.2.3.4"), ("1.2.3", "1.2.3.5"), ("", "")]
    answer = stow_answer(refs, ["r0", "r1", "r2"], outcomes, "/p/{request_id}/sr")
    assert answer.status == 202
    assert answer.results[0] == {
        "index": 0,
        "request_id": "r0",
        "sop_instance_uid": "1.2.3.4",
        "label": None,
        "sr_url": "/p/r0/sr",
    }
    assert [r["error"]["code"] for r in answer.results[1:]] == [
        "unsupported_format",
        "quality_rejected",
    ]
    ds = pydicom.Dataset.from_json(answer.response)
    assert [f.FailureReason for f in ds.FailedSOPSequence] == [0xC000, 0xC000]
    assert dataset_only("application/dicom+json") and not dataset_only(
        "application/dicom+json, application/json"
    )


def test_decoded_dicom_source_is_private_and_feeds_the_sr():
    data = make_dicom(pixels=(np.arange(128 * 160).reshape(128, 160) % 4096).astype(np.uint16))
    decoded = decode_radiograph(data)
    source = decoded.dicom_source
    assert source["PatientID"] == FAKE_PATIENT_ID
    for text in (str(decoded.metadata()), repr(decoded)):
        assert FAKE_PATIENT_ID not in text and FAKE_PATIENT_NAME not in text
    assert sop_reference(data) == (source["SOPClassUID"], source["SOPInstanceUID"])
    assert sop_reference(b"not dicom") == ("", "")
    result = {
        "request_id": "req-1",
        "label": "fracture",
        "abstained": False,
        "probabilities": {"fracture": 0.9, "tumor-benign": 0.1},
        "validated_classes": ["fracture"],
        "model": {"name": "m", "version": "1", "sha256": "0" * 64},
    }
    sr = pydicom.dcmread(io.BytesIO(to_bytes(structured_report(result, source, time.time()))))
    assert sr.PatientName == FAKE_PATIENT_NAME and sr.StudyInstanceUID == source["StudyInstanceUID"]
    assert sr.SOPInstanceUID == derived_uid("req-1", "sr") != derived_uid("req-2", "sr")
    assert read_findings(sr.ContentSequence) == {
        "finding": "fracture",
        "probabilities": {"fracture": 0.9, "tumor-benign": 0.1},
    }
    notes = [
        note.TextValue
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
        for note in item.ContentSequence
        if note.ValueType == "TEXT"
    ]
    assert notes == ["tumor-benign is not a validated class"]
