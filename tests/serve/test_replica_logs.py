"""Ray's per-retry warnings about an unreachable replica: one line per replica a minute."""

from __future__ import annotations

import logging

from serve.replica_logs import OncePerReplicaState

UNAVAILABLE = "Replica(id='{}', deployment='Fusion', app='orthovision') is temporarily unavailable."


def records(messages: list[str]) -> list[logging.LogRecord]:
    return [
        logging.LogRecord("ray.serve", logging.WARNING, __file__, 1, m, (), None) for m in messages
    ]


def test_repeats_are_dropped_and_counted_per_replica() -> None:
    now = [0.0]
    quiet = OncePerReplicaState(interval_s=60, clock=lambda: now[0])
    kept = [r for r in records([UNAVAILABLE.format("a")] * 1000) if quiet.filter(r)]
    assert len(kept) == 1
    assert quiet.filter(records([UNAVAILABLE.format("b")])[0])  # another replica: its own line
    now[0] = 61.0
    later = records([UNAVAILABLE.format("a")])[0]
    assert quiet.filter(later)
    assert "999 repeats not logged" in later.getMessage()


def test_other_lines_pass() -> None:
    quiet = OncePerReplicaState()
    assert all(quiet.filter(r) for r in records(["POST /v1/predict 200"] * 5))
