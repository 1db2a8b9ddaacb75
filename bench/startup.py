"""`make serve` as a user meets it: seconds to ready, and the memory of the idle service.

    python -m bench.startup [--starts 3] [--settle-s 5]

Each start runs `orthovision serve` (the local preset, deploy/local.yaml, port 8000) as a
child process, times it to the first 200 from `/readyz`, waits `--settle-s`, reads the
summed PSS of its whole process tree, and stops it (nothing is left running). Run it on an
idle machine with the venv and the ONNX export cache present (the first start after a new
checkpoint also exports the graphs). The last stdout line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import machine_info
from bench.procs import Server, port_is_free, tree
from bench.procs import pss_mb as pss_mb_of

URL = "http://127.0.0.1:8000"


def one_start(log_dir: Path, settle_s: float) -> dict:
    cmd = [sys.executable, "-m", "serve.commands", "serve"]
    server = Server("orthovision-serve", cmd, URL + "/readyz", log_dir / "serve.log")
    started = time.perf_counter()
    server.start(ready_timeout_s=300)
    ready_s = time.perf_counter() - started
    try:
        time.sleep(settle_s)
        pss_mb = server.memory.pss_now_mb()
        by_process = {
            " ".join(p.cmdline())[:60].strip(): round(pss_mb_of(p.pid), 1)
            for p in tree(server.proc.pid)
        }
    finally:
        server.stop()
    return {"ready_s": round(ready_s, 1), "pss_mib": pss_mb, "pss_mib_by_process": by_process}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--settle-s", type=float, default=5.0)
    args = p.parse_args()
    if not port_is_free(8000):
        raise SystemExit("port 8000 is in use: stop the running service first")
    runs = []
    with tempfile.TemporaryDirectory(prefix="orthovision-startup-") as tmp:
        for i in range(args.starts):
            while not port_is_free(8000):  # the last start's proxy lets go of the port
                time.sleep(0.5)
            runs.append(one_start(Path(tmp) / str(i), args.settle_s))
            print(f"start {i + 1}: ready {runs[-1]['ready_s']} s, PSS {runs[-1]['pss_mib']} MiB")
    result = {"machine": machine_info("cpu"), "starts": runs}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
