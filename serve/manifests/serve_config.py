"""Render Ray Serve config files from the one typed config (docs/DESIGN.md: one config).

`deploy/*.yaml` are outputs of `orthovision render`; a test fails when a committed file
differs from its render, so hand edits cannot drift from the config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from orthovision.config import DeploymentConfig, OrthoVisionConfig
from orthovision.paths import project_path
from serve import autoscaling

# Custom Ray resources that steer placement: each Ray node (a KubeRay worker group, or a
# `ray start --resources` node) advertises one of them, and each deployment asks for one
# unit, so the CPU pool (ingress, preprocessing, fusion) and the model pool (backbones,
# explainer) never take each other's nodes. See serve/manifests/.
CPU_NODE_RESOURCE = "orthovision_cpu_node"
MODEL_NODE_RESOURCE = "orthovision_model_node"


def served_branches(cfg: OrthoVisionConfig) -> list[str]:
    """Branch names of the checkpoint the config serves (its card in this checkout), else
    the config's own backbones: deployment names and alerts follow what is served."""
    from orthovision.model.card import CheckpointError, branch_names, read_card

    try:
        return branch_names(read_card(project_path(cfg.serve.checkpoint)))
    except (CheckpointError, KeyError):
        return [b.name for b in cfg.model.backbones]


def deployment_options(d: DeploymentConfig) -> dict:
    """Ray Serve deployment options for one DeploymentConfig (autoscaled when min < max)."""
    actor: dict = {"num_cpus": d.num_cpus}
    if d.num_gpus:
        actor["num_gpus"] = d.num_gpus
    if d.resources:
        actor["resources"] = dict(d.resources)
    opts: dict = {
        "ray_actor_options": actor,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "logging_config": {"enable_access_log": d.access_log},
    }
    if d.autoscaled:
        opts["autoscaling_config"] = {
            "min_replicas": d.min_replicas,
            # Nothing starts a deployment that may scale to zero until it is asked for.
            "initial_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "target_ongoing_requests": d.target_ongoing_requests,
            "upscale_delay_s": d.upscale_delay_s,
            "downscale_delay_s": d.downscale_delay_s,
            "policy": {
                "policy_function": autoscaling.POLICY_PATH,
                "policy_kwargs": {
                    "scale_down_below": d.scale_down_below,
                    "target_busy": d.target_busy,
                },
            },
        }
    else:
        opts["num_replicas"] = d.min_replicas
    return opts


def deployments(cfg: OrthoVisionConfig) -> list[dict]:
    """Ray Serve's own per-deployment section of a config file: what an SRE reads with
    `serve status` and edits in place (`kubectl edit rayservice`, `serve deploy`). Replicas,
    autoscaling, queue bounds and actor options restart replicas when changed; `user_config`
    (batching knobs, the fusion's temperature and abstain threshold) reconfigures running
    replicas without a restart (their `reconfigure` methods)."""
    s = cfg.serve
    out = [
        {"name": "Ingress", **deployment_options(s.ingress)},
        {"name": "Preprocessor", **deployment_options(s.preprocessor)},
    ]
    for branch in served_branches(cfg):
        out.append(
            {
                "name": f"Backbone_{branch}",
                **deployment_options(s.backbone),
                "user_config": s.batch.model_dump(mode="json"),
            }
        )
    out.append(
        {
            "name": "Fusion",
            **deployment_options(s.fusion),
            "user_config": cfg.fusion.model_dump(mode="json"),
        }
    )
    out.append({"name": "Explainer", **deployment_options(s.explainer)})
    return out


def served_model(cfg: OrthoVisionConfig) -> dict:
    """The model section as served: the checkpoint's own (its card in this checkout), so a
    rendered file never describes a model that is not the one running."""
    from orthovision.model.card import CheckpointError, read_card

    try:
        return read_card(project_path(cfg.serve.checkpoint))["config"]["model"]
    except (CheckpointError, KeyError):
        return cfg.model.model_dump(mode="json")


def serve_config(cfg: OrthoVisionConfig) -> dict:
    """A Serve config file (the schema of `serve deploy` and RayService serveConfigV2)."""
    config = cfg.model_dump(mode="json", exclude={"train"})  # training is not the service's
    config["model"] = served_model(cfg)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [
            {
                "name": cfg.serve.app_name,
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {"config": config},
                "deployments": deployments(cfg),
            }
        ],
    }


def load_serve_file(path: Path) -> OrthoVisionConfig:
    """The OrthoVisionConfig carried as the application's args in a Serve config file."""
    doc = yaml.safe_load(Path(path).read_text())
    return OrthoVisionConfig.model_validate(doc["applications"][0]["args"]["config"])
