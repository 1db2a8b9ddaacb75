"""ONNX Runtime CPU engine for one backbone (ServeConfig.cpu_backend = "onnx", the default).

Torch-free: a replica serving ONNX never imports torch (~0.7 GiB per process). The graph is
exported from the checkpoint itself (never a file from elsewhere) by `model/onnx_export.py`
in a short-lived child process, into a cache keyed by the weights' sha256, the branch and
the torch/ORT versions; beside it the export writes a **reference**: a guard batch of uint8
model inputs (the checkpoint's `guard_batch.npz`, else fixed phantoms) and torch's fp32
features and logits for it. At start the replica runs the graph on that batch and serves it
only if the top-1 is torch's and the probabilities are within GUARD_MAX_PROB_DIFF (features
within 1e-3, so the OOD score is torch's too); otherwise it serves torch (model/engine.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from orthovision.model.probabilities import softmax

log = logging.getLogger("ray.serve")

GRAPH_FORMAT = "features+logits"  # in the cache key: a graph of an older layout is not reused
GUARD_FILE = "guard_batch.npz"  # uint8 (N, 1, S, S) model inputs shipped with a checkpoint
GUARD_MAX_PROB_DIFF = 1e-3
# int8 graphs are accepted offline (bench/int8.py); at start they must still give torch's
# top-1 on the guard batch, with probabilities this close.
GUARD_MAX_PROB_DIFF_INT8 = 0.05
EXPORT_TIMEOUT_S = 300


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("ORTHOVISION_ONNX_CACHE", "~/.cache/orthovision/onnx")).expanduser()


def graph_paths(
    weights_sha256: str, branch: str, image_size: int, cache_dir: Path | None = None
) -> tuple[Path, Path]:
    """(graph, reference) of a branch in the export cache."""
    raw = (
        f"{GRAPH_FORMAT}:{weights_sha256}:{branch}:{image_size}:"
        f"{metadata.version('torch')}:{metadata.version('onnxruntime')}"
    )
    stem = f"{branch}-{hashlib.sha256(raw.encode()).hexdigest()[:24]}"
    folder = cache_dir or onnx_cache_dir()
    return folder / f"{stem}.onnx", folder / f"{stem}.reference.npz"


def ensure_exported(
    checkpoint: Path, branch: str, weights_sha256: str, image_size: int
) -> tuple[Path, Path]:
    """The cached graph and reference, exported first (in a child process) if missing."""
    graph, reference = graph_paths(weights_sha256, branch, image_size)
    if not (graph.is_file() and reference.is_file()):
        cmd = [sys.executable, "-m", "orthovision.model.onnx_export"]
        cmd += ["--checkpoint", str(checkpoint), "--branch", branch]
        subprocess.run(cmd, check=True, timeout=EXPORT_TIMEOUT_S, capture_output=True)
    return graph, reference


def model_input(batch_uint8: np.ndarray, mean, std) -> np.ndarray:
    """(B, 1, H, W) uint8 -> (B, 3, H, W) normalised float32: `tensors.to_model_input` in
    numpy (the same arithmetic, in float32)."""
    if batch_uint8.dtype != np.uint8 or batch_uint8.ndim != 4 or batch_uint8.shape[1] != 1:
        raise ValueError(
            f"expected uint8 (B, 1, H, W), got {batch_uint8.shape} {batch_uint8.dtype}"
        )
    x = batch_uint8.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((np.repeat(x, 3, axis=1) - mean) / std)


class OnnxBranch:
    """Callable float32 (B, 3, S, S) array (or CPU tensor) -> (features (B, D), logits
    (B, C)) numpy, on ONNX Runtime CPU."""

    def __init__(self, graph: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Replicas share cores with other replicas: spinning threads would steal them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.path = Path(graph)

    def __call__(self, x) -> tuple[np.ndarray, np.ndarray]:
        # NCHW float32 (a channels_last torch tensor becomes a contiguous copy here).
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        features, logits = self.session.run(["features", "logits"], {"input": x})
        return features, logits


def check_against_reference(
    branch: OnnxBranch, reference: Path, mean, std, max_prob_diff: float, features: bool
) -> tuple[bool, str]:
    """(passed, what was measured) for the graph on the reference's guard batch."""
    with np.load(reference) as ref:
        pixels, want_feats, want_logits = ref["pixels"], ref["features"], ref["logits"]
    feats, logits = branch(model_input(pixels, mean, std))
    same_top1, diff = agreement(want_logits, logits)
    feats_close = bool(np.allclose(feats, want_feats, rtol=1e-3, atol=1e-4))
    passed = same_top1 and diff <= max_prob_diff and (feats_close or not features)
    summary = (
        f"top-1 same: {same_top1}, max probability difference {diff:.2g}, "
        f"features within 1e-3: {feats_close}"
    )
    return passed, summary


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


def agreement(reference_logits: np.ndarray, logits: np.ndarray) -> tuple[bool, float]:
    """(same top-1 for every image, maximum absolute probability difference)."""
    same_top1 = bool((reference_logits.argmax(1) == logits.argmax(1)).all())
    diff = float(np.abs(softmax(reference_logits) - softmax(logits)).max())
    return same_top1, diff
