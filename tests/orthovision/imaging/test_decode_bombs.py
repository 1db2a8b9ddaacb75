"""Decompression and pixel bombs against the decoder, each in a fresh process so its peak
RSS is its own: every bomb is refused with a 4xx in < 2 s and < 500 MB, and the largest
inputs the bounds still accept decode within the same memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.hostile import bomb_cases, deflated_dicom_small, png_of_zeros
from support.images import make_dicom

from orthovision.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
MAX_GROWTH_MB = 500
CHILD = """
import json, sys, time
from orthovision.errors import InputError
from orthovision.imaging.decode import decode_radiograph

def peak_kb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
before = peak_kb()
t = time.perf_counter()
try:
    decode_radiograph(data)
    status = 200
except InputError as e:
    status = e.http_status
seconds = time.perf_counter() - t
after = peak_kb()
print(json.dumps({"status": status, "seconds": seconds, "growth_mb": (after - before) / 1024}))
"""


def decode_in_child(tmp_path: Path, body: bytes) -> dict:
    path = tmp_path / "input.bin"
    path.write_bytes(body)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


BOMBS = bomb_cases()


@pytest.mark.parametrize("case", BOMBS, ids=[c.name for c in BOMBS])
def test_bomb_is_refused_fast_and_small(tmp_path, case):
    result = decode_in_child(tmp_path, case.body)
    assert 400 <= result["status"] < 500
    assert result["seconds"] < 2.0, result
    assert result["growth_mb"] < MAX_GROWTH_MB, result


def largest_accepted() -> list[tuple[str, bytes]]:
    """Just inside the decode-memory bound (256 MiB estimate) or the 64 MiB body bound."""
    side16 = int((62 << 20) / 2) ** 0.5
    return [
        ("png-rgba-4880", png_of_zeros(4880, 4880, 8, 6)),
        ("png-grey16-6600", png_of_zeros(6600, 6600, 16, 0)),
        ("png-rgb-5400", png_of_zeros(5400, 5400, 8, 2)),
        ("dicom-uint16-62mib", make_dicom(pixels=np.zeros((int(side16),) * 2, np.uint16))),
        ("dicom-deflated", deflated_dicom_small()),
    ]


@pytest.mark.parametrize(
    "name,body", largest_accepted(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_largest_accepted_input_decodes_within_memory(tmp_path, name, body):
    result = decode_in_child(tmp_path, body)
    assert result["status"] in (200, 422), result  # 422: a blank image may fail later checks
    assert result["growth_mb"] < MAX_GROWTH_MB, result


# The docs/RELIABILITY.md table:
#   PYTHONPATH=tests python tests/orthovision/imaging/test_decode_bombs.py
if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, body in [*largest_accepted(), *((c.name, c.body) for c in BOMBS)]:
            r = decode_in_child(Path(tmp), body)
            print(
                f"{name}: {len(body) >> 10} KB, status {r['status']}, "
                f"{r['seconds']:.2f} s, +{r['growth_mb']:.0f} MB"
            )
