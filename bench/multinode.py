"""A node dies under load and the clients lose nothing: `python -m bench.multinode`.

Starts a two-node Ray cluster on loopback (bench.raycluster: own temp dirs and ports): the
head advertises CPU_NODE_RESOURCE (ingress, preprocessing, fusion), the second node
MODEL_NODE_RESOURCE (both backbones and the explainer), exactly the placement of the gpu
preset's KubeRay worker groups. It deploys the app with the default checkpoint, sends a
bounded load with retrying clients, SIGKILLs every process of the second node mid-load,
restarts it, and prints: requests sent, failed attempts, requests lost after retries, and
the time to recover. The last line is `RESULT {json}`. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.latency import sample_jpeg
from bench.raycluster import LOOPBACK, RayNode, RetryingClient, cluster, deploy, free_port
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
            store_url=f"sqlite:///tmp/orthovision-multinode-{os.getpid()}.sqlite3",
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


def run(
    requests: int = 160,
    concurrency: int = 4,
    kill_after: int = 40,
    down_s: float = 3.0,
    max_load_s: float = 900.0,
) -> dict:
    http_port = free_port()
    cfg = OrthoVisionConfig.model_validate(two_pool_config(http_port).model_dump())
    body, source = sample_jpeg()
    head = RayNode("head", num_cpus=2, resources={CPU_NODE_RESOURCE: POOL_CAPACITY})
    with cluster([head]):
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
            placed = replica_addresses(cfg.serve.app_name)
            print(f"replicas by node address: {placed}")
            on_model_node = {
                d: ips == {model_node.ip} for d, ips in placed.items() if d.startswith("Backbone")
            }

            client = RetryingClient(url, body, deadline=time.monotonic() + max_load_s)
            done = threading.Semaphore(0)
            events: dict[str, float] = {}

            def one(i: int) -> bool:
                ok = client.predict(i)
                done.release()
                return ok

            def chaos() -> None:
                for _ in range(kill_after):
                    done.acquire()
                events["kill"] = time.monotonic()
                model_node.kill()
                print(f"killed the model node after {kill_after} requests", flush=True)
                time.sleep(down_s)
                try:
                    model_node.restart()
                    events["restarted"] = time.monotonic()
                    tries = len(model_node.old_temp_dirs)
                    print(f"model node restarted ({tries} start attempt(s))", flush=True)
                except (RuntimeError, TimeoutError) as exc:
                    print(f"model node restart FAILED: {exc}", flush=True)

            load_t0 = time.monotonic()
            chaos_thread = threading.Thread(target=chaos, daemon=True)
            chaos_thread.start()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(requests)))
            load_s = time.monotonic() - load_t0
            chaos_thread.join(timeout=120)
            client.close()
        finally:
            model_node.stop()

    kill_t = events.get("kill")
    after = sorted(end for start, end in client.success_times if kill_t and start >= kill_t)
    recover_s = round(after[0] - kill_t, 1) if after else None
    result = {
        "requests_sent": requests,
        "succeeded": client.ok,
        "failed_attempts": client.failed_attempts,
        "lost_after_retries": client.lost,
        "time_to_recover_s": recover_s,
        "node_down_s": round(events["restarted"] - kill_t, 1) if "restarted" in events else None,
        "load_wall_s": round(load_s, 1),
        "concurrency": concurrency,
        "killed_after_requests": kill_after,
        "backbones_on_model_node": all(on_model_node.values()) and bool(on_model_node),
        "image": source,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(f"requests sent:              {requests} ({concurrency} concurrent clients)")
    print(f"failed attempts (retried):  {client.failed_attempts}")
    print(f"lost after client retries:  {client.lost}")
    print(
        f"time to recover:            {recover_s} s "
        "(kill -> first success of a request sent after the kill)"
    )
    print(f"model node down, restarted: {result['node_down_s']} s after the kill")
    print("RESULT " + json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=40, help="completed requests")
    parser.add_argument("--down-s", type=float, default=3.0, help="seconds the node stays dead")
    args = parser.parse_args()
    run(args.requests, args.concurrency, args.kill_after, args.down_s)


if __name__ == "__main__":
    main()
