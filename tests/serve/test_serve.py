"""The real Ray Serve app on this machine (fractional CPUs, tiny timm backbones for speed)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from support.data import SHARED, requires_shared
from support.images import make_dicom, make_jpeg, make_png
from support.liveapp import VIEWER_KEY, post_with_retry, radiograph
from support.metrics import metric_sum, scrape

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def app(live_app):
    return {"client": live_app.client, "metrics_port": live_app.metrics_port, "cfg": live_app.cfg}


def test_health_ready_model_openapi(app):
    c = app["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and len(ready.json()["backbones"]) == 2
    card = c.get("/v1/model").json()
    assert card["classes"][:2] == ["fracture", "non-affected"]
    spec = c.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model"} <= set(spec["paths"])
    assert c.get("/docs").status_code == 200


@pytest.mark.parametrize("kind", ["png-raw", "jpeg-multipart", "dicom-raw"])
def test_predict(app, kind):
    c = app["client"]
    if kind == "png-raw":
        r = c.post(
            "/v1/predict", content=make_png(radiograph()), headers={"content-type": "image/png"}
        )
    elif kind == "jpeg-multipart":
        r = c.post("/v1/predict", files={"file": ("x.jpg", make_jpeg(radiograph(1)), "image/jpeg")})
    else:
        r = c.post(
            "/v1/predict",
            content=make_dicom(pixels=radiograph(2).astype(np.uint16) * 16),
            headers={"content-type": "application/dicom"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert set(body["branches"]) == {"efficientnet_b0", "resnet18"}
    assert len(body["request_id"]) == 32 and int(body["request_id"], 16) >= 0
    if body["label"] is not None:
        assert body["label"] in body["validated_classes"]
    if kind == "dicom-raw":
        assert body["input"]["modality"] == "CR"


@requires_shared
@pytest.mark.parametrize("name", ["RG3_J2KR.dcm", "RG2_JPLL.dcm"])
def test_predict_shared_dicom_has_no_patient_identifiers(app, name):
    import pydicom

    path = SHARED / "dicom" / name
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    r = app["client"].post("/v1/predict", content=path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["input"]["modality"] == "CR"
    for value in (str(ds.PatientName), str(ds.PatientID)):
        if value:
            assert value not in r.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"", 400),
        (b"PK\x03\x04" + b"\0" * 100, 415),
        (b"<html><body>hi</body></html>", 415),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 422),
    ],
    ids=["empty", "zip", "html", "truncated-png"],
)
def test_bad_inputs_get_json_4xx(app, body, status):
    r = app["client"].post("/v1/predict", content=body, headers={"content-type": "image/png"})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"code", "message"}


def test_unknown_routes_and_explanations_404(app):
    c = app["client"]
    assert c.get("/v1/nope").status_code == 404
    assert c.get("/v1/explanations/unknown").status_code == 404
    assert c.get("/v1/explanations/unknown.png").status_code == 404


def test_explanation_flow(app):
    c = app["client"]
    r = c.post("/v1/predict?explain=true", content=make_png(radiograph(3)))
    assert r.status_code == 200, r.text
    url = r.json()["explanation_url"]
    assert url == f"/v1/explanations/{r.json()['request_id']}"
    deadline = time.monotonic() + 60
    while (e := c.get(url)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert e.status_code == 200 and e.json()["state"] == "done", e.text
    png = c.get(url + ".png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_endpoint_isolates_bad_items(app):
    files = [("files", (f"{i}.png", make_png(radiograph(i)), "image/png")) for i in range(3)]
    files.insert(1, ("files", ("bad.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")))
    r = app["client"].post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["index"] for i in items] == [0, 1, 2, 3]
    assert "error" in items[1] and all("probabilities" in items[i] for i in (0, 2, 3))


def test_concurrent_batching_poison_isolation_and_equality(app):
    c = app["client"]
    image = make_png(radiograph(7))
    single = c.post("/v1/predict", content=image).json()["probabilities"]
    bodies = [image] * 7 + [b"\xff\xd8\xff\xe0 not really a jpeg"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post_with_retry(c, "/v1/predict", content=b), bodies))
    assert [r.status_code for r in responses[:7]] == [200] * 7
    assert responses[7].status_code == 422
    assert len({r.json()["request_id"] for r in responses[:7]}) == 7, "request ids collide"
    for r in responses[:7]:
        batched = r.json()["probabilities"]
        assert all(abs(batched[k] - single[k]) < 1e-5 for k in single)


def test_custom_metrics_exported_with_batches_over_one(app):
    c = app["client"]
    image = make_png(radiograph(9))
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda _: post_with_retry(c, "/v1/predict", content=image).status_code, range(32)
            )
        )
    assert codes == [200] * 32
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = scrape(app["metrics_port"])
        # Each replica process flushes its own metrics: wait for all the counters checked below.
        if (
            metric_sum(text, "ray_orthovision_predictions_total") >= 32
            and metric_sum(text, "ray_orthovision_rejected_inputs_total") >= 1
            and metric_sum(text, "ray_orthovision_backbone_batch_size_count") > 0
            and metric_sum(text, "ray_orthovision_requests_total", status="200") >= 32
        ):
            break
        time.sleep(2)
    assert metric_sum(text, "ray_orthovision_predictions_total") >= 32
    count = metric_sum(text, "ray_orthovision_backbone_batch_size_count", backbone="resnet18")
    total = metric_sum(text, "ray_orthovision_backbone_batch_size_sum", backbone="resnet18")
    assert count > 0 and total / count > 1.0, "no dynamic batching under concurrent load"
    assert metric_sum(text, "ray_orthovision_rejected_inputs_total") >= 1
    # Labelled by route template and status (the middleware sees the final status).
    ok = metric_sum(text, "ray_orthovision_requests_total", route="/v1/predict", status="200")
    assert ok >= 32
    assert "PatientName" not in text and "Leaky" not in text


def test_auth_401_403_429(app):
    c = app["client"]
    png = make_png(radiograph(11))
    missing = httpx.post(str(c.base_url) + "/v1/predict", content=png, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    wrong = c.post("/v1/predict", content=png, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    viewer = {"X-API-Key": VIEWER_KEY}
    assert c.post("/v1/predict", content=png, headers=viewer).status_code == 403
    codes = [c.get("/v1/model", headers=viewer).status_code for _ in range(4)]
    assert codes[0] == 200 and 429 in codes
    limited = c.get("/v1/model", headers=viewer)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert c.get("/healthz", headers={}).status_code == 200  # probes need no key


def test_cpu_model_replicas_yield_to_the_request_path(app):
    import psutil

    def thread_niceness(role: str) -> list[tuple[int, set[int]]]:
        """(main thread's nice, every thread's nice) of each replica process of a role."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if f"ServeReplica:{app['cfg'].serve.app_name}:{role}" in " ".join(
                p.info["cmdline"] or []
            ):
                found.append((p.nice(), {psutil.Process(t.id).nice() for t in p.threads()}))
        return found

    (ingress,) = {main for main, _ in thread_niceness("Ingress")}  # Ray starts workers at 15
    step = app["cfg"].serve.cpu_model_niceness
    assert step > 0 and ingress < 19
    backbones = thread_niceness("Backbone_")
    assert len(backbones) == 2
    for main, threads in backbones:  # the forward thread is lowered, the main thread not
        assert main == ingress and max(threads) == min(19, ingress + step)
    ((main, threads),) = thread_niceness("Explainer")
    assert main == ingress and max(threads) == min(19, ingress + 2 * step)
