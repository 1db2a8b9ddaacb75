"""Optimiser, learning-rate schedule (warm-up + cosine), gradient clipping and the
exponential moving average of the weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orthovision.model.backbones import Ensemble


def clip_gradients(params, max_norm: float | None) -> None:
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def lr_factor(step: int, steps_per_epoch: int, tc) -> float:
    """Multiplier of the base learning rate at a global optimizer step (warm-up, schedule)."""
    warmup = tc.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if tc.schedule == "constant":
        return 1.0
    total = max(tc.epochs * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: Ensemble, tc) -> torch.optim.Optimizer:
    """One parameter group per branch (its own lr) plus the fusion weights."""
    unknown = set(tc.branch_lr) - set(model.branch_names)
    if unknown:
        raise ValueError(f"branch_lr names unknown branches {sorted(unknown)}")
    groups = []
    for name in model.branch_names:
        params = [p for p in model.branches[name].parameters() if p.requires_grad]
        if params:
            lr = tc.branch_lr.get(name, tc.lr)
            groups.append({"params": params, "lr": lr, "base_lr": lr, "name": name})
    if model.fusion_params.requires_grad:
        groups.append(
            {"params": [model.fusion_params], "lr": tc.lr, "base_lr": tc.lr, "name": "fusion"}
        )
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=tc.lr, weight_decay=tc.weight_decay)


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers (Polyak averaging).

    The decay warms up as (1 + n) / (10 + n), so the average is not dominated by the
    random initialisation early on (timm's ModelEmaV3 does the same).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ours = self.module.state_dict()
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ours[k].lerp_(v.detach(), 1.0 - d)
            else:
                ours[k].copy_(v)
