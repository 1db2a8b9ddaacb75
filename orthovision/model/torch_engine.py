"""The torch engine of one branch (model/engine.py): GPUs, `cpu_backend: torch`, and the
fallback when an ONNX graph fails its start-up check."""

from __future__ import annotations

import numpy as np
import torch

from orthovision.model.backbones import branch_features
from orthovision.model.checkpoint import Checkpoint
from orthovision.model.device import enable_cudnn_autotune
from orthovision.model.engine import rows
from orthovision.model.tensors import to_model_input
from orthovision.safety.ood import load_for_checkpoint


class TorchEngine:
    backend = "torch"

    def __init__(self, ckpt: Checkpoint, branch: str, device: torch.device, threads: int) -> None:
        self.device = device
        if device.type == "cpu":
            torch.set_num_threads(threads)
        else:
            enable_cudnn_autotune()
        norm = ckpt.model.norms[branch]
        self.mean, self.std = norm.mean.tolist(), norm.std.tolist()
        self.dtype = torch.float16 if device.type == "cuda" else torch.float32
        # NHWC: the layout oneDNN and cuDNN run convolutions fastest in.
        model = ckpt.model.branches[branch].to(device, self.dtype)
        self.model = model.to(memory_format=torch.channels_last).eval()
        detector = load_for_checkpoint(ckpt.path, ckpt.card, [branch])
        self.ood = detector.branches[branch] if detector is not None else None

    @torch.inference_mode()
    def __call__(self, batch_uint8: np.ndarray) -> np.ndarray:
        x = to_model_input(
            torch.from_numpy(batch_uint8),
            self.mean,
            self.std,
            device=self.device,
            dtype=self.dtype,
            channels_last=True,
        )
        feats, logits = branch_features(self.model, x)
        return rows(logits.float().cpu().numpy(), feats.float().cpu().numpy(), self.ood)
