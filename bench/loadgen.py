"""One load generator for every server under test: closed loop at fixed concurrency, or open
loop at a fixed Poisson arrival rate.

Plain `http.client` with one keep-alive connection per worker thread: the lightest Python
client, because on a 2-core machine the client shares the CPUs with the server it measures.
Open-loop latency runs from the scheduled arrival, not the send, so a stalled server cannot
hide its queueing (no coordinated omission).

A closed-loop worker answered 503 with Retry-After waits that long before its next request,
as HTTP clients (and `orthovision bulk`) do; `honour_retry_after=False` models clients that
retry at once, the worst case for the server's rejection cost. Rejections are counted apart
from errors; latency percentiles are of accepted (200) requests only.
"""

from __future__ import annotations

import http.client
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str
    images: int = 1  # images this request classifies (a batch request holds several)


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    images: int = 0
    requests: int = 0
    errors: int = 0
    statuses: dict = field(default_factory=dict)  # every status seen, counted
    wall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ms: float, images: int, status: int) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.latencies_ms.append(ms)
                self.images += images
            else:
                self.errors += 1

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rejected": self.statuses.get(503, 0),  # the service shed them
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "img_per_s": round(self.images / self.wall_s, 2) if self.wall_s else 0.0,
            "req_per_s": round(len(lat) / self.wall_s, 2) if self.wall_s else 0.0,
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p95_ms": round(percentile(lat, 0.95), 1) if lat else None,
            "p99_ms": round(percentile(lat, 0.99), 1) if lat else None,
            "wall_s": round(self.wall_s, 1),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


class _Client:
    """One keep-alive connection per thread; reconnects after a server-side close."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self.local.conn = conn
        return conn

    def post(self, path: str, body: Body) -> tuple[int, float]:
        """(status, Retry-After seconds or 0); 599 when the connection failed twice."""
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request("POST", path, body.data, {"Content-Type": body.content_type})
                resp = conn.getresponse()
                resp.read()
                return resp.status, _seconds(resp.getheader("Retry-After"))
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    return 599, 0.0
        return 599, 0.0


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def closed_loop(
    url: str,
    path: str,
    bodies: Sequence[Body],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 2.0,
    max_requests: int | None = None,
    timeout_s: float = 120.0,
    cpu_probe: Callable[[], float] | None = None,
    honour_retry_after: bool = True,
) -> dict:
    """`concurrency` workers each send the next body as soon as the last answer came back.

    `cpu_probe`: CPU seconds used so far by the server under test; with it the result also
    holds `img_per_cpu_s`, which other processes on a shared machine cannot move much."""
    client = _Client(url, timeout_s)
    run = Run()
    counter = iter(range(1 << 62))
    lock = threading.Lock()
    start = time.perf_counter() + warmup_s
    stop = start + duration_s

    def worker(_: int) -> None:
        while True:
            with lock:
                i = next(counter)
            now = time.perf_counter()
            if now >= stop or (max_requests is not None and run.requests >= max_requests):
                return
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            status, retry_after = client.post(path, body)
            t1 = time.perf_counter()
            if t0 >= start:  # requests sent during warm-up are not counted
                run.add((t1 - t0) * 1000, body.images, status)
            if honour_retry_after and status == 503 and retry_after:
                time.sleep(min(retry_after, max(0.0, stop - time.perf_counter())))

    cpu_at_start: list[float] = []
    timer = None
    if cpu_probe is not None:
        timer = threading.Timer(
            max(0.0, start - time.perf_counter()), lambda: cpu_at_start.append(cpu_probe())
        )
        timer.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    # Every request sent in the window is counted, so the window closes with the last answer.
    run.wall_s = max(1e-9, time.perf_counter() - start)
    out = run.summary()
    out["concurrency"] = concurrency
    if timer is not None:
        timer.join()
        cpu_s = cpu_probe() - cpu_at_start[0]
        out["server_cpu_s"] = round(cpu_s, 2)
        out["img_per_cpu_s"] = round(run.images / cpu_s, 3) if cpu_s > 0 else None
    return out


def open_loop(
    url: str,
    path: str,
    bodies: Sequence[Body],
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    max_in_flight: int = 64,
    timeout_s: float = 120.0,
) -> dict:
    """Poisson arrivals at `rate_per_s` requests per second for `duration_s`."""
    client = _Client(url, timeout_s)
    run = Run()
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            break
        arrivals.append(t)

    def send(args: tuple[float, Body]) -> None:
        due, body = args
        status, _ = client.post(path, body)
        run.add((time.perf_counter() - due) * 1000, body.images, status)

    start = time.perf_counter() + 0.5
    with ThreadPoolExecutor(max_in_flight) as pool:
        for i, offset in enumerate(arrivals):
            due = start + offset
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, (due, bodies[i % len(bodies)]))
    run.wall_s = max(1e-9, time.perf_counter() - start)
    out = run.summary()
    out["offered_req_per_s"] = round(rate_per_s, 2)
    return out
