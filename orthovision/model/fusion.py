"""Learned fusion of branch logits and the decision rule.

Pure functions: the Ensemble and the Fusion deployment share them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fusion_weights_from_params(fusion_params: torch.Tensor) -> torch.Tensor:
    """Softmax over the learnable per-branch parameters: positive weights summing to 1."""
    return torch.softmax(fusion_params, dim=0)


def fuse_logits(
    branch_logits: Sequence[torch.Tensor], fusion_weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(B, C) fused probabilities = sum_i w_i * softmax(logits_i / T).

    Averaging probabilities (not logits) keeps each branch's calibration and matches the
    paper's weighted soft voting.
    """
    if len(branch_logits) != fusion_weights.numel():
        raise ValueError(f"{len(branch_logits)} branches but {fusion_weights.numel()} weights")
    stacked = torch.stack([torch.softmax(lg.float() / temperature, dim=-1) for lg in branch_logits])
    return torch.einsum("k,kbc->bc", fusion_weights.float().to(stacked.device), stacked)
