"""Monitoring manifests: Prometheus alert and drift rules, the PodMonitor and the Grafana
dashboard.
"""

from __future__ import annotations

import json
import math

from orthovision.config import OrthoVisionConfig
from orthovision.paths import project_path
from serve.manifests.cluster import APP_LABEL, ClusterSpec, deployment_configs


def metric_selector(cfg: OrthoVisionConfig, **labels: str) -> str:
    """A PromQL label selector for this application; a value starting with ~ is a regex."""
    items = {"application": cfg.serve.app_name, **labels}
    parts = [f'{k}=~"{v[1:]}"' if v.startswith("~") else f'{k}="{v}"' for k, v in items.items()]
    return "{" + ",".join(parts) + "}"


def alert_rules(cfg: OrthoVisionConfig, spec: ClusterSpec) -> list[dict]:
    """SLO alerts; per-deployment thresholds come from the deployments' limits."""
    app = metric_selector(cfg)
    errors = metric_selector(cfg, status_code="~5..")
    rules = [
        {
            "alert": "OrthoVisionErrorRatioHigh",
            "expr": (
                f"sum(rate(ray_serve_num_http_requests_total{errors}[5m])) / "
                f"sum(rate(ray_serve_num_http_requests_total{app}[5m])) > {spec.slo_error_ratio}"
            ),
            "for": "5m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": f"More than {spec.slo_error_ratio:.0%} of requests end in a 5xx",
                "runbook": "docs/OPERATIONS.md#overload",
            },
        },
        {
            "alert": "OrthoVisionP99LatencyHigh",
            "expr": (
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(ray_serve_http_request_latency_ms_bucket{app}[5m]))) "
                f"> {spec.slo_p99_latency_ms:g}"
            ),
            "for": "10m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": f"p99 request latency above {spec.slo_p99_latency_ms:g} ms",
                "runbook": "docs/OPERATIONS.md#overload",
            },
        },
        {
            "alert": "OrthoVisionReplicaCrashLoop",
            "expr": (
                "sum by (deployment) "
                f"(increase(ray_serve_deployment_replica_starts_total{app}[15m])) > 3"
            ),
            "for": "0m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": "{{ $labels.deployment }} started more than 3 replicas in 15 min",
                "runbook": "docs/OPERATIONS.md#replica-crash-loop",
            },
        },
        {
            # Requests answered 503 because no replica answered by their deadline: a lost
            # node that is not coming back, or replicas that cannot start (serve/classify.py).
            "alert": "OrthoVisionReplicasUnavailable",
            "expr": (
                'sum(rate(ray_orthovision_replica_failures_total{outcome="unavailable"}[5m])) > 0'
            ),
            "for": "5m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": "requests answered 503: no model replica answered in time for 5 min",
                "runbook": "docs/OPERATIONS.md#node-lost",
            },
        },
    ]
    for name, d in deployment_configs(cfg).items():
        limit = math.ceil(spec.queue_alert_fraction * d.max_queued_requests)
        if d.max_queued_requests > 0:
            rules.append(
                {
                    "alert": "OrthoVisionQueueDepthHigh",
                    "expr": "max(ray_serve_deployment_queued_queries"
                    f"{metric_selector(cfg, deployment=name)}) > {limit}",
                    "for": "5m",
                    "labels": {"severity": "warning", "deployment": name},
                    "annotations": {
                        "summary": f"{name}: a caller queues more than {limit} of "
                        f"{d.max_queued_requests} requests; 503s follow at the limit",
                        "runbook": "docs/OPERATIONS.md#overload",
                    },
                }
            )
        if d.autoscaled:
            rules.append(
                {
                    "alert": "OrthoVisionReplicasPinnedAtMax",
                    "expr": f"sum(ray_serve_deployment_replica_healthy"
                    f"{metric_selector(cfg, deployment=name)}) >= {d.max_replicas}",
                    "for": "15m",
                    "labels": {"severity": "warning", "deployment": name},
                    "annotations": {
                        "summary": f"{name} has run at max_replicas={d.max_replicas} for 15 min",
                        "runbook": "docs/OPERATIONS.md#overload",
                    },
                }
            )
    return rules + dicom_node_rules(cfg) + drift_rules(spec.drift_baseline)


OUTBOX_STALLED_S = 900  # a PACS down this long is an incident, not a blip


