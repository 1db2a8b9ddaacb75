"""The two shipped presets (`local`: one machine, CPU; `gpu`: the KubeRay cluster)."""

from __future__ import annotations

from orthovision.config import OrthoVisionConfig, ServeConfig
from serve.manifests.serve_config import CPU_NODE_RESOURCE, MODEL_NODE_RESOURCE


def preset(name: str) -> OrthoVisionConfig:
    """The shipped deployment presets."""
    if name == "local":
        # One machine, CPU, every deployment present: the embedded default of `make serve`.
        base = ServeConfig()
        return OrthoVisionConfig(
            serve=ServeConfig(
                device="cpu",
                # A 32-image batch request fans out 32 preprocess calls at once. Queued in the
                # replica they cost nothing; queued in the caller's router they are re-probed
                # until a slot frees, burning the CPU the batch needs: 16 keeps them in the
                # replica's queue.
                preprocessor=base.preprocessor.model_copy(update={"max_ongoing_requests": 16}),
                # One ingress gathers the images already (serve/gather.py): a backbone that
                # waited for more calls would only idle the CPU that is the bottleneck.
                batch={"max_batch_size": 8, "batch_wait_timeout_s": 0.0},
            )
        )
    if name == "gpu":
        base = ServeConfig()
        on_cpu_pool = {"resources": {CPU_NODE_RESOURCE: 1.0}}
        on_model_pool = {"resources": {MODEL_NODE_RESOURCE: 1.0}}
        return OrthoVisionConfig(
            serve=ServeConfig(
                host="0.0.0.0",
                admission_max_inflight=96,
                # Off loopback, API keys are mandatory; they come from a Secret as env.
                security={"auth": "api-key"},
                device="cuda",
                store_url="redis://orthovision-redis:6379/0",
                batch={"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
                preprocessor=base.preprocessor.model_copy(
                    update={
                        "min_replicas": 2,
                        "max_replicas": 16,
                        "num_cpus": 1.0,
                        # A call is a chunk of up to max_batch_size images: one in flight
                        # keeps a replica busy.
                        "target_ongoing_requests": 1.0,
                        **on_cpu_pool,
                    }
                ),
                # Half a GPU per backbone replica: both backbones share one card.
                backbone=base.backbone.model_copy(
                    update={
                        "min_replicas": 1,
                        "max_replicas": 4,
                        "num_cpus": 1.0,
                        "num_gpus": 0.5,
                        "max_ongoing_requests": 64,
                        # Calls are batches (gathered in the ingress): one running and one
                        # waiting per replica.
                        "target_ongoing_requests": 2.0,
                        "max_queued_requests": 256,
                        **on_model_pool,
                    }
                ),
                explainer=base.explainer.model_copy(
                    update={
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "downscale_delay_s": 30.0,
                        "num_gpus": 0.25,
                        **on_model_pool,
                    }
                ),
                ingress=base.ingress.model_copy(
                    update={
                        "min_replicas": 1,
                        "max_replicas": 4,
                        "max_ongoing_requests": 64,
                        "max_queued_requests": 32,
                        "target_ongoing_requests": 32.0,
                        **on_cpu_pool,
                    }
                ),
                fusion=base.fusion.model_copy(
                    update={"min_replicas": 1, "max_replicas": 4, **on_cpu_pool}
                ),
            )
        )
    raise ValueError(f"unknown preset {name!r}; known: local, gpu")
