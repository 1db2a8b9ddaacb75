"""A node dies under load and the clients lose nothing: `python -m bench.multinode`.

Starts a two-node Ray cluster on loopback (bench.raycluster: own temp dirs and ports): the
head advertises CPU_NODE_RESOURCE (ingress, preprocessing, fusion), the second node
MODEL_NODE_RESOURCE (both backbones and the explainer), exactly the placement of the gpu
preset's KubeRay worker groups. It deploys the app with the default checkpoint, sends a
bounded load with retrying clients, SIGKILLs every process of the second node mid-load,
restarts it, and prints: requests sent, failed attempts, requests lost after retries, HTTP
500s, the time to recover, the throughput before the kill against the minute after the
backbones are back, and the log lines about unavailable replicas. `--burn N` runs N
CPU-burning processes beside it (a loaded machine). The last line is `RESULT {json}`.
Everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from bench.__main__ import cpu_name
from bench.latency import sample_jpeg
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
    serve_log_lines,
)
from orthovision.config import OrthoVisionConfig, ServeConfig
from serve.manifests.serve_config import CPU_NODE_RESOURCE, MODEL_NODE_RESOURCE

POOL_CAPACITY = 1000.0


def two_pool_config(http_port: int) -> OrthoVisionConfig:
    """The local preset with the gpu preset's placement (one unit of a pool resource each)."""
    base = ServeConfig()
    cpu_pool = {"resources": {CPU_NODE_RESOURCE: 1.0}}
    model_pool = {"resources": {MODEL_NODE_RESOURCE: 1.0}}
    return OrthoVisionConfig(
        serve=ServeConfig(
            host=LOOPBACK,
            port=http_port,
            device="cpu",
            store_url=private_store_url("multinode"),
            ingress=base.ingress.model_copy(update=cpu_pool),
            preprocessor=base.preprocessor.model_copy(update=cpu_pool),
            fusion=base.fusion.model_copy(update=cpu_pool),
            backbone=base.backbone.model_copy(update=model_pool),
            explainer=base.explainer.model_copy(update=model_pool),
        )
    )


def replica_addresses(app_name: str) -> dict[str, set[str]]:
    """Deployment -> node IP addresses of its live replicas (GCS actor table; no dashboard)."""
    from ray._private.state import actors

    placed: dict[str, set[str]] = {}
    for actor in actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") == "ALIVE" and name.startswith(f"SERVE_REPLICA::{app_name}#"):
            deployment = name.split("#")[1]
            placed.setdefault(deployment, set()).add(actor["Address"]["IPAddress"])
    return placed


def backbones_back(app_name: str, model_ip: str) -> bool:
    """Every Backbone has a live replica on the restarted node and Serve counts it RUNNING
    (the old replicas died with the node, so these are new ones)."""
    placed = replica_addresses(app_name)
    backbones = [d for d in placed if d.startswith("Backbone")]
    running = replica_counts(app_name, backbones)
    return bool(backbones) and all(model_ip in placed[d] and running[d] >= 1 for d in backbones)


