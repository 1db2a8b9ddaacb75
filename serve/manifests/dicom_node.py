"""The DICOM node on Kubernetes (`k8s/dicom-node.yaml`): its own StatefulSet beside the
RayService, behind a TCP Service on port 11112.

Why not a Ray Serve deployment: DIMSE is a long-lived TCP protocol that Serve's HTTP/gRPC
proxies do not route, and an outbox must outlive its process. The node calls the Serve
app over HTTP (the RayService's serve Service) with each tenant's key, so every instance
takes the HTTP road (auth, quotas, admission, pipeline); it scales by replicas (a PACS's
associations are spread by the Service), each with its own volume for its inbox and
outbox, and restarts without touching the Ray cluster.
"""

from __future__ import annotations

import yaml

from orthovision.config import OrthoVisionConfig
from serve.manifests.cluster import APP_LABEL, RAY_UID, ClusterSpec, PodSize
from serve.manifests.kuberay import POD_SECURITY, _resources, _secret_env
from serve.manifests.serve_config import serve_config

NODE_KEYS_SECRET_KEY = "node-api-keys"  # in the API keys' Secret: `tenant=key,...`
QUEUE_MOUNT = "/var/lib/orthovision"
CONFIG_MOUNT = "/etc/orthovision"


def node_labels(spec: ClusterSpec) -> dict[str, str]:
    return {APP_LABEL: spec.dicom_node_name}


def node_config(cfg: OrthoVisionConfig, spec: ClusterSpec) -> OrthoVisionConfig:
    """The preset as the node's pods run it: on the pod's address, calling the RayService's
    serve Service, its queue on the volume (a subfolder: private_directory owns it)."""
    node = cfg.serve.dicom_node.model_copy(
        update={
            "enabled": True,
            "host": "0.0.0.0",
            "service_url": f"http://{spec.name}-serve-svc.{spec.namespace}.svc:{cfg.serve.port}",
            "queue_path": f"{QUEUE_MOUNT}/queue/dicom-node.sqlite3",
        }
    )
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"dicom_node": node})})


def dicom_node(cfg: OrthoVisionConfig, spec: ClusterSpec) -> list[dict]:
    name, labels = spec.dicom_node_name, node_labels(spec)
    node_cfg = node_config(cfg, spec)
    node = node_cfg.serve.dicom_node
    meta = {"name": name, "namespace": spec.namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"serve.yaml": yaml.safe_dump(serve_config(node_cfg), sort_keys=False)},
    }
    ports = {"dicom": node.port, "metrics": node.metrics_port}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": labels,
            "ports": [{"name": n, "port": p, "targetPort": n} for n, p in ports.items()],
        },
    }
    probe = {"tcpSocket": {"port": "dicom"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "dicom-node",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["orthovision", "dicom-node", "--config", f"{CONFIG_MOUNT}/serve.yaml"],
        "ports": [{"name": n, "containerPort": p} for n, p in ports.items()],
        "env": [
            _secret_env(node.api_keys_env, spec.api_keys_secret, NODE_KEYS_SECRET_KEY),
        ],
        "resources": _resources(PodSize(cpu=1, memory="2Gi")),
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 15, "failureThreshold": 6},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsUser": RAY_UID,
        },
        "volumeMounts": [
            {"name": "queue", "mountPath": QUEUE_MOUNT},
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": name}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                    # A stopping pod finishes its association and the rows it holds.
                    "terminationGracePeriodSeconds": 60,
                    **POD_SECURITY,
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "queue"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": spec.dicom_node_storage}},
                    },
                }
            ],
        },
    }
    pod_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": labels},
            "podMetricsEndpoints": [{"port": "metrics", "interval": "15s"}],
        },
    }
    return [config_map, service, statefulset, pod_monitor]


def dicom_node_policy(cfg: OrthoVisionConfig, spec: ClusterSpec) -> dict:
    """C-STORE from the hospital's DICOM network only; metrics from Prometheus."""
    node = cfg.serve.dicom_node
    monitoring = {"kubernetes.io/metadata.name": spec.monitoring_namespace}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": spec.dicom_node_name, "namespace": spec.namespace},
        "spec": {
            "podSelector": {"matchLabels": node_labels(spec)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"ipBlock": {"cidr": cidr}} for cidr in spec.dicom_peer_cidrs],
                    "ports": [{"protocol": "TCP", "port": node.port}],
                },
                {
                    "from": [{"namespaceSelector": {"matchLabels": monitoring}}],
                    "ports": [{"protocol": "TCP", "port": node.metrics_port}],
                },
            ],
        },
    }
