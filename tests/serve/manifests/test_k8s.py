"""k8s/ manifests: rendered from the config, valid against KubeRay and Kubernetes schemas offline.
(Long: one file per rendered manifest family would repeat the schema loading.)

CRD validation is strict (unknown fields are errors, as with `kubectl apply --validate=strict`):
a CRD schema alone would silently prune a misspelled field, and a misspelled
`gcsFaultToleranceOptions` is exactly the mistake that must not pass.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache

import pytest
import yaml

from orthovision.config import OrthoVisionConfig
from orthovision.paths import PROJECT_ROOT, SHARED_ROOT
from serve.manifests.cluster import ClusterSpec, deployment_configs, group_bounds, ray_version
from serve.manifests.kuberay import CLIENT_PORT, DASHBOARD_PORT, GCS_PORT
from serve.manifests.presets import preset
from serve.manifests.render import render_texts
from serve.manifests.serve_config import CPU_NODE_RESOURCE, MODEL_NODE_RESOURCE, served_branches

ROOT = PROJECT_ROOT
KUBERAY = SHARED_ROOT / "schemas" / "kuberay"
requires_crds = pytest.mark.skipif(
    not KUBERAY.exists(),
    reason="../shared/schemas/kuberay absent (fresh clone): KubeRay CRD validation skipped",
)
K8S_VERSION = "1.30"  # oldest Kubernetes the manifests target (NetworkPolicy, probes, PDB-free)

TEXTS = render_texts()
DOCS = {
    name: list(yaml.safe_load_all(text)) for name, text in TEXTS.items() if name.endswith(".yaml")
}
RAYSERVICE = DOCS["rayservice.yaml"][0]
CLUSTER = RAYSERVICE["spec"]["rayClusterConfig"]


def strict(schema: object) -> object:
    """Unknown fields become errors wherever the CRD lists the known ones."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str):
    import jsonschema

    path = KUBERAY / f"ray.io_{kind.lower()}s.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def as_raycluster(rayservice: dict) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rayservice["metadata"]["name"]},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }


# --- rendered == committed ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_committed_k8s_files_equal_their_render(name):
    committed = ROOT / "k8s" / name
    assert committed.exists(), f"k8s/{name} missing: run `orthovision render` and commit"
    assert committed.read_text() == TEXTS[name], "run `orthovision render` and commit"


def test_dockerfile_pins_ray_to_the_manifests_ray_version():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == ray_version()
    assert "FROM rayproject/ray:${RAY_VERSION}-py311" in dockerfile
    assert CLUSTER["rayVersion"] == ray_version()


# --- KubeRay CRDs ------------------------------------------------------------------------


@requires_crds
def test_rayservice_validates_against_the_kuberay_crd():
    assert crd_errors(RAYSERVICE) == []


@requires_crds
def test_its_cluster_validates_as_a_raycluster():
    assert crd_errors(as_raycluster(RAYSERVICE)) == []


def _break(path: str, value: object = None, delete: bool = False):
    def apply(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        *parents, leaf = path.split(".")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if delete:
            del node[leaf]
        else:
            node[leaf] = value
        return doc

    return apply


def _rename(path: str, new: str):
    def apply(doc: dict) -> dict:
        doc = copy.deepcopy(doc)
        *parents, leaf = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[new] = node.pop(leaf)
        return doc

    return apply


BROKEN = {
    "misspelled field": _rename(
        "spec.rayClusterConfig.gcsFaultToleranceOptions", "gcsFaultToleranceOption"
    ),
    "wrong type": _break("spec.rayClusterConfig.workerGroupSpecs.0.maxReplicas", "five"),
    "required field missing": _break(
        "spec.rayClusterConfig.workerGroupSpecs.1.groupName", delete=True
    ),
    "value outside enum": _break("spec.rayClusterConfig.gcsFaultToleranceOptions.backend", "etcd"),
    "serveConfigV2 not a string": _break("spec.serveConfigV2", {"applications": []}),
    "rayStartParams value not a string": _break(
        "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0
    ),
}


@requires_crds
@pytest.mark.parametrize("breakage", list(BROKEN), ids=list(BROKEN))
def test_a_broken_manifest_fails_crd_validation(breakage):
    broken = BROKEN[breakage](RAYSERVICE)
    assert crd_errors(broken), f"{breakage}: the CRD schema accepted a broken RayService"


# --- Kubernetes core schemas (kubernetes-validate ships them: no cluster, no network) ------


CORE = [doc for name, docs in DOCS.items() for doc in docs if "/" not in doc["apiVersion"] or
        doc["apiVersion"].split("/")[0] in ("apps", "networking.k8s.io")]  # fmt: skip


@pytest.mark.parametrize("doc", CORE, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in CORE])
def test_core_objects_validate_against_kubernetes_schemas(doc):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


