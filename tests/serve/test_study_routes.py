"""Studies, patient timelines, erasure and the study SR on the live app (docs/STUDIES.md):
a study of three DICOM views sent by STOW-RS and a follow-up study; no patient identifier
in the store's files, the logs or the metrics; another tenant reads none of it."""

from __future__ import annotations

import io
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME
from support.dicomweb import stow
from support.images import make_dicom, make_png, radiograph
from support.liveapp import KEY_B, VIEWER_KEY
from support.pdf import pdf_text

from serve.studies import ABSTAINED_TEXT

pytestmark = pytest.mark.serve

# This module's own patient: other live-app tests send DICOMs with FAKE_PATIENT_ID, whose
# timeline therefore holds their studies too. It contains FAKE_PATIENT_ID, so every leak
# check below still finds it.
PATIENT = f"{FAKE_PATIENT_ID}-{uuid.uuid4().hex[:8]}"
SECRETS = (FAKE_PATIENT_ID, FAKE_PATIENT_NAME, "Leaky", "PID-0042", "ACC-SECRET-9")


def study_dicoms(study_uid: str, date: str, views: tuple[str, ...], seed: int, **kw) -> list:
    """One study's instances: the same patient and study, a view each."""
    return [
        make_dicom(
            pixels=radiograph(seed + i).astype(np.uint16) << 2,
            StudyInstanceUID=study_uid,
            StudyDate=date,
            ViewPosition=view,
            **kw,
        )
        for i, view in enumerate(views)
    ]


def shown(p: float | None) -> str:
    return ABSTAINED_TEXT if p is None else f"{p:.2f}"


def expected_probability(results: list[dict]) -> float | None:
    scored = [r["probabilities"]["fracture"] for r in results if not r["abstained"]]
    return max(scored, default=None)


@pytest.fixture(scope="module")
def two_studies(live_app) -> dict:
    """Patient PATIENT: a study of three views (2026-01-03), then a follow-up."""
    first, follow = generate_uid(), generate_uid()
    r1 = stow(
        live_app.client, study_dicoms(first, "20260103", ("AP", "LAT", "PA"), 40, PatientID=PATIENT)
    )
    r2 = stow(
        live_app.client, study_dicoms(follow, "20260201", ("AP", "LAT"), 50, PatientID=PATIENT)
    )
    assert r1.status_code == r2.status_code == 200, (r1.text[:300], r2.text[:300])
    return {"uids": (first, follow), "answers": (r1.json(), r2.json())}


def test_stow_answers_each_study_result(live_app, two_studies):
    for uid, answer, n in zip(two_studies["uids"], two_studies["answers"], (3, 2), strict=True):
        assert set(answer) == {"stow", "results", "studies"}  # the existing fields stay
        (study,) = answer["studies"]
        assert study["study_instance_uid"] == uid
        assert study["study_date"] in ("2026-01-03", "2026-02-01") and study["body_part"] == "HAND"
        result = study["result"]
        assert result["rule"] == "max over views" and result["complete"] is True
        assert result["instances"] == n and result["pending"] == result["failed"] == 0
        assert result["fracture_probability"] == expected_probability(answer["results"])
        # The untrained test model may abstain on every view: then no view drives the study.
        drivers = [r for r in answer["results"] if r["request_id"] == result["driving_request_id"]]
        assert [d["probabilities"]["fracture"] for d in drivers] == (
            [] if result["fracture_probability"] is None else [result["fracture_probability"]]
        )
        ids = sorted(i["request_id"] for i in study["instances"])
        assert ids == sorted(r["request_id"] for r in answer["results"])
        assert {i["view"] for i in study["instances"]} <= {"AP", "LAT", "PA"}
        # GET answers the same study.
        assert live_app.client.get(f"/v1/studies/{uid}").json() == study


def test_timeline_lists_both_studies_newest_first_with_the_change(live_app, two_studies):
    first, follow = two_studies["answers"]
    ref = first["studies"][0]["patient_ref"]
    assert ref == follow["studies"][0]["patient_ref"] and len(ref) == 64
    body = live_app.client.get(f"/v1/patients/{ref}/timeline").json()
    assert body["order"] == "newest first"
    assert [s["study_instance_uid"] for s in body["studies"]] == list(two_studies["uids"][::-1])
    newest, prior = body["studies"]
    p, q = (shown(s["studies"][0]["result"]["fracture_probability"]) for s in (follow, first))
    assert newest["change"]["summary"] == (
        f"fracture probability {p}, was {q} on the prior study of 2026-01-03"
    )
    assert prior["change"] is None
    # The same timeline by the patient id header, hashed server-side.
    by_id = live_app.client.get("/v1/patients/timeline", headers={"X-Patient-ID": PATIENT})
    assert by_id.status_code == 200 and by_id.json() == body
    assert PATIENT not in by_id.text and FAKE_PATIENT_ID not in by_id.text


def test_uploads_name_their_study_by_header(live_app):
    uid = generate_uid()
    one = live_app.client.post(
        "/v1/predict", content=make_png(radiograph(61)), headers={"X-Study-Instance-UID": uid}
    )
    assert one.status_code == 200, one.text
    files = [("files", (f"{i}.png", make_png(radiograph(62 + i)), "image/png")) for i in range(2)]
    batch = live_app.client.post(
        "/v1/predict/batch", files=files, headers={"X-Study-Instance-UID": uid}
    )
    assert batch.status_code == 200, batch.text
    study = live_app.client.get(f"/v1/studies/{uid}").json()
    assert study["result"]["instances"] == 3 and study["patient_ref"] is None
    for bad, why in (("1.2.abc", "digits and dots"), ("1.02.3", "zero-led"), ("9" * 65, "64")):
        r = live_app.client.post(
            "/v1/predict", content=make_png(radiograph(61)), headers={"X-Study-Instance-UID": bad}
        )
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "bad_study_uid"


