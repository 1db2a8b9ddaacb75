"""One log line per replica state, not one per retry.

Ray Serve's router (in the calling replica: the ingress) logs a warning every time it finds
a replica unreachable or dead, and it re-routes in a loop: a lost node once gave 94,424
"... is temporarily unavailable" lines in 15 minutes from one ingress (about 100 a second),
burning the CPU the live requests needed. This filter lets the first line about a replica
through, drops repeats for `interval_s`, and says how many it dropped on the next one.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

# Ray's wording (ray/serve/_private/router.py); "Replica(id=..., deployment=..., app=...)".
REPLICA_STATE = re.compile(r"(Replica\(.*?\)) (is temporarily unavailable|will not be considered)")
SERVE_LOGGER = "ray.serve"


class OncePerReplicaState(logging.Filter):
    def __init__(
        self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        match = REPLICA_STATE.search(message)
        if match is None:
            return True
        key = f"{match.group(1)} {match.group(2)}"
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        if len(self._last) > 10_000:  # replicas come and go: forget old ones
            self._last.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg, record.args = f"{message} ({dropped} repeats not logged)", ()
        return True


def install() -> None:
    """Add the filter to Serve's logger once per process (each replica calls this)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, OncePerReplicaState) for f in logger.filters):
        logger.addFilter(OncePerReplicaState())
