"""Serve autoscaling under a constant load, on this machine: `python -m bench.autoscale`.

One `ray start` node on loopback (bench.raycluster), the app with the Preprocessor (1..3) and
each Backbone (1..2) autoscaled by the project's policy (serve/autoscaling.py: on how busy
each stage's replicas are, with hysteresis on the way down), fractional CPUs that fit 2
cores, 10 s / 15 s delays. A constant closed-loop load (12 retrying clients, the
full-size shared radiograph) runs until the replica counts have held still for `hold_s`
after the first scale-up (at least `min_load_s`, at most `load_cap_s`), then stops; counts
from serve.status() are sampled every second, and go on being sampled until every
deployment is back at its minimum.

Which stage saturated is measured apart from the autoscaler's own input: each stage's busy
time as its latency metric counts it (the sum of `orthovision_stage_latency_seconds`, from
the node's Prometheus export) per replica-second, while the load ran at the starting counts.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from bench.__main__ import cpu_name
from bench.preprocess import SHARED_IMAGE, load_jpeg
from bench.prometheus import metric_sum, scrape
from bench.raycluster import (
    LOOPBACK,
    RayNode,
    RetryingClient,
    cluster,
    cpu_burners,
    deploy,
    free_port,
    private_store_url,
    replica_counts,
)
from orthovision.config import DeploymentConfig, OrthoVisionConfig, ServeConfig
from serve.manifests.serve_config import served_branches

BRANCHES = served_branches(OrthoVisionConfig())
# The Preprocessor and each Backbone of the served (default) checkpoint, and the stage name
# each one's latency metric carries (serve/preprocessor.py, serve/backbone.py).
STAGES = {"Preprocessor": "preprocess"} | {f"Backbone_{b}": f"backbone_{b}" for b in BRANCHES}
WATCHED = list(STAGES)
BUSY_METRIC = "ray_orthovision_stage_latency_seconds_sum"


def autoscaling_config(http_port: int) -> OrthoVisionConfig:
    """Fits 2 cores at max: 0.1 + 3x0.2 + 2x2x0.3 + 0.05 + 0.05 = 2.0 CPUs."""
    # The Preprocessor and Backbones scale on how busy they are (serve/busy.py: 70% of each
    # replica's time); the up-step waits out the seconds in which the pipeline fills.
    scaled = {
        "min_replicas": 1,
        "target_busy": 0.7,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 15.0,
    }
    return OrthoVisionConfig(
        serve=ServeConfig(
            host=LOOPBACK,
            port=http_port,
            device="cpu",
            store_url=private_store_url("autoscale"),
            ingress=DeploymentConfig(
                num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256
            ),
            preprocessor=DeploymentConfig(
                max_replicas=3, num_cpus=0.2, max_ongoing_requests=4, **scaled
            ),
            backbone=DeploymentConfig(
                max_replicas=2,
                num_cpus=0.3,
                max_ongoing_requests=16,
                max_queued_requests=128,
                **scaled,
            ),
            fusion=DeploymentConfig(
                num_cpus=0.05, max_ongoing_requests=64, max_queued_requests=256
            ),
            explainer=DeploymentConfig(num_cpus=0.05, max_ongoing_requests=1),
        )
    )


def busy_seconds(metrics_url: str) -> dict[str, float]:
    """Seconds each watched stage has spent working, summed over its replicas."""
    text = scrape(metrics_url)
    return {name: metric_sum(text, BUSY_METRIC, stage=stage) for name, stage in STAGES.items()}


def saturation(samples: list[dict], until_t: float) -> dict[str, float]:
    """Busy seconds per replica-second of each stage from the first sample with work to the
    last sample at or before `until_t` (the replica counts did not change in between)."""
    window = [s for s in samples if s["phase"] == "load" and s["t_s"] <= until_t]
    window = [s for s in window if any(s["busy"].values())]
    if len(window) < 2:
        return {}
    first, last = window[0], window[-1]
    dt = last["t_s"] - first["t_s"]
    if dt <= 0:
        return {}
    return {
        name: round((last["busy"][name] - first["busy"][name]) / dt / first[name], 3)
        for name in WATCHED
    }


def down_steps_under_load(samples: list[dict]) -> list[dict]:
    """Every sample, during the load, where a deployment had fewer replicas than before."""
    load = [s for s in samples if s["phase"] == "load"]
    return [
        {"t_s": now["t_s"], "deployment": name, "from": before[name], "to": now[name]}
        for before, now in zip(load, load[1:], strict=False)
        for name in WATCHED
        if now[name] < before[name]
    ]


def run(
    concurrency: int = 12,
    min_load_s: float = 60.0,
    hold_s: float = 30.0,
    load_cap_s: float = 180.0,
    settle_cap_s: float = 150.0,
    burn: int = 0,
) -> dict:
    cfg = autoscaling_config(free_port())
    # A full-size radiograph: its decode + CLAHE load the Preprocessor as real traffic does.
    body, source = load_jpeg(SHARED_IMAGE)
    samples: list[dict] = []
    # Metrics every 2 s (Ray's default is 10 s), so the busy times follow the load.
    head = RayNode("head", num_cpus=2, env={"RAY_metrics_report_interval_ms": "2000"})
    with cpu_burners(burn), cluster([head]):
        url = deploy(cfg, head.address)
        metrics_url = f"http://{head.ip}:{head.metrics_port}/metrics"
        client = RetryingClient(url, body)
        t0 = time.monotonic()

        def sample(phase: str) -> dict:
            row = {"t_s": round(time.monotonic() - t0, 1), "phase": phase}
            row |= replica_counts(cfg.serve.app_name, WATCHED)
            row["busy"] = busy_seconds(metrics_url) if phase == "load" else {}
            samples.append(row)
            print(
                f"{row['t_s']:>6} {phase:<5} " + " ".join(f"{n}={row[n]}" for n in WATCHED),
                flush=True,
            )
            return row

        def watch(_stop: threading.Event) -> None:
            """Sample every second; return (ending the load) once the counts held still."""
            last_change, previous = None, None
            while (elapsed := time.monotonic() - t0) < load_cap_s:
                row = sample("load")
                counts = tuple(row[n] for n in WATCHED)
                if previous is not None and counts != previous:
                    last_change = elapsed
                previous = counts
                steady = last_change is not None and elapsed - last_change >= hold_s
                if steady and elapsed >= min_load_s:
                    return
                time.sleep(1.0)

        client.load_during(watch, concurrency)
        load_end = time.monotonic()
        while time.monotonic() - load_end < settle_cap_s:
            row = sample("idle")
            if all(row[n] == 1 for n in WATCHED):
                break
            time.sleep(1.0)
        client.close()

    peak = {n: max(s[n] for s in samples) for n in WATCHED}
    first_up = {n: next((s["t_s"] for s in samples if s[n] >= 2), None) for n in WATCHED}
    scaled = [t for t in first_up.values() if t is not None]
    first_t = min(scaled) if scaled else None
    first_scaled = sorted(n for n, t in first_up.items() if t == first_t)
    busy = saturation(samples, first_t if first_t is not None else float("inf"))
    saturated = max(busy, key=busy.get) if busy else None
    above = {n: [i for i, s in enumerate(samples) if s[n] > 1] for n in WATCHED}
    back = {
        n: samples[idx[-1] + 1]["t_s"] if idx and idx[-1] + 1 < len(samples) else None
        for n, idx in above.items()
    }
    result = {
        "concurrency": concurrency,
        "requests_sent": client.requests,
        "succeeded": client.ok,
        "lost_after_retries": client.lost,
        "http_500": client.server_errors,
        "load_s": round(load_end - t0, 1),
        "peak_replicas": peak,
        "first_at_2_replicas_t_s": first_up,
        "first_scaled": first_scaled,
        "busy_per_replica_before_first_scale": busy,
        "saturated": saturated,
        "down_steps_under_load": down_steps_under_load(samples),
        "back_to_1_t_s": back,
        "all_back_to_min": all(samples[-1][n] == 1 for n in WATCHED),
        "samples": [{k: v for k, v in s.items() if k != "busy"} for s in samples],
        "cpu_burners": burn,
        "image": source,
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
    }
    print(f"load: {client.requests} requests from {concurrency} clients over {result['load_s']} s")
    print(f"busy per replica before the first scale-up: {busy}; saturated: {saturated}")
    print(f"first scaled: {first_scaled} at {first_t} s; peak replicas: {peak}")
    print(f"down-steps under load: {result['down_steps_under_load']}; back to 1 (s): {back}")
    print("RESULT " + json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes beside")
    args = parser.parse_args()
    run(args.concurrency, burn=args.burn)


if __name__ == "__main__":
    main()
