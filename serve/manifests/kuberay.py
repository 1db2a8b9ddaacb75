"""KubeRay manifests rendered from the one config (docs/DESIGN.md: one config, three consumers).

`orthovision render` writes `k8s/*.yaml` and `k8s/grafana-dashboard.json` from the `gpu`
preset: a RayService whose serveConfigV2 is the same Serve config as `deploy/gpu.yaml`,
the Redis it uses for results and GCS fault tolerance, network policies, and monitoring
(PodMonitor, PrometheusRule, Grafana dashboard). Worker-group sizes and alert thresholds
are computed from the deployments' replica bounds, so they move with the config.

Placement: the head runs no replicas (`num-cpus: "0"`); a CPU worker group advertises
CPU_NODE_RESOURCE (ingress, preprocessing, fusion) and a GPU worker group advertises
MODEL_NODE_RESOURCE (backbones, explainer); each deployment asks for one unit of one of
them through `DeploymentConfig.resources`. The Ray autoscaler (in-tree) adds pods of the
group whose resource a pending replica needs.
Over 400 lines: the RayService, Redis and the network policies share the pod and
container helpers at the top, and a reviewer checks each object against them on one page.
"""

from __future__ import annotations

import json

import yaml

from orthovision.config import OrthoVisionConfig
from serve.manifests.cluster import (
    API_KEYS_ENV,
    APP_LABEL,
    PATIENT_KEYS_ENV,
    POOL_MARKER_CAPACITY,
    RAY_UID,
    REDIS_PASSWORD_ENV,
    ClusterSpec,
    PodSize,
    group_bounds,
    ray_version,
)
from serve.manifests.serve_config import (
    CPU_NODE_RESOURCE,
    MODEL_NODE_RESOURCE,
    serve_config,
)
from serve.shedding import proxy_environment

# Ray's fixed ports (ray_constants): GCS, dashboard, client, dashboard agent, metrics.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT, METRICS_PORT = 6379, 8265, 10001, 52365, 8080


def _resources(size: PodSize) -> dict:
    # requests == limits: Guaranteed QoS, and Ray reads its CPU/memory from the cgroup limit.
    amount = {"cpu": str(size.cpu), "memory": size.memory}
    if size.gpu:
        amount["nvidia.com/gpu"] = str(size.gpu)
    return {"requests": dict(amount), "limits": dict(amount)}


def _exec_probe(command: str, failure_threshold: int, initial_delay_s: int = 30) -> dict:
    return {
        "exec": {"command": ["bash", "-c", command]},
        "initialDelaySeconds": initial_delay_s,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": failure_threshold,
    }


def _wget(port: int, path: str) -> str:
    return f"wget -T 2 -q -O- http://localhost:{port}{path} | grep success"


RAYLET_OK = _wget(AGENT_PORT, "/api/local_raylet_healthz")
GCS_OK = _wget(DASHBOARD_PORT, "/api/gcs_healthz")


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _container(
    name: str, spec: ClusterSpec, size: PodSize, ports: dict[str, int], env: list, probes: dict
) -> dict:
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": n, "containerPort": p} for n, p in ports.items()],
        "env": [
            {"name": "ORTHOVISION_CHECKPOINT", "value": spec.checkpoint_dir},
            # The ONNX export cache must be writable: the root filesystem is read-only.
            {"name": "ORTHOVISION_ONNX_CACHE", "value": "/tmp/orthovision/onnx"},
            *env,
        ],
        "resources": _resources(size),
        **probes,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
        # Writable places only: /tmp (Ray's session and logs, the local store) and the
        # object store's /dev/shm.
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }


# Pod-level hardening (Pod Security Standards "restricted"): no root, the runtime's seccomp
# profile, no Kubernetes API token (Ray needs none here).
POD_SECURITY = {
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_UID,
        "fsGroup": RAY_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "automountServiceAccountToken": False,
}


def _pod(
    component: str, container: dict, size: PodSize, extra: dict | None = None, memory_shm=None
) -> dict:
    # The object store lives in /dev/shm; the container default (64 MiB) is far too small.
    shm = {"medium": "Memory", "sizeLimit": memory_shm or "2Gi"}
    return {
        "metadata": {
            "labels": {APP_LABEL: "orthovision", "app.kubernetes.io/component": component}
        },
        "spec": {
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": shm}],
            **POD_SECURITY,
            **(extra or {}),
        },
    }


def _pool_resources(resource: str) -> str:
    # KubeRay passes rayStartParams verbatim to `ray start --resources=...`: a quoted JSON string.
    return json.dumps(json.dumps({resource: POOL_MARKER_CAPACITY}))