GROUPS = [("head", CLUSTER["headGroupSpec"])] + [
    (g["groupName"], g) for g in CLUSTER["workerGroupSpecs"]
]


@pytest.mark.parametrize("group", GROUPS, ids=[name for name, _ in GROUPS])
def test_ray_pod_templates_are_valid_pods(group):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    template = group[1]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
    pod["metadata"] = {"name": f"orthovision-{group[0]}", **template["metadata"]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_broken_pod():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    template = copy.deepcopy(CLUSTER["workerGroupSpecs"][0]["template"])
    template["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "5s"
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# --- what the manifests say ----------------------------------------------------------------


def test_serve_config_v2_is_a_serve_deploy_schema_carrying_the_gpu_preset():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    # Training settings are left out of Serve configs; the model section is the served
    # checkpoint's; the rest is the gpu preset, unchanged.
    served = OrthoVisionConfig.model_validate(app.args["config"])
    expected = preset("gpu")
    assert served.model_copy(update={"model": expected.model}) == expected
    assert [b.name for b in served.model.backbones] == served_branches(expected)


def test_serve_config_has_a_ray_native_deployments_list():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(doc).applications
    by_name = {d.name: d for d in app.deployments}
    branches = served_branches(preset("gpu"))
    expected = {"Ingress", "Preprocessor", "Fusion", "Explainer"} | {
        f"Backbone_{b}" for b in branches
    }
    assert set(by_name) == expected and len(by_name) >= 5
    for b in branches:
        backbone = by_name[f"Backbone_{b}"]
        assert backbone.ray_actor_options.num_gpus == 0.5
        assert backbone.autoscaling_config["max_replicas"] == 4
        assert backbone.user_config == preset("gpu").serve.batch.model_dump(mode="json")
    assert by_name["Fusion"].user_config["abstain_threshold"] == 0.5
    assert by_name["Preprocessor"].autoscaling_config["min_replicas"] == 2
    # Every autoscaled deployment scales by the project's policy (serve/autoscaling.py).
    scaled = [d for d in app.deployments if d.autoscaling_config]
    assert len(scaled) >= 5
    for d in scaled:
        policy = d.autoscaling_config["policy"]
        assert policy["policy_function"] == "serve.autoscaling:Hysteresis", d.name
        assert 0 < policy["policy_kwargs"]["scale_down_below"] < 1


def test_head_runs_no_replicas_and_the_autoscaler_and_gcs_ft_are_on():
    assert CLUSTER["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert CLUSTER["enableInTreeAutoscaling"] is True
    assert CLUSTER["gcsFaultToleranceOptions"]["redisAddress"].endswith(f":{GCS_PORT}")
    redis_names = {d["metadata"]["name"] for d in DOCS["redis.yaml"] if d["kind"] == "Service"}
    assert CLUSTER["gcsFaultToleranceOptions"]["redisAddress"].split(":")[0] in redis_names


def test_every_deployment_lands_on_a_group_that_advertises_its_resource():
    advertised = {
        g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"]))
        for g in CLUSTER["workerGroupSpecs"]
    }
    assert set(advertised["cpu"]) == {CPU_NODE_RESOURCE}
    assert set(advertised["gpu"]) == {MODEL_NODE_RESOURCE}
    gpu = next(g for g in CLUSTER["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    cfg = preset("gpu")
    placed = {name: set(d.resources) for name, d in deployment_configs(cfg).items()}
    assert placed["Ingress"] == placed["Preprocessor"] == placed["Fusion"] == {CPU_NODE_RESOURCE}
    assert placed["Explainer"] == {MODEL_NODE_RESOURCE}
    backbones = [name for name in placed if name.startswith("Backbone_")]
    assert len(backbones) == 2
    assert all(placed[name] == {MODEL_NODE_RESOURCE} for name in backbones)


def test_worker_groups_hold_every_deployment_at_max_replicas():
    cfg, spec = preset("gpu"), ClusterSpec()
    bounds = group_bounds(cfg, spec)
    gpus_at_max = sum(d.max_replicas * d.num_gpus for d in deployment_configs(cfg).values())
    assert bounds["gpu"][1] * spec.gpu_worker.gpu >= gpus_at_max
    cpu_pool = [d for d in deployment_configs(cfg).values() if CPU_NODE_RESOURCE in d.resources]
    assert bounds["cpu"][1] * spec.cpu_worker.cpu >= sum(
        d.max_replicas * d.num_cpus for d in cpu_pool
    )
    for g in CLUSTER["workerGroupSpecs"]:
        assert (g["minReplicas"], g["maxReplicas"]) == bounds[g["groupName"]]


def test_every_ray_container_has_requests_limits_and_probes():
    for _, group in GROUPS:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert container["readinessProbe"] and container["livenessProbe"]


def test_api_keys_come_from_a_secret_on_the_ingress_pool_only():
    def secret_env(group: dict) -> list[dict]:
        env = group["template"]["spec"]["containers"][0].get("env", [])
        return [e for e in env if "secretKeyRef" in e.get("valueFrom", {})]

    by_group = {name: secret_env(g) for name, g in GROUPS}
    # The Ingress pool: API keys, the result store's Redis password and the patient keys
    # (serve/patients.py), nothing else.
    assert [e["name"] for e in by_group["cpu"]] == [
        "ORTHOVISION_API_KEYS",
        "ORTHOVISION_REDIS_PASSWORD",
        "ORTHOVISION_PATIENT_KEYS",
    ]
    assert by_group["head"] == by_group["gpu"] == []
    # Only a reference: no key value is ever written into a rendered manifest.
    keys = {"ORTHOVISION_API_KEYS", "ORTHOVISION_PATIENT_KEYS"}
    for _, group in GROUPS:
        for e in group["template"]["spec"]["containers"][0].get("env", []):
            assert e["name"] not in keys or "value" not in e


def test_control_ports_stay_inside_the_cluster():
    control = {DASHBOARD_PORT, GCS_PORT, CLIENT_PORT}
    for policy in DOCS["network-policy.yaml"]:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule.get("ports", [])}
            sources = rule.get("from", [])
            # Addresses outside the cluster reach the DICOM node's C-STORE port only.
            dicom_port = preset("gpu").serve.dicom_node.port
            assert all("ipBlock" not in s for s in sources) or ports == {dicom_port}
            if not sources:  # open to anyone: only the HTTP API
                assert ports and not ports & control, rule
    assert CLUSTER["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_alerts_cover_the_slos_with_thresholds_from_the_config():
    (rule_doc,) = [d for d in DOCS["monitoring.yaml"] if d["kind"] == "PrometheusRule"]
    rules = rule_doc["spec"]["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {
        "OrthoVisionErrorRatioHigh",
        "OrthoVisionP99LatencyHigh",
        "OrthoVisionQueueDepthHigh",
        "OrthoVisionReplicasPinnedAtMax",
        "OrthoVisionReplicasUnavailable",
    } <= names
    for r in rules:
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
        assert r["labels"]["severity"] in ("page", "warning")
    pinned = {r["labels"]["deployment"]: r for r in rules if r["alert"].endswith("AtMax")}
    for name, d in deployment_configs(preset("gpu")).items():
        if d.autoscaled:
            assert pinned[name]["expr"].endswith(f">= {d.max_replicas}")


def test_dashboard_shows_what_an_sre_needs_from_metrics_that_exist():
    dashboard = json.loads(TEXTS["grafana-dashboard.json"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    topics = ("request rate", "latency", "batch size", "class mix", "rejected", "replicas")
    for topic in (*topics, "replica failures"):
        assert topic in titles
    metrics_src = (ROOT / "serve" / "metrics.py").read_text()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"ray_orthovision_([a-z_]+?)(?:_bucket|_sum|_count)?\b",
                                     target["expr"]):  # fmt: skip
                assert f'"orthovision_{metric}"' in metrics_src, metric


def test_http_port_is_open_to_the_ingress_controller_and_the_dicom_node_only():
    (ray_policy,) = [
        p for p in DOCS["network-policy.yaml"] if p["metadata"]["name"] == "orthovision-ray"
    ]
    for rule in ray_policy["spec"]["ingress"]:
        assert rule.get("from"), f"a rule open to every source: {rule}"
    http = [
        r
        for r in ray_policy["spec"]["ingress"]
        if {"protocol": "TCP", "port": 8000} in r.get("ports", [])
    ]
    (rule,) = http
    ingress, node = rule["from"]
    assert ingress["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    assert node["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "orthovision-dicom-node"
    }


def test_ray_pods_run_restricted():
    for _, group in GROUPS:
        spec = group["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
        container = spec["containers"][0]["securityContext"]
        assert container["readOnlyRootFilesystem"] is True
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"] == {"drop": ["ALL"]}
    # Ray's own token auth on the dashboard (job submission), GCS and client ports.
    assert CLUSTER["authOptions"] == {"mode": "token"}


def test_redis_requires_a_password_from_a_secret():
    (sts,) = [d for d in DOCS["redis.yaml"] if d["kind"] == "StatefulSet"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--protected-mode") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert (
        env["REDIS_PASSWORD"]
        == env["REDISCLI_AUTH"]
        == {"name": "orthovision-redis", "key": "password"}
    )
    gcs = CLUSTER["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert gcs == {"name": "orthovision-redis", "key": "password"}


def test_alert_rules_pass_promtool(tmp_path):
    """Prometheus's own checker on every rule (SLO and drift), as the operator loads them."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus)")
    from serve.manifests.monitoring import drift_rules

    (rule_doc,) = [d for d in DOCS["monitoring.yaml"] if d["kind"] == "PrometheusRule"]
    spec = dict(rule_doc["spec"])
    # The drift rules as a card with a baseline renders them (whether or not models/default
    # has one yet).
    baseline = {
        "abstain_rate": 0.04,
        "ood_abstain_rate": 0.05,
        "label_mix": {"fracture": 0.4, "non-affected": 0.56, "abstained": 0.04},
    }
    spec["groups"] = [*spec["groups"], {"name": "drift-check", "rules": drift_rules(baseline)}]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_drift_alerts_follow_the_card_baseline():
    from serve.manifests.monitoring import drift_rules

    baseline = {
        "abstain_rate": 0.04,
        "ood_abstain_rate": 0.05,
        "label_mix": {"fracture": 0.4, "non-affected": 0.56, "abstained": 0.04},
    }
    rules = {r["alert"]: r for r in drift_rules(baseline)}
    assert "> 0.1200" in rules["OrthoVisionAbstentionRateHigh"]["expr"]  # 3x the baseline
    assert "> 0.1500" in rules["OrthoVisionOutOfDistributionRateHigh"]["expr"]
    psi = rules["OrthoVisionLabelMixShift"]["expr"]
    assert psi.count("ln(") == 3 and psi.endswith("> 0.2") and "[1d]" in psi
    assert all(r["expr"].count("by (tenant)") >= 2 for r in rules.values())
    assert drift_rules(None) == []


def test_dashboard_has_the_drift_panels():
    import json

    dashboard = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert sum(t.startswith("Drift:") for t in titles) == 4
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("abstentions_total", "ood_score_bucket", "results_total", "top_probability"):
        assert f"ray_orthovision_{metric}" in exprs


def test_render_flags_set_image_and_namespaces_without_editing_python(tmp_path):
    from serve.commands import main

    out, k8s_out = tmp_path / "deploy", tmp_path / "k8s"
    main(
        [
            "render",
            "--out", str(out),
            "--k8s-out", str(k8s_out),
            "--image", "registry.hospital.example/orthovision-serve:0.2",
            "--namespace", "radiology-ai",
            "--ingress-namespace", "traefik",
        ]
    )  # fmt: skip
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in k8s_out.glob("*.yaml")}
    (service,) = docs["rayservice.yaml"]
    assert service["metadata"]["namespace"] == "radiology-ai"
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.hospital.example/orthovision-serve:0.2"
    assert all(d["metadata"]["namespace"] == "radiology-ai" for d in docs["redis.yaml"])
    assert "traefik" in (k8s_out / "network-policy.yaml").read_text()
    gpu = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
