"""Export one branch of a checkpoint to ONNX, with torch's reference outputs (torch side).

`python -m orthovision.model.onnx_export --checkpoint DIR --branch NAME` is what an ONNX
replica runs as a child process when the cache misses (model/onnx_backend.py): the replica
itself never imports torch. The graph takes float32 NCHW input with a dynamic batch and
returns the pooled features and the logits; the reference holds the guard batch and
torch's fp32 features and logits for it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orthovision.model.backbones import branch_features
from orthovision.model.onnx_backend import OnnxBranch, graph_paths, guard_batch
from orthovision.model.tensors import to_model_input

ONNX_OPSET = 17


class _FeaturesAndLogits(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return branch_features(self.branch, x)


def export_branch(model: nn.Module, path: Path, image_size: int) -> Path:
    """Export one backbone to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # eval() on the wrapper too: the exporter restores the mode of the module it was given,
    # recursively, which would leave the branch in training mode.
    model = _FeaturesAndLogits(model.float()).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with _staged(path, ".onnx") as tmp, torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: no onnxscript needed, stable for timm CNNs.
        torch.onnx.export(
            model,
            (example,),
            tmp,
            input_names=["input"],
            output_names=["features", "logits"],
            dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def write_reference(model: nn.Module, mean, std, pixels: np.ndarray, path: Path) -> Path:
    """The guard batch and torch's fp32 features and logits for it, atomically."""
    with torch.inference_mode():
        feats, logits = branch_features(
            model.float().eval(), to_model_input(torch.from_numpy(pixels), mean, std)
        )
    with _staged(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, pixels=pixels, features=feats.numpy(), logits=logits.numpy())
    return path


@contextmanager
def _staged(path: Path, suffix: str) -> Iterator[str]:
    """A temporary file beside `path`, moved onto it when the block succeeds."""
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def exported_branch(
    model: nn.Module,
    *,
    weights_sha256: str,
    branch: str,
    image_size: int,
    threads: int,
    cache_dir: Path | None = None,
    graph: Path | None = None,
) -> OnnxBranch:
    """An ONNX Runtime session of `model` (exported into the cache if missing), or of
    `graph` when given (an int8 graph): for benchmarks and tests in a torch process."""
    if graph is None:
        graph, _ = graph_paths(weights_sha256, branch, image_size, cache_dir)
        if not graph.is_file():
            export_branch(model, graph, image_size)
    return OnnxBranch(graph, threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--branch", required=True)
    args = p.parse_args()

    from orthovision.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    size = ckpt.config.preprocess.image_size
    model = ckpt.model.branches[args.branch]
    mean, std = ckpt.model._norm_values[args.branch]
    graph, reference = graph_paths(ckpt.card["weights_sha256"], args.branch, size)
    export_branch(model, graph, size)
    write_reference(model, mean, std, guard_batch(args.checkpoint, size), reference)


if __name__ == "__main__":
    main()
