"""Locust load test for OrthoVision Serve: `make loadtest`, or

    LOAD_SHAPE=step locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000

Users send single predictions (raw JPEG and DICOM), batches, explanation requests (then one
poll), and bad inputs that must be answered 4xx (judged with `catch_response`: an expected
4xx is a success, a 5xx or a 200 is a failure). At the end the SLO checks set the exit code:
- SLO_MAX_FAIL_RATIO (default 0.01): failed / all requests;
- SLO_P99_MS (default 5000): p99 of POST /v1/predict (a 2-core machine under a ramp to
  16 users; set it from docs/PERFORMANCE.md for a bigger one);
- SLO_MAX_SHED_RATIO (default 0.25): 503 overload answers / all requests;
- 5xx other than 503 overload answers count as failures always.
A 503 with Retry-After is load shedding as the API promises: it is not a failure (a 503
without the header is), and the user waits Retry-After (at most 5 s) before its next
request, as a well-behaved PACS router does.
Images come from ../shared/data (synthetic stand-ins when it is absent).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` and `loadtests`

from bench.images import SHARED, fullsize, jpeg224, multipart  # noqa: E402

SHAPE = os.environ.get("LOAD_SHAPE", "").lower()
if SHAPE == "step":
    from loadtests.shapes import StepRamp  # noqa: E402, F401  (locust picks it up)
elif SHAPE == "spike":
    from loadtests.shapes import Spike  # noqa: E402, F401
elif SHAPE:
    raise SystemExit(f"LOAD_SHAPE={SHAPE!r}: use step, spike or leave it unset")

SLO_MAX_FAIL_RATIO = float(os.environ.get("SLO_MAX_FAIL_RATIO", "0.01"))
SLO_P99_MS = float(os.environ.get("SLO_P99_MS", "5000"))
SLO_MAX_SHED_RATIO = float(os.environ.get("SLO_MAX_SHED_RATIO", "0.25"))
BATCH_ITEMS = int(os.environ.get("BATCH_ITEMS", "8"))
SHED = {"count": 0}  # 503 overload answers (each also counted as a request by locust)

JPEGS = [s.data for s in jpeg224(32).samples]
DICOMS = [s.data for s in fullsize(0).samples if s.content_type == "application/dicom"]
BATCH_BODY, BATCH_CTYPE = multipart(jpeg224(BATCH_ITEMS).samples)
_undecodable = sorted((SHARED / "bad-inputs" / "undecodable").glob("*"))
BAD_INPUTS = {
    "not-an-image": (b"this is not an image at all, just text" * 100, "image/png"),
    "empty": (b"", "image/jpeg"),
    "truncated-jpeg": (JPEGS[0][: len(JPEGS[0]) // 3], "image/jpeg"),
}
if _undecodable:
    BAD_INPUTS["undecodable"] = (_undecodable[0].read_bytes(), "image/jpeg")


def _judge(resp, expect_4xx: bool) -> float:
    """An expected 4xx passes; a 503 overload answer with Retry-After passes as shedding.
    Returns the seconds the user should wait before its next request."""
    code = resp.status_code
    retry_after = resp.headers.get("Retry-After")
    if code == 503 and retry_after:
        SHED["count"] += 1
        resp.success()
        return min(5.0, float(retry_after))
    if expect_4xx:
        if 400 <= code < 500:
            resp.success()
        else:
            resp.failure(f"expected a 4xx for a bad input, got {code}")
    elif code == 200:
        resp.success()
    elif code == 503:
        resp.failure("503 without Retry-After")
    else:
        resp.failure(f"HTTP {code}")
    return 0.0


class RadiologyClient(FastHttpUser):
    """A PACS router or a reader's viewer: mostly single studies, some batches."""

    network_timeout = 60.0
    connection_timeout = 10.0
    back_off = 0.0  # set from Retry-After by the last request

    def wait_time(self) -> float:
        pause, self.back_off = self.back_off, 0.0
        return pause or random.uniform(0.05, 0.2)

    def _post(self, path: str, body: bytes, ctype: str, name: str, expect_4xx=False, check=None):
        """POST judged by `_judge`; on a 200, `check(resp)` may return a failure reason."""
        with self.client.post(
            path, data=body, headers={"Content-Type": ctype}, name=name, catch_response=True
        ) as resp:
            self.back_off = _judge(resp, expect_4xx)
            if check and resp.status_code == 200 and (reason := check(resp)):
                resp.failure(reason)
        return resp

    @task(10)
    def predict_jpeg(self) -> None:
        self._post("/v1/predict", random.choice(JPEGS), "image/jpeg", "/v1/predict")

    @task(2)
    def predict_dicom(self) -> None:
        if DICOMS:
            self._post(
                "/v1/predict", random.choice(DICOMS), "application/dicom", "/v1/predict [dicom]"
            )

    @task(2)
    def predict_batch(self) -> None:
        def no_item_failed(resp) -> str | None:
            return "a valid batch item failed" if resp.json().get("failed") else None

        self._post(
            "/v1/predict/batch", BATCH_BODY, BATCH_CTYPE, "/v1/predict/batch", check=no_item_failed
        )

    @task(1)
    def explain(self) -> None:
        path = "/v1/predict?explain=true"
        resp = self._post(path, random.choice(JPEGS), "image/jpeg", path)
        url = resp.json().get("explanation_url") if resp.status_code == 200 else None
        if url:
            with self.client.get(url, name="/v1/explanations/[id]", catch_response=True) as poll:
                if poll.status_code in (200, 202):
                    poll.success()
                else:
                    poll.failure(f"HTTP {poll.status_code}")

    @task(2)
    def bad_input(self) -> None:
        kind, (body, ctype) = random.choice(list(BAD_INPUTS.items()))
        self._post("/v1/predict", body, ctype, f"/v1/predict [bad: {kind}]", expect_4xx=True)


@events.quitting.add_listener
def check_slos(environment, **_kwargs) -> None:
    """Exit code 1 when an SLO is missed (locust's own exit code is kept otherwise)."""
    stats = environment.stats
    total = stats.total
    problems = []
    if total.num_requests == 0:
        problems.append("no requests were made")
    else:
        if total.fail_ratio > SLO_MAX_FAIL_RATIO:
            problems.append(f"failure ratio {total.fail_ratio:.4f} > {SLO_MAX_FAIL_RATIO}")
        shed = SHED["count"] / total.num_requests
        sys.stderr.write(f"shed (503 + Retry-After): {SHED['count']} ({shed:.1%})\n")
        if shed > SLO_MAX_SHED_RATIO:
            problems.append(f"shed ratio {shed:.4f} > {SLO_MAX_SHED_RATIO}")
    predict = stats.get("/v1/predict", "POST")
    if predict.num_requests:
        p99 = predict.get_response_time_percentile(0.99)
        if p99 > SLO_P99_MS:
            problems.append(f"p99 of /v1/predict {p99:.0f} ms > {SLO_P99_MS:.0f} ms")
    for problem in problems:
        sys.stderr.write(f"SLO MISSED: {problem}\n")
    if problems:
        environment.process_exit_code = 1
    else:
        sys.stderr.write("SLOs met\n")
