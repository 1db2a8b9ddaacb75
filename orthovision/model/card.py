"""A checkpoint folder's card and fusion head, read without torch (the Fusion replica
and the ingress need a few numbers, not two CNNs; docs/DESIGN.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from orthovision.config import PreprocessConfig
from orthovision.model.probabilities import softmax

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
CARD_FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint is missing, tampered with, or does not fit this code or this replica."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def branch_names(card: dict) -> list[str]:
    """The branch (backbone) names a checkpoint carries, in fusion order."""
    return [b["name"] for b in card["config"]["model"]["backbones"]]


def read_card(path: Path | str) -> dict:
    """The model card of a checkpoint folder (no weights loaded)."""
    card_path = Path(path) / CARD_FILE
    if not card_path.is_file():
        raise CheckpointError(f"checkpoint card not found: {card_path}")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"unreadable model card {card_path}: {exc}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"model card {card_path} is not a JSON object")
    return card


@dataclass
class FusionHead:
    """What the Fusion deployment needs of a checkpoint: no backbone weights."""

    card: dict
    fusion_weights: dict[str, float]
    temperature: float


def verified_tensors(
    path: Path | str, keys: list[str], *, expected_preprocess: PreprocessConfig | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(card, the named tensors as numpy), with the same checks as `load_checkpoint`
    (weights sha256, preprocessing hash) but without building any backbone: the Fusion
    replica and an ONNX backbone replica need a few small tensors, not torch."""
    path = Path(path)
    card = read_card(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    if sha256_hex(weights_path.read_bytes()) != card.get("weights_sha256"):
        raise CheckpointError("weights sha256 does not match the card's")
    trained_hash = card.get("preprocess_sha256")
    if expected_preprocess is not None and expected_preprocess.param_hash() != trained_hash:
        raise CheckpointError(
            f"checkpoint was trained with preprocessing {trained_hash} but this replica runs "
            f"{expected_preprocess.param_hash()}"
        )
    try:
        with safe_open(str(weights_path), framework="numpy") as f:
            return card, {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, KeyError) as exc:
        raise CheckpointError(f"tensor missing from {weights_path}: {exc}") from None


def load_fusion_head(
    path: Path | str, *, expected_preprocess: PreprocessConfig | None = None
) -> FusionHead:
    """The card, the fusion weights and the calibrated temperature (verified_tensors)."""
    card, t = verified_tensors(
        path, ["fusion_params", "temperature"], expected_preprocess=expected_preprocess
    )
    names = branch_names(card)
    # The Ensemble's softmax over its fusion parameters.
    weights = softmax(t["fusion_params"].astype(np.float64)[None])[0].tolist()
    return FusionHead(card, dict(zip(names, weights, strict=True)), float(t["temperature"]))
