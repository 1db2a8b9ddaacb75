"""Latency of the running service at fixed concurrency: `python -m bench.latency`.

Starts the app from deploy/local.yaml on a local Ray (unless --url names a running one),
sends the same 224x224 JPEG radiograph N times per concurrency level, prints p50/p95/p99
and img/s, and a last line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.loadgen import percentile
from orthovision.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
SHARED_JPEG = (
    ROOT.parent / "shared" / "data" / "fracture-xray" / "fractured" / "001fc7ee522043ab.jpg"
)


def sample_jpeg() -> tuple[bytes, str]:
    if SHARED_JPEG.exists():
        return SHARED_JPEG.read_bytes(), f"shared {SHARED_JPEG.name} (224x224 JPEG)"
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    img = (60 + rng.normal(0, 20, (224, 224))).clip(0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes(), "synthetic 224x224 JPEG"


def measure(url: str, data: bytes, concurrency: int, requests: int) -> dict:
    with httpx.Client(base_url=url, timeout=60) as client:

        def one(_: int) -> float:
            t0 = time.perf_counter()
            r = client.post("/v1/predict", content=data)
            r.raise_for_status()
            return (time.perf_counter() - t0) * 1000

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(2 * concurrency)))  # warm-up
            t0 = time.perf_counter()
            lat = sorted(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": requests,
        "p50_ms": round(statistics.median(lat), 1),
        "p95_ms": round(percentile(lat, 0.95), 1),
        "p99_ms": round(percentile(lat, 0.99), 1),
        "img_per_s": round(requests / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="a running service; default: start deploy/local.yaml")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    started_here = args.url is None
    if started_here:
        from serve.run import start, wait_ready

        args.url = start(ROOT / "deploy" / "local.yaml")
        if not wait_ready(args.url, 180):
            raise SystemExit("service not ready")
    data, source = sample_jpeg()
    rows = [measure(args.url, data, c, args.requests) for c in args.concurrency]
    if started_here:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print(f"image: {source}; machine: {platform.machine()}, {os.cpu_count()} CPUs (CPU only)")
    print(f"{'concurrency':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'img/s':>7}")
    for r in rows:
        print(
            f"{r['concurrency']:>11} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['p99_ms']:>8} "
            f"{r['img_per_s']:>7}"
        )
    print("RESULT " + json.dumps({"image": source, "cpus": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
    main()
