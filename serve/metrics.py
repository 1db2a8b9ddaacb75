"""Custom Prometheus metrics through ray.util.metrics (exported by each Ray node's metrics agent).

Label values are drawn from fixed sets (class names, error codes, stage and backbone
names): never request ids, file names or anything read from a DICOM header.
"""

from __future__ import annotations

from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram

OOD_SCORE_BOUNDARIES = [0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 8, 13, 21, 34]
PROBABILITY_BOUNDARIES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
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
        self.replica_failures = Counter(
            "orthovision_replica_failures_total",
            description="Batches whose replica died or went unreachable mid-call, by what "
            "happened next (retried; unavailable: answered 503 at the request's deadline).",
            tag_keys=("outcome",),
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
        # Drift telemetry per tenant (ids from config, or "local"): what the model sees and
        # says, against the validation baselines in the model card (alerts in k8s/).
        self.results = Counter(
            "orthovision_results_total",
            description="Classified images by tenant and label ('abstained' when it abstained).",
            tag_keys=("tenant", "label"),
        )
        self.abstentions = Counter(
            "orthovision_abstentions_total",
            description="Abstentions by tenant and reason code (out_of_scope, "
            "out_of_distribution, unvalidated_class, low_confidence).",
            tag_keys=("tenant", "reason"),
        )
        self.quality_findings = Counter(
            "orthovision_quality_findings_total",
            description="Quality findings on classified images by tenant and check.",
            tag_keys=("tenant", "check"),
        )
        self.ood_score = Histogram(
            "orthovision_ood_score",
            description="Feature-space OOD score of classified images, by tenant.",
            boundaries=OOD_SCORE_BOUNDARIES,
            tag_keys=("tenant",),
        )
        self.top_probability = Histogram(
            "orthovision_top_probability",
            description="Highest fused probability of classified images, by tenant.",
            boundaries=PROBABILITY_BOUNDARIES,
            tag_keys=("tenant",),
        )

    def observe_result(self, tenant: str, result: dict) -> None:
        """One classified image's drift figures (labels: fixed sets only, never its data)."""
        tags = {"tenant": tenant}
        self.results.inc(tags={**tags, "label": result.get("label") or "abstained"})
        if result.get("abstained"):
            code = result.get("abstain_code") or "unknown"
            self.abstentions.inc(tags={**tags, "reason": code})
        for finding in (result.get("quality") or {}).get("findings", []):
            self.quality_findings.inc(tags={**tags, "check": finding["check"]})
        if result.get("ood_score") is not None:
            self.ood_score.observe(float(result["ood_score"]), tags=tags)
        probabilities = result.get("probabilities") or {}
        if probabilities:
            self.top_probability.observe(max(probabilities.values()), tags=tags)


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    """One set of metric objects per process (Ray registers each name once per worker)."""
    return Metrics()
