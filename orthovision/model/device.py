"""Device choice, one rule for training, serving and benchmarks."""

from __future__ import annotations

import torch


def resolve_device(preference: str) -> torch.device:
    """ "auto": CUDA when present, else CPU; any other value names the device."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def enable_cudnn_autotune() -> None:
    """Fixed 224x224 inputs: let cuDNN pick the fastest kernels once, at warm-up."""
    torch.backends.cudnn.benchmark = True
