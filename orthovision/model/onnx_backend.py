"""ONNX Runtime CPU backend for one backbone (ServeConfig.cpu_backend = "onnx", the default).

The branch is exported from the loaded checkpoint itself (never a file from elsewhere) into a
cache keyed by the weights' sha256, the branch and the torch/ORT versions, then run by an
InferenceSession with its intra-op pool sized to the replica's CPUs. The graph returns the
pooled features with the logits, so the OOD score is the same on both engines.
Normalisation stays in torch (`to_model_input`) so both backends see exactly the same input.

Trusted per replica, not once: `agrees_with_torch` runs both engines on the checkpoint's
guard batch at start and the replica serves torch when they differ (docs/PERFORMANCE.md has
the agreement on the shared images).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orthovision.safety.ood import branch_features

ONNX_OPSET = 17
GRAPH_FORMAT = "features+logits"  # in the cache key: a graph of an older layout is not reused
GUARD_FILE = "guard_batch.npz"  # uint8 (N, 1, S, S) model inputs shipped with a checkpoint
GUARD_MAX_PROB_DIFF = 1e-3


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("ORTHOVISION_ONNX_CACHE", "~/.cache/orthovision/onnx")).expanduser()


def _cache_key(weights_sha256: str, branch: str, image_size: int) -> str:
    import onnxruntime

    raw = (
        f"{GRAPH_FORMAT}:{weights_sha256}:{branch}:{image_size}:"
        f"{torch.__version__}:{onnxruntime.__version__}"
    )
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class _FeaturesAndLogits(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return branch_features(self.branch, x)


def export_branch(model: nn.Module, path: Path, image_size: int) -> Path:
    """Export one backbone (float32, NCHW input, dynamic batch; outputs the pooled features
    and the logits) to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # eval() on the wrapper too: the exporter restores the mode of the module it was given,
    # recursively, which would leave the branch in training mode.
    model = _FeaturesAndLogits(model.float()).eval()
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
                output_names=["features", "logits"],
                dynamic_axes={
                    "input": {0: "batch"},
                    "features": {0: "batch"},
                    "logits": {0: "batch"},
                },
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxBranch:
    """Callable float32 (B, 3, S, S) tensor -> (features (B, D), logits (B, C)) numpy, on
    ONNX Runtime CPU."""

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

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = x.float().contiguous()  # ORT takes NCHW; channels_last is a torch-only layout
        features, logits = self.session.run(["features", "logits"], {"input": x.numpy()})
        return features, logits


def guard_batch(checkpoint: Path, image_size: int) -> np.ndarray:
    """The uint8 model inputs both engines are compared on: the checkpoint's own
    (`guard_batch.npz`, written by `orthovision guard-batch` from its validation images),
    else fixed synthetic phantoms (the public repository ships no dataset pixels)."""
    path = Path(checkpoint) / GUARD_FILE
    if path.is_file():
        with np.load(path) as data:
            batch = data["pixels"]
        if batch.dtype == np.uint8 and batch.shape[1:] == (1, image_size, image_size):
            return batch
    return phantoms(image_size)


def phantoms(image_size: int, n: int = 6) -> np.ndarray:
    """Deterministic radiograph-like inputs: dark background, a bright tilted shaft with a
    denser cortex, a soft-tissue gradient and noise; (n, 1, S, S) uint8."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size - 0.5
    out = []
    for k in range(n):
        angle = np.pi * k / n
        across = np.abs(xx * np.cos(angle) + yy * np.sin(angle))
        width = 0.08 + 0.03 * (k % 3)
        bone = np.where(across < width, 150 + 80 * (across > 0.6 * width), 0.0)
        tissue = 60 * np.exp(-((across / 0.3) ** 2))
        image = 20 + tissue + bone + rng.normal(0, 8, xx.shape)
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(out)[:, None]


def agreement(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> tuple[bool, float]:
    """(same top-1 for every image, maximum absolute probability difference)."""
    from orthovision.model.probabilities import softmax

    same_top1 = bool((torch_logits.argmax(1) == onnx_logits.argmax(1)).all())
    diff = float(np.abs(softmax(torch_logits) - softmax(onnx_logits)).max())
    return same_top1, diff
