"""`make loadtest`: start `make serve`, wait for /readyz, run Locust headless, stop the server.

    python -m loadtests.run [--shape step|spike|none] [--run-time 60s] [--out DIR] [--url URL]

Writes DIR/<shape>_stats.csv (+ _stats_history, _failures, _exceptions) and DIR/<shape>.html.
Exits with Locust's exit code: non-zero when a request failed beyond the SLO or p99 was over
it (see loadtests/locustfile.py). With --url it targets a running service and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bench.procs import Server, port_is_free

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="step", choices=["step", "spike", "none"])
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--users", type=int, default=8, help="with --shape none")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "reports")
    parser.add_argument("--url", help="a running service (default: start `make serve`)")
    args = parser.parse_args()

    server = None
    url = args.url or "http://127.0.0.1:8000"  # deploy/local.yaml
    if args.url is None:
        port = urlsplit(url).port or 80
        if not port_is_free(port):
            sys.stderr.write(f"port {port} is in use: stop that server or pass --url\n")
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        server = Server(
            "make serve", ["make", "-s", "serve"], url + "/readyz", args.out / "serve.log"
        )
        print(f"starting `make serve` (log: {server.log_path}) ...", flush=True)
        server.start(ready_timeout_s=300)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / args.shape
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--host",
        url,
        "--run-time",
        args.run_time,
        "--csv",
        str(prefix),
        "--html",
        str(prefix) + ".html",
        "--only-summary",
        "--stop-timeout",
        "10",
    ]
    if args.shape == "none":
        cmd += ["--users", str(args.users), "--spawn-rate", str(args.users)]
    env = dict(os.environ, LOAD_SHAPE="" if args.shape == "none" else args.shape)
    try:
        print("running:", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=ROOT)
    finally:
        if server is not None:
            server.stop()
    print(f"report: {prefix}.html, CSV: {prefix}_stats.csv; exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
