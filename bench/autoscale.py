"""Serve autoscaling, shown on this machine: `python -m bench.autoscale`.

One `ray start` node on loopback (bench.raycluster), the app with autoscaling Preprocessor
(1..3) and Backbones (1..2), fractional CPUs that fit 2 cores, short upscale/downscale
delays. A bounded closed-loop load (a thread pool of retrying clients) runs until the
Preprocessor and a Backbone reach 2 replicas (or a time cap), then stops; replica counts
from serve.status() are sampled every second and printed until they are back at 1.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.preprocess import SHARED_IMAGE, load_jpeg
from bench.raycluster import (
    LOOPBACK,
    RayNode,
    RetryingClient,
    cluster,
    deploy,
    free_port,
    replica_counts,
)
from orthovision.config import DeploymentConfig, OrthoVisionConfig, ServeConfig
from serve.manifests.serve_config import served_branches

# The Preprocessor and each Backbone of the served (default) checkpoint.
WATCHED = ["Preprocessor"] + [f"Backbone_{n}" for n in served_branches(OrthoVisionConfig())]


def autoscaling_config(http_port: int) -> OrthoVisionConfig:
    """Fits 2 cores at max: 0.1 + 3x0.2 + 2x2x0.3 + 0.05 + 0.05 = 2.0 CPUs."""
    fast = {"upscale_delay_s": 2.0, "downscale_delay_s": 5.0}
    return OrthoVisionConfig(
        serve=ServeConfig(
            host=LOOPBACK,
            port=http_port,
            device="cpu",
            store_url=f"sqlite:///tmp/orthovision-autoscale-{os.getpid()}.sqlite3",
            ingress=DeploymentConfig(
                num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256
            ),
            preprocessor=DeploymentConfig(
                min_replicas=1,
                max_replicas=3,
                # CPU-bound, one request at a time per core: scale at 50 % busy.
                target_ongoing_requests=0.5,
                num_cpus=0.2,
                max_ongoing_requests=4,
                **fast,
            ),
            backbone=DeploymentConfig(
                min_replicas=1,
                max_replicas=2,
                # A call is a batch of images gathered in the ingress: one at a time keeps
                # a one-thread replica busy.
                target_ongoing_requests=1.0,
                num_cpus=0.3,
                max_ongoing_requests=16,
                max_queued_requests=128,
                **fast,
            ),
            fusion=DeploymentConfig(
                num_cpus=0.05, max_ongoing_requests=64, max_queued_requests=256
            ),
            explainer=DeploymentConfig(num_cpus=0.05, max_ongoing_requests=1),
        )
    )


def run(concurrency: int = 12, max_requests: int = 3000, load_cap_s: float = 150.0,
        settle_cap_s: float = 150.0, hold_s: float = 10.0) -> dict:  # fmt: skip
    cfg = autoscaling_config(free_port())
    # A full-size radiograph: its decode + CLAHE load the Preprocessor as real traffic does
    # (a 224-pixel JPEG leaves it idle while the backbones queue).
    body, source = load_jpeg(SHARED_IMAGE)
    samples: list[dict] = []
    stop_load = threading.Event()
    head = RayNode("head", num_cpus=2)
    with cluster([head]):
        url = deploy(cfg, head.address)
        client = RetryingClient(url, body, budget_s=60)
        t0 = time.monotonic()
        sent = 0
        lock = threading.Lock()

        def worker() -> None:
            nonlocal sent
            while not stop_load.is_set():
                with lock:
                    if sent >= max_requests:
                        return
                    sent += 1
                client.predict(sent)

        def sample(phase: str) -> dict:
            row = {"t_s": round(time.monotonic() - t0, 1), "phase": phase}
            row |= replica_counts(cfg.serve.app_name, WATCHED)
            samples.append(row)
            print(
                f"{row['t_s']:>6} {phase:<5} "
                + " ".join(f"{name}={row[name]}" for name in WATCHED),
                flush=True,
            )
            return row

        pool = ThreadPoolExecutor(concurrency)
        for _ in range(concurrency):
            pool.submit(worker)
        reached_at = None
        while time.monotonic() - t0 < load_cap_s and sent < max_requests:
            row = sample("load")
            scaled = row["Preprocessor"] >= 2 and max(row[n] for n in WATCHED[1:]) >= 2
            if scaled and reached_at is None:
                reached_at = time.monotonic()
            # Hold the load a little past the scale-up so the trace shows it steady.
            if reached_at is not None and time.monotonic() - reached_at >= hold_s:
                break
            time.sleep(1.0)
        stop_load.set()
        pool.shutdown(wait=True)
        load_end = time.monotonic()
        while time.monotonic() - load_end < settle_cap_s:
            row = sample("idle")
            if all(row[n] == 1 for n in WATCHED):
                break
            time.sleep(1.0)
        client.close()

    peak = {n: max(s[n] for s in samples) for n in WATCHED}
    first_up = {
        n: next((s["t_s"] for s in samples if s[n] >= 2), None) for n in WATCHED
    }  # fmt: skip

    def back_to_1(name: str) -> float | None:
        """First sample after the last one above 1 replica (None if it never scaled)."""
        above = [i for i, s in enumerate(samples) if s[name] > 1]
        if not above or above[-1] + 1 >= len(samples):
            return None
        return samples[above[-1] + 1]["t_s"]

    back = {n: back_to_1(n) for n in WATCHED}
    result = {
        "concurrency": concurrency,
        "requests_sent": sent,
        "succeeded": client.ok,
        "lost_after_retries": client.lost,
        "load_s": round(load_end - t0, 1),
        "peak_replicas": peak,
        "first_at_2_replicas_t_s": first_up,
        "back_to_1_t_s": back,
        "samples": samples,
        "image": source,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(f"load: {sent} requests from {concurrency} clients over {result['load_s']} s")
    print(f"peak replicas: {peak}")
    print(f"first at >=2 replicas (s): {first_up}; back to 1 (s): {back}")
    print("RESULT " + json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-requests", type=int, default=3000)
    args = parser.parse_args()
    run(args.concurrency, args.max_requests)


if __name__ == "__main__":
    main()
