"""Backpressure at 3x capacity: only 200/429/503 come back, and accepted requests stay fast.

Measures, against a running service: the unloaded p99 (sequential requests), the capacity
(closed loop), then an open-loop arrival rate of 3x capacity for a fixed time. Prints the
status counts and the p99 of accepted requests beside the unloaded p99, and a RESULT line.
Loopback only; bounded in time and requests.

    python -m bench.backpressure --url http://127.0.0.1:8000 [--api-key KEY]
    python -m bench.backpressure --admission 2   # starts the local preset itself (port 8010)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


async def timed_post(client: httpx.AsyncClient, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/predict", content=body)
        status = r.status_code
    except httpx.HTTPError:
        status = 0  # connection-level failure: counted, never hidden
    return status, time.perf_counter() - t0


async def measure(url: str, body: bytes, headers: dict, duration_s: float, factor: float) -> dict:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        for _ in range(5):
            await timed_post(c, body)
        unloaded = [(await timed_post(c, body))[1] for _ in range(30)]

        # Capacity: closed loop at a concurrency well above what the service admits.
        stop = time.perf_counter() + duration_s / 2
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                status, _ = await timed_post(c, body)
                done += status == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(16)))
        capacity = done / (time.perf_counter() - t0)

        # Open loop at factor x capacity: arrivals do not wait for answers.
        rate = factor * capacity
        tasks, t0 = [], time.perf_counter()
        n = int(rate * duration_s)
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed_post(c, body)))
        results = await asyncio.gather(*tasks)
    statuses = Counter(s for s, _ in results)
    accepted = [lat for s, lat in results if s == 200]
    return {
        "unloaded_p50_ms": round(1000 * statistics.median(unloaded), 1),
        "unloaded_p99_ms": round(1000 * p99(unloaded), 1),
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(rate, 1),
        "requests": n,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_p99_ms": round(1000 * p99(accepted), 1) if accepted else None,
    }


def run(
    url: str, body: bytes, api_key: str | None = None, duration_s: float = 10.0, factor: float = 3.0
) -> dict:
    headers = {"X-API-Key": api_key} if api_key else {}
    return asyncio.run(measure(url, body, headers, duration_s, factor))


@contextlib.contextmanager
def local_service(admission: int, port: int = 8010):
    """The local preset with `serve.admission_max_inflight` = admission, on a private port and
    store, started and stopped here; yields its URL."""
    from bench.__main__ import serve_config, service_server

    tmp = Path(tempfile.mkdtemp(prefix="orthovision-backpressure-"))
    cfg = serve_config(argparse.Namespace(config=None, gpu=False, port=port, cpu_backend=None), tmp)
    cfg = cfg.model_copy(
        update={"serve": cfg.serve.model_copy(update={"admission_max_inflight": admission})}
    )
    server = service_server(cfg, tmp)
    server.start(ready_timeout_s=300)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def main() -> None:
    from bench.latency import sample_jpeg

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument(
        "--admission", type=int, help="start the local preset with this admission limit"
    )
    args = parser.parse_args()
    body, source = sample_jpeg()
    if args.admission:
        with local_service(args.admission) as url:
            result = run(url, body, None, args.duration_s)
        result["admission_max_inflight"] = args.admission
    else:
        result = run(args.url, body, args.api_key, args.duration_s)
    print(f"image: {source}")
    for key, value in result.items():
        print(f"{key:>18}: {value}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