def dicom_node_rules(cfg: OrthoVisionConfig) -> list[dict]:
    """The DICOM node's outbox (results a PACS has not confirmed) and inbox (instances held)."""
    held = cfg.serve.dicom_node.max_in_flight
    full = math.ceil(0.9 * held)
    return [
        {
            "alert": "OrthoVisionDicomOutboxStalled",
            "expr": f"max(orthovision_dicom_outbox_oldest_age_seconds) > {OUTBOX_STALLED_S}",
            "for": "5m",
            "labels": {"severity": "page"},
            "annotations": {
                "summary": f"a result has waited over {OUTBOX_STALLED_S // 60} min for its "
                "PACS to confirm it (nothing is lost: the outbox keeps retrying)",
                "runbook": "docs/OPERATIONS.md#dicom-node",
            },
        },
        {
            "alert": "OrthoVisionDicomInboxFull",
            "expr": f"max(orthovision_dicom_inbox_instances) >= {full}",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"the DICOM node holds {full}+ of its {held} instances in flight: "
                "PACS pushes get 0xA700 and retry",
                "runbook": "docs/OPERATIONS.md#dicom-node",
            },
        },
    ]


DRIFT_FLOOR = 0.001  # a label never seen in a window counts as 0.1% (PSI needs no zeros)


def drift_rules(baseline: dict | None) -> list[dict]:
    """Per-tenant drift alerts against the checkpoint card's validation baseline: abstention
    and OOD rates several times the baseline for 30 min; the label mix shifted by a
    population stability index above 0.2 over a day."""
    if not baseline:
        return []
    rate = "sum by (tenant) (rate(ray_orthovision_{}[30m]))"
    results = rate.format("results_total")
    abstain = max(3 * baseline["abstain_rate"], 0.05)
    ood = max(3 * baseline["ood_abstain_rate"], 0.05)
    day = "sum by (tenant) (increase(ray_orthovision_results_total{}[1d]))"
    total = day.format("")
    terms = []
    for label, q in baseline["label_mix"].items():
        q = max(q, DRIFT_FLOOR)
        p = f"clamp_min({day.format('{label=' + json.dumps(label) + '}')} / {total}, {DRIFT_FLOOR})"
        terms.append(f"(({p} - {q:.4f}) * ln({p} / {q:.4f}))")
    runbook = "docs/SAFETY.md#drift"
    return [
        {
            "alert": "OrthoVisionAbstentionRateHigh",
            "expr": f"{rate.format('abstentions_total')} / {results} > {abstain:.4f}",
            "for": "30m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.tenant }}: abstains on more than "
                f"{abstain:.0%} of images (validation: {baseline['abstain_rate']:.1%})",
                "runbook": runbook,
            },
        },
        {
            "alert": "OrthoVisionOutOfDistributionRateHigh",
            "expr": (
                "sum by (tenant) (rate(ray_orthovision_abstentions_total"
                '{reason="out_of_distribution"}[30m])) / '
                f"{results} > {ood:.4f}"
            ),
            "for": "30m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.tenant }}: more than "
                f"{ood:.0%} of images are out of distribution "
                f"(validation: {baseline['ood_abstain_rate']:.1%})",
                "runbook": runbook,
            },
        },
        {
            "alert": "OrthoVisionLabelMixShift",
            "expr": " + ".join(terms) + " > 0.2",
            "for": "1h",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.tenant }}: predicted-label mix over a day differs from "
                "validation (population stability index > 0.2)",
                "runbook": runbook,
            },
        },
    ]


def monitoring(cfg: OrthoVisionConfig, spec: ClusterSpec) -> list[dict]:
    meta = {"namespace": spec.namespace, "labels": {APP_LABEL: "orthovision"}}
    pod_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{spec.name}-ray", **meta},
        "spec": {
            "selector": {"matchLabels": {APP_LABEL: "orthovision"}},
            "podMetricsEndpoints": [
                {
                    "port": "metrics",
                    "interval": "15s",
                    "relabelings": [
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
                            "targetLabel": "ray_node_type",
                        },
                        {
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_group"],
                            "targetLabel": "ray_group",
                        },
                    ],
                }
            ],
        },
    }
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": f"{spec.name}-slo", **meta},
        "spec": {"groups": [{"name": "orthovision-slo", "rules": alert_rules(cfg, spec)}]},
    }
    dashboard_configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{spec.name}-dashboard",
            "namespace": spec.namespace,
            # The Grafana sidecar (kube-prometheus-stack) loads ConfigMaps with this label.
            "labels": {APP_LABEL: "orthovision", "grafana_dashboard": "1"},
        },
        "data": {"orthovision.json": dashboard_text(cfg)},
    }
    return [pod_monitor, rule, dashboard_configmap]


