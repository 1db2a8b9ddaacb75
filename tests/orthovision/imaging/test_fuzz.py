"""CI-sized decoder fuzzing: the atheris harness in a subprocess (`make fuzz` runs 100k)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
pytest.importorskip("atheris")


def test_decoder_fuzz_short_budget(tmp_path):
    corpus = tmp_path / "corpus"
    subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "seeds.py"), str(corpus)],
        check=True,
        capture_output=True,
    )
    runs = 3000
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz" / "fuzz_decoder.py"),
            f"-runs={runs}",
            "-timeout=2",
            # The harness checks its own peak RSS; libFuzzer's check would read the parent's
            # (see tests/orthovision/imaging/fuzz/fuzz_decoder.py).
            "-rss_limit_mb=0",
            "-max_len=65536",
            "-seed=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # libFuzzer may count one run more than asked (seen: "Done 3001 runs" for -runs=3000).
    done = re.search(r"Done (\d+) runs", log)
    assert done and int(done.group(1)) >= runs, log[-3000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
