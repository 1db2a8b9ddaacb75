"""Servers under test as child processes: start, wait for readiness, sample memory, stop.

Memory is sampled as the resident set size (RSS, /proc/PID/statm: a counter read, no page
walk) summed over the server's whole process tree (Ray's GCS, raylet and every replica
worker); shared library pages count once per process, so the sum overstates what the tree
needs. The proportional set size (PSS, /proc/PID/smaps_rollup) is read once, at the end of
a window: reading smaps_rollup walks the page tables under the process's mmap lock, and
doing it every second slowed a torch server tenfold (measured: naive server 0.8 -> 18 img/s
without it).
Every process ever seen in a tree is remembered and killed at stop if still alive, so a
benchmark leaves nothing behind even when Ray daemonises.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import psutil

from orthovision.client.readiness import wait_http_ok


def pss_mb(pid: int) -> float:
    """PSS of one process in MiB (RSS where smaps_rollup is unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        return 0.0


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class MemorySampler:
    """Peak of the summed PSS of a process tree, sampled every `interval_s` in a thread."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_mb = 0.0
        self.seen: dict[int, float] = {}  # pid -> create_time, to kill exactly these later
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> float:
        procs = tree(self.pid)
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass
        total = sum(rss_mb(p.pid) for p in procs)
        self.peak_mb = max(self.peak_mb, total)
        return total

    def pss_now_mb(self) -> float:
        """Summed PSS of the tree, once (costly: see the module docstring)."""
        return round(sum(pss_mb(p.pid) for p in tree(self.pid)), 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def reset_peak(self) -> None:
        self.peak_mb = 0.0

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Server:
    """A child process in its own session; `stop()` ends it and everything it started."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, log_path: Path) -> None:
        self.name, self.cmd, self.ready_url, self.log_path = name, cmd, ready_url, log_path
        self.proc: subprocess.Popen | None = None
        self.memory: MemorySampler | None = None

    def start(self, ready_timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.memory = MemorySampler(self.proc.pid).start()
        if not wait_http_ok(self.ready_url, ready_timeout_s, self.proc):
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} did not become ready; log tail:\n{tail}")

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid) if self.proc else 0.0

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.memory:
            self.memory.sample()
            self.memory.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        seen = self.memory.seen if self.memory else {}
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
