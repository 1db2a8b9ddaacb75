"""ONNX Runtime engine: same features and logits as torch, cached export keyed by the
weights, torch's reference outputs, and the start-up check that falls back to torch."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from orthovision.model.backbones import branch_features
from orthovision.model.onnx_backend import (
    OnnxBranch,
    agreement,
    graph_paths,
    guard_batch,
    model_input,
    phantoms,
)
from orthovision.model.onnx_export import exported_branch
from orthovision.model.tensors import to_model_input


@pytest.mark.parametrize("timm_name", ["test_resnet", "test_efficientnet"])
def test_onnx_matches_torch_for_any_batch_size(tmp_path, timm_name):
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, num_classes=4).eval()
    branch = exported_branch(
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
    assert not model.training  # the export leaves the branch as it found it


def test_export_is_cached_per_weights(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    common = dict(branch="b", image_size=64, threads=1, cache_dir=tmp_path)
    first = exported_branch(model, weights_sha256="a" * 64, **common)
    mtime = first.path.stat().st_mtime_ns
    again = exported_branch(model, weights_sha256="a" * 64, **common)
    other = exported_branch(model, weights_sha256="b" * 64, **common)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert other.path != first.path
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".onnx", ".onnx"]  # no temp files


def test_numpy_model_input_is_torchs():
    pixels = phantoms(32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = to_model_input(torch.from_numpy(pixels), mean, std).numpy()
    np.testing.assert_allclose(model_input(pixels, mean, std), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        model_input(pixels[:, 0], mean, std)


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
def tiny_checkpoint(tmp_path, monkeypatch):
    from support.checkpoints import save_tiny_checkpoint

    monkeypatch.setenv("ORTHOVISION_ONNX_CACHE", str(tmp_path / "onnx"))
    return save_tiny_checkpoint(tmp_path / "ckpt")


def start(checkpoint, backend="onnx"):
    from orthovision.config import PreprocessConfig
    from orthovision.model.engine import OnnxEngine

    return OnnxEngine.start(checkpoint, "resnet18", backend, 1, PreprocessConfig())


def test_engine_serves_onnx_with_torchs_rows(tiny_checkpoint):
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.model.torch_engine import TorchEngine

    engine = start(tiny_checkpoint)
    assert engine is not None and engine.backend == "onnx"
    reference = TorchEngine(load_checkpoint(tiny_checkpoint), "resnet18", torch.device("cpu"), 1)
    pixels = phantoms(224)
    np.testing.assert_allclose(engine(pixels), reference(pixels), rtol=1e-3, atol=1e-4)
    # The export ran in a child process and left the graph and torch's reference.
    from orthovision.model.card import read_card

    graph, ref = graph_paths(read_card(tiny_checkpoint)["weights_sha256"], "resnet18", 224)
    assert graph.is_file() and ref.is_file()


def test_engine_refuses_a_graph_that_disagrees_with_torch(tiny_checkpoint, monkeypatch, caplog):
    real_call = OnnxBranch.__call__

    def drifted(self, x):
        feats, logits = real_call(self, x)
        return feats, logits + np.linspace(0, 0.5, logits.shape[1], dtype=np.float32)

    monkeypatch.setattr(OnnxBranch, "__call__", drifted)
    with caplog.at_level("WARNING", logger="ray.serve"):
        assert start(tiny_checkpoint) is None
    assert "disagrees with torch for resnet18" in caplog.text


def test_int8_without_graphs_of_these_weights_serves_fp32_onnx(tiny_checkpoint, caplog):
    with caplog.at_level("INFO", logger="ray.serve"):
        engine = start(tiny_checkpoint, "onnx-int8")
    assert engine.backend == "onnx" and "no int8 graph" in caplog.text


def test_engine_module_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, orthovision.model.engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
