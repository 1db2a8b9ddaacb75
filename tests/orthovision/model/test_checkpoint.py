"""Checkpoint folder: safetensors + model card; verification on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from orthovision.config import BackboneConfig, ModelConfig, OrthoVisionConfig, PreprocessConfig
from orthovision.model.backbones import Ensemble, build_ensemble
from orthovision.model.card import CARD_FILE, WEIGHTS_FILE, CheckpointError
from orthovision.model.checkpoint import load_checkpoint, save_checkpoint


def tiny_config(pretrained: str = "none") -> OrthoVisionConfig:
    backbones = (
        BackboneConfig(name="eff", timm_name="test_efficientnet", pretrained=pretrained),
        BackboneConfig(name="res", timm_name="test_resnet", pretrained=pretrained),
    )
    return OrthoVisionConfig(model=ModelConfig(backbones=backbones))


def tiny_model(cfg: OrthoVisionConfig) -> Ensemble:
    torch.manual_seed(0)
    model = build_ensemble(
        cfg.model.model_copy(
            update={
                "backbones": tuple(
                    b.model_copy(update={"pretrained": "none"}) for b in cfg.model.backbones
                )
            }
        )
    )
    with torch.no_grad():  # not the initial values, so the round trip proves they are stored
        model.fusion_params.copy_(torch.tensor([0.1, -0.3]))
        model.temperature.fill_(1.7)
    return model.eval()


def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 1, 64, 64), generator=g, dtype=torch.uint8)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Ensemble, OrthoVisionConfig, Path]:
    cfg = tiny_config()
    model = tiny_model(cfg)
    path = save_checkpoint(
        model,
        cfg,
        tmp_path / "ckpt",
        validated_classes=["fracture", "non-affected"],
        trained=True,
        data={"train": 10},
        metrics={"accuracy": 0.5},
    )
    return model, cfg, path


def fp16_rounded(model: Ensemble) -> Ensemble:
    """The model as the checkpoint stores it: >= 2-D float weights rounded through float16."""
    rounded = tiny_model(tiny_config())
    state = {
        k: v.half().float() if v.is_floating_point() and v.ndim >= 2 else v
        for k, v in model.state_dict().items()
    }
    rounded.load_state_dict(state)
    return rounded.eval()


def test_round_trip_reproduces_outputs(saved):
    model, cfg, path = saved
    ckpt = load_checkpoint(path, expected_preprocess=cfg.preprocess)
    loaded = ckpt.model
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert float(loaded.temperature) == pytest.approx(1.7)
    torch.testing.assert_close(loaded.fusion_params, model.fusion_params, atol=0, rtol=0)
    with torch.no_grad():
        got = loaded(batch())
        want = fp16_rounded(model)(batch())
        original = model(batch())
    torch.testing.assert_close(got.probabilities, want.probabilities, atol=1e-6, rtol=1e-5)
    for name in want.branch_logits:
        torch.testing.assert_close(got.branch_logits[name], want.branch_logits[name])
    # And fp16 storage of weights costs almost nothing in probability.
    torch.testing.assert_close(got.probabilities, original.probabilities, atol=2e-3, rtol=0)


def test_card_describes_the_checkpoint(saved):
    model, cfg, path = saved
    card = json.loads((path / CARD_FILE).read_text())
    assert card["classes"] == list(cfg.model.classes)
    assert card["validated_classes"] == ["fracture", "non-affected"]
    assert card["architectures"] == {"eff": "test_efficientnet", "res": "test_resnet"}
    assert card["preprocess"] == cfg.preprocess.model_dump(mode="json")
    assert card["preprocess_sha256"] == cfg.preprocess.param_hash()
    assert card["trained"] is True
    assert card["data"] == {"train": 10} and card["metrics"] == {"accuracy": 0.5}
    weights = (path / WEIGHTS_FILE).read_bytes()
    assert card["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert card["config"]["model"]["temperature"] == pytest.approx(1.7)
    assert OrthoVisionConfig.model_validate(card["config"]).preprocess == cfg.preprocess
    assert {"name", "version", "created_at"} <= set(card)


def test_weights_are_float16_where_it_saves_bytes(saved):
    _, _, path = saved
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["branches.res.fc.weight"] == "F16"
    assert dtypes["branches.eff.conv_stem.weight"] == "F16"
    # Tiny but precision-sensitive tensors stay float32.
    for key in ("fusion_params", "temperature", "norms.eff.mean", "branches.eff.bn2.running_var"):
        assert dtypes[key] == "F32", key


def test_no_pickle_in_checkpoint_folder(saved):
    _, _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [WEIGHTS_FILE, CARD_FILE]


def _flip_weight_byte(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def _edit_card(path: Path, edit) -> None:
    card = json.loads((path / CARD_FILE).read_text())
    edit(card)
    (path / CARD_FILE).write_text(json.dumps(card))


def _swap_architecture(card: dict) -> None:
    # Valid config, intact sha, but the weights are for another network: strict keys refuse.
    card["config"]["model"]["backbones"][1]["timm_name"] = "test_efficientnet"


def _rehash_preprocess(card: dict) -> None:
    card["preprocess_sha256"] = "0" * 64


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (_flip_weight_byte, "sha256"),
        (lambda p: (p / WEIGHTS_FILE).unlink(), "weights not found"),
        (lambda p: (p / CARD_FILE).unlink(), "card not found"),
        (lambda p: (p / CARD_FILE).write_text("{not json"), "unreadable model card"),
        (lambda p: _edit_card(p, _swap_architecture), "do not fit"),
        (lambda p: _edit_card(p, _rehash_preprocess), "preprocess_sha256"),
        (lambda p: _edit_card(p, lambda c: c.pop("config")), "no valid config"),
    ],
    ids=["weights-byte", "no-weights", "no-card", "bad-json", "arch", "pp-hash", "no-config"],
)
def test_tampered_checkpoint_is_refused(saved, tamper, match):
    _, _, path = saved
    tamper(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "replica_preprocess",
    [PreprocessConfig(clahe_clip_limit=3.0), PreprocessConfig(resize_mode="stretch")],
)
def test_replica_with_other_preprocessing_is_refused(saved, replica_preprocess):
    _, cfg, path = saved
    with pytest.raises(CheckpointError, match="checkpoint was trained with preprocessing") as err:
        load_checkpoint(path, expected_preprocess=replica_preprocess)
    assert cfg.preprocess.param_hash() in str(err.value)
    assert replica_preprocess.param_hash() in str(err.value)


def test_loading_never_fetches_initial_weights(tmp_path):
    # The card records pretrained="timm" (hub, offline here); loading must not try it.
    cfg = tiny_config(pretrained="timm")
    path = save_checkpoint(
        tiny_model(cfg), cfg, tmp_path / "c", validated_classes=[], trained=False
    )
    ckpt = load_checkpoint(path)
    assert [b.pretrained for b in ckpt.config.model.backbones] == ["timm", "timm"]
    assert ckpt.card["trained"] is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validated_classes": ["fracture", "osteoporosis"]}, "validated_classes"),
        ({"cfg": OrthoVisionConfig()}, "does not describe"),
    ],
)
def test_save_refuses_inconsistent_card(tmp_path, kwargs, match):
    cfg = tiny_config()
    args = {"cfg": cfg, "validated_classes": ["fracture"]} | kwargs
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tiny_model(cfg), out_dir=tmp_path, trained=True, **args)


def test_fusion_head_matches_the_full_checkpoint_and_checks_the_hash(tmp_path):
    from support.checkpoints import save_tiny_checkpoint

    from orthovision.model.card import CheckpointError, load_fusion_head
    from orthovision.model.checkpoint import load_checkpoint

    path = save_tiny_checkpoint(tmp_path / "ckpt")
    head, full = load_fusion_head(path), load_checkpoint(path)
    assert list(head.fusion_weights) == full.model.branch_names
    assert list(head.fusion_weights.values()) == pytest.approx(full.model.fusion_weights.tolist())
    assert head.temperature == pytest.approx(float(full.model.temperature))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(CheckpointError):
        load_fusion_head(path)
