"""The autoscaling policy of every autoscaled deployment: scale the stage that holds the work,
and scale down only when the load would still fit with room to spare.

The signal is Ray Serve's own: ongoing (running + queued) calls per replica, averaged over
the look-back period, against the deployment's `target_ongoing_requests`. Through this
pipeline a call is a batch (serve/gather.py), and each batch sits in one stage at a time, so
the stage that is the bottleneck on this machine holds the most batches: it is the one that
scales, whatever the machine (the Preprocessor on a fast CPU, the backbones on a slow one).

Up: as Ray's default, enough replicas for the load at the target. Down (the hysteresis
Ray's default lacks, which made a backbone go 1 -> 2 -> 1 -> 2 under constant load): only to
the fewest replicas that would each run at or below `scale_down_below` of the target. A
constant load that needed n replicas never fits n - 1 that way, so the count holds; a load
that fell away for `downscale_delay_s` takes it down. Ray applies the delays and the
min/max bounds around this function (ray.serve.autoscaling_policy).

Ray pickles this module by value into the Serve controller: it imports nothing of ours.
"""

from __future__ import annotations

import math
from typing import Any

# Import path Ray loads the policy from (the class is built once with policy_kwargs).
POLICY_PATH = "serve.autoscaling:Hysteresis"


def desired_replicas(current: int, load: float, scale_down_below: float) -> int:
    """Replicas for `load` (ongoing calls over the target per replica: 2.0 fills two)."""
    if load > current:
        return math.ceil(load)
    return min(current, math.ceil(load / scale_down_below))


class Hysteresis:
    def __init__(self, scale_down_below: float = 0.5) -> None:
        if not 0 < scale_down_below < 1:
            raise ValueError("scale_down_below must be in (0, 1)")
        self.scale_down_below = scale_down_below

    def __call__(self, ctx: Any) -> tuple[int, dict]:  # ray.serve.config.AutoscalingContext
        current = ctx.current_num_replicas
        if current == 0:  # Ray's cold start path decides (a request waits for a replica)
            return ctx.target_num_replicas, {}
        load = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        return desired_replicas(current, load, self.scale_down_below), {}
