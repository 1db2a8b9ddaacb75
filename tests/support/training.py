"""A tiny training config (timm test models, 32 px) over given sources."""

from __future__ import annotations

from pathlib import Path

from orthovision.config import OrthoVisionConfig

TINY = [
    {"name": "efficientnet_b0", "timm_name": "test_efficientnet"},
    {"name": "resnet18", "timm_name": "test_resnet"},
]


def tiny_cfg(tmp_path: Path, sources: list[dict], **train) -> OrthoVisionConfig:
    return OrthoVisionConfig.model_validate(
        {
            "preprocess": {"image_size": 32},
            "model": {"backbones": TINY},
            "train": {
                "sources": sources,
                "epochs": 1,
                "batch_size": 8,
                "max_steps_per_epoch": 2,
                "fusion_epochs": 5,
                "cache_dir": str(tmp_path / "cache"),
                "eval_batch_size": 32,
                "bootstrap_samples": 20,
                "num_threads": 1,
                **train,
            },
        }
    )
