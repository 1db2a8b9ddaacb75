"""A real Ray cluster of `ray start` nodes on loopback, for the scale-out scripts.

Each node gets its own temp dir and its own ports, so the cluster never touches another Ray
on this machine, and `stop()`/`kill()` end exactly this node's processes (found by its temp
dir in their command line, and by the session of its `ray start --block`): never `ray stop`,
which would end every Ray on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from orthovision.config import OrthoVisionConfig

RAY = str(Path(sys.executable).parent / "ray")
# 127.0.0.1 is rewritten by Ray to the host's routable address; other 127/8 addresses are not,
# so the whole cluster stays on loopback (and each node gets an address of its own).
LOOPBACK = "127.0.0.2"


AUTH_TOKEN = secrets.token_hex(32)  # this driver's clusters only


def private_store_url(name: str) -> str:
    """A result store of this run in a directory of its own: the SQLite store refuses a
    directory others can write to, such as /tmp itself."""
    return f"sqlite:///tmp/orthovision-{name}-{os.getpid()}/store.sqlite3"


def serve_log_lines(node: RayNode, deployments: tuple[str, ...], needle: str) -> int:
    """Lines containing `needle` in the Serve logs of the node's replicas of `deployments`."""
    logs = Path(node.temp_dir) / "session_latest" / "logs" / "serve"
    count = 0
    for name in deployments:
        for path in logs.glob(f"replica_*_{name}_*.log"):
            with path.open(errors="replace") as lines:
                count += sum(needle in line for line in lines)
    return count


@contextlib.contextmanager
def cpu_burners(count: int) -> Iterator[None]:
    """`count` processes spinning on a core each, at normal priority, for the block: a
    loaded machine, to show a result is not timing luck. Always stopped."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # free on every address: some Ray ports bind all of them
        return s.getsockname()[1]


def _proc_matches(pid: int, needle: str, sid: int | None) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 6 of /proc/PID/stat is the session id (fields after the ")" of the command name).
    session = int(stat.rsplit(")", 1)[1].split()[3])
    return needle in cmdline or (sid is not None and session == sid)


@dataclass
class RayNode:
    """One `ray start --block` node: the head when `gcs_address` is None."""

    name: str
    num_cpus: float
    ip: str = LOOPBACK
    resources: dict[str, float] = field(default_factory=dict)
    gcs_address: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Unix socket paths must stay under 108 bytes: a short dir directly under /tmp.
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ovr-", dir="/tmp"))
    gcs_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)  # Prometheus text at /metrics
    proc: subprocess.Popen | None = None
    old_temp_dirs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.gcs_address or f"{self.ip}:{self.gcs_port}"

    def start(self, timeout_s: float = 120) -> RayNode:
        cmd = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={self.ip}",
            f"--num-cpus={self.num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=200000000",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={self.metrics_port}",
        ]
        if self.gcs_address is None:
            cmd += [
                "--head",
                f"--port={self.gcs_port}",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",  # its API server still starts
            ]
        else:
            cmd += [f"--address={self.gcs_address}"]
        log = open(Path(self.temp_dir) / "ray-start.log", "ab")  # closed when the process ends
        env = {**os.environ, **self.env, "RAY_ADDRESS": ""}
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: ray start exited; see {log.name}")
            if (Path(self.temp_dir) / "ray_current_cluster").exists() and self._raylet_up():
                return self
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: not up within {timeout_s:.0f} s; see {log.name}")

    def _raylet_up(self) -> bool:
        return any("raylet" in p for p in self._processes(names=True))

    def _processes(self, names: bool = False) -> list:
        sid = self.proc.pid if self.proc is not None else None
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                pid = int(entry.name)
                if _proc_matches(pid, self.temp_dir, sid):
                    if names:
                        with contextlib.suppress(OSError):
                            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode())
                    else:
                        found.append(pid)
        return found

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
        """Kill every process of this node (raylet, agents, workers): a node failure."""
        deadline = time.monotonic() + timeout_s
        while (pids := self._processes()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            time.sleep(0.2)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def restart(self, attempts: int = 4) -> RayNode:
        """Start again as a fresh node (a new pod): new temp dir, same address and resources.

        Retried like a pod in CrashLoopBackOff: on a saturated CPU a raylet can miss Ray's
        fixed 30 s registration deadline, and a second try then usually succeeds.
        """
        for _ in range(attempts - 1):
            self._fresh_temp_dir()
            try:
                return self.start()
            except (RuntimeError, TimeoutError):
                self.kill()  # what the failed try left behind
        self._fresh_temp_dir()
        return self.start()

    def _fresh_temp_dir(self) -> None:
        self.old_temp_dirs.append(self.temp_dir)
        self.temp_dir = tempfile.mkdtemp(prefix="ovr-", dir="/tmp")
        self.proc = None

    def stop(self) -> None:
        """Polite stop (SIGTERM), then SIGKILL whatever is left; remove the temp dirs."""
        self.kill(signal.SIGTERM, timeout_s=10)
        self.kill(signal.SIGKILL, timeout_s=10)
        for path in [*self.old_temp_dirs, self.temp_dir]:
            shutil.rmtree(path, ignore_errors=True)


def deploy(cfg: OrthoVisionConfig, address: str, ready_timeout_s: float = 240) -> str:
    """Connect this process to the cluster, run the app, wait for /readyz; return its URL."""
    import ray
    from ray import serve

    from serve.app import AppArgs, build_app
    from serve.run import wait_ready

    ray.init(
        address=address,
        _node_ip_address=address.rsplit(":", 1)[0],  # the head's loopback address
        configure_logging=False,
        log_to_driver=False,
    )
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(
        build_app(AppArgs(config=cfg)), name=cfg.serve.app_name, route_prefix="/", blocking=False
    )
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    if not wait_ready(url, ready_timeout_s):
        raise TimeoutError(f"app not ready at {url} within {ready_timeout_s:.0f} s")
    return url


def disconnect() -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return  # serve.shutdown() would start a local Ray just to find nothing
    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def _reload_ray_auth() -> None:
    """Make this process re-read RAY_AUTH_MODE / RAY_AUTH_TOKEN: Ray caches both at import
    (a pytest session imports Ray long before a cluster of ours exists)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def cluster(nodes: list[RayNode]) -> Iterator[list[RayNode]]:
    """Start the nodes in order (head first); always stop them, in reverse.

    Every node and this driver share one fresh token (Ray's token authentication): a node
    never falls back to a token file another Ray on the machine left in ~/.ray.
    """
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": AUTH_TOKEN}
    saved = {k: os.environ.get(k) for k in (*auth, "RAY_ADDRESS")}
    os.environ.update(auth)
    os.environ.pop("RAY_ADDRESS", None)
    _reload_ray_auth()
    started: list[RayNode] = []
    try:
        for node in nodes:
            started.append(node.start())
        yield started
    finally:
        disconnect()
        for node in reversed(started):
            node.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_ray_auth()


