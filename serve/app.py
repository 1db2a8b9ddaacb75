"""The typed application builder: `serve.app:build_app` (Serve config files, RayService)."""

from __future__ import annotations

import logging

from pydantic import BaseModel, Field
from ray.serve import Application

from orthovision.config import OrthoVisionConfig
from serve.auth import check_binding
from serve.backbone import BackboneDeployment
from serve.explainer import ExplainerDeployment
from serve.fusion import FusionDeployment
from serve.ingress import Ingress
from serve.manifests.serve_config import deployment_options
from serve.preprocessor import PreprocessorDeployment
from serve.runtime import checkpoint_branches

log = logging.getLogger("ray.serve")


class AppArgs(BaseModel):
    config: OrthoVisionConfig = Field(default_factory=OrthoVisionConfig)


def build_app(args: AppArgs | dict) -> Application:
    """Bind every deployment with the options the one config gives it."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    cfg = args.config
    s = cfg.serve
    check_binding(s)  # fail in the driver, with the reason, before any replica starts
    config = cfg.model_dump(mode="json")
    preprocessor = PreprocessorDeployment.options(
        name="Preprocessor", **deployment_options(s.preprocessor)
    ).bind(config)
    backbones = {
        name: BackboneDeployment.options(
            name=f"Backbone_{name}",
            user_config=s.batch.model_dump(),
            **deployment_options(s.backbone),
        ).bind(name, config)
        for name in checkpoint_branches(cfg)
    }
    fusion = FusionDeployment.options(
        name="Fusion", user_config=cfg.fusion.model_dump(), **deployment_options(s.fusion)
    ).bind(config)
    explainer = ExplainerDeployment.options(
        name="Explainer", **deployment_options(s.explainer)
    ).bind(config)
    return Ingress.options(name="Ingress", **deployment_options(s.ingress)).bind(
        preprocessor, backbones, fusion, explainer, config
    )