def run(
    concurrency: int = 4,
    kill_after_s: float = 40.0,
    down_s: float = 3.0,
    window_s: float = 60.0,
    max_load_s: float = 600.0,
    burn: int = 0,
    warmup_s: float = 10.0,
) -> dict:
    """Closed-loop load from `concurrency` retrying clients; the model node is killed
    `kill_after_s` into it and restarted `down_s` later; the load runs on for `window_s`
    after its backbones are back, then stops (never past `max_load_s`). The throughput
    before the kill is measured after `warmup_s`. `burn` processes spin beside it all (a
    loaded machine)."""
    http_port = free_port()
    cfg = OrthoVisionConfig.model_validate(two_pool_config(http_port).model_dump())
    app = cfg.serve.app_name
    body, source = sample_jpeg()
    head = RayNode("head", num_cpus=2, resources={CPU_NODE_RESOURCE: POOL_CAPACITY})
    events: dict[str, float] = {}
    with cpu_burners(burn), cluster([head]):
        model_node = RayNode(
            "model-node",
            ip="127.0.0.3",  # an address of its own, still loopback
            num_cpus=2,
            resources={MODEL_NODE_RESOURCE: POOL_CAPACITY},
            gcs_address=head.address,
        )
        try:
            model_node.start()
            t0 = time.monotonic()
            url = deploy(cfg, head.address)
            print(f"app ready in {time.monotonic() - t0:.1f} s at {url}")
            placed = replica_addresses(app)
            print(f"replicas by node address: {placed}")
            on_model_node = {
                d: ips == {model_node.ip} for d, ips in placed.items() if d.startswith("Backbone")
            }

            load_t0 = time.monotonic()
            client = RetryingClient(url, body, deadline=load_t0 + max_load_s)

            def chaos(_stop: threading.Event) -> None:
                time.sleep(kill_after_s)
                events["kill"] = time.monotonic()
                model_node.kill()
                print(f"killed the model node after {kill_after_s:.0f} s of load", flush=True)
                time.sleep(down_s)
                try:
                    model_node.restart()
                    events["restarted"] = time.monotonic()
                    tries = len(model_node.old_temp_dirs)
                    print(f"model node restarted ({tries} start attempt(s))", flush=True)
                    while not backbones_back(app, model_node.ip):
                        if time.monotonic() > client.deadline:
                            return
                        time.sleep(1.0)
                    events["returned"] = time.monotonic()
                    print("backbones RUNNING on the restarted node", flush=True)
                    time.sleep(window_s)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"model node restart FAILED: {exc}", flush=True)

            client.load_during(chaos, concurrency)
            load_s = time.monotonic() - load_t0
            client.close()
            log_lines = serve_log_lines(head, ("Ingress", "Fusion"), "unavailable")
        finally:
            model_node.stop()

    kill_t = events.get("kill")
    recover_s = client.first_success_sent_after(kill_t) if kill_t else None
    before = client.rate(load_t0 + warmup_s, kill_t) if kill_t else 0.0
    back_t = events.get("returned")
    window = client.rate(back_t, back_t + window_s) if back_t else 0.0

    def since_kill(name: str) -> float | None:
        return round(events[name] - kill_t, 1) if name in events and kill_t else None

    result = {
        "requests_sent": client.requests,
        "succeeded": client.ok,
        "failed_attempts": client.failed_attempts,
        "lost_after_retries": client.lost,
        "http_500": client.server_errors,
        "client_timeouts": client.timeouts,
        "time_to_recover_s": recover_s,
        "node_down_s": since_kill("restarted"),
        "backbones_back_s": since_kill("returned"),
        "throughput_before_kill_per_s": round(before, 3),
        "throughput_after_return_per_s": round(window, 3),
        "throughput_ratio": round(window / before, 3) if before else None,
        "window_s": window_s,
        "unavailable_log_lines": log_lines,
        "load_wall_s": round(load_s, 1),
        "concurrency": concurrency,
        "killed_after_s": kill_after_s,
        "cpu_burners": burn,
        "backbones_on_model_node": all(on_model_node.values()) and bool(on_model_node),
        "image": source,
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
    }
    print(f"requests sent:              {client.requests} ({concurrency} concurrent clients)")
    print(f"failed attempts (retried):  {client.failed_attempts}")
    print(f"lost after client retries:  {client.lost}; HTTP 500: {client.server_errors}")
    print(
        f"time to recover:            {recover_s} s "
        "(kill -> first success of a request sent after the kill)"
    )
    print(f"model node restarted:       {result['node_down_s']} s after the kill")
    print(f"backbones back:             {result['backbones_back_s']} s after the kill")
    print(
        f"throughput:                 {before:.2f}/s before the kill, {window:.2f}/s in the "
        f"{window_s:.0f} s after the backbones were back ({result['throughput_ratio']})"
    )
    print(f"'unavailable' log lines:    {log_lines} (ingress and fusion)")
    print("RESULT " + json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kill-after-s", type=float, default=40.0, help="seconds of load")
    parser.add_argument("--down-s", type=float, default=3.0, help="seconds the node stays dead")
    parser.add_argument("--window-s", type=float, default=60.0, help="load after recovery")
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes beside")
    args = parser.parse_args()
    run(args.concurrency, args.kill_after_s, args.down_s, args.window_s, burn=args.burn)


if __name__ == "__main__":
    main()
