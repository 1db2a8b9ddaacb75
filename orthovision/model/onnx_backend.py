"""ONNX Runtime CPU backend for one backbone (ServeConfig.cpu_backend = "onnx").

The branch is exported from the loaded checkpoint itself (never a file from elsewhere) into a
cache keyed by the weights' sha256, the branch and the torch/ORT versions, then run by an
InferenceSession with its intra-op pool sized to the replica's CPUs. Normalisation stays in
torch (`to_model_input`) so both backends see exactly the same float input.

Accepted only because it agrees with fp32 torch (docs/PERFORMANCE.md: top-1 agreement and
maximum probability difference on the shared images).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_OPSET = 17


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("ORTHOVISION_ONNX_CACHE", "~/.cache/orthovision/onnx")).expanduser()


def _cache_key(weights_sha256: str, branch: str, image_size: int) -> str:
    import onnxruntime

    raw = f"{weights_sha256}:{branch}:{image_size}:{torch.__version__}:{onnxruntime.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def export_branch(model: nn.Module, path: Path, image_size: int) -> Path:
    """Export one backbone (float32, NCHW input, dynamic batch) to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.inference_mode(False), torch.no_grad():
            # The TorchScript exporter: no onnxscript needed, stable for timm CNNs.
            torch.onnx.export(
                model,
                (example,),
                tmp,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxBranch:
    """Callable float32 (B, 3, S, S) tensor -> logits (B, C) numpy, on ONNX Runtime CPU."""

    def __init__(
        self,
        model: nn.Module,
        *,
        weights_sha256: str,
        branch: str,
        image_size: int,
        threads: int,
        cache_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        cache = cache_dir or onnx_cache_dir()
        path = cache / f"{branch}-{_cache_key(weights_sha256, branch, image_size)}.onnx"
        if not path.is_file():
            export_branch(model, path, image_size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Replicas share cores with other replicas: spinning threads would steal them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.float().contiguous()  # ORT takes NCHW; channels_last is a torch-only layout
        return self.session.run(["logits"], {"input": x.numpy()})[0]
