"""ONNX Runtime backend: same logits as torch, cached export keyed by the weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from orthovision.model.onnx_backend import OnnxBranch


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
            expected = model(x).numpy()
        got = branch(x.contiguous(memory_format=torch.channels_last))
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


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