def k8s_serve_config(cfg: OrthoVisionConfig) -> dict:
    """deploy/gpu.yaml with one change: a proxy on every node, behind KubeRay's serve Service
    (deploy/*.yaml keep HeadOnly so two Ray nodes on one host never fight over port 8000)."""
    return {**serve_config(cfg), "proxy_location": "EveryNode"}


def rayservice(cfg: OrthoVisionConfig, spec: ClusterSpec) -> dict:
    bounds = group_bounds(cfg, spec)
    api_keys = {
        "name": API_KEYS_ENV,
        "valueFrom": {
            "secretKeyRef": {"name": spec.api_keys_secret, "key": spec.api_keys_secret_key}
        },
    }
    serve_health = _wget(cfg.serve.port, "/-/healthz")
    head_ports = {
        "gcs-server": GCS_PORT,
        "dashboard": DASHBOARD_PORT,
        "client": CLIENT_PORT,
        "serve": cfg.serve.port,
        "metrics": METRICS_PORT,
    }
    worker_ports = {"serve": cfg.serve.port, "metrics": METRICS_PORT}
    worker_probes = {
        "readinessProbe": _exec_probe(f"{RAYLET_OK} && {serve_health}", failure_threshold=10),
        "livenessProbe": _exec_probe(RAYLET_OK, failure_threshold=120),
    }
    # Every node runs a proxy (EveryNode), and every proxy sheds overload itself.
    proxy = proxy_environment(cfg.serve.proxy_max_inflight, cfg.serve.security.header)
    proxy_env = [{"name": k, "value": v} for k, v in proxy.items()]
    head = _container(
        "ray-head",
        spec,
        spec.head,
        head_ports,
        env=proxy_env,
        probes={
            "readinessProbe": _exec_probe(f"{RAYLET_OK} && {GCS_OK}", failure_threshold=10),
            "livenessProbe": _exec_probe(f"{RAYLET_OK} && {GCS_OK}", failure_threshold=120),
        },
    )
    # Only the CPU pool hosts the Ingress, so only its pods see the API and patient keys.
    redis_password = _secret_env(REDIS_PASSWORD_ENV, spec.redis_secret, "password")
    patient_keys = _secret_env(PATIENT_KEYS_ENV, spec.api_keys_secret, spec.patient_keys_secret_key)
    patient_keys["valueFrom"]["secretKeyRef"]["optional"] = True
    secrets = [api_keys, redis_password, patient_keys]
    cpu_worker = _container(
        "ray-worker", spec, spec.cpu_worker, worker_ports, proxy_env + secrets, worker_probes
    )
    gpu_worker = _container(
        "ray-worker", spec, spec.gpu_worker, worker_ports, proxy_env, worker_probes
    )
    gpu_tolerations = {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        # The toleration lets the pod onto GPU nodes; the selector keeps it off the others
        # (the label of NVIDIA's GPU feature discovery / GPU operator).
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
    }
    metrics_param = {"metrics-export-port": str(METRICS_PORT)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            # Blue/green: a config change that touches rayClusterConfig starts a new cluster,
            # switches traffic once its Serve apps are healthy, then deletes the old one.
            "upgradeStrategy": {"type": "NewCluster"},
            "serviceUnhealthySecondThreshold": 900,
            "deploymentUnhealthySecondThreshold": 300,
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": yaml.safe_dump(k8s_serve_config(cfg), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray_version(),
                # Ray token auth (Ray >= 2.52, KubeRay >= 1.5.1): the operator makes the
                # token Secret and sets it on every Ray container, so the dashboard's job
                # submission, GCS and client ports refuse callers without it, even in-cluster.
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 120,
                    "resources": _resources(PodSize(cpu=1, memory="1Gi")),
                },
                # No externalStorageNamespace: KubeRay then uses the RayCluster's UID, so the
                # old and new clusters of a blue/green upgrade never share GCS state.
                "gcsFaultToleranceOptions": {
                    "redisAddress": f"{spec.redis_name}:{GCS_PORT}",
                    "redisPassword": {
                        "valueFrom": {
                            "secretKeyRef": {"name": spec.redis_secret, "key": "password"}
                        }
                    },
                },
                "headGroupSpec": {
                    "serviceType": "ClusterIP",  # never a LoadBalancer for GCS/dashboard/client
                    "rayStartParams": {
                        "num-cpus": "0",  # no replicas on the head: it keeps GCS and control
                        "dashboard-host": "0.0.0.0",  # the KubeRay operator polls Serve here
                        **metrics_param,
                    },
                    "template": _pod("ray-head", head, spec.head),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "cpu",
                        "replicas": bounds["cpu"][0],
                        "minReplicas": bounds["cpu"][0],
                        "maxReplicas": bounds["cpu"][1],
                        "rayStartParams": {
                            "resources": _pool_resources(CPU_NODE_RESOURCE),
                            **metrics_param,
                        },
                        "template": _pod("ray-worker-cpu", cpu_worker, spec.cpu_worker),
                    },
                    {
                        "groupName": "gpu",
                        "replicas": bounds["gpu"][0],
                        "minReplicas": bounds["gpu"][0],
                        "maxReplicas": bounds["gpu"][1],
                        "rayStartParams": {
                            "resources": _pool_resources(MODEL_NODE_RESOURCE),
                            **metrics_param,
                        },
                        "template": _pod(
                            "ray-worker-gpu",
                            gpu_worker,
                            spec.gpu_worker,
                            gpu_tolerations,
                            memory_shm="8Gi",
                        ),
                    },
                ],
            },
        },
    }