def test_other_tenants_get_404_for_studies_and_timelines(live_app, two_studies):
    other = httpx.Client(base_url=live_app.url, headers={"X-API-Key": KEY_B}, timeout=60)
    uid = two_studies["uids"][0]
    ref = two_studies["answers"][0]["studies"][0]["patient_ref"]
    pairs = [
        (f"/v1/studies/{uid}", f"/v1/studies/{generate_uid()}"),
        (f"/v1/studies/{uid}/dicom/sr", f"/v1/studies/{generate_uid()}/dicom/sr"),
        (f"/v1/patients/{ref}/timeline", f"/v1/patients/{'0' * 64}/timeline"),
    ]
    for owned, unknown in pairs:
        assert live_app.client.get(owned).status_code == 200, owned
        stranger, nobody = other.get(owned), other.get(unknown)
        assert stranger.status_code == 404 and stranger.json() == nobody.json(), owned
    # B's own reference of the same PatientID is another one, with nothing behind it.
    by_id = other.get("/v1/patients/timeline", headers={"X-Patient-ID": PATIENT})
    assert by_id.status_code == 404
    erased = other.delete(f"/v1/patients/{ref}")
    assert erased.status_code == 200 and erased.json()["total"] == 0
    assert live_app.client.get(f"/v1/patients/{ref}/timeline").status_code == 200


def test_study_sr_references_every_classified_instance(live_app, two_studies):
    uid = two_studies["uids"][0]
    r = live_app.client.get(f"/v1/studies/{uid}/dicom/sr")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert sr.StudyInstanceUID == uid and sr.PatientID == PATIENT  # filed by the PACS
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = [
        ref.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert len(referenced) == 3
    assert live_app.client.get(f"/v1/studies/{uid}/dicom/sr").content == r.content


def wait_explained(client: httpx.Client, request_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/v1/explanations/{request_id}").status_code == 202:
        assert time.monotonic() < deadline, "explanation not done in time"
        time.sleep(0.3)


def test_erasure_removes_everything_of_the_patient(live_app):
    c, pid, uid = live_app.client, "PID-ERASE-ME-7", generate_uid()
    first, second = study_dicoms(uid, "20260105", ("AP", "LAT"), 70, PatientID=pid)
    answer = stow(c, [first]).json()
    explained = c.post("/v1/predict?explain=true", content=second).json()["request_id"]
    wait_explained(c, explained)
    rids = [answer["results"][0]["request_id"], explained]
    ref = c.get(f"/v1/studies/{uid}").json()["patient_ref"]
    viewer = c.delete("/v1/patients", headers={"X-API-Key": VIEWER_KEY, "X-Patient-ID": pid})
    assert viewer.status_code == 403  # a read-only key may not erase
    r = c.delete("/v1/patients", headers={"X-Patient-ID": pid})
    assert r.status_code == 200, r.text
    assert r.json()["removed"] == {"records": 2, "explanations": 1, "study_entries": 2}
    gone = [f"/v1/predictions/{rid}" for rid in rids] + [f"/v1/explanations/{explained}"]
    for path in [*gone, f"/v1/studies/{uid}", f"/v1/patients/{ref}/timeline"]:
        assert c.get(path).status_code == 404, path
    with sqlite3.connect(live_app.tmp / "store.sqlite3") as conn:
        for table in ("records", "explanations"):
            query = f"SELECT COUNT(*) FROM {table} WHERE id IN (?, ?)"
            assert conn.execute(query, rids).fetchone() == (0,), table
        rows = conn.execute("SELECT COUNT(*) FROM study_entries WHERE patient_ref = ?", (ref,))
        assert rows.fetchone() == (0,)


def test_no_patient_identifier_in_store_logs_or_metrics(live_app, two_studies):
    import ray

    time.sleep(3)  # log files and metrics flush
    store = b"".join(p.read_bytes() for p in live_app.tmp.glob("store.sqlite3*"))
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    metrics = httpx.get(f"http://127.0.0.1:{live_app.metrics_port}/metrics", timeout=10).text
    leaks = [s for s in SECRETS if s.encode() in store]
    leaks += [f"metrics: {s}" for s in SECRETS if s in metrics]
    leaks += [f"{p.name}: {s}" for p in logs for s in SECRETS if s.encode() in p.read_bytes()]
    leaks += [f"answer: {s}" for a in two_studies["answers"] for s in SECRETS if s in str(a)]
    assert leaks == [] and len(logs) >= 5


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils (pdftotext) not installed")
def test_the_follow_up_report_names_the_prior_study(live_app, two_studies, tmp_path):
    first, follow = two_studies["answers"]
    rid = follow["results"][0]["request_id"]
    pdf = live_app.client.get(f"/v1/predictions/{rid}/report.pdf")
    assert pdf.status_code == 200
    text = pdf_text(pdf.content)
    flat = " ".join(text.split())
    assert "Prior studies (same patient, same body part)" in flat
    was = shown(first["studies"][0]["result"]["fracture_probability"])
    assert f"2026-01-03, HAND: study fracture probability {was}" in flat
    assert "on the prior study of 2026-01-03" in flat
    assert not [s for s in SECRETS if s in text]
    # The first study has no prior: its report says nothing about priors.
    rid0 = first["results"][0]["request_id"]
    text0 = pdf_text(live_app.client.get(f"/v1/predictions/{rid0}/report.pdf").content)
    assert "Prior studies" not in text0
