"""k8s/dicom-node.yaml: the node's StatefulSet, Service, config and policies (the schema
checks of every core object are in test_k8s.py)."""

from __future__ import annotations

import json
import re

import yaml

from orthovision.config import OrthoVisionConfig
from serve.dicom_node.node import node_metrics
from serve.dicom_node.queue import NodeQueue
from serve.manifests.presets import preset
from serve.manifests.render import render_texts

DOCS = {n: list(yaml.safe_load_all(t)) for n, t in render_texts().items() if n.endswith(".yaml")}
NODE = {doc["kind"]: doc for doc in DOCS["dicom-node.yaml"]}
PORT = preset("gpu").serve.dicom_node.port


def test_the_pods_run_the_node_from_the_rendered_config():
    served = yaml.safe_load(NODE["ConfigMap"]["data"]["serve.yaml"])
    cfg = OrthoVisionConfig.model_validate(served["applications"][0]["args"]["config"])
    node = cfg.serve.dicom_node
    assert node.enabled and node.host == "0.0.0.0" and node.port == PORT == 11112
    # It calls the RayService's serve Service, as any HTTP client does.
    assert node.service_url == "http://orthovision-serve-svc.orthovision.svc:8000"
    (container,) = NODE["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["orthovision", "dicom-node"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert node.queue_path.startswith(mounts["queue"] + "/")  # inbox/outbox on the volume
    claim = NODE["StatefulSet"]["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "queue"
    # Its keys come from the Secret, never a value in the manifest.
    (env,) = container["env"]
    assert env["name"] == node.api_keys_env and "secretKeyRef" in env["valueFrom"]


def test_port_11112_is_a_tcp_service_reachable_from_the_dicom_network_only():
    ports = {p["name"]: p["port"] for p in NODE["Service"]["spec"]["ports"]}
    assert ports["dicom"] == PORT
    (policy,) = [p for p in DOCS["network-policy.yaml"] if p["metadata"]["name"].endswith("node")]
    dicom_rule = policy["spec"]["ingress"][0]
    assert [p["port"] for p in dicom_rule["ports"]] == [PORT]
    assert all("ipBlock" in source for source in dicom_rule["from"])
    # ... and the node reaches the HTTP API on the Ray pods.
    (ray,) = [p for p in DOCS["network-policy.yaml"] if p["metadata"]["name"] == "orthovision-ray"]
    node_pods = {"podSelector": {"matchLabels": NODE["Service"]["spec"]["selector"]}}
    (from_node,) = [r for r in ray["spec"]["ingress"] if node_pods in r["from"]]
    assert [p["port"] for p in from_node["ports"]] == [8000]


def test_the_outbox_is_watched(tmp_path):
    (rule_doc,) = [d for d in DOCS["monitoring.yaml"] if d["kind"] == "PrometheusRule"]
    rules = {r["alert"]: r for r in rule_doc["spec"]["groups"][0]["rules"]}
    assert (
        "orthovision_dicom_outbox_oldest_age_seconds"
        in rules["OrthoVisionDicomOutboxStalled"]["expr"]
    )
    assert "orthovision_dicom_inbox_instances" in rules["OrthoVisionDicomInboxFull"]["expr"]
    assert NODE["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # ... and shown, from metrics the node exports.
    dashboard = json.loads(render_texts()["grafana-dashboard.json"])
    (panel,) = [p for p in dashboard["panels"] if p["title"].startswith("DICOM node")]
    exported = {
        m.name for m in node_metrics(NodeQueue(tmp_path / "q" / "db", 1)).registry.collect()
    }
    for target in panel["targets"]:
        (name,) = re.findall(r"orthovision_dicom_[a-z_]+", target["expr"])
        assert name in exported, name