def redis(spec: ClusterSpec) -> list[dict]:
    """One Redis for the result store and GCS fault tolerance (AOF on a volume).

    A single pod: losing it stops explanations and GCS recovery but not predictions.
    docs/OPERATIONS.md (Redis down) says what to replace it with for HA.
    """
    labels = {APP_LABEL: spec.redis_name}
    meta = {"name": spec.redis_name, "namespace": spec.namespace, "labels": labels}
    # redis-cli reads the password from REDISCLI_AUTH (never on a command line).
    ping = {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5, "timeoutSeconds": 2}
    password = [
        _secret_env("REDIS_PASSWORD", spec.redis_secret, "password"),
        _secret_env("REDISCLI_AUTH", spec.redis_secret, "password"),
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": labels,
            "ports": [{"name": "redis", "port": GCS_PORT, "targetPort": "redis"}],
        },
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": spec.redis_name,
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 999,
                        "fsGroup": 999,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "redis",
                            "image": spec.redis_image,
                            "args": [
                                "--appendonly",
                                "yes",
                                "--save",
                                "",
                                "--protected-mode",
                                "yes",
                                # Kubernetes expands $(VAR) from env: the Secret's password.
                                "--requirepass",
                                "$(REDIS_PASSWORD)",
                            ],
                            "env": password,
                            "ports": [{"name": "redis", "containerPort": GCS_PORT}],
                            "resources": _resources(PodSize(cpu=1, memory="2Gi")),
                            "readinessProbe": ping,
                            "livenessProbe": {**ping, "initialDelaySeconds": 10},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                            },
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": spec.redis_storage}},
                    },
                }
            ],
        },
    }
    return [service, statefulset]


def network_policies(cfg: OrthoVisionConfig, spec: ClusterSpec) -> list[dict]:
    """Default-deny ingress to the Ray pods and Redis, then open only what is needed.

    The dashboard (8265), GCS (6379) and client (10001) ports are reachable from the Ray pods
    themselves and the dashboard from the KubeRay operator: never from outside the cluster.
    """
    ray_pods = {"podSelector": {"matchLabels": {APP_LABEL: "orthovision"}}}
    dicom_node = {"podSelector": {"matchLabels": {APP_LABEL: spec.dicom_node_name}}}

    def ns(name: str) -> dict:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    def tcp(*ports: int) -> list[dict]:
        return [{"protocol": "TCP", "port": p} for p in ports]

    def policy(name: str, selector: dict, rules: list[dict]) -> dict:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": spec.namespace},
            "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": rules},
        }

    return [
        policy(
            f"{spec.name}-ray",
            ray_pods["podSelector"],
            [
                # Ray nodes talk to each other on many ports (GCS, raylet, object manager,
                # worker ports): all TCP between the cluster's own pods.
                {"from": [ray_pods]},
                {"from": [ns(spec.operator_namespace)], "ports": tcp(DASHBOARD_PORT)},
                {"from": [ns(spec.monitoring_namespace)], "ports": tcp(METRICS_PORT)},
                # The HTTP API, from the ingress controller only (it terminates TLS; the API
                # authenticates with API keys), and from the DICOM node (k8s/dicom-node.yaml).
                {"from": [ns(spec.ingress_namespace), dicom_node], "ports": tcp(cfg.serve.port)},
            ],
        ),
        policy(
            spec.redis_name,
            {"matchLabels": {APP_LABEL: spec.redis_name}},
            [{"from": [ray_pods], "ports": tcp(GCS_PORT)}],
        ),
    ]
