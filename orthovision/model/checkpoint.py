"""Checkpoint folder: `model.safetensors` (no pickles) + `model_card.json` (docs/DESIGN.md).

Loading verifies the sha256 of the weights and the preprocessing hash before any tensor is
used: a replica must refuse a checkpoint trained with different pixels.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from orthovision.config import OrthoVisionConfig, PreprocessConfig
from orthovision.model.backbones import Ensemble
from orthovision.model.card import (
    CARD_FILE,
    CARD_FORMAT,
    WEIGHTS_FILE,
    CheckpointError,
    read_card,
    sha256_hex,
)

_FP16_MAX = torch.finfo(torch.float16).max


@dataclass
class Checkpoint:
    model: Ensemble
    config: OrthoVisionConfig
    card: dict
    path: Path


def _storage_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """float16 for conv/linear weights (the bulk of the bytes: halves the shipped file).

    1-D and scalar tensors (BN statistics, biases, mean/std, fusion parameters, temperature)
    stay float32: they are a tiny share of the bytes, and BN running_var or log-weights lose
    real precision in float16.
    """
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.is_floating_point() and tensor.ndim >= 2:
        if tensor.abs().max() <= _FP16_MAX:  # never store an overflow as inf
            return tensor.to(torch.float16)
    return tensor


def save_checkpoint(
    model: Ensemble,
    cfg: OrthoVisionConfig,
    out_dir: Path,
    *,
    validated_classes: Sequence[str],
    trained: bool,
    data: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    name: str = "orthovision",
    version: str = "0.1.0",
) -> Path:
    """Write weights and card into `out_dir`; returns the folder. `extra`: more card
    sections (training record, operating point, safety), written with the rest at once."""
    arch = [(b.name, b.timm_name) for b in model.cfg.backbones]
    if arch != [(b.name, b.timm_name) for b in cfg.model.backbones] or (
        model.cfg.classes != cfg.model.classes
    ):
        raise ValueError("cfg.model does not describe this ensemble (backbones or classes differ)")
    unknown = [c for c in validated_classes if c not in cfg.model.classes]
    if unknown:
        raise ValueError(f"validated_classes {unknown} are not among {cfg.model.classes}")
    # The calibrated temperature lives in the weights; keep the card's config consistent.
    temperature = float(model.temperature)
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"temperature": temperature})}
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS_FILE
    tensors = {k: _storage_tensor(v) for k, v in model.state_dict().items()}
    save_file(tensors, str(weights_path), metadata={"format": "pt", "name": name})

    card = {
        "format": CARD_FORMAT,
        "name": name,
        "version": version,
        "classes": list(cfg.model.classes),
        "validated_classes": list(validated_classes),
        "architectures": {b.name: b.timm_name for b in cfg.model.backbones},
        "fusion_weights": dict(zip(model.branch_names, model.fusion_weights.tolist(), strict=True)),
        "temperature": temperature,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "preprocess_sha256": cfg.preprocess.param_hash(),
        "config": cfg.model_dump(mode="json"),
        "data": data or {},
        "metrics": metrics or {},
        "trained": trained,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_hex(weights_path.read_bytes()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return out_dir


def as_stored(model: Ensemble) -> Ensemble:
    """A copy of `model` at the precision its checkpoint file keeps (float16 convs), i.e.
    what `load_checkpoint` will return: metrics on it are the shipped model's."""
    stored = copy.deepcopy(model).cpu()
    state = {k: _storage_tensor(v) for k, v in stored.state_dict().items()}
    stored.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return stored.eval()


def load_checkpoint(
    path: Path | str,
    *,
    expected_preprocess: PreprocessConfig | None = None,
    map_location: str = "cpu",
) -> Checkpoint:
    """Verify and load a checkpoint folder into a float32 Ensemble in eval mode."""
    path = Path(path)
    card = read_card(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")

    # Hash and parse the same bytes, so the file cannot change between check and use.
    blob = weights_path.read_bytes()
    actual_sha = sha256_hex(blob)
    if actual_sha != card.get("weights_sha256"):
        raise CheckpointError(
            f"weights sha256 {actual_sha} does not match the card's "
            f"{card.get('weights_sha256')}: the file was modified or is not this card's"
        )

    try:
        # Only what shapes the weights and the pixels comes from the card; serving and
        # decoding settings are today's defaults, so old checkpoints survive config changes.
        config = OrthoVisionConfig.model_validate(
            {k: card["config"][k] for k in ("model", "preprocess")}
        )
    except (KeyError, ValidationError) as exc:
        raise CheckpointError(f"model card has no valid config: {exc}") from None
    trained_hash = config.preprocess.param_hash()
    if card.get("preprocess_sha256") != trained_hash:
        raise CheckpointError("model card preprocess_sha256 does not match its own config")
    if expected_preprocess is not None and expected_preprocess.param_hash() != trained_hash:
        raise CheckpointError(
            f"checkpoint was trained with preprocessing {trained_hash} but this replica runs "
            f"{expected_preprocess.param_hash()}"
        )

    # The checkpoint holds every weight: never fetch or read initial weights again.
    backbones = tuple(b.model_copy(update={"pretrained": "none"}) for b in config.model.backbones)
    model = Ensemble(config.model.model_copy(update={"backbones": backbones}))
    try:
        state = load_safetensors_bytes(blob)
    except SafetensorError as exc:
        raise CheckpointError(f"unreadable weights {weights_path}: {exc}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatch
        raise CheckpointError(f"weights do not fit the card's architecture: {exc}") from None
    # Restore the caller-facing config (with the original weight sources) for the record.
    model.cfg = config.model
    model.to(map_location).eval()
    return Checkpoint(model=model, config=config, card=card, path=path)