def replica_counts(app_name: str, names: list[str]) -> dict[str, int]:
    """RUNNING replicas per deployment, from serve.status()."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {n: 0 for n in names}
    return {
        n: int(app.deployments[n].replica_states.get("RUNNING", 0)) if n in app.deployments else 0
        for n in names
    }


@dataclass
class RetryingClient:
    """POST with retries and capped exponential backoff: what a well-behaved client does.

    Counts every failed attempt (connection errors, 5xx, 429) and the requests that still
    failed when their retry budget ran out ("lost").
    """

    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    budget_s: float = 180.0
    # Absolute time.monotonic() after which nothing is retried: the whole run stays bounded.
    deadline: float = float("inf")
    first_backoff_s: float = 0.2
    max_backoff_s: float = 4.0
    requests: int = 0
    failed_attempts: int = 0
    lost: int = 0
    ok: int = 0
    server_errors: int = 0  # HTTP 500: the service's bug, never a client's (retried anyway)
    timeouts: int = 0  # no answer within the client's 60 s: a hang
    success_times: list[tuple[float, float]] = field(default_factory=list)  # (start, end)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            timeout=60, headers=self.headers, limits=httpx.Limits(max_connections=64)
        )
        self._lock = threading.Lock()

    def _count(self, name: str, span: tuple[float, float] | None = None) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
            if span is not None:
                self.success_times.append(span)

    def predict(self) -> bool:
        """One request, retried until it succeeds or its budget runs out."""
        self._count("requests")
        started = time.monotonic()
        backoff = self.first_backoff_s
        while True:
            try:
                r = self.client.post(self.url + "/v1/predict", content=self.body)
                if r.status_code == 200:
                    self._count("ok", (started, time.monotonic()))
                    return True
                if r.status_code < 500 and r.status_code != 429:
                    self._count("lost")  # a 4xx is a client bug: retrying cannot fix it
                    return False
                if r.status_code == 500:
                    self._count("server_errors")
            except httpx.TimeoutException:
                self._count("timeouts")
            except httpx.HTTPError:
                pass
            self._count("failed_attempts")
            now = time.monotonic()
            if now - started + backoff > self.budget_s or now + backoff > self.deadline:
                self._count("lost")
                return False
            time.sleep(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)

    def rate(self, start: float, end: float) -> float:
        """Successes per second that ended within [start, end) (time.monotonic)."""
        with self._lock:
            n = sum(start <= done < end for _, done in self.success_times)
        return n / (end - start) if end > start else 0.0

    def first_success_sent_after(self, t: float) -> float | None:
        """Seconds from `t` to the first success of a request sent at or after `t`."""
        with self._lock:
            ends = [done for sent, done in self.success_times if sent >= t]
        return round(min(ends) - t, 1) if ends else None

    def load(self, stop: threading.Event, on_answer: Callable[[], None] = lambda: None) -> None:
        """One closed-loop client: request after request until `stop` or the deadline."""
        while not stop.is_set() and time.monotonic() < self.deadline:
            self.predict()
            on_answer()

    def load_during(self, chaos: Callable[[threading.Event], None], concurrency: int) -> None:
        """Closed-loop load from `concurrency` clients while `chaos(stop)` runs beside it
        (it may wait on `stop`); the load stops when `chaos` returns."""
        stop = threading.Event()

        def chaos_then_stop() -> None:
            try:
                chaos(stop)
            finally:
                stop.set()

        beside = threading.Thread(target=chaos_then_stop, daemon=True)
        beside.start()
        with ThreadPoolExecutor(concurrency) as pool:
            for _ in range(concurrency):
                pool.submit(self.load, stop)
        beside.join(timeout=60)

    def close(self) -> None:
        self.client.close()
