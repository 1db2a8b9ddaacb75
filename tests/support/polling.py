"""Polling from Python for a condition another thread or process makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    predicate: Callable[[], bool], timeout_s: float = 30.0, interval_s: float = 0.05
) -> bool:
    """True as soon as `predicate()` is; False if it is still false after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
