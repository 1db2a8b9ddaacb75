"""How busy a replica is: seconds of work per second of wall time.

The pipeline's CPU stages (Preprocessor, Backbones) report it to Ray Serve through
`record_autoscaling_stats`, and the autoscaling policy scales them on it
(serve/autoscaling.py): a stage that works all the time is the bottleneck, whatever the
machine, while a count of ongoing calls also counts calls that only wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from serve.autoscaling import BUSY_STAT


class BusyMeter:
    """The integral of work in progress over time (two calls at once count twice)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock, self._lock = clock, threading.Lock()
        self._active, self._integral = 0, 0.0
        self._last = self._since = clock()

    def _advance(self, now: float) -> None:
        self._integral += self._active * (now - self._last)
        self._last = now

    @contextmanager
    def working(self) -> Iterator[None]:
        with self._lock:
            self._advance(self._clock())
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._advance(self._clock())
                self._active -= 1

    def take(self) -> float:
        """Seconds of work per second since the last take (work in progress counted)."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            span = now - self._since
            busy = self._integral / span if span > 0 else 0.0
            self._integral, self._since = 0.0, now
            return busy

    def stats(self) -> dict[str, float]:
        """What `record_autoscaling_stats` returns."""
        return {BUSY_STAT: self.take()}
