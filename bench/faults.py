"""Faults under load, against a live app whose Ray driver is this process.

`kill_under_load`: retrying clients (bench.raycluster.RetryingClient: backoff on 429/503/
5xx/connection errors) load the app while one replica of a deployment (a Backbone, Fusion)
is SIGKILLed; reports requests sent, failed attempts, requests lost after retries, HTTP 500s,
the time to the first success after the kill, seconds until a replacement replica is
serving, and the throughput before the kill against the window after the replacement.
`kill_explainer_with_pending`: queues explanations, SIGKILLs the Explainer
and waits until each is done or failed (never pending forever). Loopback only, bounded.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from bench.raycluster import RetryingClient


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


def kill_under_load(
    url: str,
    body: bytes,
    headers: dict,
    deployment: str,
    concurrency: int = 4,
    before_s: float = 8.0,
    window_s: float = 10.0,
    cap_s: float = 120.0,
) -> dict:
    """Closed-loop load from `concurrency` retrying clients; one replica of `deployment`
    is SIGKILLed `before_s` into it; the load runs on for `window_s` after its replacement
    is RUNNING. Throughput is measured before the kill (after a 2 s warm-up) and in that
    window."""
    victims = replica_pids(deployment)
    if not victims:
        raise RuntimeError(f"no replica process found for {deployment}")
    t0 = time.monotonic()
    client = RetryingClient(url, body, headers, budget_s=90, deadline=t0 + cap_s)
    events: dict[str, float] = {}

    def chaos(_stop: threading.Event) -> None:
        time.sleep(before_s)
        os.kill(victims[0], signal.SIGKILL)
        events["kill"] = time.monotonic()
        while time.monotonic() < client.deadline:
            pids = replica_pids(deployment)
            if pids and victims[0] not in pids and running_replicas(deployment) >= 1:
                events["replaced"] = time.monotonic()
                time.sleep(window_s)
                return
            time.sleep(0.5)

    client.load_during(chaos, concurrency)
    client.close()
    kill, replaced = events.get("kill"), events.get("replaced")
    before = client.rate(t0 + 2.0, kill) if kill else 0.0
    after = client.rate(replaced, replaced + window_s) if replaced else 0.0
    return {
        "deployment": deployment,
        "requests_sent": client.requests,
        "failed_attempts": client.failed_attempts,
        "lost_after_retries": client.lost,
        "http_500": client.server_errors,
        "client_timeouts": client.timeouts,
        "first_success_after_kill_s": client.first_success_sent_after(kill) if kill else None,
        "replacement_ready_s": round(replaced - kill, 1) if kill and replaced else None,
        "throughput_before_per_s": round(before, 2),
        "throughput_after_per_s": round(after, 2),
        "throughput_ratio": round(after / before, 3) if before else None,
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
        settled_s = round(time.monotonic() - killed, 1)
        # Recovery, not only "nothing pending": an explanation asked for now gets done.
        fresh = queue(0)
        fresh_state = "pending"
        while fresh_state == "pending" and time.monotonic() - killed < 2 * wait_s:
            time.sleep(1.0)
            fresh_state = client.get(f"/v1/explanations/{fresh}").json()["state"]
    return {
        "explanations": n,
        "pending_at_kill": pending_at_kill,
        "done": sum(s == "done" for s in states.values()),
        "failed": sum(s == "failed" for s in states.values()),
        "still_pending": sum(s == "pending" for s in states.values()),
        "settled_after_s": settled_s,
        "explanation_after_recovery": fresh_state,
        "explanation_after_recovery_s": round(time.monotonic() - killed, 1),
    }
