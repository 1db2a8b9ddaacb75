"""The bulk client: retries, Retry-After, resume, duplicates (mock transport), and a live run
that survives a killed Backbone replica with every item in the output exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from support.images import make_png
from support.liveapp import KEY, radiograph

from orthovision.cli import main
from orthovision.client.bulk import RetryPolicy, discover, finished_hashes, retry_after_s, run_bulk

FAST = RetryPolicy(max_attempts=5, base_s=0.001, cap_s=0.01)


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.png"
        path.write_bytes(make_png(radiograph(i % 50, h=160 + i, w=128)))
        paths.append(path)
    return paths


def ok_result(label: str = "fracture") -> dict:
    return {"request_id": "r", "label": label, "probabilities": {label: 1.0}}


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def run(paths, out, handler, **kw):
    return asyncio.run(
        run_bulk(
            paths,
            "http://test",
            "k",
            out,
            policy=kw.pop("policy", FAST),
            progress=False,
            transport=httpx.MockTransport(handler),
            seed=0,
            **kw,
        )
    )


def test_retries_429_503_and_connection_errors_then_resumes_without_resending(tmp_path):
    paths = write_images(tmp_path / "in", 6)
    calls: dict[str, int] = {}
    seen_waits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sha = hashlib.sha256(request.content).hexdigest()
        calls[sha] = calls.get(sha, 0) + 1
        assert request.headers["x-api-key"] == "k"
        n = calls[sha]
        if n == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {}})
        if n == 2:
            raise httpx.ConnectError("refused", request=request)
        if n == 3:
            seen_waits.append(sha)
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "x"}})
        return httpx.Response(200, json=ok_result())

    out = tmp_path / "out.ndjson"
    summary = run(paths, out, handler, concurrency=3)
    assert summary.classified == 6 and summary.retries == 18 and summary.exit_code() == 0
    assert sorted(r["sha256"] for r in lines(out)) == sorted(calls)
    assert all(r["status"] == 200 and r["result"]["label"] == "fracture" for r in lines(out))

    # resume: nothing is sent again; new files only
    paths += write_images(tmp_path / "in", 2, start=6)
    before = dict(calls)
    summary = run(paths, out, lambda r: httpx.Response(200, json=ok_result()))
    assert summary.already_done == 6 and summary.classified == 2
    assert dict(calls) == before and len(lines(out)) == 8


def test_rejections_are_final_duplicates_once_and_truncated_line_tolerated(tmp_path):
    folder = tmp_path / "in"
    paths = write_images(folder, 3)
    (folder / "copy.png").write_bytes(paths[0].read_bytes())  # same content, other name
    (folder / "notes.txt").write_text("not an image suffix: not discovered")
    bad = folder / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        if request.content.startswith(b"\x89PNG broken"):
            return httpx.Response(422, json={"error": {"code": "undecodable", "message": "x"}})
        return httpx.Response(200, json=ok_result("non-affected"))

    out = tmp_path / "out.ndjson"
    out.write_text('{"sha256": "cut-short-by-a-cra')  # a previous run died mid-line
    found = discover(folder)
    assert len(found) == 5 and all(p.suffix == ".png" for p in found)
    summary = run(found, out, handler)
    assert summary.duplicates == 1 and summary.classified == 3
    assert summary.rejected == {"undecodable": 1} and summary.exit_code() == 2
    assert len(sent) == 4  # the rejected input was sent once, never retried
    records = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert len(records) == 4 and len({r["sha256"] for r in records}) == 4
    assert len(finished_hashes(out)) == 4


def test_auth_failure_aborts_and_exhausted_items_stay_unfinished(tmp_path):
    paths = write_images(tmp_path / "in", 3)
    out = tmp_path / "out.ndjson"
    summary = run(
        paths, out, lambda r: httpx.Response(401, json={"error": {"code": "unauthorized"}})
    )
    assert summary.aborted and summary.exit_code() == 1 and not out.read_text()
    summary = run(paths, out, lambda r: httpx.Response(503), concurrency=1)
    assert len(summary.unfinished) == 3 and summary.exit_code() == 1 and not out.read_text()


def test_retry_after_forms_and_manifest(tmp_path):
    assert retry_after_s(httpx.Response(503, headers={"Retry-After": "7"})) == 7
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 20 < retry_after_s(httpx.Response(503, headers={"Retry-After": future})) <= 30
    assert retry_after_s(httpx.Response(503)) is None
    paths = write_images(tmp_path / "in", 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nin/img000.png,fracture\nin/img001.png,x\n")
    assert discover(manifest) == paths
    plain = tmp_path / "list.txt"
    plain.write_text(f"# comment\n{paths[1]}\n\nin/img000.png\n")
    assert discover(plain) == [paths[1], paths[0]]


def _backbone_replica(name: str):
    """The replica actor of a deployment, from the GCS's named actors (the state API needs
    the dashboard, which the live app runs without)."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and f"#{name}#" in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(name)


@pytest.mark.serve
def test_live_bulk_survives_a_killed_backbone_replica(live_app, tmp_path, capsys):
    import ray

    folder = tmp_path / "in"
    paths = write_images(folder, 48)
    out = tmp_path / "results.ndjson"
    result: dict = {}

    def client() -> None:
        result["code"] = main(
            [
                "bulk",
                str(folder),
                "--url",
                live_app.url,
                "--api-key",
                KEY,
                "--concurrency",
                "4",
                "--out",
                str(out),
                "--no-progress",
                "--max-attempts",
                "12",
            ]
        )

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(lines(out)) < 8):
        time.sleep(0.05)
    replica = _backbone_replica("Backbone_resnet18")
    ray.kill(replica, no_restart=True)  # Serve's controller starts a new one
    thread.join(180)
    assert not thread.is_alive() and result["code"] == 0
    summary = [x for x in capsys.readouterr().err.splitlines() if x.startswith("this run:")]
    print(f"\nbulk with a killed replica: {summary}")
    records = lines(out)
    hashes = [r["sha256"] for r in records]
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(hashes) == len(set(hashes)) == 48 and set(hashes) == expected
    assert all(r["status"] == 200 and "probabilities" in r["result"] for r in records)
    # a second run sends nothing: every item is already in the output
    assert main(["bulk", str(folder), "--url", live_app.url, "--api-key", KEY,
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert len(lines(out)) == 48
    # leave the shared app ready for the tests after this one
    deadline = time.monotonic() + 90
    while live_app.client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
