"""Backbone deployment: one class, bound once per backbone, with dynamic batching."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from orthovision.model.engine import OnnxEngine
from orthovision.model.pipeline import PreparedBatch
from serve.busy import BusyMeter
from serve.metrics import metrics
from serve.runtime import (
    checkpoint_path,
    config_from,
    forward_thread,
    limit_cpu_threads,
    may_use_cuda,
    replica_setup,
)

log = logging.getLogger("ray.serve")


class Backbone:
    def __init__(self, branch: str, config: dict) -> None:
        replica_setup()
        cfg = config_from(config)
        self.branch = branch
        cpu = not may_use_cuda(cfg.serve.device)
        threads, niceness = 1, 0
        if cpu:
            threads = limit_cpu_threads(cfg.serve.backbone.num_cpus)
            niceness = cfg.serve.cpu_model_niceness
        self.engine = None
        if cpu and cfg.serve.cpu_backend != "torch":
            self.engine = OnnxEngine.start(
                checkpoint_path(cfg), branch, cfg.serve.cpu_backend, threads, cfg.preprocess
            )
        if self.engine is None:
            self.engine = torch_engine(cfg, branch, threads)
        self.size = cfg.preprocess.image_size
        self.forwards = forward_thread(niceness, f"forward-{branch}")
        self.reconfigure(cfg.serve.batch.model_dump())
        self.forwards.submit(self._warm_up, cfg.serve.batch.max_batch_size).result()
        self.ready_since = time.time()
        self.busy = BusyMeter()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling stat: how busy this replica's forwards were."""
        return self.busy.stats()

    def reconfigure(self, user_config: dict) -> None:
        """Batch knobs from user_config, applied without a restart."""
        self.max_batch_size = int(user_config["max_batch_size"])  # images per forward
        self.__call__.set_max_batch_size(self.max_batch_size)
        self.__call__.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def _warm_up(self, batch_size: int) -> None:
        # First calls pay for allocator growth and cudnn autotuning: do it before ready.
        # cudnn.benchmark tunes per input shape, so on a GPU every batch size is visited.
        gpu = str(self.engine.device).startswith("cuda")
        for n in range(1, batch_size + 1) if gpu else {1, batch_size}:
            self.engine(np.zeros((n, 1, self.size, self.size), np.uint8))

    async def info(self) -> dict:
        return {
            "branch": self.branch,
            "device": str(self.engine.device),
            "backend": self.engine.backend,
            "loaded": True,
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, batches: list[PreparedBatch]) -> list[np.ndarray]:
        """Rows (V, C + 1) for each call's valid images, in order: logits, then the OOD
        score (BranchEngine). Calls that arrive
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
        with self.busy.working():
            return np.concatenate(
                [self.engine(pixels[i : i + size]) for i in range(0, len(pixels), size)]
            )


def torch_engine(cfg, branch: str, threads: int):
    """The torch engine, imported only here: a replica serving ONNX, and the driver that
    builds the application, never load torch (~0.7 GiB per process)."""
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.model.device import resolve_device
    from orthovision.model.torch_engine import TorchEngine

    ckpt = load_checkpoint(checkpoint_path(cfg), expected_preprocess=cfg.preprocess)
    return TorchEngine(ckpt, branch, resolve_device(cfg.serve.device), threads)


# Bound outside the class body so Ray pickles the class by reference (importable), not by
# value.
BackboneDeployment = serve.deployment(Backbone)
