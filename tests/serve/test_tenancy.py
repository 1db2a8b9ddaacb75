"""Tenant isolation on the live app: every GET route that takes an id (a request id, a
StudyInstanceUID, a patient reference) answers 404 to a tenant that does not own it,
exactly as for an unknown id."""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import httpx
import pydicom
import pytest
from support.images import make_dicom, radiograph
from support.liveapp import KEY_B, post_with_retry

pytestmark = pytest.mark.serve


def id_routes(client: httpx.Client) -> list[str]:
    """Every GET path of the OpenAPI document with one path parameter (the record id)."""
    paths = client.get("/openapi.json").json()["paths"]
    return sorted(p for p, ops in paths.items() if "get" in ops and p.count("{") == 1)


# Per path parameter: an id that nobody owns, well-formed.
UNKNOWN = {"study_instance_uid": "1.2.3.4.5.6.7.8.9", "patient_ref": "0" * 64}


@pytest.fixture(scope="module")
def owned_dicom(live_app) -> dict[str, str]:
    """A DICOM prediction of hospital-a with a finished explanation: every route has data.
    Its ids by path parameter name."""
    body = make_dicom(pixels=radiograph().astype("uint16") << 2)
    r = post_with_retry(
        live_app.client,
        "/v1/predict?explain=true&display=true",  # display: the viewer's image.png is kept
        content=body,
        headers={"content-type": "application/dicom"},
    )
    assert r.status_code == 200, r.text[:300]
    rid = r.json()["request_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = live_app.client.get(f"/v1/explanations/{rid}").json()["state"]
        if state != "pending":
            break
        time.sleep(0.5)
    assert state == "done"
    study = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).StudyInstanceUID
    ref = live_app.client.get(f"/v1/studies/{study}").json()["patient_ref"]
    ids = {"request_id": rid, "explanation_id": rid}
    return ids | {"study_instance_uid": study, "patient_ref": ref}


def test_other_tenant_reads_nothing(live_app, owned_dicom):
    routes = id_routes(live_app.client)
    # prediction, its PDF, SR, SC, explanation, study, study SR, timeline at least
    assert len(routes) >= 9, routes
    other = httpx.Client(base_url=live_app.url, headers={"X-API-Key": KEY_B}, timeout=60)
    for template in routes:
        name = template[template.index("{") + 1 : template.index("}")]
        path = template.replace("{" + name + "}", owned_dicom[name])
        owner = live_app.client.get(path)
        assert owner.status_code == 200, (path, owner.status_code, owner.text[:200])
        stranger = other.get(path)
        unknown = other.get(template.replace("{" + name + "}", UNKNOWN.get(name, "0" * 32)))
        assert stranger.status_code == 404, (path, stranger.status_code)
        # Indistinguishable from an id that does not exist.
        assert stranger.json() == unknown.json(), path
    for kind in ("heatmap", "image"):
        path = f"/v1/explanations/{owned_dicom['request_id']}.png?kind={kind}"
        assert live_app.client.get(path).status_code == 200
        assert other.get(path).status_code == 404


def test_explain_needs_the_predict_scope_too(live_app):
    from support.liveapp import VIEWER_KEY

    r = live_app.client.post(
        "/v1/predict?explain=true",
        content=b"x",
        headers={"X-API-Key": VIEWER_KEY},
    )
    assert r.status_code == 403


def _slow_upload(url: str, key: str, seconds: float) -> None:
    """A valid request whose body trickles in, one byte at a time, until the server's body
    deadline answers it (408)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
        "Content-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
    ).encode()
    with contextlib.suppress(OSError), socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(head)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.sendall(b"\x89")
            time.sleep(0.1)


def test_slow_uploads_of_one_tenant_do_not_shut_out_another(live_app):
    import threading

    from support.images import make_jpeg
    from support.liveapp import KEY

    body = make_jpeg(radiograph())
    other = httpx.Client(base_url=live_app.url, headers={"X-API-Key": KEY_B}, timeout=60)

    def timed_run(n: int) -> tuple[list[float], list[int]]:
        latencies, codes = [], []
        for _ in range(n):
            t = time.perf_counter()
            r = other.post("/v1/predict", content=body)
            latencies.append(time.perf_counter() - t)
            codes.append(r.status_code)
        return latencies, codes

    timed_run(3)  # warm
    unloaded, _ = timed_run(15)
    hold_s = live_app.cfg.serve.body_timeout_s + 0.5
    slow = [
        threading.Thread(target=_slow_upload, args=(live_app.url, KEY, hold_s), daemon=True)
        for _ in range(10)
    ]
    for t in slow:
        t.start()
    time.sleep(0.3)  # every slow upload is in progress
    # While they are all in progress (they end with a 408 at the body deadline).
    loaded, codes = timed_run(max(5, int((live_app.cfg.serve.body_timeout_s - 0.8) / 0.1)))
    for t in slow:
        t.join()
    assert set(codes) == {200}, codes
    # Not shut out: no request waited for the slow uploads' body deadline, and the typical
    # latency stayed within 2x. (The maximum of ~12 loaded requests against that of 15
    # unloaded ones, the former check, failed on one 0.23 s outlier on a 2-core box.)
    assert max(loaded) < live_app.cfg.serve.body_timeout_s / 2, sorted(loaded)
    assert statistics.median(loaded) < 2 * statistics.median(unloaded), (
        sorted(loaded),
        sorted(unloaded),
    )
