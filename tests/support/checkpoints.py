"""Tiny checkpoints (timm test models): fast stand-ins for the shipped model."""

from __future__ import annotations

from pathlib import Path

# Tiny timm backbones under the shipped branch names: fast checkpoints for the tests.
TINY_BACKBONES = (
    {"name": "efficientnet_b0", "timm_name": "test_efficientnet"},
    {"name": "resnet18", "timm_name": "test_resnet"},
)


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of the tiny backbones (fracture, non-affected validated)."""
    import torch

    from orthovision.config import ModelConfig, OrthoVisionConfig
    from orthovision.model.backbones import build_ensemble
    from orthovision.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = ModelConfig(backbones=TINY_BACKBONES)
    return save_checkpoint(
        build_ensemble(model),
        OrthoVisionConfig(model=model),
        path,
        validated_classes=["fracture", "non-affected"],
        trained=False,
    )
