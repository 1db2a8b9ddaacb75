"""Waiting for a service to answer: one poll loop for `orthovision serve`, the benchmark
harness and the tests."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
    """True once GET `url` answers 200; False at the deadline or when `proc` (the server
    being waited for, if given) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False
