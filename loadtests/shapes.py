"""Load shapes for the locustfile, picked with LOAD_SHAPE=step|spike (none: -u/-r/-t flags).

Both fit the 60 s of `make loadtest`; their sizes come from the environment so a bigger
machine can push harder without editing code.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class StepRamp(LoadTestShape):
    """STEPS steps of STEP_USERS more users each, STEP_S seconds per step, then stop.

    Default 4 steps of 4 users, 15 s each: 4, 8, 12, 16 users over 60 s; the step where
    p99 bends upwards is the knee of the latency curve.
    """

    def __init__(self) -> None:
        super().__init__()
        self.step_users = _env_int("STEP_USERS", 4)
        self.step_s = _env_int("STEP_S", 15)
        self.steps = _env_int("STEPS", 4)

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t >= self.step_s * self.steps:
            return None
        users = self.step_users * (int(t // self.step_s) + 1)
        return users, float(self.step_users)  # reach each step within a second


class Spike(LoadTestShape):
    """BASE_USERS for 20 s, a burst to SPIKE_USERS for 10 s, back to BASE_USERS for 30 s.

    Checks that a burst is absorbed (503 + Retry-After at worst, never a 5xx of another kind)
    and that latency comes back down after it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.base = _env_int("BASE_USERS", 4)
        self.spike = _env_int("SPIKE_USERS", 32)
        self.stages = [(20, self.base), (30, self.spike), (60, self.base)]

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        for end_s, users in self.stages:
            if t < end_s:
                return users, float(self.spike)  # a spike arrives at once
        return None
