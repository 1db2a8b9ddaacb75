"""Softmax, temperature and the weighted fusion in numpy: the one place evaluation, training
and the torch-free serving path compute probabilities from logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fused_probabilities(
    logits: Mapping[str, np.ndarray], weights: Sequence[float], temperature: float = 1.0
) -> np.ndarray:
    """sum_k w_k softmax(logits_k / T): the Ensemble's fusion (model/fusion.py) in numpy."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    probs = [softmax(lg, temperature) for lg in logits.values()]
    return sum(w * p for w, p in zip(weights, probs, strict=True))


def nll(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped at 1e-12)."""
    picked = probs[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1))))
