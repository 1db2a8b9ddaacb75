"""The Locust file's judging rules (loadtests/locustfile.py), in a subprocess: importing
locust monkey-patches the standard library with gevent, which must not leak into pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from orthovision.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT

PROBE = """
import json
import os
import loadtests.locustfile as lf

class Resp:
    def __init__(self, code, headers=None):
        self.status_code, self.headers, self.outcome = code, headers or {}, None
    def success(self):
        self.outcome = "ok"
    def failure(self, why):
        self.outcome = "fail: " + why

cases = {
    "200": (Resp(200), False),
    "shed": (Resp(503, {"Retry-After": "2"}), False),
    "shed_long": (Resp(503, {"Retry-After": "60"}), False),
    "503_bare": (Resp(503), False),
    "500": (Resp(500), False),
    "bad_422": (Resp(422), True),
    "bad_shed": (Resp(503, {"Retry-After": "1"}), True),
    "bad_500": (Resp(500), True),
    "bad_200": (Resp(200), True),
}
out = {}
for name, (resp, expect_4xx) in cases.items():
    wait = lf._judge(resp, expect_4xx)
    out[name] = [resp.outcome, wait]
out["shed_count"] = lf.SHED["count"]
print(json.dumps(out))
"""


def test_judging_rules_and_retry_after_back_off():
    run = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["200"] == ["ok", 0.0]
    assert out["shed"] == ["ok", 2.0]  # shedding as promised: wait, then go on
    assert out["shed_long"] == ["ok", 5.0]  # the back-off is capped
    assert out["503_bare"][0].startswith("fail")  # a 503 must say when to come back
    assert out["500"][0].startswith("fail")
    assert out["bad_422"] == ["ok", 0.0]
    assert out["bad_shed"] == ["ok", 1.0]
    assert out["bad_500"][0].startswith("fail") and out["bad_200"][0].startswith("fail")
    assert out["shed_count"] == 3


def test_locust_lists_the_user_with_each_shape():
    for shape in ("", "step", "spike"):
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--list"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LOAD_SHAPE": shape},
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert "RadiologyClient" in run.stdout
