"""Schemathesis against the live app's /openapi.json: no server error for any generated case."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.liveapp import KEY

pytestmark = pytest.mark.serve
CLI = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))


@pytest.mark.skipif(not Path(CLI).exists(), reason="schemathesis not installed (dev extra)")
def test_openapi_fuzzing_finds_no_server_error(live_app, tmp_path):
    proc = subprocess.run(
        [
            CLI,
            "run",
            f"{live_app.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-H",
            f"X-API-Key: {KEY}",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--generation-deterministic",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    print(out[-2500:])
    assert proc.returncode == 0, out[-4000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts, out[-2000:]
    generated, passed = map(int, counts.groups())
    assert generated >= 50 and passed == generated, counts.group(0)
