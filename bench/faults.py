"""Faults under load, against a live app whose Ray driver is this process.

`kill_backbone_under_load`: a retrying client (exponential backoff with jitter on 429/503/
5xx/connection errors) sends N requests while one Backbone replica is SIGKILLed; reports
requests sent, failed attempts, requests lost after retries, and seconds until a replacement
replica is serving. `kill_explainer_with_pending`: queues explanations, SIGKILLs the Explainer
and waits until each is done or failed (never pending forever). Loopback only, bounded.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil


def own_processes() -> list[psutil.Process]:
    """Processes of the Ray node this driver started: its raylet and all descendants, so
    other Ray instances on the same machine are never touched."""
    import ray

    node = ray._private.worker._global_node  # the driver's own node; no public handle exists
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def replica_pids(deployment: str, app: str = "orthovision") -> list[int]:
    """PIDs of a deployment's replica processes (Ray titles them ServeReplica:app:name)."""
    tag = f"ServeReplica:{app}:{deployment}"
    pids = []
    for proc in own_processes():
        try:
            if tag in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def running_replicas(deployment: str, app: str = "orthovision") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def post_retrying(client: httpx.Client, body: bytes, attempts: int = 10) -> tuple[bool, int]:
    """(succeeded, failed attempts) with exponential backoff and full jitter."""
    failures = 0
    for attempt in range(attempts):
        try:
            r = client.post("/v1/predict", content=body)
            if r.status_code == 200:
                return True, failures
            if r.status_code < 500 and r.status_code != 429:
                return False, failures + 1  # a client error will not heal by retrying
        except httpx.HTTPError:
            pass
        failures += 1
        time.sleep(random.uniform(0, min(5.0, 0.2 * 2**attempt)))
    return False, failures


def kill_backbone_under_load(
    url: str,
    body: bytes,
    headers: dict,
    requests: int = 60,
    concurrency: int = 4,
    deployment: str = "Backbone_resnet18",
) -> dict:
    victims = replica_pids(deployment)
    if not victims:
        raise RuntimeError(f"no replica process found for {deployment}")
    killed_at: list[float] = []

    def killer() -> None:
        time.sleep(2.0)
        os.kill(victims[0], signal.SIGKILL)
        killed_at.append(time.monotonic())

    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        threading.Thread(target=killer, daemon=True).start()
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(lambda _: post_retrying(client, body), range(requests)))
    deadline = time.monotonic() + 120
    recovered_s = None
    while time.monotonic() < deadline:
        pids = replica_pids(deployment)
        if pids and victims[0] not in pids and running_replicas(deployment) >= 1:
            recovered_s = round(time.monotonic() - killed_at[0], 1)
            break
        time.sleep(0.5)
    return {
        "deployment": deployment,
        "requests_sent": requests,
        "failed_attempts": sum(f for _, f in outcomes),
        "lost_after_retries": sum(not ok for ok, _ in outcomes),
        "replacement_ready_s": recovered_s,
    }


def kill_explainer_with_pending(
    url: str, body: bytes, headers: dict, n: int = 6, wait_s: float = 300
) -> dict:
    """Queue n explanations at once (the Explainer runs one at a time, so most wait), SIGKILL
    the Explainer, then wait until every one is done or failed."""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:

        def queue(_: int) -> str:
            for attempt in range(8):
                r = client.post("/v1/predict?explain=true", content=body)
                if r.status_code == 200:
                    return r.json()["request_id"]
                time.sleep(0.2 * 2**attempt)
            raise RuntimeError(f"could not queue an explanation: {r.status_code}")

        with ThreadPoolExecutor(n) as pool:
            ids = list(pool.map(queue, range(n)))
        for pid in replica_pids("Explainer"):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        pending_at_kill = sum(
            client.get(f"/v1/explanations/{i}").json()["state"] == "pending" for i in ids
        )
        states: dict[str, str] = {}
        while time.monotonic() - killed < wait_s:
            states = {i: client.get(f"/v1/explanations/{i}").json()["state"] for i in ids}
            if "pending" not in states.values():
                break
            time.sleep(1.0)
    return {
        "explanations": n,
        "pending_at_kill": pending_at_kill,
        "done": sum(s == "done" for s in states.values()),
        "failed": sum(s == "failed" for s in states.values()),
        "still_pending": sum(s == "pending" for s in states.values()),
        "settled_after_s": round(time.monotonic() - killed, 1),
    }
