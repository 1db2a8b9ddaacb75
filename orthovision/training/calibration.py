"""After the branches train: fusion weights, temperature scaling and the clinical
operating point, each fitted on the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from orthovision.model.backbones import Ensemble
from orthovision.model.fusion import fusion_weights_from_params
from orthovision.model.probabilities import fused_probabilities, nll


def weighted_nll(log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    """Class-weighted NLL, normalised by the weights of the batch (as cross_entropy does)."""
    return nn.functional.nll_loss(log_probs, target, weight=weight)


def fused_log_probs(model: Ensemble, branch_logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """log of the fused probabilities at temperature 1 (the ensemble's training loss input)."""
    weights = fusion_weights_from_params(model.fusion_params)
    stacked = torch.stack(
        [torch.log_softmax(branch_logits[n].float(), -1) for n in model.branch_names]
    )
    # log sum_k w_k p_k, stable in log space.
    return torch.logsumexp(stacked + torch.log(weights).view(-1, 1, 1), dim=0)


def fit_fusion_weights(
    model: Ensemble,
    logits: dict[str, np.ndarray],
    targets: np.ndarray,
    weight: torch.Tensor | None,
    steps: int,
    lr: float,
) -> list[float]:
    """Fusion parameters only (branches frozen), full batch Adam on cached branch logits."""
    params = model.fusion_params
    opt = torch.optim.Adam([params], lr=lr)
    lg = {n: torch.as_tensor(v, device=params.device) for n, v in logits.items()}
    y = torch.as_tensor(targets, device=params.device)
    w = None if weight is None else weight.to(params.device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = weighted_nll(fused_log_probs(model, lg), y, w)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def fit_temperature(
    logits: dict[str, np.ndarray], fusion_weights: np.ndarray, targets: np.ndarray
) -> tuple[float, float, float]:
    """Temperature scaling (Guo et al. 2017): T minimising the NLL of the fused probabilities.

    A 1-D problem: a log-spaced grid then a local refinement; returns (T, nll@1, nll@T).
    """

    def loss(t: float) -> float:
        return nll(targets, fused_probabilities(logits, fusion_weights, t))

    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 121))
    best = min(grid, key=loss)
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    best = float(min(fine, key=loss))
    return best, loss(1.0), loss(best)


def choose_operating_point(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], target_sensitivity: float
) -> dict | None:
    """The fracture threshold with sensitivity >= target on these (validation) data.

    The highest threshold that keeps the target: every higher one misses more fractures.
    None when the class has no positive or no negative sample.
    """
    if "fracture" not in classes:
        return None
    k = list(classes).index("fracture")
    pos = np.asarray(y_true) == k
    if not pos.any() or pos.all():
        return None
    scores = probs[:, k]
    # Candidate thresholds: each positive's score (sensitivity only drops past one).
    candidates = np.sort(np.unique(scores[pos]))[::-1]
    threshold = float(candidates[-1])
    for t in candidates:
        if np.mean(scores[pos] >= t) >= target_sensitivity:
            threshold = float(t)
            break
    predicted = scores >= threshold
    return {
        "class": "fracture",
        "threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "chosen_on": "val",
        "val_sensitivity": float(np.mean(predicted[pos])),
        "val_specificity": float(np.mean(~predicted[~pos])),
        "n_val": int(len(y_true)),
    }
