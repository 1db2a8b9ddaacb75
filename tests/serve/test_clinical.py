"""Clinician and integration routes on the live app: PDF report, DICOM SR/SC, STOW-RS, the
stored record and the viewer's files."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import uuid

import numpy as np
import pydicom
import pytest
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, SHARED
from support.dicomweb import related_body
from support.images import make_dicom, make_png
from support.liveapp import KEY_B, radiograph
from support.pdf import pdf_text

from orthovision.clinical.dicom_objects import read_findings

pytestmark = pytest.mark.serve

requires_poppler = pytest.mark.skipif(
    not (shutil.which("pdftoppm") and shutil.which("pdftotext")),
    reason="poppler-utils (pdftoppm, pdftotext) not installed",
)


def dicom_input() -> bytes:
    """The shared J2K radiograph when ../shared is present, else a synthetic CR."""
    path = SHARED / "dicom" / "RG3_J2KR.dcm"
    if path.exists():
        return path.read_bytes()
    return make_dicom(pixels=radiograph(5).astype(np.uint16) * 16)


def wait_explained(client, request_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get(f"/v1/explanations/{request_id}")
        if r.status_code == 200:
            assert r.json()["state"] == "done", r.text
            return
        time.sleep(0.2)
    pytest.fail("explanation not done in time")


@pytest.fixture(scope="module")
def explained_dicom(live_app):
    """One DICOM input classified with an explanation, done."""
    c = live_app.client
    data = dicom_input()
    r = c.post("/v1/predict?explain=true", content=data)
    assert r.status_code == 200, r.text
    result = r.json()
    wait_explained(c, result["request_id"])
    return data, result


def test_stored_record_has_no_private_part_and_no_identifiers(live_app, explained_dicom):
    data, result = explained_dicom
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    r = live_app.client.get(f"/v1/predictions/{result['request_id']}")
    assert r.status_code == 200 and r.json()["probabilities"] == result["probabilities"]
    for text in (r.text, str(result)):
        assert "_private" not in text and str(source.SOPInstanceUID) not in text
        for value in (str(source.get("PatientName", "")), str(source.get("PatientID", ""))):
            assert not value or value not in text
    assert live_app.client.get("/v1/predictions/no-such-request-id").status_code == 404


def test_heatmap_layers(live_app, explained_dicom):
    from PIL import Image

    rid = explained_dicom[1]["request_id"]
    heat = live_app.client.get(f"/v1/explanations/{rid}.png", params={"kind": "heatmap"})
    base = live_app.client.get(f"/v1/explanations/{rid}.png", params={"kind": "image"})
    assert heat.status_code == base.status_code == 200
    heat_img, base_img = Image.open(io.BytesIO(heat.content)), Image.open(io.BytesIO(base.content))
    assert heat_img.mode == "RGBA" and base_img.mode == "L" and heat_img.size == base_img.size
    alpha = np.asarray(heat_img)[..., 3]
    assert alpha.min() < 64 and alpha.max() > 192  # transparent where cold, opaque where hot
    bad = live_app.client.get(f"/v1/explanations/{rid}.png", params={"kind": "nope"})
    assert bad.status_code == 422


def test_display_image_of_a_dicom_input_for_its_owner_only(live_app):
    """display=true keeps a DICOM input's rendering (the viewer's full image): the
    source's size and aspect, pixels only; the explanation says where the source lies in
    the heat map."""
    from PIL import Image

    c = live_app.client
    data = make_dicom(pixels=radiograph(7, h=600, w=400).astype(np.uint16) * 16)
    result = c.post("/v1/predict?display=true&explain=true", content=data).json()
    rid = result["request_id"]
    r = c.get(f"/v1/predictions/{rid}/image.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"
    shown = Image.open(io.BytesIO(r.content))
    assert shown.mode == "L" and shown.size == (400, 600) and not shown.info
    for value in (FAKE_PATIENT_ID, FAKE_PATIENT_NAME):
        assert value.encode() not in r.content
    wait_explained(c, rid)
    # 400x600 fitted into 224: 149x224, centred (orthovision/imaging/preprocess.py).
    assert c.get(f"/v1/explanations/{rid}").json()["input_box"] == [37, 0, 149, 224]

    other = c.get(f"/v1/predictions/{rid}/image.png", headers={"X-API-Key": KEY_B})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    plain = c.post("/v1/predict", content=data).json()["request_id"]
    png = c.post("/v1/predict?display=true", content=make_png(radiograph(8))).json()
    for kept_none in (plain, png["request_id"]):
        r = c.get(f"/v1/predictions/{kept_none}/image.png")
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_display"
    assert c.get("/v1/predictions/no-such-id/image.png").status_code == 404


@requires_poppler
def test_pdf_report_renders_with_heatmap_and_statement(live_app, explained_dicom, tmp_path):
    data, result = explained_dicom
    r = live_app.client.get(f"/v1/predictions/{result['request_id']}/report.pdf")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(r.content)
    subprocess.run(["pdftoppm", "-png", "-r", "50", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) == 1
    text = pdf_text(r.content, "-layout")
    shown = result["label"] or "abstained"
    assert f"Predicted class: {shown}" in text
    assert "second-opinion aid" in text and "not a diagnosis" in text
    # Says which image it is about, its intended use, and a real creation date.
    flat = " ".join(text.split())
    uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
    assert "SOP Instance UID" in flat and uid in "".join(text.split())
    assert "Intended use" in flat
    info = subprocess.run(["pdfinfo", str(pdf)], check=True, capture_output=True, text=True)
    assert "2000" not in next(x for x in info.stdout.splitlines() if x.startswith("CreationDate"))
    assert result["model"]["sha256"] in text.replace("\n", "").replace(" ", "")
    assert "NOT VALIDATED" in text and "Validated classes: fracture, non-affected" in text
    assert "No explanation was requested" not in text
    # No display rendering was kept for this input: the unpadded model input, said so.
    assert "letterbox padding removed" in " ".join(text.split())
    # The live app's checkpoint carries an OOD detector: its score is in the report.
    assert f"Out-of-distribution score: {result['ood_score']:.2f}" in text
    images = subprocess.run(
        ["pdfimages", "-list", str(pdf)], check=True, capture_output=True, text=True
    ).stdout
    assert len(images.strip().splitlines()) >= 3  # header lines + the heat map
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    for value in (str(source.get("PatientName", "")), str(source.get("PatientID", ""))):
        assert not value or value not in text


@requires_poppler
def test_pdf_report_maps_the_heat_map_onto_the_kept_source_image(live_app):
    data = make_dicom(pixels=radiograph(h=400, w=200).astype(np.uint16) << 2)
    r = live_app.client.post("/v1/predict?explain=true&display=true", content=data)
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    wait_explained(live_app.client, rid)
    pdf = live_app.client.get(f"/v1/predictions/{rid}/report.pdf")
    assert pdf.status_code == 200
    text = " ".join(pdf_text(pdf.content).split())
    assert "Heat map on the source image (200x400 px" in text


@requires_poppler
def test_pdf_report_without_explanation_says_so(live_app, tmp_path):
    r = live_app.client.post("/v1/predict", content=make_png(radiograph(21)))
    pdf = live_app.client.get(f"/v1/predictions/{r.json()['request_id']}/report.pdf")
    assert pdf.status_code == 200
    text = pdf_text(pdf.content)
    assert "No explanation was requested for this image." in text


def test_dicom_sr_and_sc_reference_the_source(live_app, explained_dicom):
    data, result = explained_dicom
    rid = result["request_id"]
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    sr_resp = live_app.client.get(f"/v1/predictions/{rid}/dicom/sr")
    assert sr_resp.status_code == 200 and sr_resp.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(sr_resp.content))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.get("PatientID", "")
    new_uids = {sr.SOPInstanceUID, sr.SeriesInstanceUID}
    assert not new_uids & {source.SOPInstanceUID, source.SeriesInstanceUID}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    ref = series.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    findings = read_findings(sr.ContentSequence)
    assert findings["finding"] == (None if result["abstained"] else result["label"])
    assert findings["probabilities"] == pytest.approx(result["probabilities"], abs=1e-6)
    image = items["Source of Measurement"].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    # the same object on a second fetch: stable UIDs, no duplicate in a PACS
    again = pydicom.dcmread(
        io.BytesIO(live_app.client.get(f"/v1/predictions/{rid}/dicom/sr").content)
    )
    assert again.SOPInstanceUID == sr.SOPInstanceUID

    sc_resp = live_app.client.get(f"/v1/predictions/{rid}/dicom/sc")
    assert sc_resp.status_code == 200, sc_resp.text
    sc = pydicom.dcmread(io.BytesIO(sc_resp.content))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SOPInstanceUID not in new_uids | {source.SOPInstanceUID}
    assert sc.pixel_array.shape == (224, 224, 3) and sc.pixel_array.std() > 0


def test_dicom_outputs_refused_for_non_dicom_and_sc_made_on_request(live_app):
    c = live_app.client
    png = c.post("/v1/predict", content=make_png(radiograph(22))).json()
    assert c.get(f"/v1/predictions/{png['request_id']}/dicom/sr").json()["error"]["code"] == (
        "not_dicom"
    )
    dcm = c.post("/v1/predict", content=make_dicom(pixels=radiograph(6).astype(np.uint16) * 16))
    rid = dcm.json()["request_id"]
    assert c.get(f"/v1/predictions/{rid}/dicom/sr").status_code == 200
    # Without ?explain=true the SC is made on request: 202 + Retry-After, then 200.
    first = c.get(f"/v1/predictions/{rid}/dicom/sc")
    assert first.status_code == 202 and first.headers["retry-after"]
    deadline = time.monotonic() + 120
    sc = first
    while sc.status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.5)
        sc = c.get(f"/v1/predictions/{rid}/dicom/sc")
    assert sc.status_code == 200, sc.text[:300]
    image = pydicom.dcmread(io.BytesIO(sc.content))
    assert image.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and image.pixel_array.std() > 0
    # The prediction now links its explanation.
    assert c.get(f"/v1/predictions/{rid}").json()["explanation_url"]


def test_stow_rs_classifies_each_instance(live_app):
    good = [make_dicom(pixels=radiograph(30 + i).astype(np.uint16) * 16) for i in range(2)]
    bad = make_dicom(modality="MR", pixels=radiograph(33).astype(np.uint16) * 16)
    boundary = uuid.uuid4().hex
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = live_app.client.post(
        "/dicomweb/studies",
        content=related_body([good[0], bad, good[1]], boundary),
        headers={"content-type": ctype},
    )
    assert r.status_code == 202, r.text  # PS3.18: some instances failed
    body = r.json()
    uids = [pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in (good[0], bad, good[1])]
    stored = body["stow"]["00081199"]["Value"]
    assert [s["00081155"]["Value"][0] for s in stored] == [uids[0], uids[2]]
    failed = body["stow"]["00081198"]["Value"]
    assert failed[0]["00081155"]["Value"][0] == uids[1]
    assert failed[0]["00081197"]["Value"][0] == 0xC000
    results = body["results"]
    assert [("error" in x) for x in results] == [False, True, False]
    assert results[1]["error"]["code"] == "not_a_radiograph"
    sr = live_app.client.get(results[0]["sr_url"])
    assert pydicom.dcmread(io.BytesIO(sr.content)).StudyInstanceUID == (
        pydicom.dcmread(io.BytesIO(good[0])).StudyInstanceUID
    )
    text = r.text
    assert FAKE_PATIENT_NAME not in text and FAKE_PATIENT_ID not in text

    pure = live_app.client.post(
        "/dicomweb/studies",
        content=related_body(good[:1], boundary),
        headers={"content-type": ctype, "accept": "application/dicom+json"},
    )
    assert pure.status_code == 200
    assert pure.headers["content-type"].startswith("application/dicom+json")
    assert set(pure.json()) == {"00081199"}


def test_stow_rs_refuses_a_jpeg_typed_as_dicom(live_app):
    from support.images import make_jpeg

    boundary = uuid.uuid4().hex
    r = live_app.client.post(
        "/dicomweb/studies",
        content=related_body([make_jpeg(radiograph())], boundary),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    assert r.status_code == 409, r.text  # none stored
    (result,) = r.json()["results"]
    assert result["error"]["code"] == "unsupported_format" and "sr_url" not in result


@pytest.mark.parametrize(
    ("ctype", "status"),
    [
        ("multipart/form-data; boundary=x", 415),
        ('multipart/related; type="application/dicom+xml"; boundary=x', 415),
        ('multipart/related; type="application/dicom"', 400),
    ],
)
def test_stow_rs_refuses_other_media_types(live_app, ctype, status):
    r = live_app.client.post(
        "/dicomweb/studies", content=b"--x--\r\n", headers={"content-type": ctype}
    )
    assert r.status_code == status, r.text


def test_stow_rs_bounded_parts(live_app):
    limit = live_app.cfg.serve.max_batch_items
    boundary = "b0undary"
    r = live_app.client.post(
        "/dicomweb/studies",
        content=related_body([b"x"] * (limit + 1), boundary),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_viewer_page_and_assets_offline(live_app):
    import httpx

    page = httpx.get(live_app.url + "/", timeout=10)  # no key needed for the page
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    # Never framed by another site (clickjacking): header CSP and X-Frame-Options.
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for asset in ("viewer.js", "viewer.css"):
        r = httpx.get(f"{live_app.url}/viewer/{asset}", timeout=10)
        assert r.status_code == 200 and "://" not in r.text
    assert httpx.get(live_app.url + "/viewer/..%2fclinical.py", timeout=10).status_code == 404