def grafana_dashboard(cfg: OrthoVisionConfig) -> dict:
    app = metric_selector(cfg)
    panels_spec = [
        (
            "Request rate by status (req/s)",
            ["sum by (status_code) (rate(ray_serve_num_http_requests_total{app}[1m]))"],
            "reqps",
        ),
        (
            "Request latency p50 / p95 / p99 (ms)",
            [
                f"histogram_quantile({q}, sum by (le) "
                "(rate(ray_serve_http_request_latency_ms_bucket{app}[5m])))"
                for q in (0.5, 0.95, 0.99)
            ],
            "ms",
        ),
        (
            "Stage latency p99 (s)",
            [
                "histogram_quantile(0.99, sum by (le, stage) "
                "(rate(ray_orthovision_stage_latency_seconds_bucket[5m])))"
            ],
            "s",
        ),
        (
            "Backbone batch size (mean, p90)",
            [
                "sum by (backbone) (rate(ray_orthovision_backbone_batch_size_sum[5m])) / "
                "sum by (backbone) (rate(ray_orthovision_backbone_batch_size_count[5m]))",
                "histogram_quantile(0.9, sum by (le, backbone) "
                "(rate(ray_orthovision_backbone_batch_size_bucket[5m])))",
            ],
            "none",
        ),
        (
            "Class mix (predictions/s by label)",
            ["sum by (label) (rate(ray_orthovision_predictions_total[5m]))"],
            "reqps",
        ),
        (
            "Replica failures: batches retried, requests answered 503 (/s)",
            ["sum by (outcome) (rate(ray_orthovision_replica_failures_total[5m]))"],
            "reqps",
        ),
        (
            "Rejected inputs by reason (/s)",
            ["sum by (reason) (rate(ray_orthovision_rejected_inputs_total[5m]))"],
            "reqps",
        ),
        (
            "Replicas: healthy and autoscaler target",
            [
                "sum by (deployment) (ray_serve_deployment_replica_healthy{app})",
                "max by (deployment) (ray_serve_autoscaling_target_replicas{app})",
            ],
            "none",
        ),
        (
            "Queued requests per deployment (max over callers)",
            ["max by (deployment) (ray_serve_deployment_queued_queries{app})"],
            "none",
        ),
        (
            "Explanations pending / failed",
            [
                "sum(ray_orthovision_explanations_pending)",
                'sum(rate(ray_orthovision_explanations_total{outcome="failed"}[5m]))',
            ],
            "none",
        ),
        # The DICOM node (serve/dicom_node; its own metrics, not Ray's: no ray_ prefix).
        (
            "DICOM node: inbox, outbox and oldest undelivered result (s)",
            [
                "sum(orthovision_dicom_inbox_instances)",
                "sum(orthovision_dicom_outbox_results)",
                "max(orthovision_dicom_outbox_oldest_age_seconds)",
            ],
            "none",
        ),
        # Drift (docs/SAFETY.md): per tenant, against the card's validation baseline.
        (
            "Drift: abstention rate by tenant and reason",
            [
                "sum by (tenant, reason) (rate(ray_orthovision_abstentions_total[30m])) / "
                "ignoring(reason) group_left sum by (tenant) "
                "(rate(ray_orthovision_results_total[30m]))"
            ],
            "percentunit",
        ),
        (
            "Drift: OOD score p50 / p95 by tenant",
            [
                f"histogram_quantile({q}, sum by (le, tenant) "
                "(rate(ray_orthovision_ood_score_bucket[30m])))"
                for q in (0.5, 0.95)
            ],
            "none",
        ),
        (
            "Drift: predicted-label mix by tenant",
            [
                "sum by (tenant, label) (rate(ray_orthovision_results_total[1h])) / "
                "ignoring(label) group_left sum by (tenant) "
                "(rate(ray_orthovision_results_total[1h]))"
            ],
            "percentunit",
        ),
        (
            "Drift: mean top probability and quality findings (/s) by tenant",
            [
                "sum by (tenant) (rate(ray_orthovision_top_probability_sum[30m])) / "
                "sum by (tenant) (rate(ray_orthovision_top_probability_count[30m]))",
                "sum by (tenant, check) (rate(ray_orthovision_quality_findings_total[30m]))",
            ],
            "none",
        ),
    ]
    panels = []
    for i, (title, exprs, unit) in enumerate(panels_spec):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": e.replace("{app}", app)}
                    for j, e in enumerate(exprs)
                ],
            }
        )
    return {
        "title": "OrthoVision Serve",
        "uid": "orthovision-serve",
        "schemaVersion": 39,
        "tags": ["orthovision", "ray-serve"],
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data"}
            ]
        },
        "panels": panels,
    }


def dashboard_text(cfg: OrthoVisionConfig) -> str:
    return json.dumps(grafana_dashboard(cfg), indent=2) + "\n"


def served_drift_baseline(cfg: OrthoVisionConfig) -> dict | None:
    """The drift baseline of the checkpoint the config serves (None: none recorded)."""
    from orthovision.model.card import CheckpointError, read_card

    try:
        return read_card(project_path(cfg.serve.checkpoint)).get("drift_baseline")
    except CheckpointError:
        return None
