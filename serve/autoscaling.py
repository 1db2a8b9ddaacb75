"""The autoscaling policy of every autoscaled deployment: scale the stage that is the
bottleneck, and scale down only when the load would still fit with room to spare.

The signal. A pipeline stage (Preprocessor, Backbones) reports how busy its replicas are:
seconds of work per second (serve/busy.py, through Ray Serve's `record_autoscaling_stats`,
averaged over the look-back period). The stage that works all the time is the bottleneck on
this machine and the one that scales: the Preprocessor on a fast CPU with full-size
radiographs, the backbones on a slow one. Ray's own signal, ongoing calls per replica, also
counts calls that only wait (measured with `python -m bench.autoscale` on the 2-vCPU AMD
EPYC box: the Preprocessor scaled first on it while busy 23% of its time, ResNet-18 85%;
docs/CHANGELOG.md); it remains the signal of the deployments that report no busy time
(ingress, Fusion, Explainer).

Up: enough replicas for the load at the target (`target_busy` of each replica's time, or
`target_ongoing_requests`). Down, the hysteresis Ray's default lacks (a backbone went
1 -> 2 -> 1 -> 2 under a constant load with it): only to the fewest replicas that would each
run at or below `scale_down_below` of the target. A constant load that needed n replicas
never fits n - 1 that way, so the count holds; a load that fell away for
`downscale_delay_s` takes it down. Ray applies the delays and the min/max bounds around this
function (ray.serve.autoscaling_policy).

Ray pickles this module by value into the Serve controller: it imports nothing of ours.
"""

from __future__ import annotations

import math
from typing import Any

# Import path Ray loads the policy from (the class is built once with policy_kwargs).
POLICY_PATH = "serve.autoscaling:Hysteresis"
# The custom autoscaling stat a pipeline stage reports (serve/busy.py).
BUSY_STAT = "busy"


def desired_replicas(current: int, load: float, scale_down_below: float) -> int:
    """Replicas for `load` (ongoing calls over the target per replica: 2.0 fills two)."""
    if load > current:
        return math.ceil(load)
    return min(current, math.ceil(load / scale_down_below))


class Hysteresis:
    def __init__(self, scale_down_below: float = 0.5, target_busy: float = 0.7) -> None:
        if not 0 < scale_down_below < 1:
            raise ValueError("scale_down_below must be in (0, 1)")
        if not 0 < target_busy <= 1:
            raise ValueError("target_busy must be in (0, 1]")
        self.scale_down_below, self.target_busy = scale_down_below, target_busy

    def __call__(self, ctx: Any) -> tuple[int, dict]:  # ray.serve.config.AutoscalingContext
        current = ctx.current_num_replicas
        if current == 0:  # Ray's cold start path decides (a request waits for a replica)
            return ctx.target_num_replicas, {}
        busy = (ctx.aggregated_metrics or {}).get(BUSY_STAT)
        if busy:  # seconds of work per second, summed over the running replicas
            load = sum(busy.values()) / self.target_busy
        else:
            load = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        return desired_replicas(current, load, self.scale_down_below), {}
