"""GradCAM++ explanations: shape, range, fusion, and no side effects on the model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import timm
import torch

from orthovision.config import BackboneConfig, ModelConfig
from orthovision.model.backbones import Ensemble, build_ensemble
from orthovision.model.explain import (
    explain,
    exposed_field,
    overlay_png,
    target_layer_name,
)

SIZE = 96


@pytest.fixture(scope="module")
def model() -> Ensemble:
    torch.manual_seed(0)
    backbones = (
        BackboneConfig(name="eff", timm_name="test_efficientnet"),
        BackboneConfig(name="res", timm_name="test_resnet"),
    )
    return build_ensemble(ModelConfig(backbones=backbones)).eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A structured synthetic 'radiograph' (bright oblique band), so CAMs have something to see."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    band = np.exp(-(((xx - yy) / 12.0) ** 2)) * 180
    texture = 30 * np.sin(xx / 5.0) * np.cos(yy / 9.0)
    return np.clip(40 + band + texture, 0, 255).astype(np.uint8)


def hook_counts(module: torch.nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    ]


@pytest.mark.parametrize(
    ("timm_name", "layer"), [("test_resnet", "layer4"), ("test_efficientnet", "bn2")]
)
def test_target_layer_is_the_pooled_feature_map(timm_name, layer):
    backbone = timm.create_model(timm_name, num_classes=4)
    before = hook_counts(backbone)
    assert target_layer_name(backbone) == layer
    assert hook_counts(backbone) == before
    assert backbone.training  # the probe's eval() was undone


def test_explanation_maps_are_input_sized_normalised_and_informative(model, image):
    exp = explain(model, image)
    assert set(exp.branch_heatmaps) == {"eff", "res"}
    for heat in [exp.heatmap, *exp.branch_heatmaps.values()]:
        assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert exp.heatmap.max() == pytest.approx(1.0) and exp.heatmap.min() == pytest.approx(0.0)
    assert exp.heatmap.std() > 0.01  # not constant
    assert exp.fusion_weights == pytest.approx({"eff": 0.4, "res": 0.6})


def test_default_target_is_the_fused_prediction(model, image):
    with torch.no_grad():
        probs = model(torch.from_numpy(image)[None, None]).probabilities
    assert explain(model, image).target_class == int(probs.argmax())


def test_fused_map_is_fusion_weighted_sum_of_branch_maps(model, image):
    exp = explain(model, image)
    fused = 0.4 * exp.branch_heatmaps["eff"] + 0.6 * exp.branch_heatmaps["res"]
    fused = (fused - fused.min()) / (fused.max() - fused.min())
    np.testing.assert_allclose(exp.heatmap, fused, atol=1e-5)


@pytest.mark.parametrize("target_class", [0, 1, 2, 3])
def test_requested_class_is_explained(model, image, target_class):
    exp = explain(model, image[None], target_class=target_class)  # (1, H, W) input too
    assert exp.target_class == target_class
    assert exp.heatmap.shape == (SIZE, SIZE)


def test_maps_depend_on_the_requested_class(model, image):
    maps = [explain(model, image, target_class=k).heatmap for k in range(4)]
    assert any(not np.allclose(maps[0], m, atol=1e-3) for m in maps[1:])


@pytest.mark.parametrize(
    ("bad_image", "target_class"),
    [
        (np.zeros((3, 32, 32), np.uint8), None),
        (np.zeros((32, 32), np.float32), None),
        (np.zeros((32, 32), np.uint8), 4),
        (np.zeros((32, 32), np.uint8), -1),
    ],
)
def test_bad_arguments_are_refused(model, bad_image, target_class):
    with pytest.raises(ValueError):
        explain(model, bad_image, target_class=target_class)


def test_explaining_leaves_no_trace_on_the_model(image):
    torch.manual_seed(0)
    backbones = (
        BackboneConfig(name="eff", timm_name="test_efficientnet"),
        BackboneConfig(name="res", timm_name="test_resnet"),
    )
    model = build_ensemble(ModelConfig(backbones=backbones))
    model.train()  # a training replica: BN statistics must not move, flags must come back
    model.branches["res"].fc.weight.requires_grad_(False)  # a partly frozen model
    marker = torch.ones_like(model.fusion_params)
    model.fusion_params.grad = marker
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    hooks = hook_counts(model)

    explain(model, image)

    assert hook_counts(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.training for m in model.modules())
    assert model.fusion_params.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fusion_params")
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize(
    ("alpha", "grey_shape"), [(0.0, (120, 80)), (0.4, (64, 64)), (1.0, (50, 70))]
)
def test_overlay_png_decodes_at_the_grey_image_size(alpha, grey_shape):
    grey = np.random.default_rng(0).integers(0, 256, grey_shape, dtype=np.uint8)
    heat = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    png = overlay_png(grey, heat, alpha=alpha)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (*grey_shape, 3)
    if alpha == 0.0:  # pure image
        np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))
    if alpha == 1.0:  # pure JET map (BGR): hot = red at the bottom right, cold = blue top left
        assert decoded[-1, -1, 2] > 100 and decoded[-1, -1, 0] == 0
        assert decoded[0, 0, 0] > 100 and decoded[0, 0, 2] == 0


def test_overlay_png_refuses_colour_input():
    with pytest.raises(ValueError):
        overlay_png(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32))


# ---- attention outside the exposed field ------------------------------------------------
BAND = 16  # px of border on each side of a SIZE x SIZE input: 56% of its area


def framed(image: np.ndarray, value: int) -> np.ndarray:
    """`image` inside a flat border band of `value` (a black frame, a collimated area)."""
    out = image.copy()
    out[:BAND], out[-BAND:], out[:, :BAND], out[:, -BAND:] = value, value, value, value
    return out


def band_mask() -> np.ndarray:
    inner = np.zeros((SIZE, SIZE), bool)
    inner[BAND:-BAND, BAND:-BAND] = True
    return ~inner


@pytest.mark.parametrize("value", [0, 3, 255])
def test_field_excludes_a_flat_border_of_either_extreme(image, value):
    field = exposed_field(framed(image, value))
    assert (field[band_mask()] == 0).all()
    assert field[BAND + 8 : -BAND - 8, BAND + 8 : -BAND - 8].min() > 0.99  # feathered edge
    assert field.min() >= 0 and field.max() <= 1


def test_field_keeps_dark_and_bright_areas_the_anatomy_encloses(image):
    inner = image.copy()
    inner[30:50, 30:50] = 0  # dark, enclosed by the field: anatomy (or a lucency)
    inner[60:70, 0:40] = 255  # bright, touching the edge but textured around
    inner[60:70, 0:40:2] = 200
    field = exposed_field(inner)
    assert field[35:45, 35:45].min() > 0.9
    assert field[62:68, 4:36].min() > 0.5


def test_field_marks_the_letterbox_padding_whatever_its_value(image):
    field = exposed_field(image, content_box=(20, 0, 56, SIZE))  # pad value unknown
    assert (field[:, :20] == 0).all() and (field[:, 76:] == 0).all()
    assert field[:, 30:66].min() > 0.9


def test_a_uniform_image_keeps_its_map_unmasked():
    assert (exposed_field(np.zeros((SIZE, SIZE), np.uint8)) == 1).all()


@pytest.mark.parametrize("value", [0, 255])
def test_heat_map_mass_in_a_border_band_is_suppressed(model, image, value):
    """GradCAM++ of a framed image: the raw maps put weight on the band (its edges are
    the strongest in the image), the explained map almost none."""
    framed_image = framed(image, value)
    band = band_mask()
    raw = explain(model, framed_image, target_class=0, mask_field=False)
    exp = explain(model, framed_image, target_class=0)
    share = float((exp.heatmap * band).sum() / exp.heatmap.sum())
    raw_share = float((raw.heatmap * band).sum() / raw.heatmap.sum())
    assert share < 0.01 and raw_share > 0.3
    for heat in exp.branch_heatmaps.values():
        assert float((heat * band).sum() / heat.sum()) < 0.01
    assert exp.heatmap.max() == pytest.approx(1.0)  # rescaled within the field
