"""Backbone deployment: one class, bound once per backbone, with dynamic batching."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch
from ray import serve

from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.device import enable_cudnn_autotune, resolve_device
from orthovision.model.pipeline import PreparedBatch
from orthovision.model.tensors import to_model_input
from orthovision.safety.ood import branch_features, load_for_checkpoint
from serve.metrics import metrics
from serve.runtime import (
    checkpoint_path,
    config_from,
    forward_thread,
    limit_cpu_threads,
)

log = logging.getLogger("ray.serve")


class Backbone:
    def __init__(self, branch: str, config: dict) -> None:
        cfg = config_from(config)
        self.branch = branch
        self.device = resolve_device(cfg.serve.device)
        threads = 1
        niceness = 0
        if self.device.type == "cpu":
            threads = limit_cpu_threads(cfg.serve.backbone.num_cpus)
            torch.set_num_threads(threads)
            niceness = cfg.serve.cpu_model_niceness
        else:
            enable_cudnn_autotune()
        ckpt = load_checkpoint(checkpoint_path(cfg), expected_preprocess=cfg.preprocess)
        norm = ckpt.model.norms[branch]
        self.mean, self.std = norm.mean.tolist(), norm.std.tolist()
        self.size = cfg.preprocess.image_size
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.channels_last = True  # NHWC: oneDNN and cuDNN run convolutions fastest in it
        self.model = ckpt.model.branches[branch].to(self.device, self.dtype)
        self.model = self.model.to(memory_format=torch.channels_last).eval()
        # This branch's part of the OOD detector (the Fusion adds the branches' scores).
        detector = load_for_checkpoint(checkpoint_path(cfg), ckpt.card, [branch])
        self.ood = detector.branches[branch] if detector is not None else None
        self.onnx = None
        if self.device.type == "cpu" and cfg.serve.cpu_backend == "onnx":
            self.onnx = self._onnx_if_it_agrees(ckpt, cfg, threads)
        if self.onnx is not None:
            self.model, self.channels_last = None, False  # ORT takes NCHW
        self.backend = "torch" if self.onnx is None else "onnx"
        del ckpt  # the other branch and the fusion weights are not this replica's
        self.forwards = forward_thread(niceness, f"forward-{branch}")
        self.reconfigure(cfg.serve.batch.model_dump())
        self.forwards.submit(self._warm_up, cfg.serve.batch.max_batch_size).result()
        self.ready_since = time.time()

    def _onnx_if_it_agrees(self, ckpt, cfg, threads: int):
        """The ONNX Runtime engine, if on the checkpoint's guard batch it gives the same top-1
        and probabilities within GUARD_MAX_PROB_DIFF of torch's; else None (serve torch)."""
        from orthovision.model.onnx_backend import (
            GUARD_MAX_PROB_DIFF,
            OnnxBranch,
            agreement,
            guard_batch,
        )

        try:
            onnx = OnnxBranch(
                ckpt.model.branches[self.branch],
                weights_sha256=ckpt.card["weights_sha256"],
                branch=self.branch,
                image_size=self.size,
                threads=threads,
            )
            batch = guard_batch(checkpoint_path(cfg), self.size)
            torch_rows = self._infer(batch)
            self.onnx = onnx
            onnx_rows = self._infer(batch)
        except Exception as exc:  # an export or runtime fault: torch still serves
            log.warning("ONNX Runtime unavailable for %s (%s): serving torch", self.branch, exc)
            return None
        finally:
            self.onnx = None
        same_top1, diff = agreement(torch_rows[:, :-1], onnx_rows[:, :-1])
        scores_agree = np.allclose(torch_rows[:, -1], onnx_rows[:, -1], rtol=1e-3, equal_nan=True)
        if not (same_top1 and diff <= GUARD_MAX_PROB_DIFF and scores_agree):
            log.warning(
                "ONNX Runtime disagrees with torch for %s (top-1 same: %s, max probability "
                "difference %.2g, OOD scores agree: %s): serving torch",
                self.branch,
                same_top1,
                diff,
                scores_agree,
            )
            return None
        return onnx

    def reconfigure(self, user_config: dict) -> None:
        """Batch knobs from user_config, applied without a restart."""
        self.max_batch_size = int(user_config["max_batch_size"])  # images per forward
        self.__call__.set_max_batch_size(self.max_batch_size)
        self.__call__.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def _warm_up(self, batch_size: int) -> None:
        # First calls pay for allocator growth and cudnn autotuning: do it before ready.
        # cudnn.benchmark tunes per input shape, so on a GPU every batch size is visited.
        sizes = range(1, batch_size + 1) if self.device.type == "cuda" else {1, batch_size}
        for n in sizes:
            self._infer(np.zeros((n, 1, self.size, self.size), np.uint8))

    @torch.inference_mode()
    def _infer(self, batch_uint8: np.ndarray) -> np.ndarray:
        """(N, C + 1): the C logits, then this branch's OOD score (NaN without a detector)."""
        x = to_model_input(
            torch.from_numpy(batch_uint8),
            self.mean,
            self.std,
            device=self.device,
            dtype=self.dtype,
            channels_last=self.channels_last,
        )
        if self.onnx is not None:
            feats, logits = self.onnx(x)
        else:
            feats, logits = branch_features(self.model, x)
            feats, logits = feats.float().cpu().numpy(), logits.float().cpu().numpy()
        score = self.ood.score(feats) if self.ood is not None else np.full(len(feats), np.nan)
        return np.concatenate([logits, score[:, None].astype(np.float32)], 1)

    async def info(self) -> dict:
        return {
            "branch": self.branch,
            "device": str(self.device),
            "backend": self.backend,
            "loaded": True,
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, batches: list[PreparedBatch]) -> list[np.ndarray]:
        """Rows (V, C + 1) for each call's valid images, in order: logits, then the OOD
        score (see _infer). Calls that arrive
        together (from every ingress replica) share forwards of up to max_batch_size
        images; a call's rejected items were left out by the Preprocessor."""
        pixels = np.concatenate([b.pixels for b in batches])
        if not len(pixels):
            return [np.zeros((0, 0), np.float32) for _ in batches]
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        logits = await loop.run_in_executor(self.forwards, self._infer_chunked, pixels)
        m = metrics()
        m.batch_size.observe(len(pixels), tags={"backbone": self.branch})
        m.stage_latency.observe(
            time.perf_counter() - started, tags={"stage": f"backbone_{self.branch}"}
        )
        bounds = np.cumsum([len(b.pixels) for b in batches])[:-1]
        return np.split(logits, bounds)

    def _infer_chunked(self, pixels: np.ndarray) -> np.ndarray:
        size = self.max_batch_size
        return np.concatenate(
            [self._infer(pixels[i : i + size]) for i in range(0, len(pixels), size)]
        )


# Bound outside the class body so Ray pickles the class by reference (importable),
# not by value: torch objects in a by-value closure are not picklable.
BackboneDeployment = serve.deployment(Backbone)
