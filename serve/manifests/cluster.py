"""`ClusterSpec` (node pools, pod sizes, images) and the deployment-to-pool arithmetic
shared by the KubeRay and monitoring manifests.
"""

from __future__ import annotations

import math
from importlib.metadata import version

from pydantic import BaseModel, ConfigDict

from orthovision.config import DeploymentConfig, OrthoVisionConfig
from serve.manifests.serve_config import (
    MODEL_NODE_RESOURCE,
    served_branches,
)

APP_LABEL = "app.kubernetes.io/name"
# Each custom-resource node can host this many replicas; CPU, GPU and memory are the real
# limits, the marker only says which pool a replica belongs to.
POOL_MARKER_CAPACITY = 1000
API_KEYS_ENV = "ORTHOVISION_API_KEYS"  # read by serve/auth.py (security.api_keys_env)
REDIS_PASSWORD_ENV = "ORTHOVISION_REDIS_PASSWORD"  # serve/store/redis.py REDIS_PASSWORD_ENV
PATIENT_KEYS_ENV = "ORTHOVISION_PATIENT_KEYS"  # serve/patients.py (security.patient_keys_env)
RAY_UID = 1000  # the rayproject images' `ray` user


class PodSize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: int
    memory: str
    gpu: int = 0


class ClusterSpec(BaseModel):
    """What only Kubernetes needs: names, image, pod sizes, SLO thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "orthovision"
    namespace: str = "orthovision"
    image: str = "orthovision-serve:0.1.0"  # built from deploy/Dockerfile
    operator_namespace: str = "ray-system"  # KubeRay operator: reaches the dashboard (8265)
    monitoring_namespace: str = "monitoring"  # Prometheus: scrapes port 8080
    api_keys_secret: str = "orthovision-api-keys"
    api_keys_secret_key: str = "api-keys"
    # JSON {tenant: secret} for patient references, in the API keys' Secret (optional: a
    # tenant without one gets no timeline and SR/SC without patient attributes).
    patient_keys_secret_key: str = "patient-keys"
    redis_name: str = "orthovision-redis"
    redis_image: str = "redis:7.2-alpine"
    redis_storage: str = "8Gi"
    # Secret with the Redis password (key `password`): result store and GCS fault tolerance.
    redis_secret: str = "orthovision-redis"
    # The namespace of the ingress controller that terminates TLS in front of port 8000.
    ingress_namespace: str = "ingress-nginx"
    checkpoint_dir: str = "/home/ray/orthovision/models/default"
    # The DICOM node (k8s/dicom-node.yaml): the hospital networks allowed to reach port
    # 11112 (its AE allow-list still applies) and each replica's inbox/outbox volume.
    dicom_peer_cidrs: tuple[str, ...] = ("10.0.0.0/8",)
    dicom_node_storage: str = "20Gi"
    head: PodSize = PodSize(cpu=2, memory="8Gi")
    cpu_worker: PodSize = PodSize(cpu=4, memory="8Gi")
    gpu_worker: PodSize = PodSize(cpu=4, memory="24Gi", gpu=1)
    # SLOs (docs/OPERATIONS.md): 99% of requests without a 5xx, p99 under 2 s on GPU.
    slo_error_ratio: float = 0.01
    slo_p99_latency_ms: float = 2000.0
    # Alert when a handle's queue is this fraction of max_queued_requests (503s follow).
    queue_alert_fraction: float = 0.5
    # The served checkpoint card's `drift_baseline` (validation split): drift alert levels.
    drift_baseline: dict | None = None

    @property
    def dicom_node_name(self) -> str:
        return f"{self.name}-dicom-node"


def ray_version() -> str:
    """The installed Ray: the manifests' rayVersion and the Dockerfile's base image tag."""
    return version("ray")


def deployment_configs(cfg: OrthoVisionConfig) -> dict[str, DeploymentConfig]:
    """Serve deployment name -> its options, as serve.app.build_app names them."""
    s = cfg.serve
    named = {"Ingress": s.ingress, "Preprocessor": s.preprocessor, "Fusion": s.fusion}
    named |= {f"Backbone_{name}": s.backbone for name in served_branches(cfg)}
    named["Explainer"] = s.explainer
    return named


def pool_of(d: DeploymentConfig) -> str:
    return "gpu" if MODEL_NODE_RESOURCE in d.resources or d.num_gpus > 0 else "cpu"


def group_bounds(cfg: OrthoVisionConfig, spec: ClusterSpec) -> dict[str, tuple[int, int]]:
    """Worker group -> (min, max) pods that hold every deployment at min and at max replicas."""
    pods = {"cpu": spec.cpu_worker, "gpu": spec.gpu_worker}
    bounds = {}
    for group, size in pods.items():
        members = [d for d in deployment_configs(cfg).values() if pool_of(d) == group]

        def pods_for(replicas_of, members=members, size=size) -> int:
            cpus = sum(replicas_of(d) * d.num_cpus for d in members)
            gpus = sum(replicas_of(d) * d.num_gpus for d in members)
            need = cpus / size.cpu
            if size.gpu:
                need = max(need, gpus / size.gpu)
            return max(1, math.ceil(need - 1e-9))

        bounds[group] = (pods_for(lambda d: d.min_replicas), pods_for(lambda d: d.max_replicas))
    return bounds
