"""GradCAM++ per branch (pytorch-grad-cam) and the fusion-weighted map, plus PNG overlays.

The CAM hooks live on the shared model, so a replica explains one image at a time.
Explaining leaves no trace on the model: hooks are removed, train/eval flags,
requires_grad flags and .grad are restored, and no parameter or BN statistic changes.

Attention outside the exposed field is suppressed. A CNN responds most to the strongest
edges, and on real radiographs those are the collimator's and the letterbox's borders, not
anatomy: GradCAM++ of such an image peaks on the frame, and the per-image [0, 1] rescaling
then dims everything else. Each branch's map is therefore multiplied by `exposed_field`
of the model input (padding and flat black or saturated areas reaching the image's edge
count as outside, feathered a few pixels into the field) before it is rescaled and fused.
This changes what is shown, never the prediction; `explain(..., mask_field=False)` gives
the raw maps.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from orthovision.model.backbones import Ensemble


@dataclass
class Explanation:
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], model input size, fusion-weighted
    branch_heatmaps: dict[str, np.ndarray]  # name -> (H, W) float32 in [0, 1]
    target_class: int
    fusion_weights: dict[str, float]
    # (H, W) float32 in [0, 1]: the weight each CAM was multiplied by (all ones: unmasked).
    field: np.ndarray | None = None


# After CLAHE (orthovision/imaging/preprocess.py) a black border or padding sits at 0..~3
# (a flat tile maps to clip/256 of the range) and an unexposed, collimated area stays at
# 255; anatomy in a flat extreme the size of FIELD_MIN_AREA does not occur.
FIELD_DARK_MAX = 8
FIELD_BRIGHT_MIN = 254
# A flat extreme smaller than this share of the image is a tile's darkest or brightest
# speck (CLAHE maps each tile's extremes to the ends of the range), not a border.
FIELD_MIN_AREA = 0.005
# The feather's width in model-input pixels: the edge itself, seen from inside the field,
# is the collimator's too.
FIELD_FEATHER_PX = 3.0
# Less field than this means the border detection failed (a uniform image): no mask.
FIELD_MIN_SHARE = 0.05


def exposed_field(
    pixels: np.ndarray, content_box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """float32 (H, W) in [0, 1]: 1 inside the radiograph's exposed field, 0 outside it.

    Outside: what lies beyond `content_box` (the letterbox padding, when known) and every
    flat black (<= FIELD_DARK_MAX) or saturated (>= FIELD_BRIGHT_MIN) region that reaches
    the image's edge (black borders, shutters, air, collimated areas). A dark or bright
    area enclosed by the field stays in it. The step to 0 is feathered inwards over
    FIELD_FEATHER_PX, so the field's own edge gets little weight either.
    """
    grey = np.asarray(pixels)
    if grey.ndim == 3:
        grey = grey[0]
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) image, got {grey.shape} {grey.dtype}")
    h, w = grey.shape
    outside = np.zeros((h, w), bool)
    if content_box is not None:
        left, top, box_w, box_h = content_box
        inside = np.zeros((h, w), bool)
        inside[max(0, top) : top + box_h, max(0, left) : left + box_w] = True
        outside |= ~inside
    min_area = FIELD_MIN_AREA * h * w
    for extreme in (grey <= FIELD_DARK_MAX, grey >= FIELD_BRIGHT_MIN):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(extreme.astype(np.uint8), 4)
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        border = [k for k in edge if k != 0 and stats[k, cv2.CC_STAT_AREA] >= min_area]
        if border:
            outside |= np.isin(labels, border)
    field = (~outside).astype(np.float32)
    if field.mean() < FIELD_MIN_SHARE:
        return np.ones((h, w), np.float32)
    # Feather inwards only: blurred * binary stays 0 outside and ramps up to 1 inside.
    return field * cv2.GaussianBlur(field, (0, 0), FIELD_FEATHER_PX)


_TARGET_LAYERS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def target_layer_name(backbone: nn.Module, input_size: tuple[int, int] = (64, 64)) -> str:
    """Name of the last top-level module with a spatial (B, C, h, w) output.

    That is the feature map the global pool reads (GradCAM's "last conv layer"): resnet
    `layer4`; efficientnet `bn2`, the BN + activation after `conv_head`, which is what gets
    pooled, rather than timm's `feature_info[-1]` (`blocks.6`, before the 1x1 head conv).
    Found by one small probe forward, so any timm CNN works; cached per backbone.
    """
    if backbone in _TARGET_LAYERS:
        return _TARGET_LAYERS[backbone]
    spatial: list[str] = []
    handles = [
        child.register_forward_hook(
            lambda _m, _i, out, name=name: (
                spatial.append(name) if isinstance(out, torch.Tensor) and out.ndim == 4 else None
            )
        )
        for name, child in backbone.named_children()
    ]
    param = next(backbone.parameters())
    try:
        with _eval_mode(backbone), torch.no_grad():
            backbone(torch.zeros(1, 3, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
    if not spatial:
        # Fall back to timm's own record of its last feature stage.
        info = getattr(backbone, "feature_info", None)
        if not info:
            raise ValueError(f"no spatial feature map found in {type(backbone).__name__}")
        spatial.append(info[-1]["module"])
    _TARGET_LAYERS[backbone] = spatial[-1]
    return spatial[-1]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() for the duration (no BN statistic updates, no dropout); restore each flag after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Gradients flow to the input, not into parameters: no .grad written, flags restored."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad  # BaseCAM calls model.zero_grad(), which would drop them


def _normalise(cam: np.ndarray) -> np.ndarray:
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(cam, dtype=np.float32)
    return ((cam - lo) / (hi - lo)).astype(np.float32)


def _as_batch(image_uint8: np.ndarray) -> torch.Tensor:
    image = np.asarray(image_uint8)
    if image.ndim == 2:
        image = image[None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"expected uint8 (1, H, W) or (H, W), got {image.shape} {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image))[None]


def explain(
    model: Ensemble,
    image_uint8: np.ndarray,
    target_class: int | None = None,
    content_box: tuple[int, int, int, int] | None = None,
    mask_field: bool = True,
) -> Explanation:
    """GradCAM++ of each branch for `target_class` (default: the fused prediction), each
    limited to the exposed field (`exposed_field`, unless mask_field is False; the image's
    `content_box` in the input marks the padding), fused with the ensemble's fusion
    weights and rescaled to [0, 1]."""
    x = _as_batch(image_uint8)
    num_classes = len(model.cfg.classes)
    if target_class is not None and not 0 <= target_class < num_classes:
        raise ValueError(f"target_class {target_class} outside 0..{num_classes - 1}")
    weights = dict(zip(model.branch_names, model.fusion_weights.float().tolist(), strict=True))
    pixels = x[0, 0].numpy()
    field = exposed_field(pixels, content_box) if mask_field else np.ones_like(pixels, np.float32)

    with _eval_mode(model), _frozen_parameters(model), torch.inference_mode(False):
        if target_class is None:
            with torch.no_grad():
                target_class = int(model(x).probabilities.argmax(dim=-1)[0])
        targets = [ClassifierOutputTarget(target_class)]
        branch_maps: dict[str, np.ndarray] = {}
        for name, backbone in model.branches.items():
            layer = backbone.get_submodule(target_layer_name(backbone))
            # Input gradients keep the graph alive although parameters are frozen.
            inputs = model.branch_input(name, x).requires_grad_(True)
            with GradCAMPlusPlus(model=backbone, target_layers=[layer]) as cam, torch.enable_grad():
                raw = cam(input_tensor=inputs, targets=targets)[0]
                branch_maps[name] = _normalise(raw * field)

    fused = sum(weights[name] * cam for name, cam in branch_maps.items())
    return Explanation(
        heatmap=_normalise(np.asarray(fused)),
        branch_heatmaps=branch_maps,
        target_class=target_class,
        fusion_weights=weights,
        field=field,
    )


def overlay_png(grey: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> bytes:
    """JET-coloured heat map blended over the greyscale image (alpha = heat map share), as PNG."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) image, got {grey.shape} {grey.dtype}")
    if heatmap.ndim != 2:
        raise ValueError(f"expected a (h, w) heat map, got {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = grey.shape
    heat = cv2.resize(heatmap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat_u8 = np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)
    blended = cv2.addWeighted(colour, alpha, cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), 1 - alpha, 0)
    ok, png = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def heatmap_rgba_png(heatmap: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    """The JET-coloured heat map alone as an RGBA PNG, its alpha rising with the heat, so a
    viewer can lay it over the image at any opacity. `size` is (width, height)."""
    if heatmap.ndim != 2:
        raise ValueError(f"expected a (h, w) heat map, got {heatmap.shape}")
    heat = heatmap.astype(np.float32)
    if size is not None:
        heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
    heat_u8 = np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)
    # Cold regions stay see-through; sqrt keeps mid-level heat visible.
    alpha = np.clip(np.sqrt(heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", np.dstack([bgr, alpha]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def grey_png(grey: np.ndarray) -> bytes:
    """A uint8 (H, W) image as a greyscale PNG (the model input the heat map belongs to)."""
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) image, got {grey.shape} {grey.dtype}")
    ok, png = cv2.imencode(".png", grey)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()
