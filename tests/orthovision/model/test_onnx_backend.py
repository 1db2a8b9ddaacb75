"""ONNX Runtime backend: same features and logits as torch, cached export keyed by the
weights, and the start-up guard that falls back to torch when the engines disagree."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from orthovision.model.onnx_backend import OnnxBranch, agreement, guard_batch, phantoms
from orthovision.safety.ood import branch_features


@pytest.mark.parametrize("timm_name", ["test_resnet", "test_efficientnet"])
def test_onnx_logits_match_torch_for_any_batch_size(tmp_path, timm_name):
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, num_classes=4).eval()
    branch = OnnxBranch(
        model, weights_sha256="a" * 64, branch="b", image_size=64, threads=1, cache_dir=tmp_path
    )
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.inference_mode():
            feats, logits = branch_features(model, x)
        got_feats, got_logits = branch(x.contiguous(memory_format=torch.channels_last))
        assert got_logits.shape == (batch, 4) and got_feats.shape == tuple(feats.shape)
        np.testing.assert_allclose(got_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got_feats, feats.numpy(), rtol=1e-4, atol=1e-4)


def test_export_is_cached_per_weights(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    first = OnnxBranch(
        model, weights_sha256="a" * 64, branch="b", image_size=64, threads=1, cache_dir=tmp_path
    )
    mtime = first.path.stat().st_mtime_ns
    again = OnnxBranch(
        model, weights_sha256="a" * 64, branch="b", image_size=64, threads=1, cache_dir=tmp_path
    )
    other = OnnxBranch(
        model, weights_sha256="b" * 64, branch="b", image_size=64, threads=1, cache_dir=tmp_path
    )
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert other.path != first.path
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".onnx", ".onnx"]  # no temp files


def test_agreement_reports_top1_and_probability_difference():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    assert agreement(logits, logits) == (True, 0.0)
    same_top1, diff = agreement(logits, logits + [[0.0, 0.1], [0.0, 0.0]])
    assert same_top1 and 0.01 < diff < 0.05
    assert agreement(logits, logits[:, ::-1])[0] is False


def test_guard_batch_is_the_checkpoints_own_else_phantoms(tmp_path):
    fallback = guard_batch(tmp_path, 32)
    assert fallback.shape == (6, 1, 32, 32) and fallback.dtype == np.uint8
    np.testing.assert_array_equal(fallback, phantoms(32))  # deterministic
    own = np.full((2, 1, 32, 32), 7, np.uint8)
    np.savez_compressed(tmp_path / "guard_batch.npz", pixels=own)
    np.testing.assert_array_equal(guard_batch(tmp_path, 32), own)
    assert guard_batch(tmp_path, 64).shape == (6, 1, 64, 64)  # wrong size: not used


@pytest.fixture
def tiny_backbone_config(tmp_path, monkeypatch):
    from support.checkpoints import save_tiny_checkpoint

    monkeypatch.setenv("ORTHOVISION_ONNX_CACHE", str(tmp_path / "onnx"))
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    return {
        "serve": {"checkpoint": str(ckpt), "device": "cpu", "cpu_backend": "onnx"},
    }


def test_backbone_serves_onnx_when_it_agrees_with_torch(tiny_backbone_config):
    from serve.backbone import Backbone

    replica = Backbone("resnet18", tiny_backbone_config)
    assert replica.backend == "onnx" and replica.model is None
    rows = replica._infer(phantoms(replica.size))
    assert rows.shape == (6, 5) and np.isfinite(rows[:, :4]).all()


def test_backbone_serves_torch_when_onnx_disagrees(tiny_backbone_config, monkeypatch, caplog):
    from serve.backbone import Backbone

    real_call = OnnxBranch.__call__

    def drifted(self, x):
        feats, logits = real_call(self, x)
        return feats, logits + np.linspace(0, 0.5, logits.shape[1], dtype=np.float32)

    monkeypatch.setattr(OnnxBranch, "__call__", drifted)
    with caplog.at_level("WARNING", logger="ray.serve"):
        replica = Backbone("resnet18", tiny_backbone_config)
    assert replica.backend == "torch" and replica.onnx is None and replica.model is not None
    assert "disagrees with torch for resnet18" in caplog.text
