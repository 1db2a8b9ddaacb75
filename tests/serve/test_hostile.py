"""Hostile inputs against the live app: each gets a 4xx JSON error within 1 s, and the app
stays healthy (same replicas, bounded memory)."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import psutil
import pytest
from support.data import SHARED
from support.hostile import Case, body_cases, bomb_cases, deflated_dicom_bomb
from support.liveapp import KEY

from bench.faults import own_processes

pytestmark = pytest.mark.serve
CASES = body_cases() + bomb_cases(deflated_mb=256)
SHARED_BAD = sorted(p for p in (SHARED / "bad-inputs").rglob("*") if p.suffix in {".jpg", ".dcm"})


def replica_names() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"]
    }


def replica_rss_mb() -> float:
    """Resident memory of this session's replica processes (not other Ray instances')."""
    total = 0
    for proc in own_processes():
        try:
            if "ServeReplica:orthovision" in " ".join(proc.cmdline()):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


@pytest.fixture(scope="module")
def baseline(live_app):
    live_app.client.get("/readyz").raise_for_status()
    return {"replicas": replica_names(), "rss_mb": replica_rss_mb()}


def send(live_app, case: Case):
    c = live_app.client
    if case.multipart:
        return c.post("/v1/predict", files={"file": ("image.png", case.body, "image/png")})
    return c.post("/v1/predict", content=case.body, headers=case.headers)


def assert_json_4xx(response, started: float) -> None:
    elapsed = time.perf_counter() - started
    assert 400 <= response.status_code < 500, response.text[:300]
    error = response.json()["error"]
    assert error["code"] and error["message"]
    assert elapsed < 1.0, f"took {elapsed:.2f} s"


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_body_gets_fast_4xx(live_app, baseline, case):
    started = time.perf_counter()
    assert_json_4xx(send(live_app, case), started)


@pytest.mark.skipif(not SHARED_BAD, reason="../shared/data absent: shared bad inputs skipped")
@pytest.mark.parametrize("path", SHARED_BAD, ids=[p.name for p in SHARED_BAD])
def test_shared_bad_inputs_get_fast_4xx(live_app, baseline, path):
    started = time.perf_counter()
    assert_json_4xx(live_app.client.post("/v1/predict", content=path.read_bytes()), started)


def raw_request(live_app, head: bytes, body_parts=(), pause_s: float = 0.0) -> tuple[int, bytes]:
    """Send a hand-made HTTP/1.1 request from a thread while reading the answer here, so the
    answer is timed when it arrives, not when the (possibly slow) upload ends."""
    url = urlparse(live_app.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)

        def upload() -> None:
            try:
                for part in body_parts:
                    sock.sendall(part)
                    if pause_s:
                        time.sleep(pause_s)
            except OSError:
                pass  # the server answered and closed early: that is the point

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in header.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
        data = header + b"\r\n\r\n" + body
    return int(data.split(b" ", 2)[1]), data


def head(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: image/png\r\n{extra}\r\n"
    ).encode()


def test_oversized_body_declared_by_content_length(live_app, baseline):
    started = time.perf_counter()
    status, data = raw_request(
        live_app,
        head("/v1/predict", "Content-Length: 104857600\r\n"),
        [b"\x89PNG\r\n\x1a\n" + b"\0" * 1024],
    )
    assert status == 413 and b"too_large" in data
    assert time.perf_counter() - started < 1.0


def test_oversized_chunked_body(live_app, baseline):
    limit = live_app.cfg.serve.max_body_bytes
    chunk = b"\0" * (1 << 20)
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * (limit // len(chunk) + 2)
    started = time.perf_counter()
    status, data = raw_request(
        live_app, head("/v1/predict", "Transfer-Encoding: chunked\r\n"), parts + [b"0\r\n\r\n"]
    )
    assert status == 413 and b"too_large" in data
    assert time.perf_counter() - started < 3.0  # includes uploading 10 MiB over loopback


def test_multipart_with_thousands_of_parts(live_app, baseline):
    boundary = "hostileboundary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    body = (part * 5000 + f"--{boundary}--\r\n").encode()
    for path in ("/v1/predict", "/v1/predict/batch"):
        started = time.perf_counter()
        r = live_app.client.post(
            path,
            content=body,
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert_json_4xx(r, started)


def test_slow_trickled_upload_times_out(live_app, baseline):
    timeout_s = live_app.cfg.serve.body_timeout_s
    started = time.perf_counter()
    status, data = raw_request(
        live_app, head("/v1/predict", "Content-Length: 5000\r\n"), [b"\x89"] * 40, pause_s=0.25
    )
    elapsed = time.perf_counter() - started
    assert status == 408 and b"body_timeout" in data
    assert elapsed < timeout_s + 1.0


def test_stow_part_bombs_are_refused_without_inflating_in_the_ingress(live_app, baseline):
    """The ingress reads each STOW part's UIDs: a deflated bomb, typed as DICOM or not."""
    bomb = deflated_dicom_bomb(256)
    boundary = "stowbomb"
    parts = b"".join(
        f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + bomb + b"\r\n"
        for kind in ("application/dicom", "application/octet-stream")
    )
    started = time.perf_counter()
    r = live_app.client.post(
        "/dicomweb/studies",
        content=parts + f"--{boundary}--\r\n".encode(),
        headers={
            "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "accept": "application/dicom+json",
        },
    )
    assert r.status_code == 409, r.text[:300]  # PS3.18: none stored
    assert len(r.json()["00081198"]["Value"]) == 2  # FailedSOPSequence, one per part
    assert time.perf_counter() - started < 2.0


def test_app_stayed_healthy(live_app, baseline):
    """Runs last in this file (pytest keeps file order): same replicas, bounded memory."""
    assert live_app.client.get("/readyz").status_code == 200
    assert replica_names() == baseline["replicas"], "a replica was restarted"
    grown = replica_rss_mb() - baseline["rss_mb"]
    assert grown < 400, f"replica memory grew by {grown:.0f} MiB"
