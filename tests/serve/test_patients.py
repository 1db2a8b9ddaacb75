"""Patient references and sealed DICOM attributes (serve/patients.py)."""

from __future__ import annotations

import json

import pytest
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME

from orthovision.config import SecurityConfig
from serve.auth import LOCAL_TENANT
from serve.patients import (
    PATIENT_REF,
    SEALED_KEY,
    BadPatientHeader,
    PatientKeys,
    header_id,
    parse_patient_keys,
)

KEYS = PatientKeys({"a": "secret-of-tenant-a", "b": "secret-of-tenant-b"})
SOURCE = {
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1",
    "SOPInstanceUID": "1.2.3.4",
    "StudyInstanceUID": "1.2.3",
    "SeriesInstanceUID": "1.2.3.5",
    "PatientName": FAKE_PATIENT_NAME,
    "PatientID": FAKE_PATIENT_ID,
    "PatientBirthDate": "19700101",
    "StudyDate": "20260103",
}


def test_references_are_stable_per_tenant_and_unlinkable_across():
    ref = KEYS.ref("a", FAKE_PATIENT_ID)
    assert ref is not None and PATIENT_REF.fullmatch(ref)
    assert KEYS.ref("a", f"  {FAKE_PATIENT_ID} ") == ref  # as the DICOM reader strips it
    assert KEYS.ref("b", FAKE_PATIENT_ID) != ref
    assert KEYS.ref("a", FAKE_PATIENT_ID, "HOSP-1") != ref  # the issuer is part of it
    assert KEYS.ref("a", "") is None and KEYS.ref("c", FAKE_PATIENT_ID) is None


def test_sealed_source_holds_no_identifier_and_opens_for_its_tenant_only():
    private = {"tenant": "a", "dicom_source": SOURCE}
    stored = KEYS.seal("a", private)
    text = json.dumps(stored)
    for value in (FAKE_PATIENT_ID, FAKE_PATIENT_NAME, "19700101", "Leaky"):
        assert value not in text
    assert stored["dicom_source"]["StudyInstanceUID"] == "1.2.3" and stored[SEALED_KEY]
    assert KEYS.open("a", stored) == SOURCE
    # Under another tenant's key it does not open: only the UIDs come back.
    assert "PatientID" not in KEYS.open("b", stored)
    assert KEYS.open("a", {"dicom_source": None}) is None


def test_a_tenant_without_a_key_keeps_no_patient_attribute():
    stored = PatientKeys({}).seal("x", {"dicom_source": SOURCE})
    assert SEALED_KEY not in stored and FAKE_PATIENT_ID not in json.dumps(stored)


def test_keys_come_from_the_environment_and_the_local_default_only_without_auth(monkeypatch):
    monkeypatch.setenv("ORTHOVISION_PATIENT_KEYS", json.dumps({"a": "secret-of-tenant-a"}))
    keys = PatientKeys.from_env(SecurityConfig(auth="api-key"), ["a", "b"])
    assert keys.enabled("a") and not keys.enabled("b") and not keys.enabled(LOCAL_TENANT)
    monkeypatch.delenv("ORTHOVISION_PATIENT_KEYS")
    assert PatientKeys.from_env(SecurityConfig(auth="none"), [LOCAL_TENANT]).enabled(LOCAL_TENANT)


@pytest.mark.parametrize("value", ["[1]", "{not json", '{"a": "short"}', '{"a": 5}'])
def test_bad_key_settings_are_refused_without_quoting_a_secret(value):
    with pytest.raises(ValueError) as err:
        parse_patient_keys(value)
    assert "short" not in str(err.value).replace("under", "")


def test_patient_headers_are_checked_without_echo():
    assert header_id(" PID-1 ", "X-Patient-ID", required=True) == "PID-1"
    assert header_id(None, "X-Issuer-Of-Patient-ID", required=False) is None
    for bad in ("", "x" * 65, "PID\x00"):
        with pytest.raises(BadPatientHeader) as err:
            header_id(bad, "X-Patient-ID", required=True)
        assert err.value.http_status == 400 and (not bad or bad not in err.value.message)
