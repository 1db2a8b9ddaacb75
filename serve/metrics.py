"""Custom Prometheus metrics through ray.util.metrics (exported by each Ray node's metrics agent).

Label values are drawn from fixed sets (class names, error codes, stage and backbone
names): never request ids, file names or anything read from a DICOM header.
"""

from __future__ import annotations

from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "orthovision_requests_total",
            description="HTTP requests by tenant (ids from config: bounded), route and status.",
            tag_keys=("tenant", "route", "status"),
        )
        self.predictions = Counter(
            "orthovision_predictions_total",
            description="Predictions returned, by label (abstained ones as 'abstained').",
            tag_keys=("label",),
        )
        self.rejected = Counter(
            "orthovision_rejected_inputs_total",
            description="Inputs rejected with a 4xx, by error code.",
            tag_keys=("reason",),
        )
        self.batch_size = Histogram(
            "orthovision_backbone_batch_size",
            description="Images per model call, by backbone.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("backbone",),
        )
        self.stage_latency = Histogram(
            "orthovision_stage_latency_seconds",
            description="Latency of one stage of the request road.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("stage",),
        )
        self.explanation_queue = Gauge(
            "orthovision_explanations_pending",
            description="Explanations queued or running, seen from this ingress replica.",
        )
        self.explanation_latency = Histogram(
            "orthovision_explanation_latency_seconds",
            description="Time from queueing an explanation to its result being stored.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.explanations = Counter(
            "orthovision_explanations_total",
            description="Explanations finished, by outcome (done, failed).",
            tag_keys=("outcome",),
        )


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    """One set of metric objects per process (Ray registers each name once per worker)."""
    return Metrics()
