"""Where the CPU goes: CPU seconds per image of every process of the service during one
closed-loop window. `python -m bench.cpu_breakdown [--mode c8|c1|batch|full] [--seconds S]`

Starts the local preset on port 8010 with a private store (like `python -m bench`), warms
it, runs the load, and prints, per process role (proxy, ingress, each deployment, Ray's
daemons), the CPU seconds it used and the milliseconds per classified image. Loopback only;
the service is stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import psutil

from bench import images as image_sets
from bench.__main__ import batch_bodies, bodies, serve_config, service_server, warm_explainer
from bench.loadgen import closed_loop

ROLES = ("Ingress", "Preprocessor", "Fusion", "Explainer", "ProxyActor", "ServeController",
         "gcs_server", "raylet", "DashboardAgent", "dashboard", "log_monitor")  # fmt: skip


def role(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if "ServeReplica:" in cmd and ":Backbone_" in cmd:
        return cmd.split("ServeReplica:", 1)[1].split()[0].split(":", 1)[1]
    return next((r for r in ROLES if r in cmd), "other")


def cpu_by_role() -> collections.Counter:
    """CPU seconds of every Ray/service process on this machine, keyed by (pid, role)."""
    out: collections.Counter = collections.Counter()
    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            if "ray" in cmd or "orthovision" in cmd:
                t = proc.cpu_times()
                out[(proc.pid, role(proc))] = t.user + t.system
        except psutil.Error:
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", default="c8", help="c<N> (/v1/predict), batch, or full")
    p.add_argument("--seconds", type=float, default=12.0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="orthovision-cpu-"))
    cfg = serve_config(argparse.Namespace(config=None, gpu=False, port=8010, cpu_backend=None), tmp)
    url = f"http://127.0.0.1:{cfg.serve.port}"
    jpeg = bodies(image_sets.jpeg224(32))
    if args.mode == "batch":
        path, load, concurrency = "/v1/predict/batch", batch_bodies(image_sets.jpeg224(32), 32), 2
    elif args.mode == "full":
        path, load, concurrency = "/v1/predict", bodies(image_sets.fullsize(8)), 8
    else:
        path, load, concurrency = "/v1/predict", jpeg, int(args.mode.removeprefix("c"))
    server = service_server(cfg, tmp)
    server.start(ready_timeout_s=300)
    try:
        closed_loop(url, "/v1/predict", jpeg, 8, 3, 0)  # warm every path
        warm_explainer(url, jpeg[0], cfg)
        before, t0 = cpu_by_role(), time.time()
        row = closed_loop(url, path, load, concurrency, args.seconds, 0)
        after, wall = cpu_by_role(), time.time() - t0
    finally:
        server.stop()
    images = max(1.0, row["img_per_s"] * row["wall_s"])
    used: collections.Counter = collections.Counter()
    for key, cpu in after.items():
        used[key[1]] += cpu - before.get(key, cpu)
    print(f"{args.mode}: {row}")
    for name, cpu in used.most_common():
        print(f"  {name:38s} {cpu:7.2f} CPU-s  {1000 * cpu / images:6.1f} ms/image")
    print(f"  total {sum(used.values()):.2f} CPU-s over {wall:.1f} s wall")


if __name__ == "__main__":
    main()
