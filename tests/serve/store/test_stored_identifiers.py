"""What the image road stores for a DICOM input holds no patient identifier, on both
backends: records keep the SR/SC's patient attributes sealed, study entries a pseudonym
(serve/classify.py, serve/patients.py). The files and keys themselves are searched."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME
from support.images import make_dicom, radiograph
from support.stores import Factory, RedisServer, needs_redis, run

from orthovision.config import ServeConfig
from orthovision.imaging.decode import decode_radiograph
from orthovision.model.pipeline import Classified
from serve import classify, clinical
from serve.classify import Classifier, Job
from serve.patients import PatientKeys
from serve.store import RedisStore, ResultStore, SQLiteStore

SECRETS = (FAKE_PATIENT_ID, FAKE_PATIENT_NAME, "Leaky", "PID-0042", "ACC-SECRET-9", "19700101")
KEYS = PatientKeys({"t1": "patient-secret-of-t1"})
RESULT = {
    "label": "fracture",
    "abstained": False,
    "probabilities": {"fracture": 0.8, "non-affected": 0.2},
    "input": {"body_part": "HAND"},
}


class _NoMetrics:
    def observe_result(self, *_args) -> None:
        pass


async def keep_one_dicom(store: ResultStore) -> tuple[Classifier, dict]:
    """Run the road's storing step on one classified DICOM instance; its DICOM source."""
    data = make_dicom(
        pixels=radiograph().astype(np.uint16) << 2,
        PatientBirthDate="19700101",
        StudyDate="20260103",
    )
    source = decode_radiograph(data).dicom_source
    road = Classifier(None, store, ServeConfig(), KEYS)  # type: ignore[arg-type]
    out = Classified({**RESULT, "request_id": "rq-1"}, 1.7e9, source)
    await road._keep([Job(data, "rq-1", tenant="t1")], None, [out])  # type: ignore[arg-type]
    return road, source


@pytest.fixture(autouse=True)
def no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify, "metrics", _NoMetrics)


def test_sqlite_file_holds_no_identifier_and_the_sr_still_gets_them(tmp_path: Path) -> None:
    db = tmp_path / "store.db"

    async def main() -> None:
        store = SQLiteStore(db)
        try:
            _road, source = await keep_one_dicom(store)
            record = await store.get_record("rq-1")
            assert record is not None
            # The DICOM routes open the sealed attributes for the owning tenant.
            assert KEYS.open("t1", clinical.private(record)) == source
            (entry,) = await store.get_study("t1", source["StudyInstanceUID"])
            ref = KEYS.ref("t1", FAKE_PATIENT_ID)
            assert (entry.patient_ref, entry.fracture_probability) == (ref, 0.8)
        finally:
            await store.close()

    asyncio.run(main())
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert [s for s in SECRETS if s.encode() in raw] == []


@needs_redis
def test_redis_keys_and_values_hold_no_identifier(redis_server: RedisServer) -> None:
    redis_server.flush()
    run(lambda: RedisStore(redis_server.url), keep_one_dicom)
    with redis_server.client() as client:
        keys = list(client.scan_iter("*"))
        assert len(keys) >= 3  # the record, the study, the patient's set
        blob = b"".join(keys) + b"".join(client.dump(k) or b"" for k in keys)
    assert [s for s in SECRETS if s.encode() in blob] == []


def test_both_backends_store_the_study_entry(make_store: Factory) -> None:
    async def scenario(store: ResultStore) -> None:
        _road, source = await keep_one_dicom(store)
        ref = KEYS.ref("t1", FAKE_PATIENT_ID)
        assert ref is not None
        (entry,) = await store.get_patient_entries("t1", ref)
        assert (entry.study_uid, entry.study_date) == (source["StudyInstanceUID"], "20260103")

    run(make_store, scenario)
